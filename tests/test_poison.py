"""A sample the format cannot hold stays one error record: the rest of its shard is written.

Keys with NUL bytes, lone surrogates or of absurd length come from manifests (JSON allows all
three), Parquet key columns and the writer API; each must become that sample's error record.
"""

from __future__ import annotations

import json

import h5py
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feature_factory import attrs, bits, failure, features
from media_factory import make_image

from merge_cli.output.format import list_shards
from merge_cli.output.index import build_index
from merge_cli.output.reader import open_features
from merge_cli.output.store import ShardWriter, UnstorableSample
from merge_cli.records import MAX_KEY_BYTES, MAX_TEXT_CHARS, key_problem

CPU_FP32 = ["--device", "cpu", "--dtype", "fp32", "--workers", "0"]
POISON_KEYS = {"nul": "b\x00.jpg", "surrogate": "c\ud800.jpg", "overlong": "x" * (MAX_KEY_BYTES + 1) + ".jpg"}


@pytest.mark.parametrize("kind", sorted(POISON_KEYS))
def test_the_writer_refuses_an_unstorable_key_before_writing_anything(tmp_path, kind):
    out = tmp_path / "feats.h5"
    good = {f"g/{i}.jpg": features(f"g/{i}.jpg") for i in range(6)}
    assert key_problem(POISON_KEYS[kind]) is not None
    with ShardWriter(out, attrs()) as writer:
        for i, (key, record) in enumerate(good.items()):
            writer.add(record)
            if i == 2:
                with pytest.raises(UnstorableSample):
                    writer.add(features(POISON_KEYS[kind]))
        # error records are made storable, whatever they hold
        writer.add_failure(failure(POISON_KEYS[kind], message="m\x00" + "y" * (3 * MAX_TEXT_CHARS)))
    assert writer.samples_written == len(good)
    build_index(out)
    with open_features(out) as feats:
        assert feats.keys() == list(good)
        for key, record in good.items():
            assert bits(feats[key].tokens).equal(bits(record.tokens))
        (stored,) = feats.failures()
    assert key_problem(stored.key) is None and "\x00" not in stored.message
    assert len(stored.message) <= MAX_TEXT_CHARS and "more characters" in stored.message


def _run(cli, inputs, out, *extra):
    result = cli("extract", *[arg for path in inputs for arg in ("--input", str(path))], "--out", str(out),
                 *CPU_FP32, "--json", *extra)
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("manifest", ["json", "jsonl", "txt"])
def test_poison_paths_in_a_manifest_become_error_records(tmp_path, cli, manifest):
    media = tmp_path / "media"
    good = [f"{i}.png" for i in range(6)]
    for name in good:
        make_image(media / name, 56 + 28 * (hash(name) % 3), 84)
    poison = ["b\x00.jpg", "x" * (MAX_KEY_BYTES + 10) + ".png"]
    if manifest != "txt":
        poison.append("c\ud800.png")  # JSON can spell a lone surrogate; a text file cannot
    names = good[:3] + poison + good[3:]
    path = media / f"list.{manifest}"
    if manifest == "json":
        path.write_text(json.dumps([{"image": name} for name in names]))
    elif manifest == "jsonl":
        path.write_text("".join(json.dumps({"path": name}) + "\n" for name in names))
    else:
        path.write_bytes("".join(name + "\n" for name in names).encode("utf-8"))
    code, summary = _run(cli, [path], tmp_path / "feats.h5")
    assert code == 3 and summary["written"] == len(good) and summary["failed"] == len(poison)
    with open_features(tmp_path / "feats.h5") as feats:
        assert sorted(feats.keys()) == sorted(good)
        stored = feats.failures()
    assert len(stored) == len(poison) and all(key_problem(f.key) is None for f in stored)
    rerun_code, rerun = _run(cli, [path], tmp_path / "feats.h5")  # and the next run resumes cleanly
    assert rerun_code == 0 and rerun["skipped"] == len(names) and rerun["written"] == 0


def test_a_decodable_sample_with_an_overlong_key_is_refused_at_the_writer(tmp_path, cli):
    images = [make_image(tmp_path / "src" / f"{i}.png", 84, 112) for i in range(5)]
    ids = [f"id-{i}" for i in range(5)]
    ids[2] = "k" * (MAX_KEY_BYTES + 1)  # decodes fine, then cannot be stored under its key
    table = pa.table({"id": ids, "image": [p.read_bytes() for p in images]})
    pq.write_table(table, tmp_path / "train.parquet")
    out = tmp_path / "feats.h5"
    code, summary = _run(cli, [tmp_path / "train.parquet"], out)
    assert code == 3 and summary["written"] == 4 and summary["failed"] == 1
    assert summary["failures"][0]["stage"] == "store" and summary["failures"][0]["error_type"] == "UnstorableKey"
    with open_features(out) as feats:
        assert sorted(feats.keys()) == sorted(i for i in ids if len(i) < 100)
    for shard in list_shards(out):  # the rest of that shard is there
        with h5py.File(shard) as handle:
            assert handle["keys"].shape[0] == 4 and handle["errors/key"].shape[0] == 1
