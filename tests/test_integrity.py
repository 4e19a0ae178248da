"""Nothing silently wrong on the reading side: checksums, shard identity, confinement, and damaged
tables that raise FormatError (docs/FORMAT.md, "Checksums", "Shard identity", "Confinement")."""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib

import h5py
import numpy as np
import pytest
from feature_factory import attrs, failure, features

from merge_cli.errors import FormatError
from merge_cli.output.format import NO_CHECKSUM, STRING, TABLE_COLUMNS, list_shards
from merge_cli.output.index import build_index
from merge_cli.output.reader import open_features
from merge_cli.output.store import ShardWriter


@pytest.fixture
def output(tmp_path):
    """A four-shard output of random images and videos, indexed; returns (index path, records)."""
    out = tmp_path / "out" / "feats.h5"
    records = {}
    with ShardWriter(out, attrs(), shard_bytes=25_000) as writer:
        for i in range(24):
            record = features(f"m/{i:02d}.jpg")
            writer.add(record)
            records[record.key] = record
        writer.add_failure(failure("m/broken.jpg"))
    assert len(list_shards(out)) >= 4
    build_index(out)
    return out, records


def stored_rows(record) -> np.ndarray:
    """The record's rows as the format stores them: bf16 as its raw 16-bit patterns."""
    tokens = record.tokens.contiguous()
    return tokens.view(-1, tokens.shape[-1]).view(dtype=__import__("torch").int16).numpy().view(np.uint16)


def read_all(out, **options) -> dict:
    with open_features(out, **options) as feats:
        return {sample.key: sample for sample in feats}


def set_table(out, column: str, row: int, value: int) -> None:
    """Tamper with one cell of the index's sample_table (what open_features reads)."""
    with h5py.File(out, "r+") as handle:
        handle["sample_table"][row, TABLE_COLUMNS.index(column)] = value


def replace_dataset(group, name: str, data, **options) -> None:
    del group[name]
    group.create_dataset(name, data=data, **options)


def inspect_json(cli, out, *options):
    result = cli("inspect", str(out), "--json", *options)
    return result.exit_code, json.loads(result.stdout)


# -- checksums ---------------------------------------------------------------------------------


def test_each_sample_stores_the_crc32_of_its_stored_rows(tmp_path):
    out = tmp_path / "feats.h5"
    records = {}
    with ShardWriter(out, attrs(), shard_bytes=40_000) as writer:
        for i in range(16):  # raw 16-bit patterns: NaN payloads, -0 and subnormals checksummed as stored
            records[f"v/{i}.mp4"] = features(f"v/{i}.mp4", all_bits=True)
            writer.add(records[f"v/{i}.mp4"])
    build_index(out)
    with open_features(out) as feats:
        assert feats.has_checksums
        crc = feats.column("crc32")
        for row, key in enumerate(feats.keys()):
            expected = zlib.crc32(stored_rows(records[key]).astype("<u2").tobytes())  # the obvious reference
            assert crc[row] == expected, key
    for shard in list_shards(out):  # every shard carries its own checksums too
        with h5py.File(shard) as handle:
            assert handle["crc32"].shape == handle["keys"].shape and (handle["crc32"][()] >= 0).all()


def test_verify_catches_a_flipped_bit_that_a_plain_read_returns(output, cli):
    out, records = output
    assert len(read_all(out, verify=True)) == len(records)
    assert inspect_json(cli, out, "--check")[0] == 0
    with h5py.File(out) as index:
        row = int(np.random.randint(len(records)))
        key = index["keys"].asstr()[row]
        shard = out.parent / index["shards/path"].asstr()[index["shard"][row]]
        local = int(index["shard_offsets"][row]) + int(np.random.randint(index["lengths"][row]))
    with h5py.File(shard, "r+") as handle:
        values = handle["tokens"][local]
        values[np.random.randint(len(values))] ^= np.uint16(1 << np.random.randint(16))
        handle["tokens"][local] = values
    with open_features(out) as feats:
        feats[key]  # without verify the changed rows come back as they are
    with open_features(out, verify=True) as feats, pytest.raises(FormatError, match="does not match its checksum"):
        feats[key]
    code, report = inspect_json(cli, out, "--check")
    assert code == 1 and any("checksum" in p and repr(key) in p for p in report["problems"])


