"""Where the tool runs: its cache directory, the device, and the versions recorded in every
run's config.json."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .errors import L2OError


def cache_dir() -> Path:
    """`$L2O_DYNAMICS_CACHE`, else the user cache dir (`$XDG_CACHE_HOME/l2o-dynamics`)."""
    env = os.environ.get("L2O_DYNAMICS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "l2o-dynamics"


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
