"""`python -m service.web APP [uvicorn options]`: uvicorn's own command line, with one change to its supervisor.

With several workers (`WEB_CONCURRENCY`), uvicorn's supervisor answers SIGHUP by
replacing every worker. Replacing a worker closes its kept-alive connections,
and a request a client sends on one just as it closes is lost. Here SIGHUP is
passed on to every worker that is serving, and each rescans the model registry
and re-applies the stored assignment in place (service.lifecycle.signals): no
process stops, no connection closes. With one worker uvicorn runs in this process,
whose own SIGHUP handler does the same. Everything else is uvicorn's.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal

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


def main() -> None:
    # Until the service installs its own handler, a SIGHUP must not end the process (its default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The module, not the `uvicorn.main` attribute (that is the CLI function the package re-exports).
    cli = importlib.import_module("uvicorn.main")
    cli.Multiprocess = RescanningSupervisor  # type: ignore[attr-defined]
    cli.main()


if __name__ == "__main__":
    main()
