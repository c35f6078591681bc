"""Process hygiene: pool workers that end with their parent."""
from __future__ import annotations

import os
import threading
import time


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
