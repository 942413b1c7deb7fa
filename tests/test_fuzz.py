"""Fuzzing: schemathesis against /openapi.json, and arbitrary JSON into the decoding path.

Neither may find a 5xx, a response that breaks the document, or a row stored for
a request answered 4xx. FUZZ_EXAMPLES bounds the examples per operation (CI: 50).
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import count_rows, redis_prefix
from tests.procfile import Service, serving

# The API is open (no API_KEYS); an audit key reaches the applicant's inputs, an admin key erasure. The
# other /admin operations get no admin key: a generated body must not change the run's champion.
AUDIT_KEY = "fz-audit-tok"
ADMIN_KEY = "fz-admin-tok"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
COUNTS: Counter[str] = Counter()
RESULTS = Path(__file__).resolve().parent.parent / "var" / "fuzz-counts.txt"


@pytest.fixture(scope="module")
def running(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with serving(
        postgres_url,
        redis_url,
        tmp_path_factory.mktemp("fuzz") / "service.log",
        REDIS_KEY_PREFIX=redis_prefix(),
        LOG_LEVEL="WARNING",
        AUDIT_API_KEYS=f"fuzz-audit:{AUDIT_KEY}",
        ADMIN_API_KEYS=f"fuzz-admin:{ADMIN_KEY}",
    ) as service:
        yield service
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("".join(f"{name}: {n}\n" for name, n in sorted(COUNTS.items())))
    assert "Traceback" not in service.log()


def test_api_conforms_to_its_openapi_document(running: Service) -> None:
    # schemathesis's pytest plugin (from_fixture) does not run on pytest 9 yet, so
    # each operation's hypothesis strategy is driven here directly.
    api = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 7, [op.label for op in operations]
    for operation, mode in itertools.product(operations, GenerationMode):
        fuzz(operation, mode)


def fuzz(operation: Any, mode: GenerationMode) -> None:
    # Erasure with the admin key, reads with the audit key (it may see the inputs), writes with none (open API).
    key = ADMIN_KEY if operation.path.endswith("/applicant") else AUDIT_KEY if operation.method == "get" else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        COUNTS[f"schemathesis {mode.value} {case.method} {case.path}"] += 1
        # Default checks: no 5xx, status codes, content types and bodies as
        # documented. Except one: JSON Schema counts 71.0 as an integer, while the
        # contract (and msgspec's strict decoding) wants an integer literal and
        # answers 422; the document cannot express the difference.
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

    try:
        check()
    except Unsatisfiable:
        # An operation with no parameters and no body has nothing to make invalid.
        assert mode is GenerationMode.NEGATIVE and not operation.body and not operation.path_parameters


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=30), children, max_size=20),
    max_leaves=40,
)


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Settings]]:
    settings_ = Settings(sqlite_path=tmp_path_factory.mktemp("fuzz-sqlite") / "d.sqlite3")
    with TestClient(create_app(settings_)) as client:
        yield client, settings_


def applicant_like(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Near-valid applicants: some fields replaced by arbitrary JSON, some dropped, some added."""
    return st.builds(
        lambda changes, drops, extra: {
            **{k: v for k, v in {**base, **changes}.items() if k not in drops},
            **extra,
        },
        st.dictionaries(st.sampled_from(sorted(base)), JSON, max_size=3),
        st.sets(st.sampled_from(sorted(base)), max_size=2),
        st.dictionaries(st.text(max_size=10), JSON, max_size=1),
    )


def test_arbitrary_json_gets_201_or_a_4xx_problem(fuzz_client: tuple[TestClient, Settings], applicant: dict) -> None:
    client, settings_ = fuzz_client

    @given(body=st.one_of(JSON, applicant_like(applicant), st.binary(max_size=200)))
    @settings(max_examples=EXAMPLES * 10, deadline=None, suppress_health_check=list(HealthCheck))
    def check(body: Any) -> None:
        COUNTS["hypothesis POST /decisions"] += 1
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        before = count_rows(settings_)
        response = client.post("/decisions", content=content, headers={"Content-Type": "application/json"})
        if response.status_code == 201:
            assert count_rows(settings_) == before + 1
            return
        assert 400 <= response.status_code < 500, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == response.status_code
        assert count_rows(settings_) == before

    check()
