"""The HDF5 format: shard writer, crash-safe commit, resume scan, index with virtual datasets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from extras import needs_hdf5plugin
from feature_factory import attrs, bits, failure, features

from merge_cli.errors import FormatError, OutputWriteError, UsageError
from merge_cli.output.format import decode_attrs, list_shards, shard_dir
from merge_cli.output.index import build_index
from merge_cli.output.reader import open_features
from merge_cli.output.store import ShardWriter, _OpenShard, remove_output, scan_existing
from merge_cli.records import Failure


def write(out: Path, records, **options) -> ShardWriter:
    with ShardWriter(out, attrs(store_dtype=options.get("store_dtype", "bf16")), **options) as writer:
        for record in records:
            if hasattr(record, "tokens"):
                writer.add(record)
            else:
                writer.add_failure(record)
    return writer


def stored_tokens_h5py(out: Path) -> dict[str, np.ndarray]:
    """Every sample's rows read with plain h5py through the index's virtual `tokens`."""
    with h5py.File(out, "r") as handle:
        tokens = handle["tokens"]
        keys = handle["keys"].asstr()[()]
        offsets, lengths = handle["offsets"][()], handle["lengths"][()]
        return {key: tokens[o : o + n] for key, o, n in zip(keys, offsets, lengths)}


def assert_same(expected: dict, out: Path) -> None:
    """Reader and plain h5py both return exactly the written bits for every key."""
    plain = stored_tokens_h5py(out)
    assert sorted(plain) == sorted(expected)
    with open_features(out) as feats:
        assert sorted(feats.keys()) == sorted(expected)
        for key, record in expected.items():
            sample = feats[key]
            assert sample.tokens.dtype == record.tokens.dtype
            assert sample.tokens.shape == record.tokens.shape
            assert torch.equal(bits(sample.tokens), bits(record.tokens)), key
            raw = plain[key].reshape(record.tokens.shape)
            if record.tokens.dtype == torch.bfloat16:
                assert np.array_equal(raw.view(np.int16), bits(record.tokens).numpy())
            else:
                assert np.array_equal(raw.view(np.uint8), record.tokens.numpy().view(np.uint8))


@pytest.mark.parametrize("store_dtype", ["bf16", "fp16", "fp32"])
def test_round_trip_is_bit_exact(tmp_path, store_dtype):
    out = tmp_path / "feats.h5"
    records = {f"img/{i}.jpg": features(f"img/{i}.jpg", store_dtype=store_dtype, all_bits=True) for i in range(12)}
    write(out, records.values(), store_dtype=store_dtype)
    summary = build_index(out)
    assert summary["samples"] == 12 and summary["errors"] == 0
    assert summary["dtype"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[store_dtype]
    assert_same(records, out)
    with h5py.File(out) as handle:
        assert handle["tokens"].attrs["dtype"] == summary["dtype"]
        if store_dtype == "bf16":
            assert handle["tokens"].dtype == np.uint16


def test_bf16_special_values_survive(tmp_path):
    out = tmp_path / "feats.h5"
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -3.5, 65504.0, 1e38])
    record = features("special.png", grid=(1, 2, 2), dim=8)
    record.tokens = special.to(torch.bfloat16).reshape(1, 1, 8)
    write(out, [record])
    build_index(out)
    with open_features(out) as feats:
        assert torch.equal(bits(feats["special.png"].tokens), bits(record.tokens))


def test_small_shard_size_gives_several_shards_read_as_one(tmp_path):
    out = tmp_path / "feats.h5"
    grids = [(1 + i % 3, 2 * (1 + i % 4), 2 * (1 + i // 4 % 4)) for i in range(60)]  # ~100 KB of rows
    records = {f"k{i:03d}": features(f"k{i:03d}", dim=64, grid=grid) for i, grid in enumerate(grids)}
    limit = 48_000
    writer = write(out, records.values(), shard_bytes=limit)
    shards = list_shards(out)
    assert len(shards) >= 3 and shards == writer.shard_paths
    assert all(path.stat().st_size <= limit for path in shards), [p.stat().st_size for p in shards]
    assert writer.samples_written == 60
    assert writer.tokens_written == sum(r.tokens.shape[0] * r.tokens.shape[1] for r in records.values())
    assert writer.bytes_written == sum(p.stat().st_size for p in shards)
    summary = build_index(out)
    assert summary["shards"] == len(shards) and summary["samples"] == 60
    with h5py.File(out) as handle:
        assert handle["tokens"].is_virtual
        assert handle["tokens"].shape == (summary["rows"], 64)
        sources = handle["tokens"].virtual_sources()
        assert len(sources) == len(shards)
        assert all(not s.file_name.startswith("/") for s in sources)
        assert handle["keys"].asstr()[()].tolist() == list(records)  # shard order = write order
    assert_same(records, out)


def test_sample_bigger_than_a_shard_gets_its_own(tmp_path):
    out = tmp_path / "feats.h5"
    small = [features(f"s{i}", grid=(1, 2, 2), dim=64) for i in range(3)]
    big = features("big", grid=(1, 40, 40), dim=64)  # 400 rows x 128 B = 51 KB > limit
    writer = write(out, [small[0], big, small[1], small[2]], shard_bytes=40_000)
    with open_features(writer.shard_paths[1]) as shard:
        assert shard.keys() == ["big"]
    build_index(out)
    assert_same({r.key: r for r in [*small, big]}, out)


def test_resumed_run_adds_shards_without_overwriting(tmp_path):
    out = tmp_path / "feats.h5"
    first = {f"a{i}": features(f"a{i}") for i in range(5)}
    write(out, first.values())
    existing = scan_existing(out)
    assert existing is not None
    assert existing.done_keys == set(first) and existing.failed_keys == set()
    assert existing.attrs["config_hash"] == attrs()["config_hash"]
    assert existing.attrs["settings"] == attrs()["settings"]  # as stored: JSON text, as the pipeline passes it
    second = {f"b{i}": features(f"b{i}") for i in range(4)}
    writer = write(out, second.values())
    third = {"c0": features("c0")}
    write(out, third.values(), rank=1)
    names = [p.name for p in list_shards(out)]
    assert names == ["r000-00000.h5", "r000-00001.h5", "r001-00000.h5"]
    assert writer.shard_paths[0].name == "r000-00001.h5"
    build_index(out)
    assert_same(first | second | third, out)
    assert scan_existing(out).done_keys == set(first) | set(second) | set(third)


def test_failure_then_success_is_not_an_error(tmp_path):
    out = tmp_path / "feats.h5"
    write(out, [failure("x.jpg"), features("y.jpg"), failure("z.jpg", "first try")])
    existing = scan_existing(out)
    assert existing.failed_keys == {"x.jpg", "z.jpg"} and existing.done_keys == {"y.jpg"}
    retried = features("x.jpg")
    write(out, [retried, failure("z.jpg", "second try")])
    summary = build_index(out)
    assert summary["samples"] == 2 and summary["errors"] == 1
    with open_features(out) as feats:
        assert "x.jpg" in feats and torch.equal(bits(feats["x.jpg"].tokens), bits(retried.tokens))
        assert [(f.key, f.message) for f in feats.failures()] == [("z.jpg", "second try")]
    assert scan_existing(out).failed_keys == {"z.jpg"}


def test_duplicate_keys_across_ranks_keep_the_first(tmp_path):
    out = tmp_path / "feats.h5"
    kept = features("same.jpg", grid=(1, 4, 4))
    write(out, [kept, features("only0.jpg")], rank=0)
    write(out, [features("same.jpg", grid=(1, 2, 2)), features("only1.jpg")], rank=1)
    summary = build_index(out)
    assert summary["duplicates"] == 1 and summary["samples"] == 3
    with open_features(out) as feats:
        assert torch.equal(bits(feats["same.jpg"].tokens), bits(kept.tokens))
        assert feats.attrs["duplicate_keys"] == 1


def test_shard_of_only_errors_and_empty_output(tmp_path):
    out = tmp_path / "feats.h5"
    write(out, [failure("a.jpg"), failure("b.jpg")])
    summary = build_index(out)
    assert (summary["samples"], summary["errors"], summary["token_dim"]) == (0, 2, 0)
    with open_features(out) as feats:
        assert len(feats) == 0 and [f.key for f in feats.failures()] == ["a.jpg", "b.jpg"]

    empty = tmp_path / "empty" / "feats.h5"
    with pytest.raises(FormatError, match="nothing to index"):
        build_index(empty)
    summary = build_index(empty, attrs=attrs())
    assert summary["samples"] == 0 and summary["shards"] == 0
    with h5py.File(empty) as handle:
        assert handle["tokens"].shape == (0, 0) and handle["keys"].shape == (0,)
    with open_features(empty) as feats:
        assert len(feats) == 0 and feats.attrs["tower"] == "demo-vit" and feats.attrs["dtype"] == "bfloat16"
    assert scan_existing(empty).done_keys == set()


@pytest.mark.parametrize("compression", ["lzf", "gzip", pytest.param("zstd", marks=needs_hdf5plugin)])
def test_compressed_round_trip(tmp_path, compression):
    out = tmp_path / "feats.h5"
    records = {f"k{i}": features(f"k{i}", dim=48) for i in range(10)}
    write(out, records.values(), compression=compression, shard_bytes=40_000)
    build_index(out)
    with h5py.File(list_shards(out)[0]) as handle:
        filters = handle["tokens"]._filters
        expected = {"lzf": "lzf", "gzip": "gzip", "zstd": "32015"}[compression]
        assert expected in filters, filters
        assert handle.attrs["compression"] == compression
    assert_same(records, out)


def test_folder_can_move_and_cwd_does_not_matter(tmp_path, monkeypatch):
    out = tmp_path / "a" / "feats.h5"
    records = {f"k{i}": features(f"k{i}") for i in range(8)}
    write(out, records.values(), shard_bytes=20_000)
    build_index(out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert_same(records, out)
    moved = tmp_path / "b"
    shutil.move(str(tmp_path / "a"), moved)
    monkeypatch.chdir(moved / "feats.h5.d")
    assert_same(records, moved / "feats.h5")
    monkeypatch.chdir(tmp_path)
    assert_same(records, Path("b/feats.h5"))  # a relative path to the index works too


def test_scan_deletes_stale_temporaries_and_ignores_them(tmp_path):
    out = tmp_path / "feats.h5"
    writer = ShardWriter(out, attrs(), shard_bytes=20_000)
    done = {}
    while len(writer.shard_paths) < 1 or writer._shards.get(-1) is None:
        record = features(f"k{len(done)}")
        writer.add(record)
        done[record.key] = record
    open_tmp = writer._shards[-1].tmp
    assert open_tmp.exists()  # the open shard: what a kill -9 now would leave
    garbage = shard_dir(out) / "r003-00007.h5.tmp"
    garbage.write_bytes(os.urandom(5000))
    index_tmp = tmp_path / "feats.h5.otherhost-123.tmp"
    index_tmp.write_bytes(b"half an index")
    existing = scan_existing(out)
    committed = {k for p in writer.shard_paths for k in open_features(p).keys()}
    assert existing.done_keys == committed and len(committed) < len(done)
    assert not open_tmp.exists() and not garbage.exists() and not index_tmp.exists()
    writer.abort()
    build_index(out)
    assert_same({k: done[k] for k in committed}, out)
    # a later writer of rank 0 continues after the highest sequence ever used
    assert ShardWriter(out, attrs())._first_free_sequence() == len(writer.shard_paths)


def test_scan_with_a_rank_leaves_other_ranks_temporaries_alone(tmp_path):
    out = tmp_path / "feats.h5"
    write(out, [features("a.jpg")])
    live = ShardWriter(out, attrs(), rank=0)  # another process, already writing its next shard
    live.add(features("b.jpg"))
    stale = shard_dir(out) / "r001-00003.h5.tmp"  # left by a killed rank-1 run
    stale.write_bytes(b"partial")
    building = tmp_path / "feats.h5.host-42.tmp"  # an index another job is building right now
    building.write_bytes(b"partial")
    assert scan_existing(out, rank=1).done_keys == {"a.jpg"}
    assert not stale.exists() and live._shards[-1].tmp.exists() and building.exists()
    live.close()
    assert scan_existing(out, rank=1).done_keys == {"a.jpg", "b.jpg"}


@pytest.mark.slow
def test_kill_9_leaves_every_renamed_shard_readable(tmp_path):
    out = tmp_path / "feats.h5"
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from feature_factory import attrs, features
        from merge_cli.output.store import ShardWriter
        writer = ShardWriter({str(out)!r}, attrs(), shard_bytes=30_000)
        i = 0
        while True:
            torch.manual_seed(i)
            writer.add(features(f"k{{i:06d}}", dim=64))
            i += 1
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(list_shards(out)) < 3 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert len(list_shards(out)) >= 3
    existing = scan_existing(out)
    assert not list(shard_dir(out).glob("*.tmp"))
    build_index(out)
    with open_features(out) as feats:
        assert set(feats.keys()) == existing.done_keys
        for key in feats.keys():
            torch.manual_seed(int(key[1:]))
            assert torch.equal(bits(feats[key].tokens), bits(features(key, dim=64).tokens))


def test_exception_in_block_still_commits_whole_samples(tmp_path):
    out = tmp_path / "feats.h5"
    kept = features("kept.jpg")
    with pytest.raises(RuntimeError):
        with ShardWriter(out, attrs()) as writer:
            writer.add(kept)
            raise RuntimeError("the pipeline broke")
    build_index(out)
    assert_same({"kept.jpg": kept}, out)


def test_a_failed_file_write_discards_the_shard(tmp_path, monkeypatch):
    out = tmp_path / "feats.h5"
    committed = write(out, [features("a.jpg")]).shard_paths
    writer = ShardWriter(out, attrs(), shard_bytes=200_000)  # chunks of 390 rows of 64 B
    writer.add(features("x.jpg", grid=(1, 2, 2)))

    def disk_full(self, block):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_OpenShard, "_write", disk_full)
    with pytest.raises(OutputWriteError, match="r000-00001.h5.tmp: No space left on device"):
        writer.add(features("big.jpg", grid=(1, 40, 40)))  # 400 rows: fills a chunk, which is written
    with pytest.raises(RuntimeError, match="failed earlier"):
        writer.add(features("y.jpg"))
    writer.close()
    assert list_shards(out) == committed and not list(shard_dir(out).glob("*.tmp"))


def test_bad_records_are_refused_before_writing(tmp_path):
    out = tmp_path / "feats.h5"
    with ShardWriter(out, attrs()) as writer:
        record = features("a.jpg", grid=(1, 4, 4))
        record.grid_thw = (1, 4, 6)
        with pytest.raises(ValueError, match="do not match grid_thw"):
            writer.add(record)
        writer.add(features("b.jpg", dim=32))
        with pytest.raises(ValueError, match="token dim"):
            writer.add(features("c.jpg", dim=16))
    build_index(out)
    assert open_features(out).keys() == ["b.jpg"]
    with pytest.raises(UsageError):
        ShardWriter(out, attrs(), compression="brotli")
    with pytest.raises(UsageError):
        ShardWriter(out, attrs(), store_dtype="int8")


def test_attrs_are_written_everywhere_and_decoded(tmp_path):
    out = tmp_path / "feats.h5"
    write(out, [features("a.jpg")])
    build_index(out)
    for path in (out, list_shards(out)[0]):
        with h5py.File(path) as handle:
            raw = dict(handle.attrs)
            decoded = decode_attrs(handle.attrs)
        assert raw["format"] == "merge-cli-features" and raw["format_version"] == 2
        assert isinstance(raw["resize_policy"], str)  # JSON text on disk
        assert decoded["resize_policy"] == json.loads(attrs()["resize_policy"])
        assert decoded["settings"]["layer"] == -1
        assert decoded["tower_is_demo"] is True and decoded["layer"] == -1
        assert decoded["dtype"] == "bfloat16" and decoded["token_dim"] == 32
    assert decode_attrs(h5py.File(out).attrs)["role"] == "index"


def test_dict_attributes_are_stored_as_json(tmp_path):
    out = tmp_path / "feats.h5"
    given = attrs(settings={"layer": -2}, extra=[1, 2], projector_eps=None)
    with ShardWriter(out, given) as writer:
        writer.add(features("a.jpg"))
    with open_features(writer.shard_paths[0]) as shard:
        assert shard.attrs["settings"] == {"layer": -2} and shard.attrs["extra"] == [1, 2]
        assert shard.attrs["projector_eps"] is None
    assert json.loads(scan_existing(out).attrs["settings"]) == {"layer": -2}


def test_mixed_settings_are_refused(tmp_path):
    out = tmp_path / "feats.h5"
    write(out, [features("a.jpg")])
    with ShardWriter(out, attrs(config_hash="different")) as writer:
        writer.add(features("b.jpg"))
    with pytest.raises(FormatError, match="different settings"):
        scan_existing(out)
    with pytest.raises(FormatError, match="different settings"):
        build_index(out)


def test_scan_and_remove_refuse_a_foreign_file(tmp_path):
    out = tmp_path / "feats.h5"
    assert scan_existing(out) is None
    with h5py.File(out, "w") as handle:
        handle["x"] = [1, 2]
    with pytest.raises(FormatError, match="not a merge-cli output"):
        scan_existing(out)
    with pytest.raises(FormatError):
        remove_output(out)
    assert out.exists()


def test_remove_output_deletes_only_ours(tmp_path):
    out = tmp_path / "feats.h5"
    write(out, [features("a.jpg"), features("b.jpg")], shard_bytes=10_000)
    build_index(out)
    (shard_dir(out) / "r000-00099.h5.tmp").write_bytes(b"partial")
    (tmp_path / "feats.h5.host-7.tmp").write_bytes(b"partial")
    remove_output(out)
    assert not out.exists() and not shard_dir(out).exists()
    assert list(tmp_path.iterdir()) == []
    write(out, [features("a.jpg")])
    notes = shard_dir(out) / "notes.txt"
    notes.write_text("mine")
    remove_output(out)
    assert notes.exists() and list_shards(out) == []
    assert scan_existing(out) is None


@pytest.mark.parametrize("foreign", ["hdf5", "text", "other_name"])
def test_overwrite_refuses_shard_named_files_merge_cli_did_not_write(tmp_path, foreign):
    out = tmp_path / "feats.h5"
    write(out, [features("a.jpg")])
    build_index(out)
    intruder = shard_dir(out) / "r000-00007.h5"
    if foreign == "hdf5":
        with h5py.File(intruder, "w") as handle:
            handle["data"] = np.arange(5)
    elif foreign == "text":
        intruder.write_text("my notes")
    else:  # a real shard of ours, renamed: its attributes name another sequence
        shutil.copy(list_shards(out)[0], intruder)
    with pytest.raises(FormatError, match="r000-00007.h5"):
        remove_output(out)
    assert intruder.exists() and out.exists() and len(list_shards(out)) == 2  # nothing deleted


def test_index_dedup_checks_keys_when_hashes_collide(tmp_path, monkeypatch):
    """With a 2-bit key hash nearly every key shares its hash: the index must still keep each
    distinct key's first copy (shard order), drop only real later copies, and find every key."""
    import merge_cli.output.index as index_module
    import merge_cli.output.reader as reader_module
    from merge_cli.hashing import key_hash, key_hashes

    monkeypatch.setattr(index_module, "key_hashes", lambda keys: key_hashes(keys) % np.uint64(4))
    monkeypatch.setattr(reader_module, "key_hash", lambda key: key_hash(key) % 4)
    out = tmp_path / "feats.h5"
    rng = np.random.default_rng()
    written: list[tuple[int, list]] = []
    for rank in range(3):  # overlapping --rank runs: some keys written by several ranks
        keys = [f"k{i}.jpg" for i in sorted(rng.choice(40, size=20, replace=False))]
        records = [features(key) if rng.random() > 0.2 else failure(key) for key in keys]
        write(out, records, rank=rank, shard_bytes=30_000)
        written.append((rank, records))
    first: dict[str, object] = {}  # the slow reference: first copy in (rank, sequence) order
    for _, records in written:
        for record in records:
            if not isinstance(record, Failure):
                first.setdefault(record.key, record)
    copies = sum(1 for _, records in written for r in records if not isinstance(r, Failure)) - len(first)
    failed = {r.key for _, records in written for r in records if isinstance(r, Failure)} - set(first)
    summary = build_index(out)
    assert summary["samples"] == len(first) and summary["duplicates"] == copies
    with open_features(out) as feats:
        assert sorted(feats.keys()) == sorted(first) and len(set(feats.keys())) == len(first)
        for key, record in first.items():
            assert torch.equal(bits(feats[key].tokens), bits(record.tokens)), key
        assert "absent.jpg" not in feats
        assert {f.key for f in feats.failures()} == failed


def test_a_small_output_has_a_small_index(tmp_path):
    """The index's appendable datasets are chunked to what the shards hold (a chunk is stored
    whole): ten samples must not cost a megabyte of index."""
    out = tmp_path / "feats.h5"
    write(out, [features(f"v{i}.mp4", grid=(3, 2, 4)) for i in range(10)])
    summary = build_index(out)
    assert summary["samples"] == 10 and summary["index_bytes"] < 64 * 1024, summary["index_bytes"]
