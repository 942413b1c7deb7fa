"""Reading a JSON request body within its limits, decoding it with a msgspec type, answering JSON.

Every handler that takes a body goes through here, so each error (wrong media
type, too large, empty, not JSON, not valid, a key twice in one object) is the
same problem document on every endpoint.

Duplicate keys: msgspec keeps the last of `"age": 22, …, "age": 99`, while a
gateway that reads the first would see another applicant than the one we score
and record, so a body with a key twice in one object is a 422 naming the key.
msgspec cannot report duplicates, and a second parse of every body that can
(the json module with an object_pairs_hook: ~6 µs a request, ~6 ms a 1,000-item
batch) would cost ~4 % of a POST and ~20 % of a batch. So a cheap exact test
comes first: in JSON every `:` outside a string separates one object member, so
a body holds no duplicate when its count of `:` bytes equals the number of
members the decoded value accounts for (~0.5 µs). Only a body where the two
differ (a `:` inside a string, such as a reference `APP:1`, an explicit
`"reference": null`, or a duplicate) takes the second parse.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import msgspec
import msgspec.inspect
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from service.errors import (
    BadRequest,
    ClientGone,
    DuplicateKey,
    PayloadTooLarge,
    UnsupportedMediaType,
    from_validation_error,
    quoted,
)
from service.schemas import ProblemError

JSON = "application/json"


async def read_json_body(request: Request, limit: int) -> bytes:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON and not (media_type.startswith("application/") and media_type.endswith("+json")):
        shown = media_type or "none"
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {shown}.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The body is {declared} bytes; this endpoint accepts at most {limit}.")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body carries no Content-Length to check up front
                raise PayloadTooLarge(f"The body exceeds {limit} bytes, the most this endpoint accepts.")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone("The client disconnected before sending the whole body.") from None
    body = b"".join(chunks)
    if not body.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    return body


def decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise from_validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}.") from None
    except UnicodeDecodeError:  # msgspec checks UTF-8 lazily, inside strings
        raise BadRequest("The request body is not valid UTF-8.") from None
    if body.count(b":") != _members(value):
        json.loads(body, object_pairs_hook=_refuse_duplicates)
    return value


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise DuplicateKey(
            f"The key {quoted(twice)} appears more than once in one object; send each key once.",
            [ProblemError("$", f"Duplicate key {quoted(twice)}")],
        )
    return found


def _members(value: Any) -> int:
    """How many object members the JSON that decoded to `value` held, when it held each key once."""
    if not isinstance(value, msgspec.Struct):
        return 0
    required, optional, nested = _shape(type(value))
    count: int = required
    for name, default in optional:
        if getattr(value, name) != default:
            count += 1
    for name in nested:
        inner = getattr(value, name)
        if isinstance(inner, list):
            for item in inner:
                count += _members(item)
        else:
            count += _members(inner)
    return count


@functools.cache
def _shape(cls: type[msgspec.Struct]) -> tuple[int, tuple[tuple[str, Any], ...], tuple[str, ...]]:
    """A Struct's required fields, its optional ones with their defaults, and those that hold Structs."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    required = sum(f.required for f in info.fields)
    optional = tuple(
        (f.name, f.default if f.default_factory is msgspec.NODEFAULT else f.default_factory())
        for f in info.fields
        if not f.required
    )
    nested = tuple(f.name for f in info.fields if _holds_structs(f.type))
    return required, optional, nested


def _holds_structs(kind: msgspec.inspect.Type) -> bool:
    if isinstance(kind, msgspec.inspect.StructType):
        return True
    if isinstance(kind, msgspec.inspect.ListType):
        return _holds_structs(kind.item_type)
    if isinstance(kind, msgspec.inspect.UnionType):
        return any(_holds_structs(t) for t in kind.types)
    return False


def json_response(payload: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(payload, status_code=status, headers=headers, media_type=JSON)
