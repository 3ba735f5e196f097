"""One run per output directory: an advisory lock beside ``--out``, and atomic writes of the result files.

The lock is ``OUT.lock`` (beside ``OUT`` and ``OUT.partial``). A run takes it before it writes anything
and holds it until ``OUT.partial`` has been renamed to ``OUT``, so a second run on the same ``--out``
(plain, ``--force`` or ``--resume``) is refused before it touches anything, and a reader never sees a
half-renamed result.

* Where ``fcntl`` exists the lock is ``flock(LOCK_EX | LOCK_NB)`` on the file: the OS releases it when
  the process dies (kill -9 included), so a lock left by a dead run is simply taken over.
* Elsewhere the file is created exclusively with the owner's pid in it; a file whose pid no longer
  runs is stale and is taken over.

The file holds the owner's pid, for the refusal's message. It is removed when the lock is released;
a run that takes a file which was removed in the meantime (the inode changed) tries again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["OutputLocked", "RunLock", "atomic_write_text", "lock_path"]


class OutputLocked(RuntimeError):
    """Another live run holds the output directory's lock."""

    def __init__(self, out: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"another hyperflux-compile ({who}) is writing {out}; wait for it or choose another --out")
        self.pid = pid


def lock_path(out: Path) -> Path:
    """The lock file of an output directory: ``OUT.lock`` beside it."""
    return out.with_name(out.name + ".lock")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """The output directory's lock; :meth:`acquire` or raise :class:`OutputLocked`, :meth:`release`."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = lock_path(self.out)
        self._fh: IO[str] | None = None
        self._owned_file = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            self._acquire_flock()
        else:  # no fcntl (Windows); the tests run _acquire_exclusive directly
            self._acquire_exclusive()
        return self

    def _acquire_flock(self) -> None:
        for _ in range(10):
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open as long as the lock
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise OutputLocked(self.out, _read_pid(self.path)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released and removed the file between our open and our lock
                fh.close()
                continue
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            self._fh = fh
            return
        raise OutputLocked(self.out, _read_pid(self.path))

    def _acquire_exclusive(self) -> None:
        """The fallback without fcntl: create the file exclusively; take over one whose pid is dead."""
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid is not None and pid != os.getpid() and _alive(pid):
                    raise OutputLocked(self.out, pid) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(str(os.getpid()))
            self._owned_file = True
            return
        raise OutputLocked(self.out, _read_pid(self.path))

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # before the unlock: a waiter that opened it retries on the new inode
            self._fh.close()  # closing releases the flock
            self._fh = None
        elif self._owned_file:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._owned_file = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: a reader sees
    the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
