"""Reading merge-cli features from a training job.

    from merge_cli import open_features

    with open_features("feats.h5") as feats:
        sample = feats["images/cat.jpg"]       # or feats[0]
        sample.tokens                          # (t, h/2 * w/2, D) torch tensor, bf16 bit-exact

`open_features` takes the index (`feats.h5`) or any single shard (each shard is self-describing).
Opening an index reads no per-sample data: a key is found through the index's sorted key-hash
table, a sample's numbers come from one row of its sample table, and token rows are read straight
from the shard files (measured faster than going through the index's virtual dataset), whose
handles are kept open. A shard opened on its own is loaded whole (it is at most --shard-size).

Nothing outside `feats.h5.d/` is ever read (docs/FORMAT.md, "Confinement"), and a shard is used
only when it is the very file the index was built over (its `shard_id` and row count); with
`verify=True` every sample's rows are checked against their CRC-32 too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch

from merge_cli.errors import FormatError
from merge_cli.hashing import key_hash
from merge_cli.output.format import (
    ERROR_FIELDS,
    KINDS,
    NO_CHECKSUM,
    NUMPY_DTYPES,
    TABLE_COLUMNS,
    TABLE_COLUMNS_BEFORE_CHECKSUMS,
    check_inside_folder,
    confined_shard,
    decode_attrs,
    first_line,
    numpy_to_tokens,
    open_h5,
    plain_value,
    read_strings,
    require_local_objects,
    rows_checksum,
)
from merge_cli.records import Failure

COMPRESSED_CACHE_BYTES = 4 * 1024 * 1024
"""Chunk cache for compressed shards: a few ~1 MiB chunks, so that reading samples in order
decompresses each chunk once. Uncompressed shards get no cache: HDF5 then reads just the requested
rows (measured 36 us vs 290 us per 128 KiB sample with a cache that pulls in the whole chunk).
The cache is a file-access setting fixed by the first open of a file in a process."""
MAX_OPEN_SHARDS = 128
"""Least recently used shard handles beyond this many are closed."""

COLUMNS = ("offsets", "lengths", "grid_thw", "merged_hw", "orig_hw", "resized_hw", "kind", "decoder",
           "frame_offsets", "frame_lengths")
"""Per-sample tables `column()` offers (read whole on first use)."""
REQUIRED_DATASETS = ("tokens", "keys", *COLUMNS, "frame_indices", "frame_times", "errors")
INDEX_OBJECTS = ("tokens", "keys", "sample_table", "key_table", "frame_indices", "frame_times", "errors", "shards")
"""What a reader of an index touches: each must be stored in the index itself (no links out)."""
PAIR_COLUMNS = {"grid_thw": 3, "merged_hw": 2, "orig_hw": 2, "resized_hw": 2, "processor_grid": 2}
"""Per-sample tables with a second axis, and its length."""


@dataclass
class FeatureSample:
    """One stored sample."""

    key: str
    kind: str
    """"image" or "video"."""
    tokens: torch.Tensor
    """(t, merged_h * merged_w, D) in the stored dtype (torch.bfloat16 for bf16, bit-exact)."""
    grid_thw: tuple[int, int, int]
    """Frames (or temporal patches), patch rows and patch columns before merging (Qwen2-VL's image_grid_thw)."""
    merged_hw: tuple[int, int]
    """Token rows and columns after the merge: grid_thw[1:] // merge_size."""
    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    frame_indices: list[int]
    """Videos: the source frame index of every sampled frame; images: []."""
    frame_times: list[float]
    """Videos: timestamps in seconds of the sampled frames; images: []."""
    decoder: str
    index: int
    """Position of the sample in the file."""
    processor_grid: tuple[int, int] | None = None
    """Patch rows and columns the checkpoint's processor gave; differs from grid_thw[1:] only for a
    grid made even (files from before this column: grid_thw[1:])."""


class _Record(NamedTuple):
    """What the reader needs about one sample, read in one go."""

    offset: int
    length: int
    grid_thw: tuple[int, int, int]
    merged_hw: tuple[int, int]
    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    frame_offset: int
    frame_length: int
    shard: int
    shard_offset: int
    kind: str
    decoder: str
    processor_grid: tuple[int, int]
    crc32: int
    """CRC-32 of the stored rows, NO_CHECKSUM for files written before checksums."""


def _require_string_dataset(handle: h5py.File, name: str, path: Path) -> None:
    if h5py.check_string_dtype(handle[name].dtype) is None:
        raise FormatError(f"{path}: damaged merge-cli output ({name} holds {handle[name].dtype}, not text)")


class _ShardTable:
    """One shard read on its own: its tables are loaded whole (a shard is at most --shard-size)."""

    def __init__(self, handle: h5py.File, path: Path) -> None:
        _require_string_dataset(handle, "keys", path)
        self._keys = read_strings(handle["keys"])
        n = len(self._keys)
        # The first occurrence wins if a key is stored twice (only a damaged shard can have that).
        self._row = {key: i for i, key in zip(range(n - 1, -1, -1), reversed(self._keys))}
        self.duplicate_keys = n - len(self._row)
        self.columns = {name: handle[name][()] for name in COLUMNS}
        self.columns["processor_grid"] = (  # files from before the column: the grid used
            handle["processor_grid"][()] if "processor_grid" in handle else self.columns["grid_thw"][:, 1:]
        )
        self.columns["crc32"] = handle["crc32"][()] if "crc32" in handle else np.full(n, NO_CHECKSUM, np.int64)
        self.has_checksums = "crc32" in handle
        self.columns["shard"] = np.zeros(n, dtype=np.int32)
        self.columns["shard_offsets"] = self.columns["offsets"]
        bad = [name for name, values in self.columns.items() if len(values) != n]
        if bad:
            raise FormatError(f"{path}: damaged merge-cli output ({', '.join(bad)} do not have {n} rows)")
        for name, values in self.columns.items():
            text = name in ("kind", "decoder")
            width = PAIR_COLUMNS.get(name)
            if (values.dtype.kind != "S") if text else not np.issubdtype(values.dtype, np.integer):
                raise FormatError(f"{path}: damaged merge-cli output ({name} holds {values.dtype})")
            if values.shape != ((n, width) if width else (n,)):
                raise FormatError(f"{path}: damaged merge-cli output ({name} has shape {values.shape})")
        unknown = set(np.unique(self.columns["kind"]).tolist()) - {kind.encode() for kind in KINDS}
        if unknown:
            raise FormatError(f"{path}: damaged merge-cli output (kind {sorted(unknown)[0]!r} is neither image nor video)")
        self.n = n

    def row_of(self, key: str) -> int | None:
        return self._row.get(key)

    def key(self, row: int) -> str:
        return self._keys[row]

    def keys(self) -> list[str]:
        return list(self._keys)

    def column(self, name: str) -> np.ndarray:
        return self.columns[name]

    def record(self, row: int) -> _Record:
        c = self.columns
        return _Record(
            int(c["offsets"][row]), int(c["lengths"][row]), tuple(int(v) for v in c["grid_thw"][row]),  # type: ignore[arg-type]
            tuple(int(v) for v in c["merged_hw"][row]), tuple(int(v) for v in c["orig_hw"][row]),  # type: ignore[arg-type]
            tuple(int(v) for v in c["resized_hw"][row]), int(c["frame_offsets"][row]),  # type: ignore[arg-type]
            int(c["frame_lengths"][row]), 0, int(c["offsets"][row]), c["kind"][row].decode(),
            c["decoder"][row].decode("ascii", "replace"),
            (int(c["processor_grid"][row][0]), int(c["processor_grid"][row][1])), int(c["crc32"][row]),
        )


class _IndexTable:
    """An index read lazily: opening reads nothing per sample; a key is found by binary search in
    the sorted key-hash table (the fence, read on first lookup, then one block) and checked against
    the stored key; a sample's numbers come from one row of `sample_table`."""

    def __init__(self, handle: h5py.File, path: Path, version: object) -> None:
        if "key_table/text" not in handle or "sample_table" not in handle:
            raise FormatError(
                f"{path}: an index of format version {version} (no key table); rebuild it with `merge-cli index {path}`"
            )
        require_local_objects(handle, [*INDEX_OBJECTS, *(f"key_table/{name}" for name in handle["key_table"])], path)
        _require_string_dataset(handle, "keys", path)
        self._handle = handle
        self._keys = handle["keys"].asstr()
        self.n = int(handle["keys"].shape[0])
        self._table = handle["sample_table"]
        self._hash = handle["key_table/hash"]
        self._rows = handle["key_table/row"]
        self._text = handle["key_table/text"]
        self._text_offsets = handle["key_table/text_offsets"]
        self._block = int(handle["key_table"].attrs.get("block", 4096))
        self._fence: np.ndarray | None = None
        names = json.loads(plain_value(self._table.attrs["columns"]))
        self.has_checksums = names == list(TABLE_COLUMNS)
        if (
            names not in (list(TABLE_COLUMNS), list(TABLE_COLUMNS_BEFORE_CHECKSUMS))
            or self._table.shape != (self.n, len(names))
            or not np.issubdtype(self._table.dtype, np.integer)
        ):
            raise FormatError(f"{path}: damaged merge-cli output (sample_table does not match {self.n} samples)")
        self._kinds = json.loads(plain_value(self._table.attrs["kinds"]))
        self._decoders = json.loads(plain_value(self._table.attrs["decoders"]))
        if not (isinstance(self._kinds, list) and set(self._kinds) <= set(KINDS)) or not (
            isinstance(self._decoders, list) and all(isinstance(d, str) for d in self._decoders)
        ):
            raise FormatError(f"{path}: damaged merge-cli output (sample_table names unknown kinds or decoders)")
        self._columns: dict[str, np.ndarray] = {}
        self._duplicates: int | None = None

    def row_of(self, key: str) -> int | None:
        if self._fence is None:
            self._fence = self._handle["key_table/fence"][()]
        wanted = np.uint64(key_hash(key))
        block = max(int(np.searchsorted(self._fence, wanted, side="left")) - 1, 0)
        while block * self._block < self.n:  # equal hashes may run on into the next block
            start = block * self._block
            hashes = self._hash[start : start + self._block]
            first, last = np.searchsorted(hashes, wanted, "left"), np.searchsorted(hashes, wanted, "right")
            if first < last:
                rows = self._rows[start + first : start + last]
                for row in sorted(int(r) for r in rows):  # the first stored copy wins
                    if self.key(row) == key:
                        return row
            if last < len(hashes):
                return None
            block += 1
        return None

    def key(self, row: int) -> str:
        start, stop = self._text_offsets[row : row + 2]
        return self._text[start:stop].tobytes().decode("utf-8")

    def keys(self) -> list[str]:
        return self._keys[()].tolist() if self.n else []

    def column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            if name == "crc32" and name not in self._handle:  # an index from before checksums
                self._columns[name] = np.full(self.n, NO_CHECKSUM, dtype=np.int64)
            else:
                self._columns[name] = self._handle[name][()]
        return self._columns[name]

    @property
    def duplicate_keys(self) -> int:
        """Keys stored more than once (only a damaged index has any): reads the key table."""
        if self._duplicates is None:
            hashes = self._hash[()]
            same = np.nonzero(hashes[1:] == hashes[:-1])[0]
            rows = self._rows[()]
            self._duplicates = sum(1 for i in same if self.key(int(rows[i])) == self.key(int(rows[i + 1])))
        return self._duplicates

    def record(self, row: int) -> _Record:
        v = self._table[row].tolist()
        if not (0 <= v[15] < len(self._kinds) and 0 <= v[16] < len(self._decoders)):
            raise FormatError(f"damaged sample table (row {row} names kind {v[15]}, decoder {v[16]})")
        return _Record(
            v[0], v[1], (v[2], v[3], v[4]), (v[5], v[6]), (v[7], v[8]), (v[9], v[10]), v[11], v[12], v[13], v[14],
            self._kinds[v[15]], self._decoders[v[16]], (v[17], v[18]), v[19] if self.has_checksums else NO_CHECKSUM,
        )


class FeatureFile:
    """An open merge-cli output: `len`, `keys()`, `in`, `[key]`, `[index]`, iteration, `.attrs`.

    Opening an index takes the same time and memory for a thousand samples or a hundred million:
    per-sample data is read when asked for (`column()` reads a whole column on first use).
    With `verify=True` every sample read is checked against its stored CRC-32 (FormatError when
    it differs); a file written before checksums opens with a warning that it cannot be verified.
    """

    def __init__(self, path: Path | str, *, verify: bool = False) -> None:
        self.path = Path(path)
        self.verify = verify
        self._file = open_h5(self.path, rdcc_nbytes=0)
        if plain_value(self._file.attrs.get("role")) != "index" and _cache_bytes(self._file) != 0:
            self._file.close()  # a compressed shard read on its own: reopen with a chunk cache
            self._file = open_h5(self.path, rdcc_nbytes=COMPRESSED_CACHE_BYTES, rdcc_nslots=521)
        self._shards: OrderedDict[int, h5py.Dataset] = OrderedDict()
        self._shard_files: dict[int, h5py.File] = {}
        self._shard_table: tuple[np.ndarray, list[str] | None] | None = None
        self._warned_unverifiable = False
        try:
            self._load()
        except BaseException:
            self._file.close()
            raise
        if verify and not self.has_checksums:
            self._warn_unverifiable()

    def _load(self) -> None:
        handle = self._file
        missing = [name for name in REQUIRED_DATASETS if name not in handle]
        if missing:
            raise FormatError(f"{self.path}: damaged merge-cli output (missing {', '.join(missing)})")
        try:
            self.attrs: dict[str, Any] = decode_attrs(handle.attrs)
            self.role = "index" if self.attrs.get("role") == "index" else "shard"
            if self.role != "index":
                require_local_objects(handle, [name for name in handle if name != "errors"] + ["errors"], self.path)
            tokens = handle["tokens"]
            self.dtype_name = str(tokens.attrs.get("dtype", self.attrs.get("dtype", "")))
            if self.dtype_name not in NUMPY_DTYPES:
                raise FormatError(f"{self.path}: unknown stored dtype {self.dtype_name!r}")
            if tokens.ndim != 2:
                raise FormatError(f"{self.path}: damaged merge-cli output (tokens has shape {tokens.shape})")
            self.token_dim = int(tokens.shape[1])
            self.rows = int(tokens.shape[0])
            if self.role == "index":
                self._table: _ShardTable | _IndexTable = _IndexTable(handle, self.path, self.attrs.get("format_version"))
                self.shard_paths = [confined_shard(self.path, entry) for entry in read_strings(handle["shards/path"])]
            else:
                if tokens.is_virtual:
                    raise FormatError(f"{self.path}: damaged merge-cli output (a shard's tokens point into other files)")
                self._table = _ShardTable(handle, self.path)
                self.shard_paths = [self.path]
            self._frame_indices = handle["frame_indices"]
            self._frame_times = handle["frame_times"]
        except (KeyError, OSError, ValueError, IndexError, TypeError) as error:
            raise FormatError(f"{self.path}: damaged merge-cli output ({first_line(error)})") from error

    @property
    def has_checksums(self) -> bool:
        """Whether the file stores CRC-32 checksums of its samples' rows (files written before
        merge-cli stored them do not, and cannot be verified)."""
        return self._table.has_checksums

    @property
    def duplicate_keys(self) -> int:
        """Keys stored more than once in this file (the reader returns the first)."""
        return self._table.duplicate_keys

    @property
    def h5(self) -> h5py.File:
        """The underlying h5py file (read-only), for whatever this class does not cover."""
        return self._file

    def column(self, name: str) -> np.ndarray:
        """A whole per-sample table (read on first use, then kept): offsets, lengths, grid_thw,
        merged_hw, orig_hw, resized_hw, processor_grid, kind, decoder, frame_offsets, frame_lengths,
        shard, shard_offsets, crc32."""
        if name not in (*COLUMNS, "processor_grid", "shard", "shard_offsets", "crc32"):
            raise KeyError(name)
        return self._table.column(name)

    # -- mapping interface --------------------------------------------------------------------

    def __len__(self) -> int:
        return self._table.n

    def keys(self) -> list[str]:
        """All keys, in file order (read when called: at 100M keys that is gigabytes)."""
        return self._table.keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._table.row_of(key) is not None

    def index(self, key: str) -> int:
        """Position of `key`; KeyError when it is not stored."""
        row = self._table.row_of(key)
        if row is None:
            raise KeyError(key)
        return row

    def __getitem__(self, item: str | int) -> FeatureSample:
        if isinstance(item, str):
            return self._sample(self.index(item), item)
        if isinstance(item, (int, np.integer)):
            row = int(item)
            n = self._table.n
            if row < 0:
                row += n
            if not 0 <= row < n:
                raise IndexError(f"sample index {item} out of range for {n} samples")
            return self._sample(row)
        raise TypeError(f"index with a key (str) or a position (int), not {type(item).__name__}")

    def get(self, key: str, default: Any = None) -> FeatureSample | Any:
        row = self._table.row_of(key)
        return default if row is None else self._sample(row, key)

    def __iter__(self) -> Iterator[FeatureSample]:
        for row in range(self._table.n):
            yield self._sample(row)

    def failures(self) -> list[Failure]:
        """The error records: inputs with no features (for an index, only keys never stored)."""
        group = self._file["errors"]
        columns = [read_strings(group[name]) for name in ERROR_FIELDS]
        return [Failure(key, stage, error_type, message) for key, stage, error_type, message in zip(*columns)]

    # -- reading ------------------------------------------------------------------------------

    def _sample(self, row: int, key: str | None = None) -> FeatureSample:
        try:
            return self._read_sample(row, key)
        except FormatError:
            raise
        except (OSError, ValueError, TypeError, IndexError, KeyError, RuntimeError) as error:
            # What a damaged table makes h5py, numpy or torch raise: the documented error instead.
            name = repr(key) if key is not None else f"number {row}"
            raise FormatError(f"{self.path}: damaged sample {name} ({first_line(error)})") from error

    def _read_sample(self, row: int, key: str | None) -> FeatureSample:
        record = self._table.record(row)
        key = self._table.key(row) if key is None else key
        t, gh, gw = record.grid_thw
        mh, mw = record.merged_hw
        if min(t, mh, mw) < 0 or record.length != t * mh * mw:
            raise FormatError(f"{self.path}: damaged sample {key!r} ({record.length} rows for grid {t}x{mh}x{mw})")
        rows = self._rows_of(record, key)
        if self.verify:
            self._verify(rows, record, key)
        if record.frame_length:
            start, stop = record.frame_offset, record.frame_offset + record.frame_length
            frame_indices = self._frame_indices[start:stop].tolist() if start >= 0 else []
            frame_times = self._frame_times[start:stop].tolist() if start >= 0 else []
            if len(frame_indices) != record.frame_length or len(frame_times) != record.frame_length:
                raise FormatError(f"{self.path}: damaged sample {key!r} (its frames lie outside the frame tables)")
        else:
            frame_indices, frame_times = [], []
        return FeatureSample(
            key=key,
            kind=record.kind,
            tokens=numpy_to_tokens(rows, self.dtype_name).view(t, mh * mw, self.token_dim),
            grid_thw=(t, gh, gw),
            merged_hw=(mh, mw),
            orig_hw=record.orig_hw,
            resized_hw=record.resized_hw,
            frame_indices=frame_indices,
            frame_times=frame_times,
            decoder=record.decoder,
            index=row,
            processor_grid=record.processor_grid,
        )

    def _verify(self, rows: np.ndarray, record: _Record, key: str) -> None:
        if record.crc32 == NO_CHECKSUM:
            self._warn_unverifiable()
        elif rows_checksum(rows) != record.crc32:
            raise FormatError(
                f"{self.path}: sample {key!r} does not match its checksum (its rows in "
                f"{self.shard_paths[record.shard].name} changed after they were written)"
            )

    def _warn_unverifiable(self) -> None:
        if not self._warned_unverifiable:
            self._warned_unverifiable = True
            warnings.warn(
                f"{self.path}: written without checksums (before merge-cli stored them): its samples cannot be verified",
                stacklevel=3,
            )

    def read_rows(self, row: int) -> np.ndarray:
        """The stored `(length, D)` token rows of sample `row`, as stored (bf16 as uint16)."""
        return self._rows_of(self._table.record(row), str(row))

    def _rows_of(self, record: _Record, key: str) -> np.ndarray:
        if not record.length:
            return np.empty((0, self.token_dim), dtype=NUMPY_DTYPES[self.dtype_name])
        if record.shard_offset < 0:
            raise FormatError(f"{self.path}: damaged sample {key!r} (negative row offset {record.shard_offset})")
        rows = self.shard_tokens(record.shard)[record.shard_offset : record.shard_offset + record.length]
        if rows.shape[0] != record.length:
            raise FormatError(f"{self.path}: damaged sample {key!r} (its rows lie outside its shard's tokens)")
        return rows

    def shard_tokens(self, shard: int) -> h5py.Dataset:
        """`tokens` of shard number `shard` (see `shard_paths`), from a small LRU of open handles.

        A shard is opened only inside `feats.h5.d/`, and only when it is the file the index was
        built over (same `shard_id`, same rows): FormatError otherwise."""
        if not 0 <= shard < len(self.shard_paths):
            raise FormatError(
                f"{self.path}: damaged merge-cli output (a sample names shard {shard}; there are {len(self.shard_paths)})"
            )
        dataset = self._shards.get(shard)
        if dataset is not None:
            self._shards.move_to_end(shard)
            return dataset
        path = self.shard_paths[shard]
        if path == self.path:
            dataset = self._file["tokens"]
        else:
            dataset = self._open_shard(shard, path)
        self._shards[shard] = dataset
        while len(self._shards) > MAX_OPEN_SHARDS:
            old, _ = self._shards.popitem(last=False)
            if old in self._shard_files:
                self._shard_files.pop(old).close()
        return dataset

    def _open_shard(self, shard: int, path: Path) -> h5py.Dataset:
        if not path.is_file():
            raise FormatError(f"{self.path}: shard {path.name} is missing")
        check_inside_folder(self.path, path)
        handle = open_h5(path, rdcc_nbytes=_cache_bytes(self._file), rdcc_nslots=521)
        try:
            require_local_objects(handle, ["tokens"], path)
            tokens = handle["tokens"]
            rows, ids = self._indexed_shards()
            if tokens.is_virtual or tokens.ndim != 2 or tokens.shape[1] != self.token_dim:
                raise FormatError(f"{path}: damaged shard (its tokens are not {self.token_dim} wide rows stored in it)")
            identity = str(plain_value(handle.attrs.get("shard_id", "")))
            if ids is not None and ids[shard] and identity != ids[shard]:
                raise FormatError(
                    f"{path}: not the shard this index was built over (shard_id {identity[:32] or 'none'}, the index "
                    f"expects {ids[shard]}); the folder changed since: run merge-cli index {self.path}"
                )
            if tokens.shape[0] != rows[shard]:
                raise FormatError(
                    f"{path}: has {tokens.shape[0]} token rows, the index expects {rows[shard]}; "
                    f"run merge-cli index {self.path}"
                )
        except BaseException:
            handle.close()
            raise
        self._shard_files[shard] = handle
        return tokens

    def _indexed_shards(self) -> tuple[np.ndarray, list[str] | None]:
        """Rows and identity of every shard as the index recorded them (read once; indexes from
        before shard identities have no ids)."""
        if self._shard_table is None:
            group = self._file["shards"]
            rows = group["rows"][()]
            ids = read_strings(group["id"]) if "id" in group else None
            if len(rows) != len(self.shard_paths) or (ids is not None and len(ids) != len(self.shard_paths)):
                raise FormatError(f"{self.path}: damaged merge-cli output (the shard tables disagree)")
            self._shard_table = (rows, ids)
        return self._shard_table

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        for handle in self._shard_files.values():
            handle.close()
        self._shard_files.clear()
        self._shards.clear()
        self._file.close()

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureFile({str(self.path)!r}, samples={len(self)}, dtype={self.dtype_name}, dim={self.token_dim})"


def _cache_bytes(handle: h5py.File) -> int:
    """Chunk cache for the shards described by `handle` (a shard, or an index naming their compression)."""
    compression = str(plain_value(handle.attrs.get("compression")) or "none")
    return 0 if compression == "none" else COMPRESSED_CACHE_BYTES


def open_features(path: Path | str, *, verify: bool = False) -> FeatureFile:
    """Open a merge-cli output (`feats.h5`) or one of its shards for reading; `verify=True` checks
    every sample read against its CRC-32 (FormatError on a mismatch)."""
    return FeatureFile(path, verify=verify)


class FeatureDataset(torch.utils.data.Dataset):
    """A map-style Dataset of FeatureSample records, safe with DataLoader worker processes.

    No HDF5 handle crosses a process boundary: each process (the main one, every worker) opens
    its own on first use, and pickling drops it. Samples have different shapes, so give the
    DataLoader a collate function, e.g. `collate_fn=list`. `verify=True` checks every sample
    against its checksum (see `open_features`).
    """

    def __init__(self, path: Path | str, keys: Sequence[str] | None = None, *, verify: bool = False) -> None:
        self.path = Path(path)
        self.verify = verify
        with open_features(self.path) as features:  # opened and closed here: nothing to inherit
            if keys is None:
                self._rows: np.ndarray | None = None  # numpy: no per-row object for workers to copy
                self._length = len(features)
            else:
                rows = np.fromiter((-1 if (r := features._table.row_of(k)) is None else r for k in keys), np.int64)
                missing = [keys[i] for i in np.nonzero(rows < 0)[0][:1]]
                if missing:
                    raise KeyError(f"{int((rows < 0).sum())} keys are not in {self.path}, e.g. {missing[0]!r}")
                self._rows = rows
                self._length = len(self._rows)
        self._features: FeatureFile | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> FeatureSample:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} samples")
        row = index if self._rows is None else int(self._rows[index])
        return self.features[row]

    @property
    def features(self) -> FeatureFile:
        """This process's own open file (opened on first use, again after a fork)."""
        if self._features is None or self._pid != os.getpid():
            self._features = open_features(self.path, verify=self.verify)  # an inherited handle is never used
            self._pid = os.getpid()
        return self._features

    def close(self) -> None:
        if self._features is not None and self._pid == os.getpid():
            self._features.close()
        self._features = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_features"] = None
        state["_pid"] = None
        return state
