"""One writer per output: exclusive advisory locks on lock files beside the output.

    feats.h5.lock           the output: held by the process that lists, removes and indexes
    feats.h5.d/r000.lock    rank 0's shards: held by the one process writing them

A lock is `fcntl.flock` on its own open file, so the kernel drops it when the holder dies (kill -9
included): a lock that can be taken proves that nobody owns what it guards. The holder writes
its pid and host into the file, for the message that refuses a second writer. On release the file
is removed while still locked; a taker checks that the file it locked is still the one at the
path, so a lock is never taken on a removed file.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from merge_cli.errors import OutputBusyError, UsageError

LOCK_SUFFIX = ".lock"
POLL_SECONDS = 0.2
GRACE_SECONDS = 1.0
"""A lock held by nobody named (an `is_free` probe holds one for microseconds, a new holder has
not written its line yet) is retried this long before the take is refused."""
HOLDER_BYTES = 512
"""Holder lines longer than this are cut when read (a lock file is tiny; a hostile one is not)."""


def output_lock_path(out: Path) -> Path:
    """`feats.h5` -> `feats.h5.lock` beside it."""
    out = Path(out)
    return out.with_name(out.name + LOCK_SUFFIX)


def rank_lock_path(out: Path, rank: int) -> Path:
    """`feats.h5` -> `feats.h5.d/r000.lock`: guards rank `rank`'s shards and temporaries."""
    out = Path(out)
    return out.with_name(out.name + ".d") / f"r{rank:03d}{LOCK_SUFFIX}"


@dataclass
class FileLock:
    """A held lock; `release` (or leaving the `with` block) removes the lock file and unlocks."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        _HELD.pop(_key(self.path), None)
        try:
            os.unlink(self.path)  # still locked: a waiting taker sees a new file, never this one
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[str, FileLock] = {}
"""Locks this process holds, by path: a second take in the same process reuses the first."""


def _key(path: Path) -> str:
    return os.path.abspath(path)


def held_here(path: Path) -> bool:
    """Does this process hold the lock at `path`?"""
    return _key(path) in _HELD


def acquire(path: Path, what: str, *, wait: float = 0.0) -> FileLock:
    """Take the lock at `path` (creating its folder), waiting at most `wait` seconds.

    Raises OutputBusyError naming the holder when another process keeps it. When this process
    already holds it, the held lock is returned (release it once, by its first taker)."""
    import fcntl

    path = Path(path)
    if held_here(path):
        return _HELD[_key(path)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create {path.parent}: {error.strerror or error}") from error
    started = time.monotonic()
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            raise UsageError(f"cannot create the lock file {path}: {error.strerror or error}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"cannot lock {path}: {error.strerror or error}") from error
            waited = time.monotonic() - started
            if waited >= wait and (holder or waited >= GRACE_SECONDS):
                raise OutputBusyError(
                    f"{what} is being written by {holder or 'another process'} (lock {path}); "
                    "wait for it to finish, or give another --out"
                ) from None
            time.sleep(POLL_SECONDS)
            continue
        if _same_file(fd, path):
            break
        os.close(fd)  # locked a file its holder removed on release: take the new one
    _write_holder(fd)
    lock = FileLock(path, fd)
    _HELD[_key(path)] = lock
    return lock


@contextmanager
def hold(path: Path, what: str, *, wait: float = 0.0) -> Iterator[FileLock]:
    """The lock at `path` for the `with` block; released after it only if taken here (a lock this
    process already held stays held)."""
    taken = not held_here(path)
    lock = acquire(path, what, wait=wait)
    try:
        yield lock
    finally:
        if taken:
            lock.release()


def is_free(path: Path) -> bool:
    """True when no process holds the lock at `path` (its owner, if any, is gone). The lock is
    taken and released to find out, so the answer is only good while the caller holds a lock that
    keeps new owners away, or for things a new owner would not touch."""
    import fcntl

    if held_here(path):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's lock
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _write_holder(fd: int) -> None:
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:2]))
    text = f"pid {os.getpid()} on host {socket.gethostname()} ({command or 'python'})\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8", "replace"), 0)
    except OSError:
        pass  # the lock holds without its note; a refused run then names "another process"


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, HOLDER_BYTES, 0)
    except OSError:
        return ""
    text = raw.decode("utf-8", "replace").strip().splitlines()
    line = text[0] if text else ""
    return "".join(c if c.isprintable() else "?" for c in line)
