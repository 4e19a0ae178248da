"""Work units: cut in listing order, deterministic ids, the key rules through 64-bit key hashes,
the whole-unit hook of sharded sources, and the compact key-hash set against a plain dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_cli.errors import UsageError
from merge_cli.inputs.sources import collect_samples, stream_units
from merge_cli.inputs.units import KeyHashSet, Listed, WholeUnit, iter_units
from merge_cli.records import Failure, Sample


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def listed(key: str, path: str | None = None, origin: str = "test") -> Listed:
    where = Path(path or f"/data/{key}")
    return Listed(Sample(key, where, "image"), where, origin)


def test_units_cut_the_listing_in_order_with_deterministic_ids(tmp_path):
    names = [f"{i:03d}.jpg" for i in range(23)] + ["sub/a.png", "sub/b.png", "notes.txt"]
    for name in names:
        touch(tmp_path / "d" / name)
    units = list(stream_units([tmp_path / "d"], unit_size=5))
    assert [u.id for u in units] == list(range(5))
    assert [len(u.entries) for u in units] == [5, 5, 5, 5, 5]
    flat = [key for u in units for key in u.keys]
    assert flat == [s.key for s in collect_samples([tmp_path / "d"]).samples]  # same order as the list
    again = list(stream_units([tmp_path / "d"], unit_size=5))
    assert [(u.id, u.fingerprint, u.keys) for u in again] == [(u.id, u.fingerprint, u.keys) for u in units]
    assert len({u.fingerprint for u in units}) == 5


def test_a_folder_streams_in_key_order_where_a_name_sorts_before_its_folder(tmp_path):
    for name in ["a/x.jpg", "a.jpg", "a-b.jpg", "b/c/d.jpg", "b.jpg", "B.jpg"]:
        touch(tmp_path / "d" / name)
    keys = [key for u in stream_units([tmp_path / "d"], unit_size=2) for key in u.keys]
    assert keys == sorted(keys) == ["B.jpg", "a-b.jpg", "a.jpg", "a/x.jpg", "b.jpg", "b/c/d.jpg"]


def test_the_same_file_in_a_later_unit_is_done_once(tmp_path):
    media = tmp_path / "media"
    for i in range(6):
        touch(media / f"{i}.jpg")
    manifest = tmp_path / "m.txt"
    manifest.write_text("0.jpg\n5.jpg\nnew.jpg\n")
    touch(media / "new.jpg")
    units = list(stream_units([media, manifest], media_root=media, unit_size=4))
    keys = [key for u in units for key in u.keys]
    assert keys == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg", "new.jpg"]
    assert [len(u.entries) for u in units] == [4, 3, 0][: len(units)]  # 0.jpg, 5.jpg dropped from the third cut


def test_two_files_under_one_key_in_different_units_stop_the_run_naming_both(tmp_path):
    for i in range(5):
        touch(tmp_path / "one" / f"{i}.jpg")
    touch(tmp_path / "two" / "3.jpg")
    with pytest.raises(UsageError) as error:
        list(stream_units([tmp_path / "one", tmp_path / "two"], unit_size=2))
    message = str(error.value)
    assert "'3.jpg'" in message
    assert str(tmp_path / "one" / "3.jpg") in message and str(tmp_path / "two" / "3.jpg") in message
    assert f"--input {tmp_path / 'one'}" in message and f"--input {tmp_path / 'two'}" in message


def test_a_whole_unit_from_a_sharded_source_is_never_cut():
    tar = WholeUnit(tuple(listed(f"tar0/{i}.jpg") for i in range(7)))
    items = [listed("a.jpg"), listed("b.jpg"), tar, listed("c.jpg"), WholeUnit(()), listed("d.jpg")]
    units = list(iter_units(lambda: iter(items), unit_size=3))
    # a sharded input always ends the run of loose entries before it (an empty one too) and
    # takes one id, whatever its size
    assert [u.keys for u in units] == [["a.jpg", "b.jpg"], [f"tar0/{i}.jpg" for i in range(7)], ["c.jpg"], ["d.jpg"]]
    assert [u.id for u in units] == [0, 1, 2, 3]


def test_source_failures_are_entries_of_their_unit(tmp_path):
    touch(tmp_path / "a.jpg")
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.jpg\nnotes.docx\n")
    (unit,) = stream_units([manifest], unit_size=10)
    assert isinstance(unit.entries[0], Sample) and isinstance(unit.entries[1], Failure)
    assert unit.entries[1].stage == "source"


def test_a_64_bit_hash_collision_is_not_mistaken_for_a_duplicate(monkeypatch):
    import merge_cli.inputs.units as units

    monkeypatch.setattr(units, "key_hashes", lambda keys: np.array([len(k) for k in keys], dtype=np.uint64))
    items = [listed("aa.jpg"), listed("bb.jpg"), listed("aa.jpg"), listed("cc.jpg")]  # every hash equal
    kept = [k for u in iter_units(lambda: iter(items), unit_size=2) for k in u.keys]
    assert kept == ["aa.jpg", "bb.jpg", "cc.jpg"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 2)), max_size=300), st.integers(1, 40))
def test_key_hash_set_agrees_with_a_dict(pairs, batch):
    """Batches added in any sizes: lookups answer exactly what a dict of key -> path would."""
    reference: dict[int, int] = {}
    hashes = KeyHashSet()
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        keys = np.array([k for k, _ in chunk], dtype=np.uint64)
        found, stored = hashes.lookup(keys)
        assert found.tolist() == [k in reference for k, _ in chunk]
        assert [int(s) for s, f in zip(stored, found) if f] == [reference[k] for k, _ in chunk if k in reference]
        new = {}
        for k, p in chunk:
            if k not in reference and k not in new:
                new[k] = p
        hashes.add(np.array(list(new), dtype=np.uint64), np.array(list(new.values()), dtype=np.uint64))
        reference.update(new)
    assert len(hashes) == len(reference) and hashes.nbytes == 16 * len(reference)