def test_files_without_checksums_open_and_say_they_cannot_be_verified(output, cli):
    out, records = output
    for shard in list_shards(out):  # as written before checksums: no crc32, no shard identity
        with h5py.File(shard, "r+") as handle:
            del handle["crc32"]
            del handle.attrs["shard_id"]
    build_index(out)
    with h5py.File(out, "r+") as index:  # and an index from before them: a 19-column table
        table = index["sample_table"][()]
        column_attrs = dict(index["sample_table"].attrs)
        replace_dataset(index, "sample_table", table[:, :-1])
        for name, value in column_attrs.items():
            index["sample_table"].attrs[name] = value
        index["sample_table"].attrs["columns"] = json.dumps(list(TABLE_COLUMNS[:-1]))
        del index["crc32"], index["shards/id"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = read_all(out)  # opens as before, silently
    with pytest.warns(UserWarning, match="cannot be verified"):
        verified = read_all(out, verify=True)
    assert set(plain) == set(verified) == set(records)
    with open_features(out) as feats:
        assert not feats.has_checksums and (feats.column("crc32") == NO_CHECKSUM).all()
    code, report = inspect_json(cli, out, "--check")
    assert code == 0 and any("without checksums" in note for note in report["notes"])


# -- shard identity ----------------------------------------------------------------------------


def test_swapped_shards_are_refused_not_read(output, cli):
    out, _ = output
    first, second = list_shards(out)[:2]
    swap = first.with_name("swap")
    first.rename(swap)
    second.rename(first)
    swap.rename(second)
    with pytest.raises(FormatError, match="not the shard this index was built over"):
        read_all(out)
    code, report = inspect_json(cli, out)
    assert code == 1 and any("not the shard this index was built over" in p for p in report["problems"])


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "foreign", "other output's shard"])
def test_a_damaged_or_foreign_shard_is_refused(output, tmp_path, damage):
    out, _ = output
    victim = list_shards(out)[-1]
    data = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "zeroed":
        victim.write_bytes(bytes(len(data)))
    elif damage == "foreign":
        with h5py.File(out) as index:
            dim = index["tokens"].shape[1]
        victim.unlink()
        with h5py.File(victim, "w") as handle:
            handle["tokens"] = np.random.randint(0, 2**16, (4096, dim)).astype(np.uint16)
    else:  # a valid merge-cli shard, of another output, under the same name
        other = tmp_path / "other.h5"
        with ShardWriter(other, attrs()) as writer:
            for i in range(30):
                writer.add(features(f"o/{i}.jpg"))
        shutil.copy(list_shards(other)[0], victim)
    with pytest.raises(FormatError):
        read_all(out)


# -- confinement -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    ["/etc/passwd", "feats.h5.d/../elsewhere/r000-00000.h5", "../feats.h5.d/r000-00000.h5", "other.d/r000-00000.h5",
     "feats.h5.d/sub/r000-00000.h5", "feats.h5.d/notes.txt"],
)
def test_an_index_naming_a_shard_outside_its_folder_is_refused(output, entry):
    out, _ = output
    with h5py.File(out, "r+") as index:
        paths = index["shards/path"].asstr()[()].tolist()
        paths[0] = entry
        replace_dataset(index["shards"], "path", np.array(paths, dtype=object), dtype=STRING)
    with pytest.raises(FormatError, match="outside feats.h5.d/"):
        open_features(out)


def test_a_shard_linking_out_of_the_folder_is_refused(output, tmp_path):
    out, records = output
    victim = list_shards(out)[0]
    outside = tmp_path / "elsewhere.h5"
    victim.rename(outside)
    victim.symlink_to(outside)
    with pytest.raises(FormatError, match="link to a file outside"):
        read_all(out)
    with pytest.raises(FormatError, match="link to a file outside"):
        build_index(out)
    # a link that stays inside the folder is fine
    victim.unlink()
    inside = victim.with_name("kept-here.h5")
    outside.rename(inside)
    victim.symlink_to(inside.name)
    assert set(read_all(out, verify=True)) == set(records)


