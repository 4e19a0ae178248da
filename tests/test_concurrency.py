"""One writer per output: a second extract on the same --out is refused, never mixed in.

The extracts run in forked children of the test process (torch is already imported there), so
that each costs a fraction of a second instead of a fresh interpreter's start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from feature_factory import attrs, features
from media_factory import make_image

from merge_cli.errors import OutputBusyError
from merge_cli.output import locks
from merge_cli.output.format import shard_dir
from merge_cli.output.index import build_index
from merge_cli.output.reader import open_features
from merge_cli.output.store import ShardWriter, remove_output, scan_existing

ROUNDS = 20


@pytest.fixture
def tiny(tmp_path) -> Path:
    root = tmp_path / "media"
    rng = np.random.default_rng()
    for i in range(3):
        make_image(root / f"img{i}.png", int(rng.integers(28, 90)), int(rng.integers(28, 90)), rng=rng)
    return root


def fork_extract(media: Path, out: Path, log: Path) -> int:
    """Start `merge-cli extract` in a forked child; returns its pid (stdout+stderr go to `log`)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        import torch

        torch.set_num_threads(1)  # the parent's thread pool does not survive fork
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # not pytest's capture objects
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        sys.argv = ["merge-cli", "extract", "--input", str(media), "--out", str(out),
                    "--device", "cpu", "--dtype", "fp32", "--workers", "0"]
        from merge_cli.cli import main

        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def stored(out: Path) -> dict[str, bytes]:
    """Every sample's stored rows, as raw bytes, after the output verified: each sample against
    its checksum, and the whole file with inspect's integrity checks."""
    from merge_cli.output.inspection import inspect_features

    assert inspect_features(out, check=True)["problems"] == []
    with open_features(out, verify=True) as feats:
        return {key: feats[key].tokens.numpy().tobytes() for key in feats.keys()}


def test_a_second_extract_on_one_out_is_refused(tiny, tmp_path):
    reference_out = tmp_path / "ref" / "feats.h5"
    assert wait(fork_extract(tiny, reference_out, tmp_path / "ref.log")) == 0
    reference = stored(reference_out)
    assert len(reference) == 3
    outcomes = []
    for round in range(ROUNDS):
        out = tmp_path / f"run{round}" / "feats.h5"
        logs = tmp_path / f"a{round}.log", tmp_path / f"b{round}.log"
        if round % 2 == 0:
            # Deterministic: B starts while A holds the lock (A is stopped at whatever point it
            # had reached after taking it).
            first = fork_extract(tiny, out, logs[0])
            lock = locks.output_lock_path(out)
            deadline = time.monotonic() + 60
            while f"pid {first} " not in (lock.read_text() if lock.exists() else ""):
                assert time.monotonic() < deadline, logs[0].read_text()
                time.sleep(0.005)
            os.kill(first, signal.SIGSTOP)
            second = fork_extract(tiny, out, logs[1])
            second_code = wait(second)
            os.kill(first, signal.SIGCONT)
            codes = (wait(first), second_code)
            assert codes == (0, 1), [log.read_text() for log in logs]
            message = logs[1].read_text()
            assert f"pid {first} " in message and "being written" in message and "Traceback" not in message
            assert len(message.strip().splitlines()) == 1, message
        else:
            # A plain race: both start together. One is refused, unless they did not overlap (then
            # the second found everything done).
            pids = fork_extract(tiny, out, logs[0]), fork_extract(tiny, out, logs[1])
            codes = tuple(wait(pid) for pid in pids)
            assert codes in ((0, 1), (1, 0), (0, 0)), [log.read_text() for log in logs]
            for code, log in zip(codes, logs):
                assert "Traceback" not in log.read_text()
                if code == 1:
                    assert "being written by pid" in log.read_text()
        outcomes.append(codes)
        assert stored(out) == reference, round
        assert not list(out.parent.glob("*.lock")) and not list(shard_dir(out).glob("*.lock"))
    print("outcomes:", outcomes)


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "feats.h5"
    script = (
        "import sys, time; from merge_cli.output import locks; "
        f"locks.acquire(locks.output_lock_path({str(out)!r}), 'x'); print('held', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=f"being written by pid {child.pid} on host"):
            build_index(out, attrs=attrs(), wait=0)
    finally:
        child.kill()  # kill -9: the kernel drops the lock
        child.wait()
    build_index(out, attrs=attrs(), wait=0)
    assert open_features(out).keys() == []


def test_temporaries_of_a_live_writer_survive_scans_and_overwrite(tmp_path):
    out = tmp_path / "feats.h5"
    with ShardWriter(out, attrs(), rank=0) as writer:
        writer.add(features("done.jpg"))
    build_index(out)
    # a live rank 1 in another process, writing its open shard
    script = (
        "import sys, time; sys.path.insert(0, 'tests'); from feature_factory import attrs, features; "
        "from merge_cli.output import locks; from merge_cli.output.store import ShardWriter; "
        f"lock = locks.acquire(locks.rank_lock_path({str(out)!r}, 1), 'x'); "
        f"w = ShardWriter({str(out)!r}, attrs(), rank=1); w.add(features('open.jpg')); "
        "print(w._shards[-1].tmp, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parent.parent)
    try:
        live_tmp = Path(child.stdout.readline().strip())
        assert live_tmp.exists() and live_tmp.name.startswith("r001-")
        dead_tmp = shard_dir(out) / "r002-00000.h5.tmp"  # rank 2 was killed: nobody holds its lock
        dead_tmp.write_bytes(os.urandom(100))
        assert scan_existing(out).done_keys == {"done.jpg"}
        assert live_tmp.exists() and not dead_tmp.exists()
        remove_output(out)  # --overwrite: the live writer's temporary and lock stay
        assert live_tmp.exists() and locks.rank_lock_path(out, 1).exists()
        assert not out.exists()
    finally:
        child.kill()
        child.wait()
    assert scan_existing(out) is None and not live_tmp.exists()
