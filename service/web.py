"""`python -m service.web APP [uvicorn options]`: uvicorn's own command line, with one change to its supervisor.

With several workers (`WEB_CONCURRENCY`), uvicorn's supervisor answers SIGHUP by
replacing every worker. Replacing a worker closes its kept-alive connections,
and a request a client sends on one just as it closes is lost. Here SIGHUP is
passed on to every worker that is serving, and each rescans the model registry
and re-applies the stored assignment in place (service.lifecycle.signals): no
process stops, no connection closes. With one worker uvicorn runs in this process,
whose own SIGHUP handler does the same.

It also gives prometheus-client's multiprocess mode its directory (each worker's
metrics are files there, summed by /metrics): PROMETHEUS_MULTIPROC_DIR if set,
else a new temporary directory, removed when the process ends, whether it ends
by itself, on SIGINT or on SIGTERM. One left by a process killed outright (SIGKILL)
is removed by the next start on the machine: its name holds the pid, which is gone.
Everything else is uvicorn's.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from uvicorn.supervisors import Multiprocess

logger = logging.getLogger("uvicorn.error")


class RescanningSupervisor(Multiprocess):
    def handle_hup(self) -> None:
        logger.info("Received SIGHUP, passing it to the workers: each rescans the model registry in place.")
        for process in self.processes:
            # A worker still starting reads the registry afresh anyway, and may not handle SIGHUP yet.
            if process.pid is not None and process.is_ready(timeout=1):
                os.kill(process.pid, signal.SIGHUP)
            else:
                logger.warning(
                    "Worker [%s] is not ready; it did not get the SIGHUP (it reads the registry at start).", process.pid
                )


_METRICS_PREFIX = "credit-scoring-metrics-"
_METRICS_DIRECTORY = re.compile(re.escape(_METRICS_PREFIX) + r"(\d+)-")


def _remove_orphans() -> None:
    """Metrics directories of processes that no longer exist (killed outright): removed."""
    for path in Path(tempfile.gettempdir()).glob(_METRICS_PREFIX + "*"):
        found = _METRICS_DIRECTORY.match(path.name)
        if found is None:
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, and someone else's
            pass


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # uvicorn restores this handler once it has shut down, then raises the signal again: exiting
    # through Python (not the default action) lets the metrics directory be removed first.
    raise SystemExit(128 + signum)


def main() -> None:
    # Until the service installs its own handler, a SIGHUP must not end the process (its default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    own_directory = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _remove_orphans()
        own_directory = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
        # Set before uvicorn imports the app, here or in the workers it spawns (they inherit it).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_directory
    try:
        # The module, not the `uvicorn.main` attribute (that is the CLI function the package re-exports).
        cli = importlib.import_module("uvicorn.main")
        cli.Multiprocess = RescanningSupervisor  # type: ignore[attr-defined]
        cli.main()
    except KeyboardInterrupt:  # uvicorn raises SIGINT again after its clean shutdown
        sys.exit(128 + signal.SIGINT)
    finally:
        if own_directory is not None:
            shutil.rmtree(own_directory, ignore_errors=True)


if __name__ == "__main__":
    main()
