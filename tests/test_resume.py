"""Resume by unit: completion markers, a scan that reads no per-sample data, partly written units,
nothing-to-do resumes that write nothing, and kill -9 at random points."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from media_factory import make_image

from merge_cli.inputs.sources import stream_units
from merge_cli.output import store
from merge_cli.output.reader import open_features

CPU_FP32 = ["--device", "cpu", "--dtype", "fp32", "--workers", "0"]
EXTRACT = [sys.executable, "-m", "merge_cli", "extract"]


def _corpus(root: Path, count: int) -> Path:
    for index in range(count):
        make_image(root / f"{index // 10}/{index:03d}.png", 56 + 28 * (index % 4), 84 + 14 * (index % 3))
    return root


def _markers(out: Path) -> dict[int, dict]:
    return {unit: json.loads(path.read_text()) for unit, path in store.list_unit_markers(out)}


def _state(out: Path) -> dict[str, float]:
    folder = out.with_name(out.name + ".d")
    return {p.name: p.stat().st_mtime_ns for p in [out, *folder.iterdir()]}


def test_resume_scan_of_a_finished_output_opens_one_shard_and_a_rerun_writes_nothing(cli, tmp_path, monkeypatch):
    root = _corpus(tmp_path / "media", 14)
    out = tmp_path / "feats.h5"
    args = ["extract", "--input", str(root), "--out", str(out), *CPU_FP32, "--unit-size", "4", "--shard-size", "20kB"]
    assert cli(*args).exit_code == 0
    markers = _markers(out)
    assert sorted(markers) == [0, 1, 2, 3] and [m["entries"] for m in markers.values()] == [4, 4, 4, 2]
    assert len(store.list_shards(out)) > len(markers)  # several shards per unit: markers list them all
    assert sorted(n for m in markers.values() for n in m["shards"]) == [p.name for p in store.list_shards(out)]

    opened = []
    real_open = store.open_h5
    monkeypatch.setattr(store, "open_h5", lambda path, **kw: opened.append(Path(path).name) or real_open(path, **kw))
    scan = store.scan_units(out)
    assert sorted(scan.complete) == [0, 1, 2, 3] and scan.partial == {} and not scan.loose_done
    assert [name for name in opened if name != out.name] == [store.list_shards(out)[0].name]  # the settings only
    monkeypatch.undo()

    before = _state(out)
    again = cli(*args, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 14
    assert _state(out) == before  # no shard, no marker, not even the index rewritten


def test_a_partly_written_unit_redoes_only_its_missing_samples(cli, tmp_path):
    root = _corpus(tmp_path / "media", 12)
    out, clean = tmp_path / "feats.h5", tmp_path / "clean.h5"
    args = [*CPU_FP32, "--unit-size", "5", "--shard-size", "20kB"]
    assert cli("extract", "--input", str(root), "--out", str(clean), *args).exit_code == 0
    assert cli("extract", "--input", str(root), "--out", str(out), *args).exit_code == 0
    # Make unit 1 look like a killed run's: its marker gone, its last shard gone.
    marker = _markers(out)[1]
    assert len(marker["shards"]) >= 2
    (out.parent / "feats.h5.d" / store.unit_marker_name(1)).unlink()
    (out.parent / "feats.h5.d" / marker["shards"][-1]).unlink()
    kept_keys = set()
    for name in marker["shards"][:-1]:
        with open_features(out.parent / "feats.h5.d" / name) as kept:
            kept_keys |= set(kept.keys())
    assert 0 < len(kept_keys) < 5
    result = cli("extract", "--input", str(root), "--out", str(out), *args, "--json")
    summary = json.loads(result.stdout)
    assert result.exit_code == 0 and summary["written"] == 5 - len(kept_keys) and summary["skipped"] == 7 + len(kept_keys)
    redone = _markers(out)[1]
    assert redone["shards"][:-1] == marker["shards"][:-1] and redone["entries"] == 5 and redone["samples"] == 5
    _assert_same(clean, out)


def _assert_same(clean: Path, out: Path) -> None:
    with open_features(clean) as a, open_features(out) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert b.attrs["duplicate_keys"] == 0  # nothing was computed twice
        for key in a.keys():
            torch.testing.assert_close(b[key].tokens, a[key].tokens, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_equals_a_clean_run(tmp_path):
    root = _corpus(tmp_path / "media", 60)
    clean, killed = tmp_path / "clean.h5", tmp_path / "killed.h5"
    command = [*EXTRACT, "--input", str(root), *CPU_FP32, "--batch-tokens", "64", "--unit-size", "7",
               "--shard-size", "30kB"]
    done = subprocess.run([*command, "--out", str(clean)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shards = killed.parent / (killed.name + ".d")
    rng = random.Random(int(os.environ.get("MERGE_CLI_TEST_SEED", "0")))
    kills = 0
    for _ in range(3):  # kill, resume, kill again: at a random moment after a random number of shards
        process = subprocess.Popen([*command, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wanted = len(list(shards.glob("*.h5"))) + rng.randint(1, 3) if shards.is_dir() else rng.randint(1, 3)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if shards.is_dir() and len(list(shards.glob("*.h5"))) >= wanted:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 1, "every run finished before it could be killed; make the corpus larger"

    resumed = subprocess.run([*command, "--out", str(killed), "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["written"] + summary["skipped"] == 60
    _assert_same(clean, killed)
    # Unit boundaries as in the clean run: same units, same keys in each, every shard in one unit.
    units = {unit.id: set(unit.keys) for unit in stream_units([root], unit_size=7)}
    expected = {u: (m["fingerprint"], m["entries"]) for u, m in _markers(clean).items()}
    assert {u: (m["fingerprint"], m["entries"]) for u, m in _markers(killed).items()} == expected
    listed_shards = set()
    for unit, marker in _markers(killed).items():
        for name in marker["shards"]:
            listed_shards.add(name)
            with open_features(shards / name) as shard:
                assert shard.attrs["unit"] == unit and set(shard.keys()) <= units[unit]
    assert listed_shards == {p.name for p in store.list_shards(killed)}  # no shard outside a marker


def test_a_unit_whose_samples_are_all_stored_but_unmarked_gets_its_marker_and_no_shard(cli, tmp_path):
    root = _corpus(tmp_path / "media", 9)
    out = tmp_path / "feats.h5"
    # One decode worker: the DataLoader walks the first units before the writer exists.
    args = ["extract", "--input", str(root), "--out", str(out), "--device", "cpu", "--dtype", "fp32",
            "--workers", "1", "--unit-size", "3"]
    assert cli(*args).exit_code == 0
    markers = _markers(out)
    for unit in (0, 2):  # killed after the shards, before the markers
        (out.parent / "feats.h5.d" / store.unit_marker_name(unit)).unlink()
    shards = sorted(p.name for p in store.list_shards(out))
    result = cli(*args, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["written"] == 0
    assert sorted(p.name for p in store.list_shards(out)) == shards
    again = _markers(out)
    assert {u: (m["fingerprint"], m["shards"], m["samples"]) for u, m in again.items()} == {
        u: (m["fingerprint"], m["shards"], m["samples"]) for u, m in markers.items()
    }
