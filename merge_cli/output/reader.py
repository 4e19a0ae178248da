"""Reading merge-cli features from a training job.

    from merge_cli import open_features

    with open_features("feats.h5") as feats:
        sample = feats["images/cat.jpg"]       # or feats[0]
        sample.tokens                          # (t, h/2 * w/2, D) torch tensor, bf16 bit-exact

`open_features` takes the index (`feats.h5`) or any single shard (each shard is self-describing).
The key -> row table is built once per handle; token rows are read straight from the shard files
(measured faster than going through the index's virtual dataset), whose handles are kept open.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
import torch

from merge_cli.errors import FormatError
from merge_cli.output.format import (
    ERROR_FIELDS,
    NUMPY_DTYPES,
    decode_attrs,
    first_line,
    numpy_to_tokens,
    open_h5,
    plain_value,
    read_strings,
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
"""Per-sample tables the reader loads into memory when it opens a file."""
REQUIRED_DATASETS = ("tokens", "keys", *COLUMNS, "frame_indices", "frame_times", "errors")


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


class FeatureFile:
    """An open merge-cli output: `len`, `keys()`, `in`, `[key]`, `[index]`, iteration, `.attrs`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file = open_h5(self.path, rdcc_nbytes=0)
        if plain_value(self._file.attrs.get("role")) != "index" and _cache_bytes(self._file) != 0:
            self._file.close()  # a compressed shard read on its own: reopen with a chunk cache
            self._file = open_h5(self.path, rdcc_nbytes=COMPRESSED_CACHE_BYTES, rdcc_nslots=521)
        self._shards: OrderedDict[int, h5py.Dataset] = OrderedDict()
        self._shard_files: dict[int, h5py.File] = {}
        try:
            self._load()
        except BaseException:
            self._file.close()
            raise

    def _load(self) -> None:
        handle = self._file
        missing = [name for name in REQUIRED_DATASETS if name not in handle]
        if missing:
            raise FormatError(f"{self.path}: damaged merge-cli output (missing {', '.join(missing)})")
        try:
            self.attrs: dict[str, Any] = decode_attrs(handle.attrs)
            self.role = "index" if self.attrs.get("role") == "index" else "shard"
            tokens = handle["tokens"]
            self.dtype_name = str(tokens.attrs.get("dtype", self.attrs.get("dtype", "")))
            if self.dtype_name not in NUMPY_DTYPES:
                raise FormatError(f"{self.path}: unknown stored dtype {self.dtype_name!r}")
            if tokens.ndim != 2:
                raise FormatError(f"{self.path}: damaged merge-cli output (tokens has shape {tokens.shape})")
            self.token_dim = int(tokens.shape[1])
            self.rows = int(tokens.shape[0])
            self._keys = read_strings(handle["keys"])
            n = len(self._keys)
            # The first occurrence wins if a key is stored twice (only a damaged shard can have that).
            self._row = {key: i for i, key in zip(range(n - 1, -1, -1), reversed(self._keys))}
            self.duplicate_keys = n - len(self._row)
            self._columns = {name: handle[name][()] for name in COLUMNS}
            self._columns["processor_grid"] = (
                handle["processor_grid"][()] if "processor_grid" in handle else self._columns["grid_thw"][:, 1:]
            )
            if self.role == "index":
                self._columns["shard"] = handle["shard"][()]
                self._columns["shard_offsets"] = handle["shard_offsets"][()]
                self.shard_paths = [self.path.parent / rel for rel in read_strings(handle["shards/path"])]
            else:
                self._columns["shard"] = np.zeros(n, dtype=np.int32)
                self._columns["shard_offsets"] = self._columns["offsets"]
                self.shard_paths = [self.path]
            bad = [name for name, values in self._columns.items() if len(values) != n]
            if bad:
                raise FormatError(f"{self.path}: damaged merge-cli output ({', '.join(bad)} do not have {n} rows)")
            self._frame_indices = handle["frame_indices"]
            self._frame_times = handle["frame_times"]
        except (KeyError, OSError, ValueError, IndexError) as error:
            raise FormatError(f"{self.path}: damaged merge-cli output ({first_line(error)})") from error

    @property
    def h5(self) -> h5py.File:
        """The underlying h5py file (read-only), for whatever this class does not cover."""
        return self._file

    def column(self, name: str) -> np.ndarray:
        """A per-sample table held in memory: offsets, lengths, grid_thw, merged_hw, orig_hw,
        resized_hw, processor_grid, kind, decoder, frame_offsets, frame_lengths, shard, shard_offsets."""
        return self._columns[name]

    # -- mapping interface --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        """All keys, in file order."""
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._row

    def index(self, key: str) -> int:
        """Position of `key`; KeyError when it is not stored."""
        return self._row[key]

    def __getitem__(self, item: str | int) -> FeatureSample:
        if isinstance(item, str):
            try:
                row = self._row[item]
            except KeyError:
                raise KeyError(item) from None
        elif isinstance(item, (int, np.integer)):
            row = int(item)
            if row < 0:
                row += len(self._keys)
            if not 0 <= row < len(self._keys):
                raise IndexError(f"sample index {item} out of range for {len(self._keys)} samples")
        else:
            raise TypeError(f"index with a key (str) or a position (int), not {type(item).__name__}")
        return self._sample(row)

    def get(self, key: str, default: Any = None) -> FeatureSample | Any:
        return self[key] if key in self._row else default

    def __iter__(self) -> Iterator[FeatureSample]:
        for row in range(len(self._keys)):
            yield self._sample(row)

    def failures(self) -> list[Failure]:
        """The error records: inputs with no features (for an index, only keys never stored)."""
        group = self._file["errors"]
        columns = [read_strings(group[name]) for name in ERROR_FIELDS]
        return [Failure(key, stage, error_type, message) for key, stage, error_type, message in zip(*columns)]

    # -- reading ------------------------------------------------------------------------------

    def _sample(self, row: int) -> FeatureSample:
        cols = self._columns
        t, gh, gw = (int(v) for v in cols["grid_thw"][row])
        mh, mw = (int(v) for v in cols["merged_hw"][row])
        length = int(cols["lengths"][row])
        if length != t * mh * mw:
            raise FormatError(f"{self.path}: damaged sample {self._keys[row]!r} ({length} rows for grid {t}x{mh}x{mw})")
        rows = self.read_rows(row)
        frames = int(cols["frame_lengths"][row])
        if frames:
            start = int(cols["frame_offsets"][row])
            frame_indices = self._frame_indices[start : start + frames].tolist()
            frame_times = self._frame_times[start : start + frames].tolist()
        else:
            frame_indices, frame_times = [], []
        return FeatureSample(
            key=self._keys[row],
            kind=cols["kind"][row].decode(),
            tokens=numpy_to_tokens(rows, self.dtype_name).view(t, mh * mw, self.token_dim),
            grid_thw=(t, gh, gw),
            merged_hw=(mh, mw),
            orig_hw=(int(cols["orig_hw"][row][0]), int(cols["orig_hw"][row][1])),
            resized_hw=(int(cols["resized_hw"][row][0]), int(cols["resized_hw"][row][1])),
            frame_indices=frame_indices,
            frame_times=frame_times,
            decoder=cols["decoder"][row].decode(),
            index=row,
            processor_grid=(int(cols["processor_grid"][row][0]), int(cols["processor_grid"][row][1])),
        )

    def read_rows(self, row: int) -> np.ndarray:
        """The stored `(length, D)` token rows of sample `row`, as stored (bf16 as uint16)."""
        length = int(self._columns["lengths"][row])
        if not length:
            return np.empty((0, self.token_dim), dtype=NUMPY_DTYPES[self.dtype_name])
        start = int(self._columns["shard_offsets"][row])
        return self.shard_tokens(int(self._columns["shard"][row]))[start : start + length]

    def shard_tokens(self, shard: int) -> h5py.Dataset:
        """`tokens` of shard number `shard` (see `shard_paths`), from a small LRU of open handles."""
        dataset = self._shards.get(shard)
        if dataset is not None:
            self._shards.move_to_end(shard)
            return dataset
        path = self.shard_paths[shard]
        if path == self.path:
            handle = self._file
        else:
            try:
                handle = h5py.File(path, "r", rdcc_nbytes=_cache_bytes(self._file), rdcc_nslots=521)
            except FileNotFoundError as error:
                raise FormatError(f"{self.path}: shard {path.name} is missing") from error
            except OSError as error:
                raise FormatError(f"{path}: damaged shard ({error})") from error
            self._shard_files[shard] = handle
        self._shards[shard] = dataset = handle["tokens"]
        while len(self._shards) > MAX_OPEN_SHARDS:
            old, _ = self._shards.popitem(last=False)
            if old in self._shard_files:
                self._shard_files.pop(old).close()
        return dataset

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


