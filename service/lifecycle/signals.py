"""Signals: SIGTERM and SIGINT begin shutdown at once; SIGHUP rescans the model registry in place.

uvicorn catches SIGTERM/SIGINT itself and only calls the lifespan shutdown after
draining; these handlers chain onto its own, so that shutdown (its log line,
readiness 503, its time budget) begins the moment the signal arrives. SIGHUP
reaches every worker (`python -m service.web` passes it on), and none restarts.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import threading
import time
from typing import Any

from starlette.datastructures import State

from service import metrics

logger = logging.getLogger("service.lifecycle")

CLOSING = "Closing API."
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def begin_shutdown(state: State, signal_name: str | None = None) -> None:
    """Mark the start of shutdown: readiness turns 503 and the shutdown budget starts counting."""
    if state.shutdown_began is None:
        state.shutdown_began = time.monotonic()
        state.shutting_down = True
        metrics.shutting_down.set(1)
        logger.info(CLOSING)
        if signal_name:
            logger.info("Received %s: no new connections; draining in-flight requests", signal_name)


async def watch_signals(state: State) -> str:
    # uvicorn catches SIGTERM/SIGINT itself and only calls the lifespan shutdown
    # after draining; we chain onto its handlers so shutdown (and its budget,
    # and readiness 503) begins the moment the signal arrives.
    if threading.current_thread() is not threading.main_thread():
        return "not on the main thread (in-process test client); shutdown begins with the lifespan"
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(begin_shutdown, state, signal.Signals(signum).name)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # nobody else handles it: let it act as it would have
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def on_hangup(signum: int, frame: Any) -> None:
        # The registry may have changed on disk: rescan it and re-apply the stored assignment.
        loop.call_soon_threadsafe(_rescan, state)

    state.rescans = set()
    for sig in SHUTDOWN_SIGNALS:
        previous[sig] = signal.signal(sig, on_signal)
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    state.previous_signal_handlers = previous
    return "watching SIGTERM and SIGINT, and SIGHUP (rescan the model registry)"


def _rescan(state: State) -> None:
    if state.shutting_down:  # too late to load anything
        return
    task = asyncio.get_running_loop().create_task(state.watcher.rescan(), context=contextvars.Context())
    state.rescans.add(task)
    task.add_done_callback(state.rescans.discard)


async def unwatch_signals(state: State) -> str:
    for sig, handler in getattr(state, "previous_signal_handlers", {}).items():
        signal.signal(sig, handler)
    # A rescan still loading would start what the next steps close: stop it first.
    rescans: set[asyncio.Task[None]] = getattr(state, "rescans", set())
    for task in rescans:
        task.cancel()
    if rescans:
        await asyncio.wait(rescans, timeout=1.0)
    return "restored the signal handlers"
