"""Work units: the listing cut into deterministic runs of entries, the unit of assignment and resume.

A unit is at most `unit_size` consecutive entries of the listing (samples and source failures,
after deduplication), or one whole input shard when a source yields a `WholeUnit` (a sharded
input, such as one WebDataset tar or one Parquet row group, is one unit whatever its size). Unit
ids count from 0 in listing order, so the same inputs and unit size give the same units on every
rank and every rerun; a unit's fingerprint (a hash of its keys) tells a rerun whether the listing
changed under it.

The listing is consumed as a stream: only the unit being cut is held. The key rules stand at any
scale through `KeyHashSet`, 16 bytes per key seen (a 64-bit key hash and a 64-bit path hash in
sorted numpy runs): the same key for two different files stops the run, the same file listed
twice is kept once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from merge_cli.errors import UsageError
from merge_cli.hashing import key_hashes
from merge_cli.records import Failure, Sample, escape_text

DEFAULT_UNIT_SIZE = 10_000

Entry = Sample | Failure
"""What a unit holds: a sample to decode, or an input that failed before decoding (stage `source`)."""


class Listed(NamedTuple):
    """One entry as the listing found it: the file it names and where it was named (for errors)."""

    entry: Entry
    path: Path | str
    """What the entry is: a file, or a place inside a container (`shard.tar:member`)."""
    origin: str
    duplicate_as: str | None = None
    """For container members: a key already taken by another file makes an error record under
    this name (DuplicateKey) instead of stopping the run."""


@dataclass(frozen=True)
class WholeUnit:
    """Entries a sharded source wants kept together as one unit (one tar, one row group)."""

    entries: tuple[Listed, ...]


@dataclass(frozen=True)
class Unit:
    id: int
    """Position in the listing: 0, 1, 2, ... (empty units take no id)."""
    entries: tuple[Entry, ...]
    fingerprint: str
    """Hash of the unit's keys in order: equal on every rank and rerun over the same listing."""
    whole: bool = True
    """False for a unit cut short by --limit: `entries` is a prefix of the unit, `fingerprint`
    still the whole unit's. Its shards are committed but it gets no completion marker, so a later
    run finds it partly done and does only the rest."""

    @property
    def keys(self) -> list[str]:
        return [entry.key for entry in self.entries]


def first_entries(units: Iterable[Unit], limit: int, on_reached: Callable[[], None] = lambda: None) -> Iterator[Unit]:
    """The units holding the first `limit` entries of the stream, the last one cut short if need be
    (`whole` False). Streams: the listing stops at the unit holding entry `limit`. `on_reached` is
    called before that last unit is handed on (the total is final from then on)."""
    if limit < 1:
        raise UsageError(f"--limit must be at least 1; got {limit}")
    left = limit
    for unit in units:
        if len(unit.entries) < left:
            left -= len(unit.entries)
            yield unit
            continue
        on_reached()
        yield unit if len(unit.entries) == left else replace(unit, entries=unit.entries[:left], whole=False)
        return


Listing = Callable[[], Iterable["Listed | WholeUnit"]]
"""Starts the listing over from the beginning (called again only to explain a duplicate key)."""


def iter_units(listing: Listing, unit_size: int = DEFAULT_UNIT_SIZE) -> Iterator[Unit]:
    """Cut the listing into units, deduplicating keys across the whole stream."""
    if unit_size < 1:
        raise UsageError(f"--unit-size must be at least 1; got {unit_size}")
    seen = KeyHashSet()
    next_id = 0
    window: list[Listed] = []

    def cut(listed: list[Listed] | tuple[Listed, ...]) -> Unit | None:
        nonlocal next_id
        kept = _deduplicate(listed, seen, listing)
        if not kept:
            return None
        unit = Unit(next_id, tuple(item.entry for item in kept), fingerprint([item.entry.key for item in kept]))
        next_id += 1
        return unit

    # A unit is handed on when the next listed item shows it is not the last (or the listing has
    # ended): whoever reads the listing's end flag then knows the total is final at the last unit.
    ready: list[Unit] = []
    for item in listing():
        yield from ready
        ready.clear()
        if isinstance(item, WholeUnit):
            for part in (window, item.entries):
                if part and (unit := cut(part)) is not None:
                    ready.append(unit)
            window = []
            continue
        window.append(item)
        if len(window) >= unit_size:
            if (unit := cut(window)) is not None:
                ready.append(unit)
            window = []
    if window and (unit := cut(window)) is not None:
        ready.append(unit)
    yield from ready


