"""The scale-out rehearsal, short: three replicas behind HAProxy, through PgBouncer, restarted one at a time.

`make rehearse` runs the long one and writes its table; this runs one throughput
run of a second each way and the whole rolling restart, with real HAProxy,
PgBouncer, PostgreSQL and Redis (CI installs the first two with apt-get).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.rehearse import POOLER_SIZE, rehearse
from tests.conftest import REQUIRE_SERVICES
from tests.pooler import Missing
from tests.procfile import STOPPED

pytestmark = pytest.mark.process


def test_a_rolling_restart_behind_haproxy_and_pgbouncer_fails_and_loses_nothing(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    try:
        report = rehearse(1.0, tmp_path, runs=1)
    except Missing as exc:
        if REQUIRE_SERVICES:
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    print(report.table())
    assert report.restarts == 3 and all(code in STOPPED for code in report.exit_codes), report.exit_codes
    assert report.statuses["201"] > 1000, report.statuses
    assert report.failures == 0, report.statuses
    assert report.lost == 0
    # PostgreSQL sees PgBouncer's pool and one listening session per replica, whatever the replicas' pools.
    assert 0 < report.backends_max <= POOLER_SIZE + 3
    assert report.direct_rps > 0 and report.balanced_rps > 0
