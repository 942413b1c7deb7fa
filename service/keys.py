"""API keys: which key a request carries, compared in constant time, known by its id.

A key is `id:secret`; the id names it in logs and records, the secret never
leaves this module's comparisons. Each ring holds the keys of one role: the
API (score, read, search, outcomes), audit (read, search and the applicant's
inputs; never a write), admin (/admin/*, erasure). A known key used outside its
role is a 403; an unknown one a 401 (or nothing at all while the API is open).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from starlette.requests import Request

from service import logs
from service.errors import Forbidden, Unauthorized


@dataclass(frozen=True)
class Key:
    id: str
    # SHA-256 of the secret: digests of equal length compare in constant time, whatever the secret's length.
    digest: bytes

    def __repr__(self) -> str:  # never the secret, whoever prints it
        return f"Key(id={self.id!r})"


class KeyRing:
    def __init__(self, keys: tuple[tuple[str, str], ...]) -> None:
        self.keys = tuple(Key(key_id, hashlib.sha256(secret.encode()).digest()) for key_id, secret in keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def match(self, presented: bytes) -> Key | None:
        # Compare against every key, without short-circuiting (secrets are unique, so at most one matches).
        digest = hashlib.sha256(presented).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def bearer_token(request: Request) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def _known(key: Key | None) -> Key | None:
    # Logs, metrics and records name the key that asked: its id, never its secret.
    if key is not None:
        logs.key_id.set(key.id)
    return key


def authorize(request: Request, *, read_only: bool = False) -> Key | None:
    """The key of an API call: an API key, or for a read (`read_only`) an audit key too; 401 for anything else.

    With API_KEYS unset the API is open: no key is needed, and a known one is still recognised.
    """
    state = request.app.state
    token = bearer_token(request)
    key = None
    if token is not None:
        key = state.api_keys.match(token)
        if key is None:
            audit = state.audit_keys.match(token)
            if audit is not None and read_only:
                key = audit
            elif audit is not None or state.admin_keys.match(token) is not None:
                # A key we know, used outside its role (open API or not): refused, and named in the logs.
                _known(audit or state.admin_keys.match(token))
                raise Forbidden("This key may not do this: audit keys only read, admin keys only administer.")
    if key is None and state.api_keys:
        if token is None:
            raise Unauthorized("Send the API key as `Authorization: Bearer <key>`.")
        raise Unauthorized("The API key is not valid.")
    return _known(key)


def authorize_audit(request: Request) -> Key:
    """An audit key (AUDIT_API_KEYS), for the applicant's inputs; 403 for anything else."""
    token = bearer_token(request)
    key = request.app.state.audit_keys.match(token) if token is not None else None
    if key is None:
        raise Forbidden("The applicant's inputs are for audit keys only (one of AUDIT_API_KEYS).")
    known = _known(key)
    assert known is not None
    return known


def authorize_admin(request: Request) -> Key:
    """The admin key of an /admin call; 403 for anything else (no key, a wrong one, or none configured)."""
    ring: KeyRing = request.app.state.admin_keys
    if not ring:
        raise Forbidden("The admin endpoints are off: no ADMIN_API_KEYS are configured.")
    token = bearer_token(request)
    key = ring.match(token) if token is not None else None
    if key is None:
        raise Forbidden("This endpoint needs an admin key (one of ADMIN_API_KEYS) as `Authorization: Bearer <key>`.")
    logs.key_id.set(key.id)
    return key


def authenticate(request: Request) -> None:
    """Before routing, for the API's paths: a key this service knows, of any role (or none while the API is open).

    So that a caller without a key learns nothing about the routes (no 404 for an id
    that is not one, no 405 for a method): 401 first. Each handler still checks the
    key's role.
    """
    state = request.app.state
    if not state.api_keys:
        return
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Send the API key as `Authorization: Bearer <key>`.")
    if not any(ring.match(token) for ring in (state.api_keys, state.audit_keys, state.admin_keys)):
        raise Unauthorized("The API key is not valid.")
