"""A boosting challenger, served by a child process of the worker: `python -m service.models.boosting FOLDER`.

A `boosting` pipeline costs milliseconds per call and holds the GIL for much of
it, and its pickle runs code when opened: so it lives in a process of its own,
started by the worker that needs it and reniced to 19, so that it only gets the
CPU the champion's requests leave idle. The worker writes batches of applicants
to its stdin and reads their probabilities from its stdout, each message a
4-byte length and a msgpack body. The process verifies and unpickles the version
itself and first answers `ready` or the reason it cannot.

If the process dies or stops answering, the challenger counts as failed until a
replacement, started after a back-off, says ready. It exits when its stdin
closes: when the worker stops it, and when the worker dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from service.models.metadata import Metadata, ModelError
from service.models.policy import Policy
from service.schemas import APPLICANT_FIELDS, Applicant
from service.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

# Loading imports scikit-learn and unpickles: about a second, longer on a busy machine.
READY_TIMEOUT = 60.0
# One batch (at most a few hundred rows) takes ~10 ms when the process gets CPU.
SCORE_TIMEOUT = 10.0
RESPAWN_BACKOFF = 10.0
STOP_TIMEOUT = 2.0
NICENESS = 19

_HEADER = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()
_applicant_values = operator.attrgetter(*APPLICANT_FIELDS)


class ChallengerFailed(Exception):
    """The challenger process could not score this batch."""


class BoostingChallenger:
    def __init__(self, folder: Path, metadata: Metadata, policy: Policy) -> None:
        self.folder = folder
        self.metadata = metadata
        self.version = metadata.version
        self.kind = metadata.kind
        self.policy = policy
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @classmethod
    async def start(cls, folder: Path, metadata: Metadata, policy: Policy) -> BoostingChallenger:
        """Start the process and wait until it has verified and loaded the version; ModelError with its reason."""
        challenger = cls(folder, metadata, policy)
        await challenger._spawn()
        return challenger

    async def _spawn(self) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                str(self.folder),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=PROJECT_ROOT,
                env=_child_environment(),
            )
        except OSError as exc:  # out of processes or file descriptors
            raise ModelError(f"The challenger process for {self.version} could not be started: {exc}.") from exc
        try:
            answer = await asyncio.wait_for(_read(process), READY_TIMEOUT)
        except (ChallengerFailed, TimeoutError) as exc:
            await _stop(process, 0.0)
            reason = f"no answer within {READY_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else str(exc)
            raise ModelError(f"The challenger process for {self.version} did not start: {reason}.") from None
        except BaseException:  # cancelled (shutdown) while it loaded: it must not outlive its owner
            await asyncio.shield(_stop(process, 0.0))
            raise
        if "error" in answer:
            await _stop(process, STOP_TIMEOUT)
            raise ModelError(str(answer["error"]))
        self._process = process
        logger.info("Challenger %s loaded in process %d (self-check %.1e)", self.version, process.pid, answer["ready"])

    async def score(self, applicants: list[Applicant]) -> list[float]:
        async with self._lock:  # one batch at a time through the pipe
            if self._process is None:
                if time.monotonic() < self._retry_at:
                    raise ChallengerFailed("the challenger process is down; waiting before starting another")
                try:
                    await self._spawn()
                except ModelError as exc:
                    self._retry_at = time.monotonic() + RESPAWN_BACKOFF
                    raise ChallengerFailed(str(exc)) from None
            process = self._process
            assert process is not None
            try:
                rows = [_applicant_values(a) for a in applicants]
                answer = await asyncio.wait_for(_exchange(process, rows), SCORE_TIMEOUT)
            except (ChallengerFailed, TimeoutError, ConnectionError) as exc:
                # Dead or stuck: replace it, after a back-off, rather than queue behind it.
                logger.warning("Challenger process %d for %s failed; replacing it", process.pid, self.version)
                self._process = None
                self._retry_at = time.monotonic() + RESPAWN_BACKOFF
                await _stop(process, 0.0)
                raise ChallengerFailed(str(exc) or type(exc).__name__) from None
        if "error" in answer:
            raise ChallengerFailed(str(answer["error"]))
        probabilities: list[float] = answer["probabilities"]
        return probabilities

    async def close(self) -> None:
        async with self._lock:
            process, self._process = self._process, None
            if process is not None:
                await _stop(process, STOP_TIMEOUT)


async def _exchange(process: asyncio.subprocess.Process, message: Any) -> dict[str, Any]:
    assert process.stdin is not None
    body = _encoder.encode(message)
    process.stdin.write(_HEADER.pack(len(body)) + body)
    await process.stdin.drain()
    return await _read(process)


async def _read(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    try:
        (size,) = _HEADER.unpack(await process.stdout.readexactly(_HEADER.size))
        message = _decoder.decode(await process.stdout.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChallengerFailed(f"the process exited ({type(exc).__name__})") from None
    except (msgspec.DecodeError, struct.error) as exc:  # something else wrote to its stdout
        raise ChallengerFailed(f"the process answered garbage ({exc})") from None
    if not isinstance(message, dict):
        raise ChallengerFailed("the process answered something other than a message")
    return message


# What the child inherits: enough to run Python, never the service's secrets (DATABASE_URL, keys). Whoever can
# write to MODEL_DIR can make the child run code (a pickle), so it gets nothing worth stealing.
_INHERITED = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")


def _child_environment() -> dict[str, str]:
    env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
    # One thread: the machine's cores belong to the champion's requests.
    env["OMP_NUM_THREADS"] = "1"
    return env


async def _stop(process: asyncio.subprocess.Process, grace: float) -> None:
    """Close its stdin (it exits on EOF), wait up to `grace` seconds, then kill it; always reaped."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


# -- the child process ----------------------------------------------------------------


def _send(out: BinaryIO, message: Any) -> None:
    body = _encoder.encode(message)
    out.write(_HEADER.pack(len(body)) + body)
    out.flush()


def _receive(source: BinaryIO) -> Any:
    header = source.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    return _decoder.decode(source.read(size))


def main(folder: str) -> int:
    """Load the version, then answer batches until stdin closes (the worker stopped it, or is gone)."""
    # Signals meant for the server (Ctrl-C reaches the whole process group) are the worker's to handle.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    source, out = sys.stdin.buffer, sys.stdout.buffer
    try:
        from service.models import pipeline

        _, fitted, worst = pipeline.load(Path(folder))
    except ModelError as exc:
        _send(out, {"error": str(exc)})
        return 1
    except Exception as exc:  # a broken environment: report it, whatever it is
        _send(out, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _send(out, {"ready": worst})
    while True:
        try:
            rows = _receive(source)
        except EOFError:
            return 0
        try:
            _send(out, {"probabilities": pipeline.probabilities(fitted, pipeline.rows_to_matrix(rows))})
        except Exception as exc:
            _send(out, {"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
