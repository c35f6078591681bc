"""Small shared helpers: errors, atomic file writes, seeds, devices, environment."""
from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`
    (atomic on POSIX), on error it is removed. Readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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
