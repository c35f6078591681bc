"""One writer per directory: an exclusive lock held for a run's whole life."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from .errors import L2OError
from .files import LOCK_NAME, entries, sweep_temp_files


@contextlib.contextmanager
def locked_dir(path: str | os.PathLike, command: str, option: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on directory `path` (created if missing) for the block.

    The lock is `flock` on `path/.lock`, which records the holder's pid, command and start
    time and is removed on release. The kernel drops the lock when the holder exits however
    it exits (kill -9 included), so a lock file left by a kill never blocks a later run. A
    second process fails at once with an L2OError naming the holder. The descriptor is not
    inherited by child processes. On entry, with no other writer possible, it removes the
    temporary files that killed writers left under `path`; if the block fails in a
    directory it created and left empty, that directory (and the parents created with it)
    is removed again."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise L2OError(f"{option} {path} exists and is not a directory; give a new or empty directory")
    top = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)  # first to create
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _lock(path / LOCK_NAME)
    except OSError as e:
        raise L2OError(f"{option} {path} is not writable ({e.strerror}); choose a writable directory") from None
    if fd is None:
        raise L2OError(f"{option} {path} is in use by {_lock_holder(path / LOCK_NAME)}; wait for it to "
                       f"finish or use another {option}")
    try:
        holder = {"pid": os.getpid(), "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(holder).encode())
        sweep_temp_files(path)
        try:
            yield path
        except BaseException:
            if top is not None and not entries(path):
                with contextlib.suppress(OSError):
                    (path / LOCK_NAME).unlink()
                    for p in [path, *path.parents][:len(path.parts) - len(top.parts) + 1]:
                        p.rmdir()
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            (path / LOCK_NAME).unlink()  # before the lock is released: nobody can hold it
        os.close(fd)


def _lock(lock_file: Path) -> int | None:
    """An empty, locked `lock_file` as an open descriptor, or None if another process holds it.
    A file unlinked by its holder between our open and our flock is not the lock any more:
    then try again on the new one."""
    import fcntl

    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)


def _lock_holder(lock_file: Path) -> str:
    try:
        h = json.loads(lock_file.read_text())
        return f"pid {h['pid']} ({h['command']}, started {h['started']})"
    except (ValueError, KeyError, TypeError, OSError):  # the holder has not written it yet
        return "another process"
