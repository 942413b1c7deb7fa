"""Reading a JSON request body within its limits, decoding it with a msgspec type, answering JSON.

Every handler that takes a body goes through here, so each error (wrong media
type, too large, empty, not JSON, not valid) is the same problem document on
every endpoint.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from service.errors import BadRequest, ClientGone, PayloadTooLarge, UnsupportedMediaType, from_validation_error

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
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise from_validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}.") from None
    except UnicodeDecodeError:  # msgspec checks UTF-8 lazily, inside strings
        raise BadRequest("The request body is not valid UTF-8.") from None


def json_response(payload: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(payload, status_code=status, headers=headers, media_type=JSON)
