"""Configuration, read once from the environment into a typed, frozen object.

A bad value raises ConfigError with one sentence that names the variable, so
start-up can log it and stop.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE_PATH = PROJECT_ROOT / "var" / "decisions.sqlite3"
DEFAULT_MODEL_DIR = PROJECT_ROOT / "artifacts" / "models"
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """An environment variable has a value the service cannot use."""


# libpq and redis-py also take secrets as query parameters (?password=...).
_SECRET_PARAMETERS = {"password", "sslpassword", "passfile", "sslkey"}


def mask_url(url: str) -> str:
    """The URL with its password (in the user part or the query) replaced by ***, for logs and errors."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            if ":" in host:  # an IPv6 literal lost its brackets in hostname
                host = f"[{host}]"
            port = f":{parts.port}" if parts.port is not None else ""
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}{port}")
        if parts.query:
            query = [(k, "***" if k.lower() in _SECRET_PARAMETERS else v) for k, v in parse_qsl(parts.query, True)]
            parts = parts._replace(query=urlencode(query, safe="*"))
        return urlunsplit(parts)
    except ValueError:
        return "<unparsable URL>"


@dataclass(frozen=True)
class Settings:
    port: int = 8000
    # URLs may hold passwords: never in a repr that could end up in a log.
    database_url: str | None = field(default=None, repr=False)
    # PostgreSQL itself, when DATABASE_URL is a transaction pooler (PgBouncer): the session that LISTENs for
    # model changes needs a server connection of its own, and pooled connections then prepare no statements.
    database_direct_url: str | None = field(default=None, repr=False)
    sqlite_path: Path = DEFAULT_SQLITE_PATH
    redis_url: str | None = field(default=None, repr=False)
    model_dir: Path = DEFAULT_MODEL_DIR
    # The first champion, when the system of record has no assignment yet (else the newest version).
    model_version: str | None = None
    # [lower, upper) of the probability of default that is referred to an underwriter.
    refer_band: tuple[float, float] | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    shutdown_timeout: float = 25.0
    # Seconds a replica keeps serving after SIGTERM, already unready, before it closes its listener: the time
    # a load balancer that checks readiness (HAProxy) needs to take it out. Part of SHUTDOWN_TIMEOUT.
    shutdown_delay: int = 0
    # (key id, secret) pairs, by role: the API (decisions, outcomes, monitoring), audit (read, with the
    # applicant's inputs), admin (/admin/*, erasure). Ids are unique across all three.
    api_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    audit_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    admin_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # Worker processes (uvicorn reads the same variable): each has its own pools.
    web_concurrency: int = 1
    database_pool_size: int = 10
    # Bounded waits: how long start-up waits for PostgreSQL, and how long a request
    # waits for a pooled connection before answering 503.
    database_connect_timeout: float = 5.0
    database_request_timeout: float = 3.0
    redis_timeout: float = 0.25
    redis_pool_size: int = 10
    redis_key_prefix: str = ""
    cache_ttl: int = 86_400
    # The connection layer (service/protocol.py, which reads them itself: uvicorn makes it before start-up runs):
    # seconds for a request's head and for its body, open connections per worker (0: under the fd limit), and
    # requests one worker serves at once (more are answered 503 at once: admission control).
    http_head_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_max_connections: int = 0
    max_concurrent_requests: int = 64
    # Decisions older than this lose the applicant's inputs and reference (python -m service.retention).
    # 761 days: 25 months, as long as Regulation B asks a lender to keep an application's records.
    retention_days: int = 761

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            port=_int(env, "PORT", 8000, minimum=1, maximum=65535),
            database_url=_url(env, "DATABASE_URL", ("postgres", "postgresql")),
            database_direct_url=_direct_url(env),
            sqlite_path=Path(env.get("SQLITE_PATH") or DEFAULT_SQLITE_PATH),
            redis_url=_url(env, "REDIS_URL", ("redis", "rediss", "unix")),
            model_dir=_model_dir(env),
            model_version=_value(env, "MODEL_VERSION"),
            refer_band=_refer_band(env),
            log_level=_log_level(env),
            log_format=_choice(env, "LOG_FORMAT", "text", LOG_FORMATS),
            # Whole seconds: the Procfile hands it to uvicorn, which takes an integer.
            shutdown_timeout=_int(env, "SHUTDOWN_TIMEOUT", 25, minimum=1, maximum=3600),
            shutdown_delay=_shutdown_delay(env),
            **_keys(env),
            web_concurrency=_int(env, "WEB_CONCURRENCY", 1, minimum=1, maximum=256),
            database_pool_size=_int(env, "DATABASE_POOL_SIZE", 10, minimum=1, maximum=1000),
            database_connect_timeout=_seconds(env, "DATABASE_CONNECT_TIMEOUT", 5.0, positive=True),
            database_request_timeout=_seconds(env, "DATABASE_REQUEST_TIMEOUT", 3.0, positive=True),
            redis_timeout=_seconds(env, "REDIS_TIMEOUT", 0.25, positive=True),
            redis_pool_size=_int(env, "REDIS_POOL_SIZE", 10, minimum=1, maximum=1000),
            redis_key_prefix=env.get("REDIS_KEY_PREFIX", ""),
            cache_ttl=_int(env, "CACHE_TTL", 86_400, minimum=1, maximum=10 * 365 * 86_400),
            retention_days=_int(env, "RETENTION_DAYS", 761, minimum=1, maximum=100 * 366),
            **http_limits(env),
        )


