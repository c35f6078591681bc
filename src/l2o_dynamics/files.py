"""Files the tool writes: atomic writes (a temporary file renamed into place), fresh names,
the sweep of temporary files killed writers left, and what counts as a run directory's content."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

import torch

LOCK_NAME = ".lock"  # in a directory held by `locks.locked_dir`
TEMP_SUFFIX = ".tmp"  # of `atomic_path`'s temporary files


def fresh_path(parent: str | os.PathLike, prefix: str, suffix: str = "", directory: bool = False) -> Path:
    """Create a new file (or directory) with a unique name in `parent` and return its path.

    Unlike tempfile.mkstemp/mkdtemp (mode 0600/0700) it is created with mode 0666/0777
    less the umask, so a file later renamed into place gets the usual permissions (0644)."""
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {parent}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path `.NAME.*.tmp` beside `path`; on success it is renamed onto
    `path` (atomic on POSIX), on error it is removed. Readers never see a partial file.
    A kill leaves the temporary file behind; `sweep_temp_files` removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_path(path.parent, f".{path.name}.", TEMP_SUFFIX)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def sweep_temp_files(root: str | os.PathLike) -> list[Path]:
    """Remove the temporary files `atomic_path` leaves behind when killed (`.*.tmp`)
    anywhere under `root`; returns them. Call it only while holding `locked_dir(root)`:
    another live writer's temporary files look the same."""
    removed = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                    removed.append(Path(dirpath) / name)
    return removed


def entries(path: str | os.PathLike) -> list[Path]:
    """A directory's entries other than its lock file (what a run has put there); [] if
    there is no such directory."""
    path = Path(path)
    return [p for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
