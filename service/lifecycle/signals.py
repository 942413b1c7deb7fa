"""Signals: SIGTERM and SIGINT begin shutdown at once; SIGHUP rescans the model registry in place.

uvicorn catches SIGTERM/SIGINT itself and only calls the lifespan shutdown after
draining; these handlers chain onto its own, so that shutdown (its log line,
readiness 503, its time budget) begins the moment the signal arrives. With
SHUTDOWN_DELAY, uvicorn hears of it that many seconds later: until then the
replica serves as before, readiness already 503, so that a load balancer that
checks readiness takes it out before its listener closes (a connection the
balancer opened just as it closed would be reset, request unread). A second
signal ends the wait. SIGHUP reaches every worker (`python -m service.web`
passes it on), and none restarts.
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


def begin_shutdown(state: State, signal_name: str | None = None, delay: float = 0.0) -> None:
    """Mark the start of shutdown: readiness turns 503 and the shutdown budget starts counting."""
    if state.shutdown_began is None:
        state.shutdown_began = time.monotonic()
        state.shutting_down = True
        metrics.shutting_down.set(1)
        logger.info(CLOSING)
        if signal_name and delay:
            logger.info(
                "Received %s: not ready; serving %g s more while load balancers take this replica out",
                signal_name,
                delay,
            )
        elif signal_name:
            logger.info("Received %s: no new connections; draining in-flight requests", signal_name)


async def watch_signals(state: State) -> str:
    # uvicorn catches SIGTERM/SIGINT itself and only calls the lifespan shutdown
    # after draining; we chain onto its handlers so shutdown (and its budget,
    # and readiness 503) begins the moment the signal arrives.
    if threading.current_thread() is not threading.main_thread():
        return "not on the main thread (in-process test client); shutdown begins with the lifespan"
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    delay = float(state.settings.shutdown_delay)
    received: list[int] = []
    waiting: list[asyncio.TimerHandle] = []

    def stop_waiting() -> None:
        for timer in waiting:
            timer.cancel()

    def on_signal(signum: int, frame: Any) -> None:
        handler = previous[signum]
        first = not received
        received.append(signum)
        loop.call_soon_threadsafe(begin_shutdown, state, signal.Signals(signum).name, delay if first else 0.0)
        if callable(handler) and delay and first:
            # uvicorn hears of it later: until then this replica serves, unready (see the module's docstring).
            loop.call_soon_threadsafe(lambda: waiting.append(loop.call_later(delay, handler, signum, None)))
        elif callable(handler):
            loop.call_soon_threadsafe(stop_waiting)  # a second signal: no more waiting
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
