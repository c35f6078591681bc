"""Process hygiene: pool workers that end with their parent, and a Ctrl-C that is never lost."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Iterator

_interrupted = False  # set by remember_interrupts' handler; read by check_interrupt


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


def _on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def remember_interrupts() -> Iterator[None]:
    """For the block, Ctrl-C raises KeyboardInterrupt as usual and is also remembered, so
    `check_interrupt` raises it again if it was lost. Python drops a KeyboardInterrupt that
    lands inside a finalizer (`__del__`, a weakref callback: "Exception ignored in ...") or
    inside a callback whose C caller clears errors; the long loops (meta-training unrolls,
    meta-test steps, pipeline jobs) call `check_interrupt` once per iteration, so such a
    Ctrl-C still stops them. A no-op outside the main thread or where SIGINT is not
    Python's default handler (ignored in pool workers, or the caller's own)."""
    import signal

    global _interrupted
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    _interrupted = False
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _interrupted = False


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived under `remember_interrupts` (it may have
    been swallowed where it was first raised)."""
    if _interrupted:
        raise KeyboardInterrupt
