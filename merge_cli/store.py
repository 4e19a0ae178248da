"""The on-disk HDF5 format: shard writer, crash-safe commit, resume scan, output removal.

Layout (the contract is docs/FORMAT.md):

    feats.h5                  the index: virtual `tokens` over all shards + per-sample tables
    feats.h5.d/r000-00000.h5  shard of rank 0, sequence 0 (self-describing, same datasets)
    feats.h5.d/r000-00001.h5  ...

A shard is written as `<name>.h5.tmp` and renamed to `<name>.h5` only after it is complete and
closed, so every `*.h5` in the shard folder is whole; `*.tmp` files are leftovers of a killed run.
`build_index` (merge_cli/index.py) writes `feats.h5` the same way.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from merge_cli.errors import FormatError, UsageError
from merge_cli.records import Failure, Features

if TYPE_CHECKING:  # pragma: no cover
    import torch

FORMAT_NAME = "merge-cli-features"
FORMAT_VERSION = 1

STORE_DTYPES = ("bf16", "fp16", "fp32")
COMPRESSIONS = ("none", "lzf", "gzip", "zstd")

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Store dtype option -> the `dtype` attribute written on `tokens` (and at the root)."""
NUMPY_DTYPES = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
"""Real dtype -> the HDF5/numpy dtype it is stored as (bfloat16 as its raw 16-bit pattern)."""

SHARD_SUFFIX = ".h5"
TMP_SUFFIX = ".tmp"
SHARD_NAME = re.compile(r"^r(\d{3,})-(\d{5,})\.h5$")

LIBVER = ("v110", "v110")
"""HDF5 >= 1.10 object formats (needed for virtual datasets anyway); readable by any h5py >= 2.9."""
CHUNK_TARGET_BYTES = 1 << 20
GROW_CHUNKS = 64  # extent growth step of the tokens dataset, in chunks
"""`tokens` chunks hold about 1 MiB of rows (never more than 1/8 of a shard)."""
ZSTD_LEVEL = 1
GZIP_LEVEL = 4
SHARD_OVERHEAD_BYTES = 16 * 1024
"""Reserve for the HDF5 superblock, object headers and B-trees of one shard (measured ~14 KB)."""
SAMPLE_OVERHEAD_BYTES = 256
"""Reserve per sample for its rows in the per-sample tables (measured ~190 B with short keys)."""

STRING = h5py.string_dtype("utf-8")

JSON_ATTRS = ("resize_policy", "video_options", "media_options", "settings")
"""Attributes that hold JSON text by contract (given as text or as dicts); readers decode them."""
SHARD_ATTRS = ("role", "shard_rank", "shard_sequence")
"""Root attributes that describe one shard file and are not copied into the index."""
ERROR_FIELDS = ("key", "stage", "type", "message")
"""Datasets of the `errors` group, one string per error record."""


# ---------------------------------------------------------------------------------------------
# Names and attributes


def shard_dir(out: Path) -> Path:
    """Where the shards of `out` live: `feats.h5` -> `feats.h5.d/` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".d")


def shard_name(rank: int, sequence: int) -> str:
    return f"r{rank:03d}-{sequence:05d}{SHARD_SUFFIX}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(rank, sequence) of a complete shard's file name, None for any other name."""
    match = SHARD_NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def list_shards(out: Path) -> list[Path]:
    """Complete shards of `out`, in the canonical order (rank, then sequence)."""
    folder = shard_dir(out)
    if not folder.is_dir():
        return []
    found = [(parsed, path) for path in folder.iterdir() if (parsed := parse_shard_name(path.name)) and path.is_file()]
    return [path for _, path in sorted(found)]


