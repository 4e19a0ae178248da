"""`merge-cli inspect` and `merge-cli index`: reports, integrity problems, foreign and damaged files."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from feature_factory import attrs, failure, features

from merge_cli.errors import FormatError
from merge_cli.output.format import list_shards, shard_dir
from merge_cli.output.index import build_index
from merge_cli.output.inspection import inspect_features
from merge_cli.output.store import ShardWriter

REPORT_KEYS = {
    "path", "role", "format", "format_version", "dtype", "token_dim", "attrs", "shards", "counts", "grids",
    "token_stats", "errors", "errors_left_out", "error_types", "checked", "problems", "notes", "sample",
}


@pytest.fixture
def output(tmp_path):
    out = tmp_path / "feats.h5"
    records = {}
    with ShardWriter(out, attrs(), shard_bytes=20_000) as writer:
        for i in range(16):
            grid = (2, 4, 4) if i % 5 == 0 else (1, 2, 2) if i in (2, 4, 6, 8, 12) else (1, 4, 6)
            record = features(f"m/{i:02d}", grid=grid)
            writer.add(record)
            records[record.key] = record
        for i in range(3):
            writer.add_failure(failure(f"bad/{i}.jpg", f"broken number {i}"))
    build_index(out)
    return out, records


def test_good_file_human(cli, output):
    out, _ = output
    result = cli("inspect", str(out))
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("demo-vit", "cafebabe12345678", "feats.h5.d/r000-00000.h5", "16 (", "most common grids",
                     "1 x 4 x 6", "tokens per sample", "bad/0.jpg", "broken number 2", "no integrity problems"):
        assert expected in text, expected


def test_good_file_json(cli, output):
    out, records = output
    result = cli("inspect", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == REPORT_KEYS
    counts = report["counts"]
    assert counts["samples"] == 16 and counts["errors"] == 3
    assert counts["videos"] == 4 and counts["images"] == 12 and counts["frames"] == 8
    assert counts["tokens"] == sum(r.tokens.shape[0] * r.tokens.shape[1] for r in records.values())
    assert counts["shards"] == len(report["shards"]) == len(list_shards(out)) >= 2
    assert all(s["exists"] and s["bytes"] > 0 for s in report["shards"])
    assert sum(s["samples"] for s in report["shards"]) == 16
    assert report["grids"][0] == {"grid_thw": [1, 4, 6], "merged_hw": [2, 3], "tokens": 6, "count": 7, "share": 0.4375}
    stats = report["token_stats"]
    assert (stats["min"], stats["max"]) == (1, 8)
    assert sum(b["count"] for b in stats["histogram"]) == 16
    assert report["error_types"] == {"UnidentifiedImageError": 3}
    assert report["attrs"]["settings"]["layer"] == -1
    assert report["problems"] == [] and report["sample"] is None and report["checked"] is False


def test_key_shows_one_sample(cli, output):
    out, records = output
    record = records["m/07"]
    result = cli("inspect", str(out), "--key", "m/07", "--json")
    assert result.exit_code == 0, result.output
    sample = json.loads(result.stdout)  # the sample alone, not the whole report
    assert sample["key"] == "m/07" and sample["kind"] == "image"
    assert sample["grid_thw"] == [1, 4, 6] and sample["merged_hw"] == [2, 3] and sample["shape"] == [1, 6, 32]
    assert sample["dtype"] == "bfloat16" and sample["resized_hw"] == [56, 84]
    values = record.tokens.float()
    assert sample["stats"]["max"] == pytest.approx(float(values.max()))
    assert sample["stats"]["mean"] == pytest.approx(float(values.mean()), abs=1e-5)
    assert sample["stats"]["nan"] == 0
    human = cli("inspect", str(out), "--key", "m/00")
    assert human.exit_code == 0
    assert "2 x 4 x 4 -> merged 2x2" in human.stdout and "0.00, 0.50" in human.stdout
    for whole_file in ("provenance", "shards (", "most common grids", "tokens per sample", "bad/0.jpg"):
        assert whole_file not in human.stdout, whole_file


def test_unknown_and_failed_keys_exit_2(cli, output):
    out, _ = output
    result = cli("inspect", str(out), "--key", "nope.jpg")
    assert result.exit_code == 2 and "no sample with key 'nope.jpg'" in result.output
    result = cli("inspect", str(out), "--key", "bad/1.jpg", "--json")
    assert result.exit_code == 2
    assert "failed at decode" in json.loads(result.stdout)["error"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(os.urandom(4096)), "not an HDF5 file"),
        (lambda p: p.write_text("hello"), "not an HDF5 file"),
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a folder"),
    ],
    ids=["random-bytes", "text", "missing", "folder"],
)
def test_foreign_input_exits_2(cli, tmp_path, make, message):
    path = tmp_path / "feats.h5"
    make(path)
    result = cli("inspect", str(path))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_foreign_hdf5_and_truncated_file_exit_2(cli, tmp_path, output):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["images"] = np.zeros((2, 3))
    result = cli("inspect", str(foreign))
    assert result.exit_code == 2 and "not a merge-cli output" in result.output

    out, _ = output
    truncated = tmp_path / "truncated.h5"
    data = list_shards(out)[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    result = cli("inspect", str(truncated), "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": json.loads(result.stdout)["error"], "exit_code": 2}
    assert "truncated" in json.loads(result.stdout)["error"]


def test_check_finds_an_injected_nan(cli, output):
    out, _ = output
    assert cli("inspect", str(out), "--check").exit_code == 0
    with h5py.File(out) as index:
        row = int(np.nonzero(index["keys"].asstr()[()] == "m/07")[0][0])
        shard = index["shards/path"].asstr()[index["shard"][row]]
        local = int(index["shard_offsets"][row])
    with h5py.File(out.parent / shard, "r+") as handle:
        values = handle["tokens"][local + 1]
        values[3] = 0x7FC0  # a bfloat16 NaN
        handle["tokens"][local + 1] = values
    assert cli("inspect", str(out)).exit_code == 0  # only --check reads the values
    result = cli("inspect", str(out), "--check", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["checked"] is True
    assert report["problems"] == [  # the NaN was written after the checksum, so both are found
        "1 sample whose rows do not match their checksum (changed after they were written: a swapped, "
        "truncated or foreign shard?): 'm/07'",
        "1 sample with NaN or Inf tokens: 'm/07'",
    ]
    detail = cli("inspect", str(out), "--key", "m/07", "--json")
    assert json.loads(detail.stdout)["stats"]["nan"] == 1


def test_missing_shard_and_unindexed_shard_are_problems(cli, output):
    out, _ = output
    shards = list_shards(out)
    shards[-1].unlink()
    result = cli("inspect", str(out))
    assert result.exit_code == 1
    assert f"shard feats.h5.d/{shards[-1].name} is missing" in result.stdout
    assert "missing" in result.stdout
    build_index(out)
    with ShardWriter(out, attrs(), rank=4) as writer:
        writer.add(features("late.jpg"))
    report = json.loads(cli("inspect", str(out), "--json").stdout)
    assert report["problems"] == [f"1 shard not in the index, e.g. r004-00000.h5 (run: merge-cli index {out})"]
    result = cli("index", str(out))
    assert result.exit_code == 0 and "shards" in result.stdout
    assert cli("inspect", str(out)).exit_code == 0


def test_length_mismatch_is_a_problem(cli, output):
    out, _ = output
    with h5py.File(out, "r+") as handle:
        lengths = handle["lengths"][()]
        lengths[2] += 1
        handle["lengths"][...] = lengths
    report = json.loads(cli("inspect", str(out), "--json").stdout)
    assert "1 sample with a token count that does not match the grid: 'm/02'" in report["problems"]


def test_shard_directly_and_leftover_temporaries(cli, output):
    out, _ = output
    (shard_dir(out) / "r000-00042.h5.tmp").write_bytes(b"partial")
    report = inspect_features(out)
    assert report["problems"] == [] and any("interrupted run" in n for n in report["notes"])
    shard = list_shards(out)[0]
    result = cli("inspect", str(shard), "--json")
    assert result.exit_code == 0
    single = json.loads(result.stdout)
    assert single["role"] == "shard" and single["shards"][0]["name"] == shard.name
    assert single["counts"]["samples"] == single["shards"][0]["samples"] > 0


def test_empty_output_and_index_json(cli, tmp_path):
    out = tmp_path / "feats.h5"
    with ShardWriter(out, attrs()) as writer:
        writer.add_failure(failure("only.jpg"))
    result = cli("index", str(out), "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["samples"] == 0 and summary["errors"] == 1 and summary["shards"] == 1
    report = inspect_features(out, check=True)
    assert report["counts"]["samples"] == 0 and report["token_stats"] is None and report["grids"] == []
    assert cli("inspect", str(out)).exit_code == 0
    with pytest.raises(FormatError, match="nothing to index"):
        build_index(tmp_path / "none" / "feats.h5")
    assert cli("index", str(tmp_path / "none" / "feats.h5")).exit_code == 2


def test_failures_lists_every_record(cli, tmp_path):
    out = tmp_path / "feats.h5"
    with ShardWriter(out, attrs()) as writer:
        writer.add(features("ok.jpg"))
        for i in range(23):  # more than the report's first 10
            writer.add_failure(failure(f"bad/{i:02d}.jpg", f"broken\tnumber\n{i}"))
    build_index(out)
    human = cli("inspect", str(out), "--failures")
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    assert len(lines) == 23
    assert lines[5].split("\t") == ["bad/05.jpg", "decode", "UnidentifiedImageError: broken\\tnumber\\n5"]
    as_json = cli("inspect", str(out), "--failures", "--json")
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["key"] for r in records] == [f"bad/{i:02d}.jpg" for i in range(23)]
    assert records[22] == {"key": "bad/22.jpg", "stage": "decode", "type": "UnidentifiedImageError", "message": "broken\tnumber\n22"}
    report = json.loads(cli("inspect", str(out), "--json").stdout)
    assert len(report["errors"]) == 10 and report["errors_left_out"] == 13
    assert "merge-cli inspect" in cli("inspect", str(out)).stdout  # the table says how to see all


def test_missing_index_beside_shards_suggests_index(cli, output):
    out, _ = output
    out.unlink()  # as after kill -9 before the index was written
    result = cli("inspect", str(out))
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "does not exist, but" in message and "complete shards" in message
    assert f"merge-cli index {out}" in message
    nothing = cli("inspect", str(out.parent / "other.h5"))
    assert nothing.exit_code == 2 and "merge-cli index" not in nothing.output
