"""SIGTERM and SIGINT to `hyla train` and `hyla resume`: a clean stop, not a crash.

Ray takes both signals in the driver: ray.init makes SIGTERM exit at once, its core worker
then dumps and aborts on it (exit 134), and Ray Train's fit() takes SIGINT in the main
thread to abort the run and exit 1. A job instead turns either signal into `Stopped` in the
main thread (installed again once Ray is up) and runs fit() in a thread of its own, so Ray
Train registers nothing. `Stopped` unwinds the job: Ray shuts down (its workers with it), the
MLflow run is marked KILLED, unfinished saves are removed, and the command exits with the
shell's convention, 128 + the signal: 143 for SIGTERM, 130 for SIGINT. What the run
committed stays: it resumes from its newest checkpoint that verifies.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_T = TypeVar("_T")


class Stopped(KeyboardInterrupt):
    """The job was stopped by a signal. A KeyboardInterrupt, so that whatever unwinds on
    Ctrl-C unwinds on SIGTERM as well; `exit_code` is 128 + the signal."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = signum
        super().__init__(message or f"stopped by {self.name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def take_signals() -> None:
    """SIGTERM and SIGINT raise Stopped in the main thread from now on (again after a library
    took them, as ray.init does). Elsewhere than the main thread it does nothing: Python
    delivers signals to the main thread only."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _raise_stopped)


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise Stopped (see take_signals); the handlers
    that were there before come back at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    take_signals()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def in_a_thread(fn: Callable[[], _T], name: str) -> _T:
    """fn() in a thread of its own while the main thread waits for it, free to take a signal
    (Stopped then leaves the thread behind: it is a daemon, ended with what it waits on).
    fn's result, or its exception raised here."""
    results: list[_T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fn())
        except BaseException as e:  # handed to the main thread, which raises it
            errors.append(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(1.0)  # a wait that a signal's handler interrupts
    if errors:
        raise errors[0]
    return results[0]