def list_temporaries(out: Path, rank: int | None = None) -> list[Path]:
    """Unfinished files: shards `feats.h5.d/r*-*.h5.tmp` and indexes `feats.h5.*.tmp`. With `rank`,
    only that rank's shards (an index being built may belong to any live process)."""
    out = Path(out)
    folder = shard_dir(out)
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            parsed = parse_shard_name(path.name[: -len(TMP_SUFFIX)]) if path.name.endswith(TMP_SUFFIX) else None
            if parsed and (rank is None or parsed[0] == rank):
                found.append(path)
    if rank is None and out.parent.is_dir():
        found += [p for p in out.parent.glob(f"{glob.escape(out.name)}.*{TMP_SUFFIX}") if p.is_file()]
    return sorted(found)


def index_temporary(out: Path) -> Path:
    """Where this process builds the index before renaming it to `out`: unique per host and
    process, so that two jobs finishing together never write into one file."""
    out = Path(out)
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    return out.with_name(f"{out.name}.{host}-{os.getpid()}{TMP_SUFFIX}")


def encode_attrs(attrs: Mapping[str, object]) -> dict[str, Any]:
    """HDF5-storable attribute values. Dicts, lists and None become JSON text; the names of all
    JSON-text attributes (those, and JSON_ATTRS given as JSON text) are listed in `json_attrs`."""
    encoded: dict[str, Any] = {}
    json_names = []
    for name, value in attrs.items():
        if name == "json_attrs":
            continue
        if isinstance(value, (dict, list, tuple)) or value is None:
            encoded[name] = json.dumps(value, sort_keys=True)
            json_names.append(name)
        elif isinstance(value, str) and name in JSON_ATTRS and _is_json(value):
            encoded[name] = value
            json_names.append(name)
        elif isinstance(value, (bool, np.bool_)):
            encoded[name] = np.bool_(value)
        elif isinstance(value, (int, float, str, np.integer, np.floating)):
            encoded[name] = value
        elif isinstance(value, os.PathLike):
            encoded[name] = os.fspath(value)
        else:
            raise UsageError(f"attribute {name!r}: cannot store a {type(value).__name__} (use str, number, bool, dict or list)")
    encoded["json_attrs"] = json.dumps(sorted(json_names))
    return encoded


def decode_attrs(raw: Mapping[str, Any], *, parse_json: bool = True) -> dict[str, Any]:
    """Root attributes as plain Python values; with `parse_json` the JSON-text ones decoded (the
    inverse of encode_attrs), else left as the JSON text they were given as."""
    values = {name: plain_value(value) for name, value in raw.items()}
    try:
        json_names = json.loads(values.pop("json_attrs", "[]"))
        if parse_json:
            for name in json_names:
                if name in values:
                    values[name] = json.loads(values[name])
    except (TypeError, ValueError) as error:
        raise FormatError(f"damaged attributes: {error}") from error
    return values


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def plain_value(value: Any) -> Any:
    """An attribute value as plain Python (bytes -> str, numpy scalars and arrays -> Python)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [plain_value(v) for v in value.tolist()]
    return value


# ---------------------------------------------------------------------------------------------
# Opening files that claim to be ours

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def open_h5(path: Path | str, **kwargs: Any) -> h5py.File:
    """Open a merge-cli file read-only; FormatError with one clear line for anything else."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        raise FormatError(f"{path}: is a folder, not a merge-cli output (give the .h5 file)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(HDF5_SIGNATURE))
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror or error}") from error
    if head != HDF5_SIGNATURE:
        # HDF5 also allows a user block before the signature; merge-cli never writes one.
        raise FormatError(f"{path}: not an HDF5 file, so not a merge-cli output")
    try:
        handle = h5py.File(path, "r", **kwargs)
    except OSError as error:
        raise FormatError(f"{path}: damaged or truncated HDF5 file ({first_line(error)})") from error
    try:
        check_format(handle, path)
    except BaseException:
        handle.close()
        raise
    return handle


