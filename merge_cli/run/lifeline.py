"""Decode workers never outlive the main process: each asks to die when its parent does.

torch's DataLoader workers look for a dead parent only between items (every 5 s when idle), so a
worker blocked anywhere else (in a read that never returns, in `Queue.get` on a message its parent
was killed while writing) stays alive after `kill -9` of the main process, holding memory and
files. On Linux the kernel kills the worker when its parent dies (prctl PR_SET_PDEATHSIG);
elsewhere a daemon thread in the worker polls the parent's pid and ends the process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 0.5
"""How often the portable fallback looks for its parent."""


def exit_with_parent(parent_pid: int, worker_id: int | None = None) -> None:
    """A DataLoader `worker_init_fn` (bound with functools.partial to the main process's pid):
    from here on the worker dies with `parent_pid`.

    The kernel's request follows the *thread* that forked the worker: the DataLoader iterator must
    be created on a thread that lives as long as the workers do (the extract loop's main thread).
    """
    if not _kernel_kills_on_parent_death():
        _poll_parent(parent_pid)
    if os.getppid() != parent_pid:  # the parent died before the request was in place
        os._exit(1)


def _kernel_kills_on_parent_death() -> bool:
    """Ask Linux to send SIGKILL to this process when its parent dies; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc symbol table (static builds), no prctl
        return False


def _poll_parent(parent_pid: int, interval: float = POLL_SECONDS) -> threading.Thread:
    """The portable fallback: a daemon thread that ends the process once its parent is gone (an
    orphan is adopted by another process, so its parent pid changes)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="merge-cli-parent-watch", daemon=True)
    thread.start()
    return thread
