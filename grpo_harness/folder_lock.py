"""One writer per folder: an exclusive OS lock on ``.lock`` inside a run or ablation folder.

The lock is ``fcntl.flock`` on an open file: the kernel releases it when the process ends,
however it ends (SIGKILL included), so a killed run never leaves a stale lock behind and nothing
has to be cleaned up before a ``--resume``. The file itself stays; its text names the process
that holds (or last held) the lock, which is what a refused second writer prints.

Two processes that race to create the same folder both get past their checks; the one that
takes the lock first writes, the other is refused. A holder checks that the file it locked is
still the one at the path (another process may have removed the folder and made a new one
between the ``open`` and the ``flock``) and retries when it is not.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


class FolderBusy(Exception):
    """Another live process holds the folder's lock; the message names it."""


def holder_text() -> str:
    """What the lock file says about this process: pid, host, start time and command."""
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return (f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{command}\n")


UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}
"""flock's answers on a file system without locks (Lustre without -o flock, some FUSE mounts)."""


def _busy(path: Path, holder: str | None, what: str) -> str:
    who = holder or "another process (it has not said which yet)"
    return (f"{path.parent} is in use: this {what} is being written by {who}; "
            "wait for it to end (or stop it), or choose another --out")


_HELD: set[int] = set()
"""Descriptors of the locks this process holds: a forked child (a reward's multiprocessing pool)
closes its copies, so a folder is not held past its run by a child that outlives it (closing,
not unlocking: an flock is shared with the parent's descriptor)."""


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class FolderLock:
    """``acquire()`` takes the lock or raises FolderBusy; ``release()`` (also at process end).
    On a file system without locks ``acquire()`` returns without one and sets ``unsupported``
    (the caller says so in one line). On NFS the lock holds within one host only when the mount
    keeps locks local (``local_lock``, ``nolock``), and a crashed client's lock lasts until the
    server's lease runs out."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None
        self.unsupported = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, what: str = "run folder") -> None:
        import fcntl

        if self._fd is not None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _live_holder(fd)
                os.close(fd)
                raise FolderBusy(_busy(self.path, holder, what)) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in UNSUPPORTED:
                    raise
                self.unsupported = True  # no locks on this file system: one writer cannot be enforced
                return
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the folder was replaced under us: lock the file that is there now
        os.ftruncate(fd, 0)
        os.write(fd, holder_text().encode())
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # no holder named any more
            except OSError:
                pass
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _live_holder(fd: int, wait_s: float = 2.0) -> str:
    """The holder's text; a holder that has just taken the lock writes it a moment later, over
    the text of the last holder (gone, or killed). Such text names a process that no longer
    runs on this host: it is read again until the new holder's appears, for ``wait_s`` at most."""
    host = socket.gethostname()
    deadline = time.monotonic() + wait_s
    while True:
        text = _read(fd)
        m = re.match(r"pid (\d+) on (\S+),", text)
        if m and (m.group(2) != host or _alive(int(m.group(1)))):
            return text
        if time.monotonic() > deadline:
            return ""
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode(errors="replace").strip()
    except OSError:
        return ""