def check_format(handle: h5py.File, path: Path | str) -> None:
    """Raise FormatError unless `handle` is a merge-cli output of a version this code reads."""
    try:
        name = plain_value(handle.attrs.get("format"))
        version = plain_value(handle.attrs.get("format_version"))
    except OSError as error:
        raise FormatError(f"{path}: damaged HDF5 file ({first_line(error)})") from error
    if name != FORMAT_NAME:
        raise FormatError(f"{path}: an HDF5 file but not a merge-cli output (no format={FORMAT_NAME!r} attribute)")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatError(
            f"{path}: written in format version {version}; this merge-cli reads version {FORMAT_VERSION} (upgrade merge-cli)"
        )
    if "zstd" in str(plain_value(handle.attrs.get("compression"))):
        require_hdf5plugin(path)


def require_hdf5plugin(path: Path | str | None = None) -> None:
    """Import hdf5plugin (registers the zstd filter) or say clearly how to get it."""
    try:
        import hdf5plugin  # noqa: F401
    except ImportError as error:
        where = f"{path} is" if path else "zstd shards are"
        raise FormatError(
            f"{where} compressed with zstd, which needs the hdf5plugin package: pip install hdf5plugin "
            "(or merge-cli[zstd])"
        ) from error


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Tensors <-> stored arrays


def tokens_to_numpy(tokens: torch.Tensor, dtype_name: str) -> np.ndarray:
    """(..., D) tensor in the real dtype -> numpy array of the stored dtype (bf16 as raw uint16)."""
    import torch

    want = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    tokens = tokens.detach()
    if tokens.device.type != "cpu":
        tokens = tokens.cpu()
    if tokens.dtype != want:
        tokens = tokens.to(want)
    tokens = tokens.contiguous()
    if want == torch.bfloat16:
        return tokens.view(torch.int16).numpy().view(np.uint16)
    return tokens.numpy()


