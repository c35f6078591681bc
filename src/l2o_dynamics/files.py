"""What the tool writes, and the only things it ever deletes.

The rules (README, Reliability):
- Every file is created new (`O_EXCL`, a fresh name) and, when it replaces one, written to
  a temporary file `.NAME.l2o-XXXXXXXX.tmp` beside it and renamed into place: a rename
  replaces a symbolic link planted at NAME, never the file it points to.
- A run directory or job store is one the tool made or an empty one: it then writes its
  marker `.l2o-dynamics.json` there (`{"kind": ...}`); a non-empty directory without the
  marker is refused, `--overwrite` included.
- The tool deletes only what it can prove it created: its own temporary names inside a
  directory with its marker (never a pattern over a directory the user named), the old
  contents `--overwrite` moved into `.l2o-replaced-XXXXXXXX` once the new run has
  finished, and what a run interrupted in this process wrote after moving them aside.
- Nothing is deleted or moved before the command's own checks have passed.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import L2OError

LOCK_NAME = ".lock"  # in a directory held by `locks.locked_dir`
MARKER = ".l2o-dynamics.json"  # in every directory the tool made or claimed while empty
TEMP_SUFFIX = ".tmp"  # of `atomic_path`'s temporary files
TEMP_TAG = "l2o-"  # every temporary name carries it: .NAME.l2o-XXXXXXXX.tmp, .KEY.l2o-XXXXXXXX
ASIDE_PREFIX = ".l2o-replaced-"  # --overwrite's old contents, until the new run has finished
FINISHED = ("metrics.csv", "config.json")  # a finished run's result
RUN_KINDS = ("meta-test", "meta-train", "reproduce", "probe")
STORE_KIND = "store"
_TEMP_FILE = re.compile(r"\..+\." + TEMP_TAG + r"[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the platform has none (Windows)
NOT_A_LINK = "l2o-dynamics does not write through links it did not make; remove it"


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
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {parent}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path `.NAME.l2o-XXXXXXXX.tmp` beside `path`; on success it is renamed onto
    `path` (atomic on POSIX), on error it is removed. Readers never see a partial file.
    A kill leaves the temporary file behind; `sweep_temp_files` removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_path(path.parent, f".{path.name}.{TEMP_TAG}", TEMP_SUFFIX)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def is_temp_name(name: str) -> bool:
    """A name `atomic_path` generates (`.NAME.l2o-XXXXXXXX.tmp`)."""
    return _TEMP_FILE.fullmatch(name) is not None


def sweep_temp_files(root: str | os.PathLike) -> list[Path]:
    """Remove the temporary files `atomic_path` leaves behind when killed, under `root` if it
    carries the tool's marker; returns them. Only names `atomic_path` generates; links are
    not followed; a subdirectory with a marker of its own (a job store, another run) and
    `--overwrite`'s old contents are left to their own runs. Call it only while holding
    `locked_dir(root)`: another live writer's temporary files look the same."""
    removed: list[Path] = []
    if owner(root) is None:
        return removed
    for dirpath, dirnames, names in os.walk(root):  # never into links (followlinks=False)
        dirnames[:] = [d for d in dirnames if not d.startswith(ASIDE_PREFIX)
                       and not os.path.lexists(os.path.join(dirpath, d, MARKER))]
        for name in names:
            if is_temp_name(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                    removed.append(Path(dirpath) / name)
    return removed


def entries(path: str | os.PathLike) -> list[Path]:
    """A directory's entries other than its lock file and the tool's marker (what a run has
    put there); [] if there is no such directory."""
    path = Path(path)
    return [p for p in path.iterdir() if p.name not in (LOCK_NAME, MARKER)] if path.is_dir() else []


def remove_tree(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a directory tree (links inside are
    removed, not followed)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path)


def make_dir(path: Path, flag: str = "--out") -> Path:
    """A directory the user named, created with its parents if missing (a link to a
    directory is the user's choice and is used)."""
    if path.exists() and not path.is_dir():
        raise L2OError(f"{flag} {path} exists and is not a directory; give a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sub_dir(path: Path) -> Path:
    """A directory the tool makes inside one of its own (a job's work directory): created if
    missing; a link or a file in its place is refused."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise L2OError(f"{path} is not a directory the tool made (a link or a file); {NOT_A_LINK}")
    path.mkdir(exist_ok=True)
    return path


# ---- ownership ---------------------------------------------------------------------------
def owner(path: str | os.PathLike) -> dict | None:
    """The marker of a directory the tool made (`{"kind": ...}`), or None: no marker, or one
    that is a link, not a regular file or not the tool's JSON."""
    try:
        fd = os.open(Path(path) / MARKER, os.O_RDONLY | NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            mark = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    ok = isinstance(mark, dict) and isinstance(mark.get("kind"), str) and all(
        isinstance(n, str) and n.startswith(ASIDE_PREFIX) and "/" not in n for n in mark.get("replaced", []))
    return mark if ok else None


def write_marker(path: Path, kind: str, replaced: list[str] | None = None) -> None:
    atomic_write_json(path / MARKER, {"kind": kind, "replaced": list(replaced or [])})


def finished(path: Path) -> bool:
    return all((path / name).is_file() for name in FINISHED)


def _kind_of(kind: str) -> str:
    return "run" if kind in RUN_KINDS else kind


def check_run_dir(path: str | os.PathLike, kind: str, *, overwrite: bool = False, resume: bool = False,
                  adopt: bool = False, flag: str = "--out") -> Path:
    """Whether a run of `kind` may write into `path`; creates, moves and deletes nothing.

    Admitted: a missing or empty directory; one with the tool's marker of the same kind
    that is not finished (`resume`: continue it) or, with `overwrite`, any run directory
    of the tool. `adopt` admits an unmarked directory the caller has recognised as its own
    kind of run (a meta-training's valid checkpoint). A finished result (metrics.csv and
    config.json) is continued only by `reproduce`, which redoes nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise L2OError(f"{flag} {path} exists and is not a directory; give a new or empty directory")
    if not entries(p):
        return p
    # the hints speak the caller's language: --overwrite on a command line, overwrite=True in Python
    ow, re_ = ("--overwrite", "--resume") if flag.startswith("-") else ("overwrite=True", "resume=True")
    mark = owner(p) or ({"kind": kind} if adopt else None)
    if mark is None:
        raise L2OError(f"{flag} {path} is not empty and was not made by l2o-dynamics (it has no {MARKER}; "
                       f"{ow} too replaces only directories l2o-dynamics made); choose a new or empty directory")
    if mark["kind"] != kind and not (overwrite and _kind_of(mark["kind"]) == _kind_of(kind) == "run"):
        if _kind_of(mark["kind"]) != _kind_of(kind):
            raise L2OError(f"{flag} {path} is a l2o-dynamics {mark['kind']} directory, not a {kind} one; "
                           "choose another directory")
        raise L2OError(f"{flag} {path} holds a {mark['kind']} run; "
                       f"{f'pass {ow} to replace it or ' if kind != 'reproduce' else ''}choose a new directory")
    if overwrite or (resume and (kind == "reproduce" or not finished(p))):
        return p
    if resume:
        raise L2OError(f"{flag} {path} holds a finished {kind} (metrics.csv, config.json), nothing to resume; "
                       f"pass {ow} to start over or choose a new directory")
    hint = f"{re_} to continue it, {ow} to start over," if kind == "meta-train" else ow
    raise L2OError(f"{flag} {path} exists and is not empty; pass {hint} or choose a new directory")


def check_store(path: str | os.PathLike, flag: str = "--store") -> Path:
    """A job store is a directory the tool made (its marker says `store`), an empty or
    missing one, or one made by a version before the marker: only job directories
    (`KIND-HASH`), `.work` and the lock inside. Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise L2OError(f"{flag} {path} exists and is not a directory; give a new or empty directory")
    mark = owner(p)
    if mark is not None and mark["kind"] != STORE_KIND:
        raise L2OError(f"{flag} {path} is a l2o-dynamics {mark['kind']} directory, not a job store; "
                       "choose another directory")
    if mark is None and not all(_STORE_ENTRY.fullmatch(e.name) and e.is_dir() and not e.is_symlink()
                                for e in entries(p)):
        raise L2OError(f"{flag} {path} is not empty and is not a job store of l2o-dynamics (it has no {MARKER}); "
                       "give a new or empty directory")
    return p


_STORE_ENTRY = re.compile(r"[a-z][a-z-]*-[0-9a-f]{12}|\.work")


def claim_store(path: str | os.PathLike, flag: str = "--store") -> Path:
    """`check_store`, then the directory created and marked as a job store."""
    p = check_store(path, flag)
    make_dir(p, flag)
    if owner(p) is None:
        write_marker(p, STORE_KIND)
    return p


@contextlib.contextmanager
def run_dir(path: str | os.PathLike, kind: str, *, overwrite: bool = False, resume: bool = False,
            adopt: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Claim `path` for a run of `kind` for the block; call it holding `locked_dir(path)` and
    after the command's own checks.

    `check_run_dir`, then: the directory is created and marked, the temporary files killed
    writers left in it are swept, and with `overwrite` its contents are moved into a fresh
    `.l2o-replaced-XXXXXXXX` (recorded in the marker). The old contents are deleted once a
    run there has finished (`drop_replaced`, called by `results.write_run`); if the block
    fails before that, what it wrote is removed and the old contents are moved back. A kill
    leaves them aside, recorded: the next finished run there deletes them."""
    p = check_run_dir(path, kind, overwrite=overwrite, resume=resume, adopt=adopt, flag=flag)
    make_dir(p, flag)
    before = owner(p)
    replaced = list(before["replaced"]) if before and before.get("replaced") else []
    if before is not None:
        sweep_temp_files(p)
    for e in entries(p):
        if e.is_symlink() and e.is_dir() and e.name not in replaced and not overwrite:
            raise L2OError(f"{flag} {e} is a symbolic link to a directory; {NOT_A_LINK}")
    aside = None
    moving = [e for e in entries(p) if e.name not in replaced] if overwrite else []
    if moving:
        aside = fresh_path(p, ASIDE_PREFIX, directory=True)
        replaced.append(aside.name)
        write_marker(p, kind, replaced)  # before the first move: a kill leaves it recorded
        for e in moving:
            os.rename(e, aside / e.name)  # a link is moved, not followed
    else:
        write_marker(p, kind, replaced)
    try:
        yield p
    except BaseException:
        if aside is not None and aside.is_dir() and not finished(p):
            _move_back(p, aside, before)
        raise


def _move_back(p: Path, aside: Path, before: dict | None) -> None:
    """Undo `run_dir`'s move aside: remove what this run wrote, restore the old contents
    and the old marker."""
    mark = owner(p) or {"replaced": []}
    keep = set(mark["replaced"])
    for e in entries(p):
        if e.name not in keep:
            remove_tree(e)  # written by this run after the move aside, under its lock
    for e in aside.iterdir():
        os.rename(e, p / e.name)
    aside.rmdir()
    old = dict(before) if before else {"kind": mark.get("kind", "run")}
    write_marker(p, old["kind"], [n for n in mark["replaced"] if n != aside.name])


def drop_replaced(path: str | os.PathLike) -> list[Path]:
    """Once a run in `path` has finished: delete the old contents `--overwrite` moved
    aside (the directories its marker records); returns them."""
    p = Path(path)
    mark = owner(p)
    if not mark or not mark.get("replaced") or not finished(p):
        return []
    gone = [p / n for n in mark["replaced"]]
    for d in gone:
        remove_tree(d)
    write_marker(p, mark["kind"])
    return gone


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
