"""Configuration: defaults, parsing, and a sentence naming the variable for every bad value."""

from __future__ import annotations

import hashlib

import pytest

from service.settings import DEFAULT_SQLITE_PATH, ConfigError, Settings, mask_url


def test_settings_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.port == 8000
    assert settings.database_url is None and settings.sqlite_path == DEFAULT_SQLITE_PATH
    assert settings.redis_url is None
    assert settings.log_format == "text" and settings.log_level == "INFO"
    assert settings.shutdown_timeout == 25
    assert settings.api_keys == ()


def test_settings_reads_every_variable() -> None:
    settings = Settings.from_env(
        {
            "PORT": "9000",
            "DATABASE_URL": "postgres://u:p@db.example:5432/credit",
            "REDIS_URL": "redis://cache:6379/2",
            "MODEL_DIR": "/models",
            "MODEL_VERSION": "german-credit-lr-1",
            "REFER_BAND": "0.1,0.25",
            "ADMIN_API_KEYS": "ops:s3cret, plain-secret",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "JSON",
            "SHUTDOWN_TIMEOUT": "10",
            "API_KEYS": " a , lender:b,,",
            "AUDIT_API_KEYS": "auditor:c",
            "HTTP_HEAD_TIMEOUT": "5",
            "HTTP_BODY_TIMEOUT": "12.5",
            "HTTP_MAX_CONNECTIONS": "1000",
        }
    )
    assert settings.port == 9000
    assert settings.database_url == "postgres://u:p@db.example:5432/credit"
    assert settings.redis_url == "redis://cache:6379/2"
    assert str(settings.model_dir) == "/models" and settings.model_version == "german-credit-lr-1"
    assert settings.refer_band == (0.1, 0.25)
    assert settings.admin_keys[0] == ("ops", "s3cret")
    # A plain secret gets an id derived from it, never the secret itself, nor a fast hash of it.
    derived = settings.admin_keys[1][0]
    assert settings.admin_keys[1][1] == "plain-secret" and "plain" not in derived
    assert derived.removeprefix("key-") not in hashlib.sha256(b"plain-secret").hexdigest()
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert settings.shutdown_timeout == 10
    assert [secret for _, secret in settings.api_keys] == ["a", "b"]
    assert settings.api_keys[1] == ("lender", "b") and settings.audit_keys == (("auditor", "c"),)
    assert (settings.http_head_timeout, settings.http_body_timeout, settings.http_max_connections) == (5, 12.5, 1000)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("DATABASE_URL", "mysql://localhost/db"),
        ("DATABASE_URL", "postgresql://localhost:notaport/db"),
        ("REDIS_URL", "http://localhost"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "LOUD"),
        ("SHUTDOWN_TIMEOUT", "-1"),
        ("SHUTDOWN_TIMEOUT", "soon"),
        ("SHUTDOWN_TIMEOUT", "nan"),
        ("SHUTDOWN_TIMEOUT", "2.5"),
        ("SHUTDOWN_TIMEOUT", "0"),
        ("DATABASE_POOL_SIZE", "0"),
        ("MODEL_PATH", "artifacts/classifier.joblib"),
        ("REFER_BAND", "0.3"),
        ("REFER_BAND", "0.3,0.2"),
        ("REFER_BAND", "0.1,1.5"),
        ("REFER_BAND", "low,high"),
        ("ADMIN_API_KEYS", "ops:"),
        ("ADMIN_API_KEYS", "bad id:secret"),
        ("ADMIN_API_KEYS", "ops:a,ops:b"),
        ("AUDIT_API_KEYS", "auditor:"),
        ("API_KEYS", "one:same-secret,two:same-secret"),
        ("SHUTDOWN_DELAY", "25"),
        ("SHUTDOWN_DELAY", "-1"),
        ("DATABASE_DIRECT_URL", "postgresql://localhost/db"),
        ("HTTP_HEAD_TIMEOUT", "0"),
        ("HTTP_BODY_TIMEOUT", "forever"),
        ("HTTP_MAX_CONNECTIONS", "-1"),
    ],
)
def test_settings_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert str(info.value).startswith(name)


@pytest.mark.parametrize(
    "env",
    [
        {"API_KEYS": "lender:a", "ADMIN_API_KEYS": "lender:b"},
        {"API_KEYS": "lender:same", "AUDIT_API_KEYS": "auditor:same"},
    ],
)
def test_a_key_id_or_secret_belongs_to_one_role(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(list(env)[1])
    assert "same" not in str(info.value).replace("the same secret", "")


def test_settings_error_masks_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"DATABASE_URL": "mysql://user:hunter2@localhost/db"})
    assert "hunter2" not in str(info.value)


def test_settings_repr_hides_api_keys_and_urls() -> None:
    settings = Settings(
        api_keys=(("app", "sekrit"),), database_url="postgresql://u:pw1@h/db", redis_url="redis://:pw2@h"
    )
    assert not {"sekrit", "pw1", "pw2"} & set(
        repr(settings).replace("'", " ").replace(":", " ").replace("@", " ").split()
    )


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@host:5432/db", "postgresql://u:***@host:5432/db"),
        ("postgresql://u@host/db", "postgresql://u@host/db"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgresql://u:pw@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
        ("postgresql://u@h/db?password=pw&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        ("rediss://h:6380/0?ssl_cert_reqs=none", "rediss://h:6380/0?ssl_cert_reqs=none"),
    ],
)
def test_mask_url_hides_only_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_the_connection_cap_defaults_under_the_file_descriptor_limit() -> None:
    import resource

    from service.protocol import max_connections

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert max_connections(0) == min(4096, soft - 256)
    assert max_connections(100) == 100