class HttpLimits(TypedDict):
    http_head_timeout: float
    http_body_timeout: float
    http_max_connections: int
    max_concurrent_requests: int


def http_limits(env: Mapping[str, str]) -> HttpLimits:
    """HTTP_HEAD_TIMEOUT, HTTP_BODY_TIMEOUT, HTTP_MAX_CONNECTIONS and MAX_CONCURRENT_REQUESTS, checked;
    ConfigError names the variable."""
    return {
        "http_head_timeout": _seconds(env, "HTTP_HEAD_TIMEOUT", 10.0, positive=True),
        "http_body_timeout": _seconds(env, "HTTP_BODY_TIMEOUT", 30.0, positive=True),
        "http_max_connections": _int(env, "HTTP_MAX_CONNECTIONS", 0, minimum=0, maximum=1_000_000),
        "max_concurrent_requests": _int(env, "MAX_CONCURRENT_REQUESTS", 64, minimum=1, maximum=100_000),
    }


def _shutdown_delay(env: Mapping[str, str]) -> int:
    delay = _int(env, "SHUTDOWN_DELAY", 0, minimum=0, maximum=3600)
    timeout = _int(env, "SHUTDOWN_TIMEOUT", 25, minimum=1, maximum=3600)
    if delay >= timeout:
        raise ConfigError(
            f"SHUTDOWN_DELAY ({delay} s) must be less than SHUTDOWN_TIMEOUT ({timeout} s): it is spent out of it."
        )
    return delay


def _direct_url(env: Mapping[str, str]) -> str | None:
    direct = _url(env, "DATABASE_DIRECT_URL", ("postgres", "postgresql"))
    if direct is not None and not _value(env, "DATABASE_URL"):
        raise ConfigError(
            "DATABASE_DIRECT_URL is set but DATABASE_URL is not: set DATABASE_URL to the pooler (PgBouncer) and "
            "DATABASE_DIRECT_URL to PostgreSQL itself, or unset DATABASE_DIRECT_URL."
        )
    return direct


def _value(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return raw.strip() if raw is not None and raw.strip() else None


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = _value(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}.") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}.")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float, *, positive: bool = False) -> float:
    raw = _value(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}.") from None
    if value != value or value in (float("inf"), float("-inf")) or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise ConfigError(f"{name} must be {kind} number of seconds, got {raw!r}.")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _value(env, name)
    if raw is None:
        return default
    if raw.lower() not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}.")
    return raw.lower()


