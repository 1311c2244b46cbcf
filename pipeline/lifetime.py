"""Worker processes that die with their parent, however it dies.

A SIGKILLed trainer runs no cleanup, so its loader workers must notice on
their own (issue 18: DALI's Python workers outlived a killed trainer by
minutes, ~370 MB each). On Linux a process can ask the kernel for a signal
when its parent dies (`prctl(PR_SET_PDEATHSIG)`); `die_with_parent()` asks for
SIGKILL and then checks that the parent is not already gone (the race between
fork and the request). It is called in the child:

- of a fork, through an `os.register_at_fork` hook, while a
  `parent_death_signal()` block is active in the parent (DALI's and FFCV's
  writer processes are forked inside one);
- by worker initialisers (the PIL loader's DataLoader workers, the index and
  validation pools), and on unpickling the DALI source in a spawned worker.

The kernel sends the signal when the *thread* that forked the child exits:
every loader here starts its workers from the thread that owns the loader.
Elsewhere than Linux these are no-ops (the workers' own parent checks remain).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_active = 0  # parent_death_signal() blocks open in this process (a fork inherits the count)
_hooked = False
_forking_parent = 0  # the pid that is forking, seen by the child


def die_with_parent(parent: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies; exit now if
    the parent (`parent`, default: the current one) is already gone. False
    where the platform has no such request."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # orphaned between the fork and the request: nothing left to serve
    return True


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _after_fork_in_child() -> None:
    if _active:
        die_with_parent(_forking_parent)


@contextlib.contextmanager
def parent_death_signal() -> Iterator[None]:
    """Processes forked inside this block die with this process."""
    global _active, _hooked
    if not _hooked and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _hooked = True
    _active += 1
    try:
        yield
    finally:
        _active -= 1
