"""Start-up and shutdown: the only place where resources open and close.

runner       the Lifecycle (the app's lifespan): steps in order, stops in reverse, each bounded
steps        the service's steps (settings, store, migrations, cache, budget, metrics, ...) in order
model_steps  the model lifecycle's steps (registry and champion, challenger queue, assignment watcher)
signals      SIGTERM/SIGINT begin shutdown (SIGTERM after a lame duck); SIGHUP rescans the models
"""

from __future__ import annotations

from service.lifecycle.runner import CLOSED, STARTED, STARTING, Lifecycle, QuietStartupFailure, StartupError, Step
from service.lifecycle.signals import CLOSING, begin_shutdown
from service.lifecycle.steps import default_steps

__all__ = [
    "CLOSED",
    "CLOSING",
    "STARTED",
    "STARTING",
    "Lifecycle",
    "QuietStartupFailure",
    "StartupError",
    "Step",
    "begin_shutdown",
    "default_steps",
]
