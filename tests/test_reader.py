"""The reader API: open_features, FeatureSample, FeatureDataset with DataLoader workers."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch
from extras import needs_hdf5plugin
from feature_factory import attrs, bits, failure, features
from torch.utils.data import DataLoader

from merge_cli.errors import FormatError
from merge_cli.output.format import list_shards
from merge_cli.output.index import build_index
from merge_cli.output.reader import FeatureDataset, FeatureFile, FeatureSample
from merge_cli.output.store import ShardWriter


@pytest.fixture
def output(tmp_path):
    """A three-shard output with images, videos and one error record; returns (path, records)."""
    out = tmp_path / "feats.h5"
    records = {}
    with ShardWriter(out, attrs(), shard_bytes=24_000) as writer:
        for i in range(24):
            record = features(f"media/{i:02d}.{'mp4' if i % 4 == 0 else 'jpg'}", grid=(3, 4, 6) if i % 4 == 0 else None)
            writer.add(record)
            records[record.key] = record
        writer.add_failure(failure("media/broken.jpg"))
    assert len(list_shards(out)) >= 3
    build_index(out)
    return out, records


def test_public_api_is_importable_from_the_package():
    import merge_cli

    assert merge_cli.open_features.__module__ == "merge_cli.output.reader"
    assert merge_cli.FeatureDataset is FeatureDataset


def test_mapping_interface(output):
    from merge_cli import open_features

    out, records = output
    with open_features(out) as feats:
        assert isinstance(feats, FeatureFile)
        assert len(feats) == len(records)
        assert feats.keys() == list(records)
        assert "media/00.mp4" in feats and "media/broken.jpg" not in feats and 3 not in feats
        by_index = feats[5]
        assert by_index.key == list(records)[5] and by_index.index == 5
        assert feats[-1].key == list(records)[-1]
        assert [s.key for s in feats] == list(records)
        with pytest.raises(KeyError):
            feats["nope"]
        with pytest.raises(IndexError):
            feats[len(records)]
        assert feats.get("nope") is None
        assert feats.attrs["tower"] == "demo-vit" and feats.attrs["resize_policy"]["kind"] == "smart"
        assert feats.attrs["format_version"] == 2 and feats.attrs["role"] == "index"
        assert [(f.key, f.stage) for f in feats.failures()] == [("media/broken.jpg", "decode")]
        assert "samples=24" in repr(feats)


def test_sample_records(output):
    out, records = output
    with FeatureFile(out) as feats:
        for key, record in records.items():
            sample = feats[key]
            assert isinstance(sample, FeatureSample)
            t, h, w = record.grid_thw
            assert sample.tokens.shape == (t, (h // 2) * (w // 2), 32) and sample.tokens.dtype == torch.bfloat16
            assert torch.equal(bits(sample.tokens), bits(record.tokens))
            assert sample.grid_thw == record.grid_thw and sample.merged_hw == (h // 2, w // 2)
            assert sample.orig_hw == record.orig_hw and sample.resized_hw == record.resized_hw
            assert sample.kind == record.kind and sample.decoder == record.decoder
            assert sample.frame_indices == record.frame_indices and sample.frame_times == record.frame_times
        video = feats["media/00.mp4"]
        assert video.kind == "video" and video.frame_times == [0.0, 0.5, 1.0] and video.frame_indices == [0, 3, 6]


def test_a_single_shard_reads_on_its_own(output):
    out, records = output
    shard = list_shards(out)[1]
    with FeatureFile(shard) as feats:
        assert feats.role == "shard" and 0 < len(feats) < len(records)
        for sample in feats:
            assert torch.equal(bits(sample.tokens), bits(records[sample.key].tokens))


def test_a_missing_shard_is_a_clear_error(output):
    out, records = output
    with FeatureFile(out) as feats:
        victim = feats.shard_paths[feats.column("shard")[-1]]  # the shard of the last sample
    victim.unlink()
    with FeatureFile(out) as feats:
        assert torch.equal(bits(feats[0].tokens), bits(records[feats.keys()[0]].tokens))
        with pytest.raises(FormatError, match=f"shard {victim.name} is missing"):
            feats[-1]


def test_foreign_files_are_refused(tmp_path):
    import h5py

    with pytest.raises(FormatError, match="no such file"):
        FeatureFile(tmp_path / "absent.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(FormatError, match="not an HDF5 file"):
        FeatureFile(junk)
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["data"] = np.arange(3)
    with pytest.raises(FormatError, match="not a merge-cli output"):
        FeatureFile(tmp_path / "other.h5")


@needs_hdf5plugin  # to write the zstd shard the test then reads without it
def test_zstd_without_hdf5plugin_says_what_to_install(tmp_path, monkeypatch):
    out = tmp_path / "feats.h5"
    with ShardWriter(out, attrs(), compression="zstd") as writer:
        writer.add(features("a.jpg"))
    build_index(out)
    monkeypatch.setitem(sys.modules, "hdf5plugin", None)  # import hdf5plugin now raises ImportError
    with pytest.raises(FormatError, match="pip install hdf5plugin"):
        FeatureFile(out)


class PidDataset(FeatureDataset):
    """Also says which process read each sample and which FeatureFile object it used."""

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        return os.getpid(), id(self.features), sample


def test_dataset_with_two_dataloader_workers(output):
    out, records = output
    dataset = PidDataset(out)
    assert len(dataset) == len(records)
    parent_pid, parent_file, _ = dataset[0]  # the parent opens its own handle first
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=list)
    seen = {}
    pids = set()
    for batch in loader:
        for pid, _, sample in batch:
            pids.add(pid)
            seen[sample.key] = sample
    assert len(pids) == 2 and parent_pid not in pids
    assert set(seen) == set(records)
    for key, sample in seen.items():
        assert torch.equal(bits(sample.tokens), bits(records[key].tokens)), key
    assert dataset[1][:2] == (parent_pid, parent_file)  # the parent's handle is untouched
    dataset.close()


def test_dataset_pickles_without_a_handle_and_takes_a_key_subset(output):
    out, records = output
    keys = list(records)[::5]
    dataset = FeatureDataset(out, keys=keys)
    assert len(dataset) == len(keys) and dataset[1].key == keys[1]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._features is None
    assert [clone[i].key for i in range(len(clone))] == keys
    with pytest.raises(KeyError, match="not in"):
        FeatureDataset(out, keys=["missing.jpg"])
    with pytest.raises(IndexError):
        dataset[len(keys)]


def _assert_reads_like(records, out):
    with FeatureFile(out) as feats:
        assert len(feats) == len(records)
        for key, record in records.items():
            assert key in feats
            sample = feats[key]
            assert sample.key == key and sample.grid_thw == tuple(record.grid_thw)
            assert torch.equal(bits(sample.tokens), bits(record.tokens))
            assert feats[sample.index].key == key
        for absent in ("media/none.jpg", "", "media/00.jpg ", "MEDIA/01.jpg"):
            assert absent not in feats and feats.get(absent) is None


def test_key_lookup_through_the_hash_table_across_blocks_and_collisions(output, monkeypatch):
    import merge_cli.output.index as index
    import merge_cli.output.reader as reader

    out, records = output
    monkeypatch.setattr(index, "KEY_BLOCK", 3)  # many blocks for 24 keys
    build_index(out)
    _assert_reads_like(records, out)
    # A weak hash: most keys share a hash with others, runs of equal hashes cross blocks; the
    # stored key decides.
    weak = lambda key: len(key) % 2  # noqa: E731
    monkeypatch.setattr(index, "key_hashes", lambda keys: np.array([weak(k) for k in keys], dtype=np.uint64))
    monkeypatch.setattr(reader, "key_hash", weak)
    build_index(out)
    _assert_reads_like(records, out)


def test_opening_an_index_reads_no_per_sample_data(output, monkeypatch):
    import h5py

    out, records = output
    reads = []
    original = h5py.Dataset.__getitem__

    def counting(self, selection):
        reads.append((self.name, self.shape))
        return original(self, selection)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    with FeatureFile(out) as feats:
        assert len(feats) == len(records)
        per_sample = [name for name, shape in reads if shape and shape[0] == len(records)]
        assert per_sample == [], per_sample  # only the small shard list is read on open
        assert feats["media/05.jpg"].key == "media/05.jpg"


def test_a_version_1_index_is_refused_with_the_command_that_rebuilds_it(output):
    import h5py

    out, records = output
    with h5py.File(out, "a") as handle:  # what merge-cli 0.x wrote: no key table
        del handle["key_table"], handle["sample_table"]
        handle.attrs["format_version"] = 1
    with pytest.raises(FormatError) as error:
        FeatureFile(out)
    assert "format version 1" in str(error.value) and f"merge-cli index {out}" in str(error.value)
    assert "\n" not in str(error.value)
    build_index(out)
    _assert_reads_like(records, out)