def numpy_to_tokens(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """The inverse of tokens_to_numpy: stored array -> tensor of the real dtype, bit-exact."""
    import torch

    if dtype_name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


# ---------------------------------------------------------------------------------------------
# The shard writer


def _compression_kwargs(compression: str) -> dict[str, Any]:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
    require_hdf5plugin()
    import hdf5plugin

    return dict(hdf5plugin.Zstd(clevel=ZSTD_LEVEL))


@dataclass
class _SampleRows:
    """What is kept in memory per sample until the shard is closed."""

    key: str
    kind: str
    offset: int
    length: int
    grid_thw: tuple[int, int, int]
    merged_hw: tuple[int, int]
    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    decoder: str
    frame_indices: list[int]
    frame_times: list[float]


class ShardWriter:
    """Writes one process's shards: `feats.h5.d/r<rank>-<seq>.h5`, each at most `shard_bytes`.

    `add` buffers token rows and writes them in chunk-aligned blocks; per-sample metadata is kept
    in memory and written when the shard is closed, after which the shard is renamed from
    `*.h5.tmp` to `*.h5`. A sample larger than `shard_bytes` gets a shard of its own. Nothing is
    created until the first record arrives. Used as a context manager, the open shard is committed
    on exit, also when the block raised (every sample that `add` accepted is whole), unless
    writing the file itself failed (see `close`).
    """

    def __init__(
        self,
        out: Path,
        attrs: Mapping[str, object],
        *,
        rank: int = 0,
        shard_bytes: int = 2 * 10**9,
        compression: str = "none",
        store_dtype: str = "bf16",
    ) -> None:
        if store_dtype not in STORE_DTYPES:
            raise UsageError(f"store dtype must be one of {', '.join(STORE_DTYPES)}; got {store_dtype!r}")
        if compression not in COMPRESSIONS:
            raise UsageError(f"compression must be one of {', '.join(COMPRESSIONS)}; got {compression!r}")
        if rank < 0:
            raise UsageError(f"rank must not be negative; got {rank}")
        if shard_bytes < 1:
            raise UsageError(f"shard size must be positive; got {shard_bytes}")
        self.out = Path(out)
        self.rank = rank
        self.shard_bytes = int(shard_bytes)
        self.compression = compression
        self.store_dtype = store_dtype
        self.dtype_name = DTYPE_NAMES[store_dtype]
        self._np_dtype = NUMPY_DTYPES[self.dtype_name]
        self._compression_kwargs = _compression_kwargs(compression)
        self.merge_size = int(attrs.get("merge_size", 2))  # type: ignore[call-overload]
        self._attrs = dict(attrs)
        self._attrs.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            dtype=self.dtype_name,
            compression=compression,
        )
        self._attr_bytes = sum(len(str(v)) + len(k) + 64 for k, v in encode_attrs(self._attrs).items())
        self._token_dim: int | None = None
        self._chunk_rows = 0
        self._sequence = self._first_free_sequence()
        self._shard: _OpenShard | None = None
        self._closed = False
        self.samples_written = 0
        self.failures_written = 0
        self.tokens_written = 0
        self._finished_bytes = 0
        self.shard_paths: list[Path] = []

    # -- public API ---------------------------------------------------------------------------

    @property
    def bytes_written(self) -> int:
        """Bytes of the finished shards on disk plus the estimate for the open one."""
        return self._finished_bytes + (self._shard.estimated_bytes() if self._shard else 0)

    def add(self, features: Features) -> None:
        """Store one sample's tokens; rolls to a new shard when this one would exceed `shard_bytes`."""
        self._check_open()
        rows, meta = self._prepare(features)
        if self._shard is not None and self._shard.token_dim is None:  # opened by a failure record
            self._shard.token_dim, self._shard.chunk_rows = self._token_dim, self._chunk_rows
        if self._shard is not None and not self._shard.empty:
            if self._shard.estimated_bytes(extra_rows=len(rows), extra_meta=meta) > self.shard_bytes:
                self._commit()
        shard = self._open_shard()
        shard.add(rows, meta)
        self.samples_written += 1
        self.tokens_written += len(rows)

    def add_failure(self, failure: Failure) -> None:
        """Store an error record (key, stage, type, message)."""
        self._check_open()
        record = (str(failure.key), str(failure.stage), str(failure.error_type), str(failure.message))
        extra = SAMPLE_OVERHEAD_BYTES + sum(len(s.encode()) for s in record)
        if self._shard is not None and not self._shard.empty:
            if self._shard.estimated_bytes(extra_meta_bytes=extra) > self.shard_bytes:
                self._commit()
        self._open_shard().failures.append(record)
        self.failures_written += 1

    def close(self) -> None:
        """Finish the open shard (close the file, then rename it into place). Idempotent.

        A shard whose file write failed (disk full, I/O error) is deleted instead: its samples are
        not in any complete shard, so a resumed run computes them again."""
        if self._closed:
            return
        self._closed = True
        if self._shard is not None and self._shard.broken:
            self.abort()
        elif self._shard is not None:
            self._commit()

    def abort(self) -> None:
        """Drop the open shard without committing it (its temporary file is deleted)."""
        self._closed = True
        if self._shard is not None:
            self._shard.discard()
            self._shard = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if self._shard is not None and self._shard.broken:
            raise RuntimeError(f"writing {self._shard.tmp} failed earlier; this writer can only be closed")

    def _first_free_sequence(self) -> int:
        """Never reuse a name: one past the highest sequence of this rank, complete or temporary."""
        folder = shard_dir(self.out)
        highest = -1
        if folder.is_dir():
            for path in folder.iterdir():
                name = path.name[: -len(TMP_SUFFIX)] if path.name.endswith(TMP_SUFFIX) else path.name
                parsed = parse_shard_name(name)
                if parsed and parsed[0] == self.rank:
                    highest = max(highest, parsed[1])
        return highest + 1

    def _prepare(self, features: Features) -> tuple[np.ndarray, _SampleRows]:
        """Validate one record and turn it into stored rows + metadata, before touching any file."""
        tokens = features.tokens
        if tokens.dim() != 3:
            raise ValueError(f"{features.key}: tokens must be (t, h/m * w/m, D); got shape {tuple(tokens.shape)}")
        t, n, dim = (int(s) for s in tokens.shape)
        grid = tuple(int(v) for v in features.grid_thw)
        m = self.merge_size
        if len(grid) != 3 or grid[1] % m or grid[2] % m:
            raise ValueError(f"{features.key}: grid_thw {grid} is not a {m}x{m}-mergeable patch grid")
        merged = (grid[1] // m, grid[2] // m)
        if t != grid[0] or n != merged[0] * merged[1]:
            raise ValueError(
                f"{features.key}: tokens {tuple(tokens.shape)} do not match grid_thw {grid} "
                f"(expected ({grid[0]}, {merged[0] * merged[1]}, D))"
            )
        if self._token_dim is None:
            self._token_dim = dim
            row_bytes = dim * self._np_dtype.itemsize
            cap = max(1, self.shard_bytes // 8 // max(row_bytes, 1))
            self._chunk_rows = max(1, min(CHUNK_TARGET_BYTES // max(row_bytes, 1), cap))
        elif dim != self._token_dim:
            raise ValueError(f"{features.key}: token dim {dim} differs from this output's {self._token_dim}")
        if features.kind not in ("image", "video"):
            raise ValueError(f"{features.key}: kind must be 'image' or 'video'; got {features.kind!r}")
        frame_indices = [int(i) for i in features.frame_indices]
        frame_times = [float(s) for s in features.frame_times]
        if len(frame_indices) != len(frame_times):
            raise ValueError(f"{features.key}: {len(frame_indices)} frame indices but {len(frame_times)} frame times")
        rows = tokens_to_numpy(tokens, self.dtype_name).reshape(t * n, dim)
        meta = _SampleRows(
            key=str(features.key),
            kind=features.kind,
            offset=-1,
            length=t * n,
            grid_thw=grid,  # type: ignore[arg-type]
            merged_hw=merged,
            orig_hw=(int(features.orig_hw[0]), int(features.orig_hw[1])),
            resized_hw=(int(features.resized_hw[0]), int(features.resized_hw[1])),
            decoder=str(features.decoder),
            frame_indices=frame_indices,
            frame_times=frame_times,
        )
        return rows, meta

    def _open_shard(self) -> _OpenShard:
        if self._shard is None:
            final = shard_dir(self.out) / shard_name(self.rank, self._sequence)
            self._sequence += 1
            attrs = dict(self._attrs, role="shard", shard_rank=self.rank, shard_sequence=self._sequence - 1)
            if self._token_dim is not None:
                attrs["token_dim"] = self._token_dim
            self._shard = _OpenShard(
                final,
                encode_attrs(attrs),
                self._np_dtype,
                self.dtype_name,
                self._token_dim,
                self._chunk_rows,
                self._compression_kwargs,
                self._attr_bytes,
            )
        return self._shard

    def _commit(self) -> None:
        assert self._shard is not None
        shard, self._shard = self._shard, None
        path = shard.commit()
        self.shard_paths.append(path)
        self._finished_bytes += path.stat().st_size


class _OpenShard:
    """One shard being written under its temporary name."""

    def __init__(
        self,
        final: Path,
        attrs: dict[str, Any],
        np_dtype: np.dtype,
        dtype_name: str,
        token_dim: int | None,
        chunk_rows: int,
        compression_kwargs: dict[str, Any],
        attr_bytes: int,
    ) -> None:
        self.final = final
        self.tmp = final.with_name(final.name + TMP_SUFFIX)
        self.attrs = attrs
        self.np_dtype = np_dtype
        self.dtype_name = dtype_name
        self.token_dim = token_dim
        self.chunk_rows = chunk_rows
        self.compression_kwargs = compression_kwargs
        self.fixed_bytes = SHARD_OVERHEAD_BYTES + attr_bytes
        self.samples: list[_SampleRows] = []
        self.failures: list[tuple[str, str, str, str]] = []
        self.meta_bytes = 0
        self.rows = 0  # rows accepted (written + buffered)
        self.written = 0  # rows already in the file
        self.buffer: np.ndarray | None = None
        self.fill = 0
        self.broken = False
        self.file: h5py.File | None = None
        self.tokens: h5py.Dataset | None = None

    @property
    def empty(self) -> bool:
        return not self.samples and not self.failures

    def estimated_bytes(self, extra_rows: int = 0, extra_meta: _SampleRows | None = None, extra_meta_bytes: int = 0) -> int:
        """Upper estimate of the file size: whole chunks (an uncompressed edge chunk is stored whole)."""
        rows = self.rows + extra_rows
        meta = self.meta_bytes + extra_meta_bytes + (_meta_bytes(extra_meta) if extra_meta else 0)
        if self.token_dim is None or rows == 0:
            token_bytes = 0
        else:
            chunks = math.ceil(rows / self.chunk_rows)
            token_bytes = chunks * self.chunk_rows * self.token_dim * self.np_dtype.itemsize
        return self.fixed_bytes + meta + token_bytes

    def add(self, rows: np.ndarray, meta: _SampleRows) -> None:
        meta.offset = self.rows
        try:
            self._append_rows(rows)
        except BaseException:
            self.broken = True
            raise
        self.rows += len(rows)
        self.samples.append(meta)
        self.meta_bytes += _meta_bytes(meta)

    def _ensure_file(self) -> None:
        if self.file is not None:
            return
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.tmp, "w", libver=LIBVER)
        for name, value in self.attrs.items():
            self.file.attrs[name] = value
        assert self.token_dim is not None
        self.tokens = self.file.create_dataset(
            "tokens",
            shape=(0, self.token_dim),
            maxshape=(None, self.token_dim),
            chunks=(self.chunk_rows, self.token_dim),
            dtype=self.np_dtype,
            **self.compression_kwargs,
        )
        self.tokens.attrs["dtype"] = self.dtype_name
        self.buffer = np.empty((self.chunk_rows, self.token_dim), dtype=self.np_dtype)

    def _append_rows(self, rows: np.ndarray) -> None:
        """Copy rows into the chunk buffer; whole chunks go to the file in chunk-aligned writes."""
        if len(rows) == 0:
            return
        self._ensure_file()
        assert self.buffer is not None
        pos, total, size = 0, len(rows), self.chunk_rows
        while pos < total:
            if self.fill == 0 and total - pos >= size:
                whole = (total - pos) // size * size
                self._write(rows[pos : pos + whole])
                pos += whole
                continue
            take = min(size - self.fill, total - pos)
            self.buffer[self.fill : self.fill + take] = rows[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == size:
                self._write(self.buffer)
                self.fill = 0

    def _write(self, block: np.ndarray) -> None:
        assert self.tokens is not None
        start = self.written
        if not self.compression_kwargs and len(block) % self.chunk_rows == 0:
            self._write_whole_chunks(block)
            return
        self.tokens.resize(start + len(block), axis=0)
        self.tokens[start : start + len(block)] = block
        self.written += len(block)

    def _write_whole_chunks(self, block: np.ndarray) -> None:
        """Uncompressed, chunk-aligned rows go straight to disk as raw chunks: no filter pipeline,
        no chunk cache, no selection logic (measured ~1.5x faster than a sliced write, on par
        with a plain file write)."""
        assert self.tokens is not None
        block = np.ascontiguousarray(block)
        if self.tokens.shape[0] < self.written + len(block):
            # Grow the extent many chunks at a time (resizing is a metadata update per call);
            # commit trims it to the rows written.
            self.tokens.resize(self.written + len(block) + GROW_CHUNKS * self.chunk_rows, axis=0)
        for first in range(0, len(block), self.chunk_rows):
            self.tokens.id.write_direct_chunk((self.written, 0), block[first : first + self.chunk_rows])
            self.written += self.chunk_rows

    def commit(self) -> Path:
        """Write the tables, close, rename into place. Returns the final path."""
        try:
            if self.file is None:
                self.final.parent.mkdir(parents=True, exist_ok=True)
                self.file = h5py.File(self.tmp, "w", libver=LIBVER)
                for name, value in self.attrs.items():
                    self.file.attrs[name] = value
                dim = self.token_dim or 0
                self.tokens = self.file.create_dataset("tokens", shape=(0, dim), dtype=self.np_dtype)
                self.tokens.attrs["dtype"] = self.dtype_name
            if self.fill:
                assert self.buffer is not None
                self._write(self.buffer[: self.fill])
                self.fill = 0
            if self.tokens is not None and self.tokens.shape[0] != self.written:
                self.tokens.resize(self.written, axis=0)
            if self.token_dim is not None:
                self.file.attrs["token_dim"] = self.token_dim
            write_tables(self.file, self.samples, self.failures)
            self.file.close()
        except BaseException:
            self.discard()
            raise
        _fsync(self.tmp)
        os.replace(self.tmp, self.final)
        _fsync(self.final.parent)
        return self.final

    def discard(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # the file is being thrown away; closing it is a courtesy
                pass
            self.file = None
        self.tmp.unlink(missing_ok=True)


def _meta_bytes(meta: _SampleRows) -> int:
    text = len(meta.key.encode()) + len(meta.kind) + len(meta.decoder.encode())
    return SAMPLE_OVERHEAD_BYTES + text + 16 * len(meta.frame_indices)


def _fsync(path: Path) -> None:
    """Flush a file's data (before its rename) or a folder's entries (after it) to disk. Best
    effort: not every platform can open a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_tables(file: h5py.File, samples: list[_SampleRows], failures: list[tuple[str, str, str, str]]) -> None:
    """The per-sample datasets and the `errors` group of one shard."""
    n = len(samples)
    frame_counts = np.array([len(s.frame_indices) for s in samples], dtype=np.int64)
    frame_offsets = np.zeros(n, dtype=np.int64)
    if n:
        frame_offsets[1:] = np.cumsum(frame_counts)[:-1]
    columns: dict[str, np.ndarray] = {
        "keys": object_array([s.key for s in samples]),
        "offsets": np.array([s.offset for s in samples], dtype=np.int64),
        "lengths": np.array([s.length for s in samples], dtype=np.int64),
        "grid_thw": np.array([s.grid_thw for s in samples], dtype=np.int32).reshape(n, 3),
        "merged_hw": np.array([s.merged_hw for s in samples], dtype=np.int32).reshape(n, 2),
        "orig_hw": np.array([s.orig_hw for s in samples], dtype=np.int32).reshape(n, 2),
        "resized_hw": np.array([s.resized_hw for s in samples], dtype=np.int32).reshape(n, 2),
        "kind": ascii_array([s.kind for s in samples]),
        "decoder": ascii_array([s.decoder for s in samples]),
        "frame_offsets": frame_offsets,
        "frame_lengths": frame_counts,
        "frame_indices": np.array([i for s in samples for i in s.frame_indices], dtype=np.int64),
        "frame_times": np.array([x for s in samples for x in s.frame_times], dtype=np.float64),
    }
    write_columns(file, columns, failures_columns(failures))


def failures_columns(failures: list[tuple[str, str, str, str]]) -> dict[str, np.ndarray]:
    return {name: object_array([f[i] for f in failures]) for i, name in enumerate(ERROR_FIELDS)}


def write_columns(file: h5py.File, columns: Mapping[str, np.ndarray], errors: Mapping[str, np.ndarray]) -> None:
    """Per-sample datasets (`keys` as UTF-8 strings) and the `errors` group."""
    for name, values in columns.items():
        file.create_dataset(name, data=values, dtype=STRING if name == "keys" else values.dtype)
    group = file.create_group("errors")
    for name in ERROR_FIELDS:
        group.create_dataset(name, data=errors[name], dtype=STRING)


def object_array(values: list[str]) -> np.ndarray:
    """Python strings as a numpy object array (what h5py writes as variable-length UTF-8)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def ascii_array(values: list[str]) -> np.ndarray:
    """Short names (kind, decoder) as fixed-length ASCII: a whole column reads in one fast call."""
    width = max((len(v) for v in values), default=1) or 1
    return np.array([v.encode("ascii") for v in values], dtype=f"S{width}").reshape(len(values))


def read_strings(dataset: h5py.Dataset) -> list[str]:
    """A 1-D string dataset as a list of Python str."""
    return dataset.asstr()[()].tolist() if dataset.size else []


# ---------------------------------------------------------------------------------------------
# Resume scan and removal


@dataclass(frozen=True)
class ExistingOutput:
    """What an earlier run left behind, for resuming."""

    attrs: dict
    """Root attributes of the existing output (from its first shard, else the index), as stored:
    JSON attributes (settings, resize_policy, ...) stay JSON text, the form the pipeline writes."""
    done_keys: set[str]
    """Keys with stored features in complete shards."""
    failed_keys: set[str]
    """Keys with only error records (to be re-run on resume)."""
    shards: list[Path]


def scan_existing(out: Path, *, rank: int | None = None) -> ExistingOutput | None:
    """The keys and settings of an existing output, or None when there is none.

    Deletes the stale temporary files a killed run left (`*.h5.tmp`): with `rank`, only that
    rank's, which no live process can own (one process per rank); without, all of them, which
    is only safe while no other process writes into this output. Raises FormatError when
    `out` exists but is not a merge-cli output, when a shard cannot be read, or when the shards
    were written with different settings (different `config_hash`).
    """
    out = Path(out)
    for stale in list_temporaries(out, rank):
        stale.unlink(missing_ok=True)
    shards = list_shards(out)
    index_attrs: dict | None = None
    if out.exists():
        with open_h5(out) as handle:
            index_attrs = decode_attrs(handle.attrs, parse_json=False)
    if not shards and index_attrs is None:
        return None
    done: set[str] = set()
    errored: set[str] = set()
    attrs: dict | None = None
    for path in shards:
        try:
            with open_h5(path) as handle:
                shard_attrs = decode_attrs(handle.attrs, parse_json=False)
                done.update(read_strings(handle["keys"]))
                errored.update(read_strings(handle["errors/key"]))
        except KeyError as error:
            raise FormatError(f"{path}: damaged shard (missing {error})") from error
        if attrs is None:
            attrs = shard_attrs
        elif shard_attrs.get("config_hash") != attrs.get("config_hash"):
            raise FormatError(
                f"{path.parent}: shards were written with different settings (config_hash "
                f"{attrs.get('config_hash')} in {shards[0].name}, {shard_attrs.get('config_hash')} in {path.name}); "
                "start over with --overwrite"
            )
    if attrs is None:
        attrs = index_attrs or {}
    for name in SHARD_ATTRS:
        attrs.pop(name, None)
    return ExistingOutput(attrs=attrs, done_keys=done, failed_keys=errored - done, shards=shards)


def remove_output(out: Path) -> None:
    """Delete `out` and its shards (only files merge-cli wrote); the shard folder if left empty.

    Refuses (FormatError) to delete an `out` that is not a merge-cli output.
    """
    out = Path(out)
    if out.exists():
        open_h5(out).close()  # raises FormatError for anything that is not ours
    for path in list_temporaries(out) + list_shards(out):
        path.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    folder = shard_dir(out)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def build_index(out: Path, *, attrs: Mapping[str, object] | None = None) -> dict:
    """(Re)write `out` (feats.h5) atomically from all complete shards; see merge_cli.index."""
    from merge_cli.index import build_index as build

    return build(out, attrs=attrs)
