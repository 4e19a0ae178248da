"""--limit N (a prefix of the listing that a later run completes) and --dry-run (plan without
running: counts, tokens and bytes from the headers, time from a timed probe, nothing written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from media_factory import make_image, make_video, zero_video_data

from merge_cli.inputs.sources import stream_units
from merge_cli.output import store
from merge_cli.output.reader import open_features

CPU = ["--device", "cpu", "--dtype", "fp32"]


def _images(root: Path, count: int) -> list[str]:
    """`count` images of random sizes in nested folders; their keys in listing order."""
    sides = np.random.randint(28, 200, size=(count, 2))
    keys = [f"{i % 3}/{i:03d}.png" for i in range(count)]
    for key, (height, width) in zip(keys, sides):
        make_image(root / key, int(height), int(width))
    return sorted(keys)


def _extract(cli, media: Path, out: Path, *args: str) -> dict:
    result = cli("extract", "--input", str(media), "--out", str(out), *CPU, "--json", *args)
    assert result.exit_code in (0, 3), result.output
    return json.loads(result.stdout)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and mtime: what a dry run must not touch."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            info = path.lstat()
            found[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return found


# --- --limit -----------------------------------------------------------------------------------------


def test_limit_takes_a_prefix_that_a_later_run_completes(cli, tmp_path):
    count = int(np.random.randint(20, 32))
    unit_size = int(np.random.randint(3, 8))
    limit = int(np.random.randint(2, count - 1))
    if limit % unit_size == 0:
        limit += 1  # a unit cut short is the case that matters (whole ones are tested by the rerun)
    keys = _images(tmp_path / "media", count)
    out = tmp_path / "feats.h5"
    args = ("--unit-size", str(unit_size), "--workers", "0")

    first = _extract(cli, tmp_path / "media", out, *args, "--limit", str(limit))
    assert (first["samples"], first["written"], first["limit"]) == (limit, limit, limit)
    with open_features(out) as feats:
        assert sorted(feats.keys()) == keys[:limit]  # the first N in listing order
    markers = {unit for unit, _ in store.list_unit_markers(out)}
    assert markers == set(range(limit // unit_size))  # the cut unit is not marked complete
    cut = limit // unit_size
    units_with_shards = set()
    for path in store.list_shards(out):
        with store.open_h5(path) as shard:
            units_with_shards.add(int(shard.attrs["unit"]))
    assert cut in units_with_shards  # its shards are committed all the same

    again = _extract(cli, tmp_path / "media", out, *args, "--limit", str(limit))
    assert (again["written"], again["skipped"]) == (0, limit)

    rest = _extract(cli, tmp_path / "media", out, *args)
    assert (rest["samples"], rest["written"], rest["skipped"]) == (count, count - limit, limit)
    assert not rest["warnings"][1:]  # no "inputs changed" slow path: only the demo tower's warning
    units = list(stream_units([tmp_path / "media"], unit_size=unit_size))
    markers = dict((unit, json.loads(path.read_text())) for unit, path in store.list_unit_markers(out))
    assert sorted(markers) == [unit.id for unit in units]
    for unit in units:
        assert markers[unit.id]["fingerprint"] == unit.fingerprint
        assert (markers[unit.id]["entries"], markers[unit.id]["samples"]) == (len(unit.entries), len(unit.entries))

    whole = tmp_path / "whole.h5"
    _extract(cli, tmp_path / "media", whole, *args)
    with open_features(out) as pieced, open_features(whole) as once:
        assert sorted(pieced.keys()) == keys
        for key in np.random.choice(keys, size=5, replace=False):
            assert torch.equal(pieced[key].tokens, once[key].tokens)


def test_limit_stops_the_listing(tmp_path):
    from merge_cli.inputs.units import Listed, first_entries, iter_units
    from merge_cli.records import Sample

    pulled = []

    def listing():
        for index in range(10**6):
            pulled.append(index)
            yield Listed(Sample(f"{index:07d}.jpg", Path(f"{index:07d}.jpg"), "image"), f"{index:07d}.jpg", "test")

    unit_size, limit = int(np.random.randint(5, 50)), int(np.random.randint(1, 500))
    units = list(first_entries(iter_units(listing, unit_size), limit))
    assert sum(len(unit.entries) for unit in units) == limit
    assert [unit.whole for unit in units] == [True] * (len(units) - 1) + [limit % unit_size == 0]
    assert len(pulled) <= limit + unit_size + 1  # the unit holding the last entry, and one item to know it ends


def test_limit_must_be_positive(cli, tmp_path):
    result = cli("extract", "--input", str(tmp_path), "--out", str(tmp_path / "f.h5"), "--limit", "0")
    assert result.exit_code == 2 and "--limit" in result.output


# --- --dry-run -------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "media"
    _images(root, int(np.random.randint(6, 14)))
    height, width = (2 * int(v) for v in np.random.randint(20, 60, size=2))
    make_video(root / "clips" / "a.mp4", int(np.random.randint(10, 40)), height, width, fps=10)
    make_video(root / "clips" / "b.mp4", int(np.random.randint(10, 40)), width, height, fps=5)
    (root / "broken.jpg").write_bytes(np.random.bytes(300))  # its header does not read: it would fail
    return root


@pytest.mark.parametrize("workers", ["0", "2"])
def test_dry_run_writes_nothing_and_matches_the_run(cli, corpus, tmp_path, workers):
    out = tmp_path / "out" / "feats.h5"
    (tmp_path / "out").mkdir()
    before = _tree(tmp_path)
    result = cli("extract", "--input", str(corpus), "--out", str(out), *CPU, "--workers", workers, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert _tree(tmp_path) == before  # no shard, no index, no lock file, no folder

    run = _extract(cli, corpus, out, "--workers", workers)
    assert plan["dry_run"] and plan["to_do"] == plan["listed"] == run["samples"]
    assert (plan["tokens"], plan["patch_tokens"]) == (run["tokens"], run["patch_tokens"])  # exact, from the headers
    assert plan["would_fail"] == run["failed"] == 1 and plan["failures"][0]["key"] == "broken.jpg"
    assert (plan["images"], plan["videos"]) == (run["written"] - 2, 2)
    written = sum(p.stat().st_size for p in [out, *Path(f"{out}.d").iterdir()])
    assert 0.8 * written <= plan["bytes"] <= 1.5 * written
    estimate = plan["estimate"]
    assert plan["estimated_seconds"] > 0 and estimate["tower_patch_tokens_per_second"] > 0
    assert set(estimate["decode_seconds_per_sample"]) == {"image", "video"}  # each kind measured


def test_dry_run_plans_only_what_is_left(cli, corpus, tmp_path):
    out = tmp_path / "feats.h5"
    done = _extract(cli, corpus, out, "--workers", "0", "--unit-size", "4", "--limit", "5")
    before = _tree(tmp_path)
    result = cli("extract", "--input", str(corpus), "--out", str(out), *CPU, "--workers", "0", "--unit-size", "4",
                 "--dry-run", "--json")
    plan = json.loads(result.stdout)
    assert _tree(tmp_path) == before
    assert plan["skipped"] == done["written"] + done["failed"] == 5
    assert plan["to_do"] == plan["listed"] - 5
    limited = json.loads(cli("extract", "--input", str(corpus), "--out", str(out), *CPU, "--workers", "0",
                             "--unit-size", "4", "--limit", "7", "--dry-run", "--json").stdout)
    assert (limited["listed"], limited["to_do"], limited["limit"]) == (7, 2, 7)


def test_dry_run_takes_no_lock_and_is_refused_where_the_run_is(cli, corpus, tmp_path):
    from merge_cli.output import locks

    out = tmp_path / "feats.h5"
    _extract(cli, corpus, out, "--workers", "0")
    held = locks.acquire(locks.output_lock_path(out), str(out))  # another run writing it
    try:
        busy = cli("extract", "--input", str(corpus), "--out", str(out), *CPU, "--workers", "0", "--dry-run", "--json")
        assert busy.exit_code == 0 and json.loads(busy.stdout)["to_do"] == 0
        other = cli("extract", "--input", str(corpus), "--out", str(out), *CPU, "--workers", "0", "--layer", "-2", "--dry-run")
        assert other.exit_code == 1 and "layer: -1 -> -2" in other.stderr
    finally:
        held.release()


def test_no_time_estimate_when_a_kind_cannot_be_timed(cli, tmp_path):
    media = tmp_path / "media"
    make_image(media / "a.png", 60, 90)
    zero_video_data(make_video(media / "v.mp4", 12, 48, 64))  # its header plans, its frames do not decode
    result = cli("extract", "--input", str(media), "--out", str(tmp_path / "f.h5"), *CPU, "--workers", "0", "--dry-run", "--json")
    plan = json.loads(result.stdout)
    assert plan["videos"] == 1 and plan["estimated_seconds"] is None and plan["estimate"] is None
    assert "none of the first videos could be decoded" in plan["estimate_note"]


def test_dry_run_reads_at_80_columns(corpus, tmp_path):
    from typer.testing import CliRunner

    from merge_cli.cli import app

    result = CliRunner().invoke(
        app, ["extract", "--input", str(corpus), "--out", str(tmp_path / "f.h5"), *CPU, "--workers", "0", "--dry-run"],
        env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"},
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "nothing written" in text and "estimated" in text and "would fail" in text
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.d").exists()


def test_the_summary_says_the_run_was_limited(cli, tmp_path):
    _images(tmp_path / "media", 6)
    result = cli("extract", "--input", str(tmp_path / "media"), "--out", str(tmp_path / "f.h5"), *CPU, "--workers", "0",
                 "--limit", "4")
    assert result.exit_code == 0, result.output
    assert "4 written, 0 already done, 0 failed (the first 4 inputs: --limit)" in " ".join(result.stdout.split())