def fingerprint(keys: list[str]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(len(keys).to_bytes(8, "little"))
    digest.update(key_hashes(keys).tobytes())
    return digest.hexdigest()


def _path_hashes(paths: Iterable[bytes]) -> np.ndarray:
    blake = hashlib.blake2b
    joined = b"".join(blake(p, digest_size=8).digest() for p in paths)
    return np.frombuffer(joined, dtype="<u8").astype(np.uint64)


def _deduplicate(listed: list[Listed] | tuple[Listed, ...], seen: KeyHashSet, listing: Listing) -> list[Listed]:
    """The entries of `listed` whose key is new; the same file again is dropped, another file under
    a key already taken raises UsageError naming both."""
    keys = key_hashes(item.entry.key for item in listed)
    paths = _path_hashes(_path_bytes(item.path) for item in listed)
    keep = np.ones(len(listed), dtype=bool)
    # Earlier units first, then earlier entries of this one.
    found, earlier_paths = seen.lookup(keys)
    keep &= ~found
    replaced: dict[int, Listed] = {}
    for index in np.nonzero(found & (earlier_paths != paths))[0]:
        _refuse_or_accept(listed[int(index)], listing, keep, int(index), replaced)
    unique, first = np.unique(keys, return_index=True)
    if len(unique) != len(keys):
        firsts = first[np.searchsorted(unique, keys)]
        repeated = firsts != np.arange(len(keys))
        for index in np.nonzero(repeated)[0]:
            if paths[index] == paths[firsts[index]]:
                keep[index] = False
            else:
                _refuse_or_accept(listed[int(index)], listing, keep, int(index), replaced)
    new = keep & ~found
    for index in replaced:
        new[index] = False  # the key stays the first file's
    seen.add(keys[new], paths[new])
    return [replaced.get(i, item) for i, (item, k) in enumerate(zip(listed, keep)) if k]


def _path_bytes(path: Path | str) -> bytes:
    try:
        return os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate from a manifest (JSON "\ud800"), not from a file name
        return os.fspath(path).encode("utf-8", "surrogatepass")


def _refuse_or_accept(item: Listed, listing: Listing, keep: np.ndarray, index: int, replaced: dict[int, Listed]) -> None:
    """A key hash seen before with another file. Walk the listing again (the run stops anyway, or
    this is a 1-in-10^4-at-100M event) to the first entry with this key: another file is a real
    clash (UsageError naming both); this very file means only the 64-bit hash was shared."""
    key = item.entry.key
    for earlier in _flatten(listing()):
        if earlier.entry.key == key:
            if earlier.path != item.path and item.duplicate_as is not None:
                where = item.duplicate_as
                message = (
                    f"key {key!r} of {where} is already taken by {escape_text(str(earlier.path))}; "
                    "this one is not extracted (give it another key or input)"
                )
                keep[index] = True
                replaced[index] = Listed(Failure(where, "source", "DuplicateKey", message), item.path, item.origin)
                return
            if earlier.path != item.path:
                raise UsageError(
                    f"two inputs map to the same key {key!r}: {escape_text(str(earlier.path))} "
                    f"(from {earlier.origin}) and {escape_text(str(item.path))} (from {item.origin}); give them "
                    "different --input folders or a --media-root that tells them apart"
                )
            break
    keep[index] = True


def _flatten(items: Iterable[Listed | WholeUnit]) -> Iterator[Listed]:
    for item in items:
        if isinstance(item, WholeUnit):
            yield from item.entries
        else:
            yield item


class KeyHashSet:
    """A set of 64-bit key hashes, each with the hash of the file it names, for 100M keys.

    16 bytes per key in sorted numpy runs (log-structured: a new run merges into the last while
    that is not at least 4x bigger), so lookups are a few vectorized binary searches and adding
    N keys costs O(N log N) in total. No Python object per key.
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(keys.nbytes + paths.nbytes for keys, paths in self._runs)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, path hash of each found key; 0 where not found)."""
        found = np.zeros(len(keys), dtype=bool)
        paths = np.zeros(len(keys), dtype=np.uint64)
        for run_keys, run_paths in self._runs:
            position = np.minimum(np.searchsorted(run_keys, keys), len(run_keys) - 1)
            hit = run_keys[position] == keys
            found |= hit
            paths[hit] = run_paths[position[hit]]
        return found, paths

    def add(self, keys: np.ndarray, paths: np.ndarray) -> None:
        """Add keys not in the set yet (unique among themselves)."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self._runs.append((keys[order], paths[order]))
        while len(self._runs) >= 2 and len(self._runs[-2][0]) < 4 * len(self._runs[-1][0]):
            (keys_a, paths_a), (keys_b, paths_b) = self._runs.pop(), self._runs.pop()
            merged_keys = np.concatenate([keys_b, keys_a])
            order = np.argsort(merged_keys, kind="stable")
            self._runs.append((merged_keys[order], np.concatenate([paths_b, paths_a])[order]))
