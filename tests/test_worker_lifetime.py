"""Decode workers never outlive the main process (issue 16): after `kill -9` of the main process
no DataLoader worker is left, whatever it was doing. Linux only: workers are found in /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from media_factory import make_image

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")

GONE_WITHIN = 3.0
"""Seconds the workers get after the kill. torch's own watchdog looks every 5 s, and only
between items; the kernel's parent-death signal is immediate."""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    found = _stat(pid)
    return found is not None and found[0] not in ("Z", "X")  # a zombie waits only to be reaped


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None and found[1] == pid:
                kids.append(int(entry))
    return kids


def _kill_and_check(main: subprocess.Popen, workers: list[int]) -> list[int]:
    """kill -9 the main process; the workers still alive GONE_WITHIN seconds later."""
    os.kill(main.pid, signal.SIGKILL)
    main.wait(timeout=30)
    deadline = time.monotonic() + GONE_WITHIN
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # never leave the test's own processes behind
        os.kill(pid, signal.SIGKILL)
    return left


def _blocked_loader_script(fallback: bool) -> str:
    """The extract loop's own DataLoader (`pipeline._decoded`), with every decode blocked for good,
    as a worker stuck in a read that never returns: torch's watchdog never gets to look."""
    return textwrap.dedent(
        f"""
        import sys, threading
        from merge_cli.run import lifeline, pipeline
        if {fallback}:
            lifeline._kernel_kills_on_parent_death = lambda: False  # the portable thread instead
        pipeline._DecodeDataset.__getitem__ = lambda self, todo: threading.Event().wait()
        decoded = pipeline._decoded(range(1000), None, 2)
        print(*[worker.pid for worker in decoded._workers], flush=True)
        next(decoded)  # waits for ever
        """
    )


@pytest.mark.parametrize("fallback", [False, True], ids=["prctl", "polling thread"])
def test_workers_blocked_in_a_decode_die_with_the_main_process(fallback):
    main = subprocess.Popen([sys.executable, "-c", _blocked_loader_script(fallback)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in main.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        time.sleep(1.0)  # every worker has run its init and is blocked in its first item
        assert all(_alive(pid) for pid in workers) and main.poll() is None
        assert _kill_and_check(main, workers) == [], "workers outlived the main process"
    finally:
        _end(main)


@pytest.mark.slow
def test_extract_workers_are_gone_soon_after_kill_9_of_the_main_process(tmp_path):
    import numpy as np

    for i, (h, w) in enumerate(np.random.randint(300, 600, size=(160, 2))):
        make_image(tmp_path / "media" / f"{i:03d}.jpg", int(h), int(w))
    command = [sys.executable, "-m", "merge_cli", "extract", "--input", str(tmp_path / "media"),
               "--out", str(tmp_path / "feats.h5"), "--device", "cpu", "--workers", "2", "--batch-tokens", "256"]
    main = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and main.poll() is None:
            workers = [pid for pid in _children(main.pid) if _same_command(pid, main.pid)]
            time.sleep(0.05)
        assert len(workers) == 2, "the run ended or never started its decode workers"
        time.sleep(1.0)  # mid-run: decoding and computing
        assert main.poll() is None, "the run ended before it could be killed mid-run"
        assert _kill_and_check(main, workers) == [], "workers outlived the main process"
    finally:
        _end(main)


def _same_command(pid: int, other: int) -> bool:
    """A forked worker has its parent's command line (torch's other helpers do not)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() == Path(f"/proc/{other}/cmdline").read_bytes()
    except OSError:
        return False


def _end(main: subprocess.Popen) -> None:
    if main.poll() is None:
        main.kill()
        main.wait(timeout=30)
