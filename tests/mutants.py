"""Mutation check of the test suite: one small deliberate bug at a time, and the tests that must catch it.

`make mutants` (python -m tests.mutants [NAME ...]) copies the working tree to a
temporary directory once, then for each mutant edits the copy, runs the tests named
for it there (against the real PostgreSQL and Redis, CI=true, so nothing skips),
restores the file, and prints a table: a mutant is killed when its tests fail. It
exits 1 if any survived. The list holds the hardening issue's nineteen and the
survivors that issue found; `tests/test_mutants.py` checks in the ordinary suite
that each edit still applies to the source, so the list cannot rot silently.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str
    # How many times `old` occurs in the file; every occurrence is replaced.
    count: int = 1


@dataclass(frozen=True)
class Mutant:
    name: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "decision at the cut-off approves (>= becomes >)",
        (Edit("service/models/policy.py", "probability >= self.cutoff", "probability > self.cutoff"),),
        ("tests/test_registry.py",),
    ),
    Mutant(
        "the referral band includes its upper bound",
        (Edit("service/models/policy.py", "band[0] <= probability < band[1]", "band[0] <= probability <= band[1]"),),
        ("tests/test_registry.py",),
    ),
    Mutant(
        "a keyed PostgreSQL batch without its transaction",
        (
            Edit(
                "service/storage/postgres.py",
                "async with conn.transaction(), conn.cursor() as cur:\n                # The first row",
                "async with conn.cursor() as cur:\n                # The first row",
            ),
        ),
        ("tests/test_storage.py",),
    ),
    Mutant(
        "201 before the insert is awaited",
        (
            Edit(
                "service/routes/decisions.py",
                "await state.store.insert(Record(decision, applicant, key_id=key_id))",
                "__import__('asyncio').ensure_future(state.store.insert(Record(decision, applicant, key_id=key_id)))",
            ),
        ),
        ("tests/test_durability.py",),
    ),
    Mutant(
        "a batch answered before its insert is awaited",
        (
            Edit(
                "service/routes/decisions.py",
                "        await state.store.insert_many(records)\n",
                "        __import__('asyncio').ensure_future(state.store.insert_many(records))\n",
            ),
        ),
        ("tests/test_durability.py",),
    ),
    Mutant(
        "a DEBUG line with the raw request headers",
        (
            Edit(
                "service/middleware.py",
                "        started = time.perf_counter()\n",
                "        started = time.perf_counter()\n"
                "        logging.getLogger(__name__).debug('headers %s', scope['headers'])\n",
            ),
        ),
        ("tests/test_logs.py",),
    ),
    Mutant(
        "store errors are not counted",
        (
            Edit("service/storage/postgres.py", "metrics.count(metrics.store_errors)", "pass"),
            Edit("service/storage/sqlite.py", "metrics.count(metrics.store_errors)", "pass"),
        ),
        ("tests/test_metrics.py",),
    ),
    Mutant(
        "ping asks nothing",
        (
            Edit(
                "service/storage/postgres.py",
                "    async def ping(self) -> None:\n        await self._run(_check_writable)",
                "    async def ping(self) -> None:\n        return None",
            ),
        ),
        ("tests/test_storage.py",),
    ),
    Mutant(
        "a commit thread stuck on a frozen database is left stuck",
        (Edit("service/storage/postgres_threads.py", "sock.shutdown(socket.SHUT_RDWR)", "sock.fileno()"),),
        ("tests/test_outages.py",),
    ),
    Mutant(
        "groups with idempotency keys commit on the threads, which cannot answer a conflict",
        (Edit("service/storage/postgres.py", "all(r.idempotency_key is None for r in records)", "True"),),
        ("tests/test_storage.py",),
    ),
    Mutant(
        "every group commits on a thread, however well the loop keeps up",
        (Edit("service/storage/postgres.py", "waited(records) > SLOW_LOOP", "True"),),
        ("tests/test_storage.py",),
    ),
    Mutant(
        "an idempotency key reused with another body replays the first answer",
        (Edit("service/routes/decisions.py", "if existing.request_hash != request_hash:", "if False:", count=2),),
        ("tests/test_decisions.py",),
    ),
    Mutant(
        "any presented key matches",
        (Edit("service/keys.py", "if hmac.compare_digest(digest, key.digest):", "if True:"),),
        ("tests/test_decisions.py",),
    ),
    Mutant(
        "routing before authentication",
        (Edit("service/app.py", "            Middleware(Gate),\n", ""),),
        ("tests/test_decisions.py",),
    ),
    Mutant(
        "an erasure leaves the cached copy",
        (Edit("service/routes/audit.py", "if not await state.cache.delete([decision_id]):", "if False:"),),
        ("tests/test_audit.py",),
    ),
    Mutant(
        "retention erases recent decisions instead of old ones",
        (
            Edit(
                "service/storage/audit_records.py",
                "WHERE created_at < %s AND erased_at IS NULL",
                "WHERE created_at > %s AND erased_at IS NULL",
            ),
        ),
        ("tests/test_audit_processes.py::test_retention_run_twice_at_once_erases_each_old_decision_once",),
    ),
    Mutant(
        "problem details echo the bad input whole",
        (Edit("service/errors.py", "self.detail = shortened(detail)", "self.detail = detail"),),
        ("tests/test_decisions.py",),
    ),
    Mutant(
        "a key given twice goes unchecked (the last wins)",
        (Edit("service/routes/bodies.py", 'if body.count(b":") != _members(value):', "if False:"),),
        ("tests/test_decisions.py",),
    ),
    Mutant(
        "no deadline for a request head",
        (Edit("service/protocol.py", 'self._set_deadline(self.head_timeout, "head")', "pass", count=2),),
        ("tests/test_connections.py",),
    ),
    Mutant(
        "a request under way on a kept-alive connection leaves its idle timer running",
        (Edit("service/protocol.py", "        self._unset_keepalive_if_required()\n", "", count=2),),
        ("tests/test_connections.py",),
    ),
    Mutant(
        "an upgrade request's connection stays open after its answer",
        (
            Edit(
                "service/protocol.py",
                "            if self.cycle is not None:\n                self.cycle.keep_alive = False\n",
                "",
            ),
        ),
        ("tests/test_connections.py",),
    ),
    Mutant(
        "no deadline for a body",
        (Edit("service/protocol.py", 'self._set_deadline(self.body_timeout, "body")', "pass"),),
        ("tests/test_connections.py",),
    ),
    Mutant(
        "a head streamed without end is buffered",
        (Edit("service/protocol.py", "if self._head_bytes > MAX_HEAD_BYTES:", "if False:"),),
        ("tests/test_connections.py",),
    ),
    Mutant(
        "header fields are not counted",
        (Edit("service/protocol.py", "if self._header_count > MAX_HEADERS:", "if False:"),),
        ("tests/test_connections.py",),
    ),
    Mutant(
        "at the connection cap, refuse instead of closing a silent connection",
        (Edit("service/protocol.py", "and not _evict_oldest_waiting(self.max_connections):", "and True:"),),
        ("tests/test_connections.py",),
    ),
    Mutant(
        "every request waits for a database already seen down",
        (Edit("service/storage/postgres.py", "self._outage.check()", "None", count=2),),
        ("tests/test_outages.py::test_postgres_outage_answers_503_then_recovers",),
    ),
    Mutant(
        "a bounded call's caller waits on the task through shield() and wait_for() (three loop passes)",
        (
            Edit(
                "service/tasks.py",
                "        return await answer\n",
                "        return await asyncio.wait_for(asyncio.shield(task), seconds)\n",
            ),
        ),
        ("tests/test_tasks.py",),
    ),
    Mutant(
        "a bounded call waits for the call's own clean-up at the deadline",
        (
            Edit(
                "service/tasks.py",
                "        abandon(task)\n",
                "        task.cancel()\n        await task\n",
            ),
        ),
        ("tests/test_tasks.py",),
    ),
    Mutant(
        "a connection's one timer, set for an earlier phase, ends the later phase at the earlier time",
        (Edit("service/protocol.py", "        if self.loop.time() < at:", "        if False:"),),
        ("tests/test_connections.py",),
    ),
    Mutant(
        "a refusal at a request's head ignores an answer still due on the connection (pipelining)",
        (
            Edit(
                "service/protocol.py",
                "if (cycle is not None and not cycle.response_complete) or self.parser.should_upgrade():",
                "if self.parser.should_upgrade():",
            ),
        ),
        ("tests/test_admission.py",),
    ),
    Mutant(
        "an admitted request's place is never freed",
        (Edit("service/admission.py", "            self._admission.in_flight -= 1\n", "            pass\n"),),
        ("tests/test_admission.py",),
    ),
    Mutant(
        "an admitted request keeps its place after its answer, until its task ends",
        (Edit("service/protocol.py", "            self._place.free()\n", "            pass\n"),),
        ("tests/test_admission.py",),
    ),
    Mutant(
        "a connection answered before its body was read is left idle with no timer",
        (
            Edit(
                "service/protocol.py",
                "            if self.timeout_keep_alive_task is None:\n",
                "            if False:\n",
            ),
        ),
        ("tests/test_admission.py",),
    ),
)


def apply(root: Path, edit: Edit) -> str:
    """Make the edit under `root`; the file's text before it."""
    path = root / edit.path
    text = path.read_text()
    found = text.count(edit.old)
    if found != edit.count:
        raise SystemExit(f"{edit.path}: expected {edit.count} of {edit.old!r}, found {found}: update tests/mutants.py")
    path.write_text(text.replace(edit.old, edit.new))
    return text