def _log_level(env: Mapping[str, str]) -> str:
    raw = _value(env, "LOG_LEVEL")
    if raw is None:
        return "INFO"
    level = raw.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {raw!r}.")
    return level


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = _value(env, name)
    if raw is None:
        return None
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: {mask_url(raw)}.") from None
    if parts.scheme not in schemes:
        raise ConfigError(f"{name} must be a {' or '.join(s + '://' for s in schemes)} URL, got {mask_url(raw)}.")
    if parts.scheme != "unix" and not parts.hostname and not parts.path.strip("/"):
        raise ConfigError(f"{name} names no host or database: {mask_url(raw)}.")
    return raw


def _model_dir(env: Mapping[str, str]) -> Path:
    if _value(env, "MODEL_PATH") is not None:
        raise ConfigError(
            "MODEL_PATH is no longer read: models live in a registry, MODEL_DIR (default artifacts/models), one "
            "folder per version, and MODEL_VERSION names the first champion. Unset MODEL_PATH."
        )
    raw = _value(env, "MODEL_DIR")
    return Path(raw) if raw is not None else DEFAULT_MODEL_DIR


def _refer_band(env: Mapping[str, str]) -> tuple[float, float] | None:
    raw = _value(env, "REFER_BAND")
    if raw is None:
        return None
    parts = raw.split(",")
    try:
        lower, upper = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        lower = upper = math.nan
    if not 0.0 <= lower < upper <= 1.0:
        raise ConfigError(
            f"REFER_BAND must be two probabilities 'lower,upper' with 0 <= lower < upper <= 1, got {raw!r}."
        )
    return lower, upper


_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# PBKDF2 rounds for a derived key id: ~30 ms a key here, paid once at start-up, and by anyone who would guess a
# secret from the id, which /metrics and the logs show: a guess costs that too, not a nanosecond.
KEY_ID_ROUNDS = 100_000


def derived_key_id(secret: str) -> str:
    """The id of a key given without one: a slow hash of the secret (PBKDF2-SHA256), never the secret itself."""
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), b"credit-scoring key id", KEY_ID_ROUNDS)
    return "key-" + digest.hex()[:10]


_KEY_VARIABLES = {"api_keys": "API_KEYS", "audit_keys": "AUDIT_API_KEYS", "admin_keys": "ADMIN_API_KEYS"}


def _keys(env: Mapping[str, str]) -> dict[str, tuple[tuple[str, str], ...]]:
    """The three key variables, each parsed; an id may name one key only, whatever its role."""
    found = {field_name: parse_keys(env, variable) for field_name, variable in _KEY_VARIABLES.items()}
    ids: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for field_name, keys in found.items():
        variable = _KEY_VARIABLES[field_name]
        for key_id, secret in keys:
            if ids.get(key_id, variable) != variable:
                raise ConfigError(
                    f"{variable} uses the key id {key_id!r}, which {ids[key_id]} uses too; every key needs its own id."
                )
            if secret in secrets:
                raise ConfigError(f"{variable} key {key_id!r} has the same secret as a key of {secrets[secret]}.")
            ids[key_id] = variable
            secrets[secret] = variable
    return found


def parse_keys(env: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    """Comma-separated `id:secret` (or plain `secret`) entries as (id, secret) pairs; ConfigError names the variable."""
    keys: list[tuple[str, str]] = []
    for position, entry in enumerate((e.strip() for e in env.get(name, "").split(",")), start=1):
        if not entry:
            continue
        key_id, sep, secret = entry.partition(":")
        if not sep:
            key_id, secret = derived_key_id(entry), entry
        if not _KEY_ID.match(key_id) or not secret:
            raise ConfigError(
                f"{name} entry {position} must be 'id:secret' (id: 1 to 64 of A-Z a-z 0-9 . _ -) or a plain secret."
            )
        if any(key_id == seen for seen, _ in keys):
            raise ConfigError(f"{name} uses the key id {key_id!r} twice; every key needs its own id.")
        keys.append((key_id, secret))
    return tuple(keys)
