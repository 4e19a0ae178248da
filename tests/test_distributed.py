"""Scaling out: unit claims, torchrun on CPU (gloo) with a slow rank, killed ranks, and hand-split jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from media_factory import make_image, make_video

from merge_cli.output.reader import open_features
from merge_cli.run.distributed import DistContext, static_owner, unit_claims

CPU_FP32 = ["--device", "cpu", "--dtype", "fp32", "--workers", "0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
EXTRACT = [sys.executable, "-m", "merge_cli", "extract"]


def test_context_from_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert DistContext.detect() == DistContext()
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = DistContext.detect()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.connected) == (5, 8, 1, True)
    by_hand = DistContext.detect(rank=2, world_size=3)
    assert (by_hand.rank, by_hand.world_size, by_hand.connected) == (2, 3, False)


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "media"
    for index in range(14):
        make_image(root / f"img/{index:02d}.png", 84 + 28 * (index % 4), 112 + 14 * (index % 5))
    make_video(root / "vid/a.mp4", 12, 96, 128, fps=10)
    make_video(root / "vid/b.mp4", 20, 120, 160, fps=10)
    return root


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


def _assert_same_features(path_a: Path, path_b: Path) -> None:
    with open_features(path_a) as a, open_features(path_b) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert a[key].grid_thw == b[key].grid_thw
            torch.testing.assert_close(b[key].tokens, a[key].tokens, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(corpus, tmp_path):
    single, double = tmp_path / "single.h5", tmp_path / "double.h5"
    _run([*EXTRACT, "--input", str(corpus), "--out", str(single), *CPU_FP32])
    done = _run([*TORCHRUN, "--nproc-per-node", "2", "-m", "merge_cli", "extract",
                 "--input", str(corpus), "--out", str(double), *CPU_FP32, "--unit-size", "3", "--json"])
    summary = json.loads(done.stdout)  # rank 0 alone prints, for the whole job
    assert summary["world_size"] == 2 and summary["written"] == 16 and summary["failed"] == 0
    shards = sorted(p.name for p in (tmp_path / "double.h5.d").glob("*.h5"))
    assert any(name.startswith("r000-") for name in shards) and any(name.startswith("r001-") for name in shards)
    _assert_same_features(single, double)


def _markers(out: Path) -> dict[int, dict]:
    folder = out.with_name(out.name + ".d")
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in folder.glob("unit-*.json")}


@pytest.mark.slow
def test_a_slow_rank_claims_fewer_units_and_the_output_is_the_same(tmp_path):
    root = tmp_path / "media"
    for index in range(24):
        make_image(root / f"{index:02d}.png", 56 + 28 * (index % 3), 84 + 28 * (index % 2))
    single, double = tmp_path / "single.h5", tmp_path / "double.h5"
    _run([*EXTRACT, "--input", str(root), "--out", str(single), *CPU_FP32, "--unit-size", "2"])
    slowed = {**os.environ, "MERGE_CLI_TEST_SLOW_RANK": "1:2.0"}  # rank 1 sleeps 2 s per unit it claims
    done = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "-m", "merge_cli", "extract", "--input", str(root),
                           "--out", str(double), *CPU_FP32, "--unit-size", "2", "--json"],
                          capture_output=True, text=True, timeout=300, env=slowed)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["written"] == 24
    markers = _markers(double)
    assert sorted(markers) == list(range(12))  # every unit done once, by one rank
    by_rank = [sum(1 for m in markers.values() if m["rank"] == rank) for rank in (0, 1)]
    assert by_rank[0] > by_rank[1] >= 1, by_rank  # the fast rank took more
    for marker in markers.values():  # a unit's shards are all of the rank that did it
        assert all(name.startswith(f"r{marker['rank']:03d}-") for name in marker["shards"])
    _assert_same_features(single, double)
    assert {u: (m["fingerprint"], m["entries"]) for u, m in markers.items()} == {
        u: (m["fingerprint"], m["entries"]) for u, m in _markers(single).items()
    }


def test_claims_static_round_robin_and_alone():
    from itertools import islice

    assert list(islice(unit_claims(DistContext()), 4)) == [0, 1, 2, 3]
    parts = [list(islice(unit_claims(DistContext(rank, 3)), 5)) for rank in range(3)]
    assert parts == [[0, 3, 6, 9, 12], [1, 4, 7, 10, 13], [2, 5, 8, 11, 14]]
    assert all(static_owner(unit, 3) == rank for rank, part in enumerate(parts) for unit in part)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


@pytest.mark.slow
def test_killed_rank_then_rerun_with_another_world_size(tmp_path):
    root = tmp_path / "media"
    for index in range(100):
        make_image(root / f"{index:03d}.png", 112 + 28 * (index % 3), 112 + 28 * (index % 4))
    clean, out = tmp_path / "clean.h5", tmp_path / "feats.h5"
    _run([*EXTRACT, "--input", str(root), "--out", str(clean), *CPU_FP32])

    run = [*TORCHRUN, "--nproc-per-node", "2", "-m", "merge_cli", "extract", "--input", str(root),
           "--out", str(out), *CPU_FP32, "--shard-size", "30kB", "--batch-tokens", "64", "--unit-size", "10"]
    launcher = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "feats.h5.d"
    deadline = time.monotonic() + 180
    victim = None
    while time.monotonic() < deadline and launcher.poll() is None:
        if shards.is_dir() and len(list(shards.glob("r001-*.h5"))) >= 1:
            victim = next((p for p in _children(launcher.pid) if _rank_of(p) == 1), None)
            if victim is not None:
                break
        time.sleep(0.02)
    assert victim is not None and launcher.poll() is None, "the job ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # torchrun reports the lost rank

    # Rerun the rest as a single process (a different world size): same keys, same tensors.
    done = _run([*EXTRACT, "--input", str(root), "--out", str(out), *CPU_FP32, "--json"])
    summary = json.loads(done.stdout)
    assert summary["skipped"] > 0 and summary["skipped"] + summary["written"] == 100
    _assert_same_features(clean, out)


@pytest.mark.slow
def test_index_over_separate_rank_jobs(corpus, tmp_path):
    single, split = tmp_path / "single.h5", tmp_path / "split.h5"
    _run([*EXTRACT, "--input", str(corpus), "--out", str(single), *CPU_FP32])
    written = 0
    for rank in (1, 0):  # two jobs that never talk to each other, in either order
        done = _run([*EXTRACT, "--input", str(corpus), "--out", str(split), *CPU_FP32, "--unit-size", "5",
                     "--rank", str(rank), "--world-size", "2", "--json"])
        written += json.loads(done.stdout)["written"]
    assert written == 16
    split.unlink()
    rebuilt = _run([sys.executable, "-m", "merge_cli", "index", str(split), "--json"])
    assert json.loads(rebuilt.stdout)["samples"] == 16
    _assert_same_features(single, split)


def test_progress_counts_add_up_across_ranks():
    from merge_cli.run.distributed import StoreCounts
    from merge_cli.run.progress import Reporter

    store = torch.distributed.HashStore()  # the same add() as torchrun's TCP store, in process
    rank0 = Reporter(job=StoreCounts(store), sync_interval=0.0)
    rank1 = Reporter(job=StoreCounts(store), sync_interval=3600.0)  # holds its counts back...
    rank1.advance(samples=3, tokens=300)
    rank0.advance(samples=2, tokens=200, failures=1)
    assert (rank0.samples, rank0.tokens, rank0.failures) == (2, 200, 1)
    rank1.finish()  # ...until it finishes
    rank0.advance(samples=1, tokens=100)
    assert (rank0.samples, rank0.tokens, rank0.failures) == (6, 600, 1)


@pytest.mark.slow
def test_torchrun_partial_failure_is_not_a_crash_unless_strict(tmp_path):
    """A bad file under torchrun: every rank exits 0 (no ChildFailedError) and rank 0's summary
    counts the failure; --strict makes it fatal on every rank."""
    root = tmp_path / "media"
    for index in range(4):
        make_image(root / f"{index}.png", 56 + 28 * index, 84)
    (root / "broken.png").write_bytes(b"not a png")
    command = [*TORCHRUN, "--nproc-per-node", "2", "-m", "merge_cli", "extract", "--input", str(root), *CPU_FP32]
    done = subprocess.run([*command, "--out", str(tmp_path / "a.h5"), "--json"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ChildFailedError" not in done.stderr
    summary = json.loads(done.stdout)
    assert (summary["written"], summary["failed"], summary["exit_code"]) == (4, 1, 0)
    strict = subprocess.run([*command, "--out", str(tmp_path / "b.h5"), "--strict", "--json"], capture_output=True,
                            text=True, timeout=300)
    assert strict.returncode != 0
    assert json.loads(strict.stdout)["exit_code"] == 3