def test_an_external_link_inside_a_shard_is_refused(output, tmp_path):
    out, _ = output
    victim = list_shards(out)[0]
    outside = tmp_path / "outside.h5"
    with h5py.File(victim) as handle, h5py.File(outside, "w") as other:
        other["tokens"] = np.random.randint(0, 2**16, handle["tokens"].shape).astype(np.uint16)
        other["tokens"].attrs["dtype"] = "bfloat16"
    with h5py.File(victim, "r+") as handle:
        del handle["tokens"]
        handle["tokens"] = h5py.ExternalLink(str(outside), "tokens")
    with pytest.raises(FormatError, match="link to another file"):
        read_all(out)
    with pytest.raises(FormatError, match="link to another file"):
        open_features(victim)  # the shard opened on its own


def test_virtual_tokens_pointing_outside_are_an_inspect_problem(output, tmp_path, cli):
    out, _ = output
    outside = tmp_path / "outside.h5"
    with h5py.File(out, "r+") as index:
        rows, dim = index["tokens"].shape
        with h5py.File(outside, "w") as other:
            other["tokens"] = np.random.randint(0, 2**16, (rows, dim)).astype(np.uint16)
        layout = h5py.VirtualLayout(shape=(rows, dim), dtype=np.uint16)
        layout[:] = h5py.VirtualSource(str(outside), "tokens", shape=(rows, dim))
        del index["tokens"]
        index.create_virtual_dataset("tokens", layout).attrs["dtype"] = "bfloat16"
    code, report = inspect_json(cli, out, "--check")
    assert code == 1 and any("tokens map other data than its shards" in p for p in report["problems"])


# -- damaged tables raise FormatError ----------------------------------------------------------


@pytest.mark.parametrize(
    "column, value", [("shard", -1), ("shard", 999), ("shard_offsets", 10**9), ("shard_offsets", -5), ("kind", 7),
                      ("frame_offsets", 10**9)],
)
def test_damaged_sample_table_cells_raise_format_error(output, column, value):
    out, records = output
    row = int(np.random.randint(len(records)))
    if column == "frame_offsets":  # only a video reads its frames
        with open_features(out) as feats:
            row = next(i for i in range(len(feats)) if feats.column("frame_lengths")[i])
    set_table(out, column, row, value)
    with open_features(out) as feats, pytest.raises(FormatError, match="damaged"):
        feats[row]


def test_keys_and_kind_of_the_wrong_dtype_raise_format_error(output, cli):
    out, _ = output
    shard = list_shards(out)[0]
    with h5py.File(shard, "r+") as handle:
        replace_dataset(handle, "kind", np.arange(handle["kind"].shape[0], dtype=np.int64))
    with pytest.raises(FormatError, match="kind"):
        open_features(shard)
    with h5py.File(out, "r+") as index:  # kind as ints in the index: inspect finds it
        replace_dataset(index, "kind", np.zeros(index["kind"].shape[0], dtype=np.int64))
    code, report = inspect_json(cli, out)
    assert code == 1 and any("kind" in p for p in report["problems"])
    with h5py.File(out, "r+") as index:
        replace_dataset(index, "keys", np.arange(index["keys"].shape[0], dtype=np.int64))
    with pytest.raises(FormatError, match="keys"):
        open_features(out)


def test_a_sample_table_that_disagrees_with_the_tables_is_an_inspect_problem(output, cli):
    out, records = output
    assert inspect_json(cli, out)[0] == 0
    set_table(out, "orig_h", int(np.random.randint(len(records))), 12345)
    code, report = inspect_json(cli, out)
    assert code == 1 and any("sample_table disagrees" in p and "offsets" not in p for p in report["problems"])


def test_a_format_version_of_the_wrong_type_is_named(output):
    out, _ = output
    with h5py.File(out, "r+") as index:
        index.attrs["format_version"] = "1"
    with pytest.raises(FormatError, match="format_version is '1', not an integer"):
        open_features(out)


def test_build_index_names_shards_by_their_place_in_the_folder(output):
    out, _ = output
    with h5py.File(out) as index:
        entries = index["shards/path"].asstr()[()].tolist()
        ids = index["shards/id"].asstr()[()].tolist()
    assert entries == [f"feats.h5.d/{p.name}" for p in list_shards(out)]
    identities = []
    for shard in list_shards(out):
        with h5py.File(shard) as handle:
            identities.append(handle.attrs["shard_id"])
    assert ids == identities and len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)
    os.chdir(out.parent.parent)  # resolves from the index's folder, not the working directory
    assert len(read_all(out.relative_to(out.parent.parent), verify=True)) == 24
