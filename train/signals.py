"""SIGINT and SIGTERM, from a command's first moment to its last.

Two regimes:
- Start-up (and after training): a signal raises `Interrupted` wherever the
  process is, so it unwinds through every `finally` (a loader's workers stop,
  a half-made run folder is removed) and exits quietly with 130 or 143. There
  is nothing to save yet.
- Training: `StopRequest` only records the signal; the loop stops at the next
  step boundary and saves (a preempted job loses at most one step). A second
  SIGINT there means "now": `Interrupted`, without saving.

`Interrupted` is a `BaseException`, like `KeyboardInterrupt`, so no
`except Exception` on the way swallows it.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

EXIT_ON_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal that ends the command at once; `str()` is the one line to print."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.signal = name

    @property
    def exit_status(self) -> int:
        return EXIT_ON_SIGNAL[self.signal]


def _raise_interrupted(signum, frame) -> None:
    name = signal.Signals(signum).name
    raise Interrupted(name, f"stopped by {name} before training started (nothing to save)")


@contextmanager
def startup_signals():
    """SIGINT and SIGTERM raise `Interrupted` (main thread only: elsewhere signals are left alone)."""
    with _handlers(_raise_interrupted):
        yield


class StopRequest:
    """SIGINT/SIGTERM ask the training loop to stop at the next step boundary
    (and save); a second SIGINT interrupts at once, without saving."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, self._again)

    def _again(self, signum, frame) -> None:
        raise Interrupted("SIGINT", "a second Ctrl-C: exiting now, without saving this step "
                                    "(--resume continues from the last checkpoint)")

    @contextmanager
    def installed(self):
        with _handlers(self._handle):
            yield self


@contextmanager
def _handlers(handler):
    try:
        previous = {s: signal.signal(s, handler) for s in SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
