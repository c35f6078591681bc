"""Small shared helpers: errors, atomic file writes, directory locks, workers that die with
their parent, seeds, devices, environment."""
from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import platform
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch


LOCK_NAME = ".lock"  # in a directory held by `locked_dir`
TEMP_SUFFIX = ".tmp"  # of `atomic_path`'s temporary files


class L2OError(ValueError):
    """Bad input or an unmet precondition. The message is one line saying what is
    wrong and what is valid; the CLI prints it and exits with code 2."""


class Range:
    """The valid values of a numeric setting: lo..hi, each end open or closed, all
    finite; `integer` admits only ints. `check` returns the value or raises L2OError
    naming the setting, the value and what is valid."""

    def __init__(self, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open, self.integer = lo, hi, lo_open, hi_open, integer

    def __str__(self) -> str:
        if self.integer:
            return f"an integer in {self.lo}..{self.hi}"
        return (f"a finite number in {'(' if self.lo_open else '['}{self.lo:g}, "
                f"{self.hi:g}{')' if self.hi_open else ']'}")

    def contains(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):  # numpy scalars are Real too
            return False
        if self.integer and not isinstance(v, numbers.Integral):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return bool(above and below)  # False for NaN; inf is outside every finite range

    def check(self, name: str, v):
        if not self.contains(v):
            raise L2OError(f"{name} must be {self}, got {v!r}")
        return v

    def parse(self, s: str):
        """A command-line string -> the value (L2OError if malformed or out of range)."""
        try:
            v = int(s) if self.integer else float(s)
        except ValueError:
            raise L2OError(f"expected {self}, got {s!r}") from None
        if not self.contains(v):
            raise L2OError(f"must be {self}, got {s}")
        return v


def cache_dir() -> Path:
    """`$L2O_DYNAMICS_CACHE`, else the user cache dir (`$XDG_CACHE_HOME/l2o-dynamics`)."""
    env = os.environ.get("L2O_DYNAMICS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "l2o-dynamics"


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


def entries(path: str | os.PathLike) -> list[Path]:
    """A directory's entries other than its lock file (what a run has put there); [] if
    there is no such directory."""
    path = Path(path)
    return [p for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []


def _lock_holder(lock_file: Path) -> str:
    try:
        h = json.loads(lock_file.read_text())
        return f"pid {h['pid']} ({h['command']}, started {h['started']})"
    except (ValueError, KeyError, TypeError, OSError):  # the holder has not written it yet
        return "another process"


def die_with_parent(parent_pid: int, use_prctl: bool = True) -> None:
    """Make this process (a pool worker) end when its parent `parent_pid` dies, kill -9
    included, so no orphan keeps computing and writing after its driver is gone.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL). The signal fires when the *thread* that
    started this process exits, so the parent must start its workers from a thread that
    outlives them (the thread that then waits for the pool). Elsewhere (or with
    use_prctl=False) a daemon thread polls the parent pid twice a second. A parent that died
    before this ran is seen at once: this process has been re-parented. multiprocessing's
    resource tracker then exits by itself: the parent and workers held its pipe open."""
    if not (use_prctl and _set_parent_death_signal()):
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="l2o-watch-parent", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _set_parent_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) on Linux; False where unavailable."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hex digest of the canonical JSON of `obj` (content address of a config)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends on every part (e.g. ("init", seed) vs ("data", seed))."""
    return int(stable_hash([str(p) for p in parts], 16), 16) & ((1 << 63) - 1)


def generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by `derive_seed(*parts)`: same parts, same stream."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when present)."""
    if isinstance(device, torch.device):
        return device
    device = (device or "cpu").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise L2OError(f"--device {device}: CUDA is not available on this machine; use cpu or auto")
        return torch.device(device)
    raise L2OError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, auto")


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions and machine facts recorded in every run's config.json."""
    from . import __version__

    import numpy
    import scipy

    env = {
        "l2o_dynamics": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
    if device is not None:
        dev = torch.device(device)
        env["device"] = str(dev)
        if dev.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(dev)
    return env
