"""Search cursors: where a page of GET /decisions ended, signed so a client can neither forge nor edit one.

A cursor is `<payload>.<tag>`, both base64url without padding: the payload is
JSON holding the whole search (window, filters) and the last row's position,
the tag its HMAC-SHA256 under a secret every replica reads from PostgreSQL at
start-up (`service_secrets`), so a cursor from one replica works on any other.
A cursor reveals the search it continues (nothing the client did not send) and
the time and id of the last decision it was shown; it holds no applicant data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

import msgspec

from service.errors import InvalidParameter

VERSION = 1


class Position(msgspec.Struct, frozen=True, array_like=True):
    """The searched window and filters, and where the last page ended (None before the first)."""

    v: int
    since: str
    until: str
    decision: str | None
    reference: str | None
    after_created_at: str | None
    after_id: str | None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Position)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _tag(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def sign(key: bytes, position: Position) -> str:
    payload = _b64(_encoder.encode(position))
    return f"{payload}.{_tag(key, payload)}"


def open_cursor(key: bytes, cursor: str) -> Position:
    """The position a cursor holds; 400 for anything this service did not sign, or signed for another version."""
    payload, dot, tag = cursor.partition(".")
    if not dot or not payload or not hmac.compare_digest(tag.encode(), _tag(key, payload).encode()):
        raise InvalidParameter("cursor is not one this service issued; pass the `next` of the previous page unchanged.")
    try:
        position = _decoder.decode(_unb64(payload))
    except (binascii.Error, ValueError, msgspec.DecodeError):  # signed by us, so only an older format
        raise InvalidParameter("cursor is from an older version of the service; start the search again.") from None
    if position.v != VERSION:
        raise InvalidParameter("cursor is from another version of the service; start the search again.")
    return position