def check_sources(root: Path = ROOT) -> list[str]:
    """Every edit that no longer applies to the source as it is (empty when the list is current)."""
    stale = []
    for mutant in MUTANTS:
        for edit in mutant.edits:
            if (root / edit.path).read_text().count(edit.old) != edit.count:
                stale.append(f"{mutant.name}: {edit.path}")
    return stale


def copy_tree(target: Path) -> None:
    """The working tree as git sees it (tracked and new files, uncommitted changes included)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run(mutant: Mutant, root: Path) -> tuple[bool, float, str]:
    """Whether the mutant's tests caught it, how long they took, and pytest's last line."""
    originals = [(edit, apply(root, edit)) for edit in mutant.edits]
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=root,
            env={**os.environ, "CI": "true"},
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        for edit, text in originals:
            (root / edit.path).write_text(text)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return result.returncode != 0, time.monotonic() - started, lines[-1] if lines else result.stderr[-200:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only mutants whose name contains one of these")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    if stale := check_sources():
        print("These edits no longer apply:", *stale, sep="\n  ")
        return 2
    # Each mutant runs in its own temporary copy, so a broken run never leaves a bug in the tree.
    with tempfile.TemporaryDirectory(prefix="credit-scoring-mutants-") as temp:
        root = Path(temp)
        copy_tree(root)
        print("| mutant | tests | result | s | pytest |")
        print("|---|---|---|---|---|")
        survived = 0
        for mutant in chosen:
            killed, seconds, last = run(mutant, root)
            survived += not killed
            tests = ", ".join(t.removeprefix("tests/") for t in mutant.tests)
            print(f"| {mutant.name} | {tests} | {'killed' if killed else 'SURVIVED'} | {seconds:.0f} | {last} |")
            sys.stdout.flush()
    print(f"\n{len(chosen) - survived} killed, {survived} survived, of {len(chosen)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
