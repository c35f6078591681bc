"""One writer per directory: an exclusive lock held for a run's whole life, which also
keeps other runs out of the directories below it (a job store inside a run's --out)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Iterator

from .errors import L2OError
from .files import LOCK_NAME, MARKER, NOFOLLOW, NOT_A_LINK, entries, owner

_HELD: set[Path] = set()  # the directories this process holds, resolved
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted as the lock file must not hang the open


@contextlib.contextmanager
def locked_dir(path: str | os.PathLike, command: str, option: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on directory `path` (created if missing) for the block.

    The lock is `flock` on `path/.lock`, which records the holder's pid, command and start
    time and is removed on release. The kernel drops the lock when the holder exits however
    it exits (kill -9 included), so a lock file left by a kill never blocks a later run. A
    second process fails at once with an L2OError naming the holder, and so does one whose
    `path` lies inside a directory of the tool that another process holds. The lock file is
    opened without following links and must be a regular file with one name, empty or
    written by the tool: a planted link or foreign file is refused, never written through.
    The descriptor is not inherited by child processes. Taking the lock deletes nothing; if
    the block fails in a directory it created and left empty, that directory (and the
    parents created with it) is removed again."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise L2OError(f"{option} {path} exists and is not a directory; give a new or empty directory")
    fcntl = _flock_module(option)
    _refuse_inside_held(path, option, fcntl)
    top = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)  # first to create
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _lock(path / LOCK_NAME, option, fcntl)
    except OSError as e:
        raise L2OError(f"{option} {path} is not writable ({e.strerror}); choose a writable directory") from None
    if fd is None:
        raise L2OError(f"{option} {path} is in use by {_lock_holder(path / LOCK_NAME)}; wait for it to "
                       f"finish or use another {option}")
    real = path.resolve()
    _HELD.add(real)
    try:
        holder = {"pid": os.getpid(), "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(holder).encode())
        try:
            yield path
        except BaseException:
            if top is not None and not entries(path):
                with contextlib.suppress(OSError):
                    _unlink_if(path / LOCK_NAME, fd)
                    with contextlib.suppress(FileNotFoundError):
                        (path / MARKER).unlink()  # this process made the directory, so the marker
                    for p in [path, *path.parents][:len(path.parts) - len(top.parts) + 1]:
                        p.rmdir()
            raise
    finally:
        _HELD.discard(real)
        _unlink_if(path / LOCK_NAME, fd)  # before the lock is released: nobody can hold it
        os.close(fd)


def _flock_module(option: str):
    try:
        import fcntl
    except ImportError:  # Windows
        raise L2OError(f"{option}: the lock that keeps two runs out of one directory needs POSIX flock "
                       "(Linux, macOS), which this system lacks; run l2o-dynamics under WSL") from None
    return fcntl


def _lock(lock_file: Path, option: str, fcntl) -> int | None:
    """An empty, locked `lock_file` as an open descriptor, or None if another process holds it.
    A file unlinked by its holder between our open and our flock is not the lock any more:
    then try again on the new one."""
    while True:
        created = True
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | NOFOLLOW, 0o666)
        except FileExistsError:
            created = False
            try:
                fd = os.open(lock_file, os.O_RDWR | os.O_CLOEXEC | NOFOLLOW | _NONBLOCK)
            except FileNotFoundError:  # its holder released it meanwhile
                continue
            except OSError as e:
                if e.errno == errno.ELOOP or lock_file.is_symlink():
                    raise L2OError(f"{option} {lock_file.parent}: {lock_file} is a symbolic link; "
                                   f"{NOT_A_LINK}") from None
                raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise L2OError(f"{option} {lock_file.parent}: {lock_file} is not a lock file l2o-dynamics made "
                           "(not a regular file, or one with other names); remove it or choose another directory")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(lock_file, follow_symlinks=False).st_ino == st.st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        if not created and not _written_by_us(os.pread(fd, 1 << 16, 0)):
            os.close(fd)
            raise L2OError(f"{option} {lock_file.parent}: {lock_file} exists and was not written by "
                           "l2o-dynamics; remove it or choose another directory")
        os.ftruncate(fd, 0)
        return fd


def _written_by_us(blob: bytes) -> bool:
    """Empty (a holder killed before writing it) or the holder record `locked_dir` writes."""
    if not blob:
        return True
    try:
        h = json.loads(blob)
    except ValueError:
        return False
    return isinstance(h, dict) and set(h) == {"pid", "command", "started"}


def _unlink_if(lock_file: Path, fd: int) -> None:
    """Remove `lock_file` if it is still the file open as `fd`."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(lock_file, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            lock_file.unlink()


def _refuse_inside_held(path: Path, option: str, fcntl) -> None:
    """L2OError if a directory of the tool above `path` is locked by another process (its
    sweep and writes cover what lies below it)."""
    for above in path.resolve().parents:
        if above in _HELD or owner(above) is None:
            continue
        try:
            fd = os.open(above / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | NOFOLLOW | _NONBLOCK)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by the close below
        except BlockingIOError:
            raise L2OError(f"{option} {path} lies inside {above}, which is in use by "
                           f"{_lock_holder(above / LOCK_NAME)}; wait for it to finish or use a directory "
                           "outside it") from None
        finally:
            os.close(fd)


def _lock_holder(lock_file: Path) -> str:
    try:
        fd = os.open(lock_file, os.O_RDONLY | NOFOLLOW | _NONBLOCK)
        try:
            h = json.loads(os.read(fd, 1 << 16))
        finally:
            os.close(fd)
        return f"pid {h['pid']} ({h['command']}, started {h['started']})"
    except (ValueError, KeyError, TypeError, OSError):  # the holder has not written it yet
        return "another process"
