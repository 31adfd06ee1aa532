"""Progress and stop for long sampling loops, driven from the caller's side.

The web page (`mehldau-app`) shows a progress bar while a model samples and has a Stop
button; the command line needs neither. Rather than thread a callback through every
branch's `generate`, the loops call `step()` once per token, event or diffusion step: a
no-op unless the calling thread opened a `controlled()` block, where it reports progress to
that block's callback and raises `Stopped` once its event is set. Thread-local, so two
generations in two threads (two models) are controlled apart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is running)


class Stopped(Exception):
    """The controlling caller asked the running generation to stop."""


_local = threading.local()


@contextmanager
def controlled(stop: threading.Event | None = None, progress: Progress | None = None
               ) -> Iterator[None]:
    """Inside the block, sampling loops in this thread report to `progress` and raise
    `Stopped` at their next step once `stop` is set."""
    before = getattr(_local, "job", None)
    _local.job = (stop, progress)
    try:
        yield
    finally:
        _local.job = before


def active() -> bool:
    """Whether a caller is listening: loops skip work (a host sync) done only to report."""
    return getattr(_local, "job", None) is not None


def step(fraction: float, what: str = "sample") -> None:
    job = getattr(_local, "job", None)
    if job is None:
        return
    stop, progress = job
    if stop is not None and stop.is_set():
        raise Stopped(what)
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), what)
