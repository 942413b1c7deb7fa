"""One worker's models: what a change of assignment loads, keeps, swaps and stops, on the run's real registry.

The assignments are built here (what the store would return); the versions,
their checks and the boosting challenger's process are real.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest

from service.models.assignment import ModelManager
from service.models.metadata import ModelError
from service.models.registry import Registry, read_metadata
from service.schemas import Assignment, ChallengerAssignment
from tests.conftest import Versions, corrupt_copy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def assignment(revision: int, champion: str, challenger: str | None = None, share: float = 1.0) -> Assignment:
    return Assignment(
        champion=champion,
        challenger=ChallengerAssignment(challenger, share) if challenger else None,
        changed_at=dt.datetime.now(dt.UTC),
        changed_by="test",
        revision=revision,
    )


def reader(value: Assignment):  # type: ignore[no-untyped-def]
    async def read() -> Assignment:
        return value

    return read


def environ_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def boosting_children() -> list[int]:
    found = []
    for child in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"service.models.boosting" in cmdline:
            found.append(int(child))
    return found


async def test_the_champion_swaps_before_a_challenger_process_is_ready(versions: Versions) -> None:
    manager = ModelManager(Registry(versions.root), None)
    await manager.start(assignment(1, versions.shipped))
    change = asyncio.ensure_future(manager.refresh(reader(assignment(2, versions.logistic, versions.boosting))))
    deadline = time.monotonic() + 5
    while manager.current is not None and manager.current.champion.version != versions.logistic:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    # The new champion serves while the challenger's process is still loading scikit-learn.
    assert not change.done() and manager.current is not None and manager.current.challenger is None
    models = await change
    assert models.challenger is not None and models.challenger.version == versions.boosting
    assert manager.applied_revision == 2
    await manager.close()
    assert boosting_children() == []


async def test_a_challenger_that_fails_to_load_leaves_the_serving_one(versions: Versions) -> None:
    corrupt = corrupt_copy(versions, versions.logistic, "test-corrupt-challenger")
    manager = ModelManager(Registry(versions.root), None)
    await manager.start(assignment(1, versions.shipped))
    await manager.refresh(reader(assignment(2, versions.shipped, versions.logistic)))
    models = await manager.refresh(reader(assignment(3, versions.shipped, corrupt)))
    assert models.challenger is not None and models.challenger.version == versions.logistic
    assert manager.error is not None and corrupt in manager.error
    # Not applied in full: retried later (not on every tick), and the report says why.
    assert manager.applied_revision == 2 and manager.failed_revision == 3
    assert not manager.wants(3) and manager.wants(4)
    await manager.close()


async def test_a_champion_that_fails_to_load_changes_nothing(versions: Versions) -> None:
    corrupt = corrupt_copy(versions, versions.logistic, "test-corrupt-champion")
    manager = ModelManager(Registry(versions.root), None)
    before = await manager.start(assignment(1, versions.shipped))
    with pytest.raises(ModelError, match="sha256"):
        await manager.refresh(reader(assignment(2, corrupt)))
    assert manager.current is before


async def test_a_refresh_serves_what_is_stored_even_below_what_it_applied(versions: Versions) -> None:
    """After a failover that lost the newest revisions, the stored assignment wins, whatever its number."""
    manager = ModelManager(Registry(versions.root), None)
    await manager.start(assignment(1, versions.shipped))
    await manager.refresh(reader(assignment(5, versions.logistic)))
    assert manager.wants(3)
    models = await manager.refresh(reader(assignment(3, versions.shipped)))
    assert models.champion.version == versions.shipped and manager.applied_revision == 3


async def test_preparing_the_same_challenger_twice_leaves_one_process(versions: Versions) -> None:
    manager = ModelManager(Registry(versions.root), None)
    await manager.start(assignment(1, versions.shipped))
    for _ in range(3):  # three admin calls, say, before the change is recorded
        manager.prepare(await manager.load_challenger(versions.boosting))
    await manager.refresh(reader(assignment(2, versions.shipped, versions.boosting)))
    await asyncio.sleep(0.5)  # retired processes exit on EOF
    assert len(boosting_children()) == 1
    await manager.close()
    assert boosting_children() == []


async def test_the_challenger_process_inherits_no_secret(versions: Versions, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@db/credit")
    monkeypatch.setenv("ADMIN_API_KEYS", "ops:s3cret")
    manager = ModelManager(Registry(versions.root), None)
    challenger = await manager.load_challenger(versions.boosting)
    try:
        pid = challenger.pid  # type: ignore[attr-defined]
        environ = environ_of(pid)
        assert b"hunter2" not in environ and b"s3cret" not in environ
        assert b"OMP_NUM_THREADS=1" in environ
    finally:
        await challenger.close()


def test_metadata_naming_a_file_outside_its_folder_is_refused(tmp_path: Path, versions: Versions) -> None:
    folder = tmp_path / versions.shipped
    folder.mkdir()
    meta = json.loads((versions.root / versions.shipped / "metadata.json").read_text())
    meta["files"]["../../etc/passwd"] = "0" * 64
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="plain names in its folder"):
        read_metadata(folder)
