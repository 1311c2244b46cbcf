"""One training process per run folder.

`RunLock` holds an exclusive `flock` on `<run>/lock`, a file holding the
owner's PID and host. The kernel frees a flock when its process dies, however
it dies (SIGKILL included), so a lock is never stale: a second process finds
it taken only while the first is alive, and is refused with its PID.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from iecl.train.run_dir import RunDirError


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "lock"
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        for _ in range(100):
            fd = self._lock_once()
            try:  # the file we locked is still the one at the path (a releasing owner unlinks it)?
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise RunDirError(f"cannot lock {self.path}: it keeps being replaced")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def _lock_once(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"cannot write to the run directory {self.path.parent}: {err.strerror} (making its lock "
                              "file); make it writable, or start a new run with run.out_dir set to a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"process {owner[0]} on {owner[1]}" if len(owner) >= 2 else "another process"
            raise RunDirError(
                f"{self.path.parent} is in use: {who} is training in it; wait for it to end "
                "(or stop it) before resuming this run"
            ) from None
        except OSError as err:  # a file system without locks
            os.close(fd)
            raise RunDirError(f"cannot lock {self.path}: {err.strerror}; put run.out_dir on a local file system") from None
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still ours: we hold the lock while unlinking
        except OSError:
            pass
        os.close(self.fd)  # closing frees the flock
        self.fd = None