def open_features(path: Path | str) -> FeatureFile:
    """Open a merge-cli output (`feats.h5`) or one of its shards for reading."""
    return FeatureFile(path)


class FeatureDataset(torch.utils.data.Dataset):
    """A map-style Dataset of FeatureSample records, safe with DataLoader worker processes.

    No HDF5 handle crosses a process boundary: each process (the main one, every worker) opens
    its own on first use, and pickling drops it. Samples have different shapes, so give the
    DataLoader a collate function, e.g. `collate_fn=list`.
    """

    def __init__(self, path: Path | str, keys: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        with open_features(self.path) as features:  # opened and closed here: nothing to inherit
            if keys is None:
                self._rows: list[int] | None = None
                self._length = len(features)
            else:
                missing = [k for k in keys if k not in features]
                if missing:
                    raise KeyError(f"{len(missing)} keys are not in {self.path}, e.g. {missing[0]!r}")
                self._rows = [features.index(k) for k in keys]
                self._length = len(self._rows)
        self._features: FeatureFile | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> FeatureSample:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} samples")
        row = index if self._rows is None else self._rows[index]
        return self.features[row]

    @property
    def features(self) -> FeatureFile:
        """This process's own open file (opened on first use, again after a fork)."""
        if self._features is None or self._pid != os.getpid():
            self._features = open_features(self.path)  # a handle inherited over fork is never used
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
