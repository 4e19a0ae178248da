"""`feats.h5`: one file presenting all shards as one output.

`tokens` is an HDF5 virtual dataset over every shard's `tokens` (source paths relative to
`feats.h5`, so the folder can move); the per-sample tables are copied from the shards with global
offsets, plus which shard and local offset each sample lives at (the reader reads from there).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from merge_cli.errors import FormatError
from merge_cli.hashing import key_hashes
from merge_cli.output import locks
from merge_cli.output.format import (
    DTYPE_NAMES,
    ERROR_FIELDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAME_COLUMNS,
    KEY_BLOCK,
    LIBVER,
    NO_CHECKSUM,
    NO_UNIT,
    NUMPY_DTYPES,
    OPTIONAL_COLUMNS,
    SAMPLE_COLUMNS,
    SHARD_ATTRS,
    STRING,
    TABLE_COLUMNS,
    check_inside_folder,
    decode_attrs,
    encode_attrs,
    failures_columns,
    index_temporary,
    list_index_temporaries,
    list_shards,
    object_array,
    open_h5,
    read_strings,
    shard_entry,
    write_columns,
    write_error,
)

INDEX_BYTES_PER_SAMPLE = 512
"""Room the index needs per sample besides its key (measured ~350 B with short keys)."""
INDEX_BYTES_PER_SHARD = 1024
INDEX_FIXED_BYTES = 256 * 1024


@dataclass
class _Shard:
    path: Path
    attrs: dict
    dtype: str
    rows: int
    dim: int
    columns: dict[str, np.ndarray]
    failures: list[tuple[str, str, str, str]]
    size: int


def read_shard(path: Path) -> _Shard:
    """Everything but the tokens of one complete shard."""
    with open_h5(path) as handle:
        try:
            attrs = decode_attrs(handle.attrs)
            tokens = handle["tokens"]
            columns = {
                name: object_array(read_strings(handle[name])) if name == "keys" else handle[name][()]
                for name in SAMPLE_COLUMNS
                if name not in OPTIONAL_COLUMNS or name in handle
            }
            if "processor_grid" not in columns:  # a shard from before the column: the grid used
                columns["processor_grid"] = columns["grid_thw"][:, 1:].astype(np.int32)
            if "crc32" not in columns:  # a shard from before checksums: its rows cannot be verified
                columns["crc32"] = np.full(len(columns["keys"]), NO_CHECKSUM, dtype=np.int64)
            for name in FRAME_COLUMNS:
                columns[name] = handle[name][()]
            errors = [read_strings(handle["errors"][name]) for name in ERROR_FIELDS]
            rows, dim = (int(s) for s in tokens.shape)
            dtype = str(tokens.attrs.get("dtype", attrs.get("dtype")))
        except (KeyError, OSError, ValueError) as error:
            raise FormatError(f"{path}: damaged shard ({error})") from error
    if dtype not in NUMPY_DTYPES:
        raise FormatError(f"{path}: unknown stored dtype {dtype!r}")
    return _Shard(path, attrs, dtype, rows, dim, columns, list(zip(*errors)), path.stat().st_size)


def build_index(out: Path, *, attrs: Mapping[str, object] | None = None, wait: float = 60.0) -> dict:
    """(Re)write `out` atomically from all complete shards beside it; return a JSON-able summary.

    `attrs` are the root attributes to use when there is no shard at all (an empty run), so that
    the output is still a valid, empty index. With no shard, no `attrs` and no earlier index,
    FormatError: there is nothing to index. The output's lock is held meanwhile (waiting up to
    `wait` seconds for another builder; OutputBusyError naming the holder after that).
    """
    out = Path(out)
    with locks.hold(locks.output_lock_path(out), str(out), wait=wait):
        return _build_index(out, attrs)


def _build_index(out: Path, attrs: Mapping[str, object] | None) -> dict:
    paths = list_shards(out)
    for path in paths:  # an index names shards inside its folder only (docs/FORMAT.md, "Confinement")
        check_inside_folder(out, path)
    shards = [read_shard(path) for path in paths]
    root = _root_attrs(out, shards, attrs)

    dims = {s.dim for s in shards if s.rows}
    dtypes = {s.dtype for s in shards}
    if len(dims) > 1 or len(dtypes) > 1:
        raise FormatError(f"{out}: shards disagree on token dim {sorted(dims)} or dtype {sorted(dtypes)}")
    dtype = dtypes.pop() if dtypes else str(root.get("dtype", "bfloat16"))
    dim = dims.pop() if dims else int(root.get("token_dim", 0) or 0)

    # Keep the first occurrence of every key in shard order; later copies are duplicates.
    seen: set[str] = set()
    parts: list[dict[str, np.ndarray]] = []
    row_base = 0
    duplicates = 0
    kept_per_shard = []
    for number, shard in enumerate(shards):
        cols = shard.columns
        keys = cols["keys"]
        keep = np.ones(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            if key in seen:
                keep[i] = False
            else:
                seen.add(key)
        duplicates += int((~keep).sum())
        kept_per_shard.append(int(keep.sum()))
        part = {name: cols[name][keep] for name in SAMPLE_COLUMNS}
        frame_keep = np.repeat(keep, cols["frame_lengths"])
        expected = np.concatenate([[0], np.cumsum(cols["frame_lengths"])[:-1]]) if len(keys) else cols["frame_offsets"]
        if not np.array_equal(cols["frame_offsets"], expected) or len(frame_keep) != len(cols["frame_indices"]):
            raise FormatError(f"{shard.path}: damaged shard (frame offsets do not match frame lengths)")
        for name in FRAME_COLUMNS:
            part[name] = cols[name][frame_keep]
        part["shard"] = np.full(len(part["keys"]), number, dtype=np.int32)
        part["shard_offsets"] = part["offsets"].astype(np.int64)
        part["offsets"] = part["offsets"] + row_base
        parts.append(part)
        row_base += shard.rows

    columns = _concatenate(parts)
    n = len(columns["keys"])
    frame_lengths = columns["frame_lengths"]
    columns["frame_offsets"] = np.zeros(n, dtype=np.int64)
    if n:
        columns["frame_offsets"][1:] = np.cumsum(frame_lengths)[:-1]

    # Errors: only keys that have no features anywhere; the last record of a key wins.
    last_error: dict[str, tuple[str, str, str, str]] = {}
    for shard in shards:
        for record in shard.failures:
            if record[0] not in seen:
                last_error[record[0]] = record
    failures = list(last_error.values())

    tmp = index_temporary(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in list_index_temporaries(out):  # the output lock is ours: their builders are gone
        stale.unlink(missing_ok=True)
    needed = _index_bytes(columns, len(shards))
    _check_room(tmp, needed)
    try:
        with h5py.File(tmp, "x", libver=LIBVER) as handle:
            root.update(
                format=FORMAT_NAME,
                format_version=FORMAT_VERSION,  # whatever version the shards were written in
                role="index",
                dtype=dtype,
                token_dim=dim,
                shard_count=len(shards),
                duplicate_keys=duplicates,
                compression="+".join(sorted({str(s.attrs.get("compression", "none")) for s in shards})) or "none",
            )
            for name, value in encode_attrs(root).items():
                handle.attrs[name] = value
            _write_tokens(handle, out, shards, dtype, dim, row_base)
            write_columns(handle, {name: columns[name] for name in (*SAMPLE_COLUMNS, *FRAME_COLUMNS)}, failures_columns(failures))
            handle.create_dataset("shard", data=columns["shard"])
            handle.create_dataset("shard_offsets", data=columns["shard_offsets"])
            _write_lookup_tables(handle, columns)
            group = handle.create_group("shards")
            group.create_dataset("path", data=object_array([shard_entry(out, s.path) for s in shards]), dtype=STRING)
            group.create_dataset("rows", data=np.array([s.rows for s in shards], dtype=np.int64))
            group.create_dataset("samples", data=np.array(kept_per_shard, dtype=np.int64))
            group.create_dataset("errors", data=np.array([len(s.failures) for s in shards], dtype=np.int64))
            group.create_dataset("bytes", data=np.array([s.size for s in shards], dtype=np.int64))
            group.create_dataset("unit", data=np.array([int(s.attrs.get("unit", NO_UNIT)) for s in shards], dtype=np.int64))
            group.create_dataset("id", data=object_array([str(s.attrs.get("shard_id", "")) for s in shards]), dtype=STRING)
        _fsync_file(tmp)
        os.replace(tmp, out)
    except OSError as error:  # the previous index is untouched: only the temporary is dropped
        tmp.unlink(missing_ok=True)
        raise write_error(error, tmp, needed) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "output": str(out),
        "shards": len(shards),
        "samples": n,
        "tokens": int(columns["lengths"].sum()) if n else 0,
        "rows": row_base,
        "errors": len(failures),
        "duplicates": duplicates,
        "token_dim": dim,
        "dtype": dtype,
        "shard_bytes": sum(s.size for s in shards),
        "index_bytes": out.stat().st_size,
    }


def _index_bytes(columns: dict[str, np.ndarray], shards: int) -> int:
    """An upper estimate of the index file's size: its tables, every key twice, the frames."""
    key_bytes = sum(len(key.encode("utf-8")) for key in columns["keys"])
    frames = len(columns["frame_indices"])
    return INDEX_BYTES_PER_SAMPLE * len(columns["keys"]) + 3 * key_bytes + 16 * frames + INDEX_BYTES_PER_SHARD * shards + INDEX_FIXED_BYTES


def _check_room(tmp: Path, needed: int) -> None:
    """Refuse before writing when the index cannot fit (free space, the file size limit): HDF5
    has crashed (SIGSEGV) closing a file whose writes failed, so such failures are not risked."""
    if shutil.disk_usage(tmp.parent).free < needed:
        raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tmp, needed)
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):  # no such limit on this platform
        return
    if limit != resource.RLIM_INFINITY and limit < needed:
        raise write_error(OSError(errno.EFBIG, os.strerror(errno.EFBIG)), tmp, needed)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_lookup_tables(handle: h5py.File, columns: dict[str, np.ndarray]) -> None:
    """What lets a reader open in constant time: the sorted key-hash table and the sample table."""
    n = len(columns["keys"])
    hashes = key_hashes(columns["keys"])
    order = np.argsort(hashes, kind="stable")
    block = (min(n, KEY_BLOCK),) if n else None
    group = handle.create_group("key_table")
    sorted_hashes = hashes[order]
    group.create_dataset("hash", data=sorted_hashes, chunks=block)
    group.create_dataset("row", data=order.astype(np.int64), chunks=block)
    group.create_dataset("fence", data=sorted_hashes[::KEY_BLOCK])
    group.attrs["block"] = KEY_BLOCK
    # The keys again as one UTF-8 blob with offsets (row order): one key reads in two small
    # fixed-size reads, where one element of the variable-length `keys` costs a heap read.
    encoded = [key.encode("utf-8") for key in columns["keys"]]
    offsets = np.zeros(n + 1, dtype=np.int64)
    if n:
        offsets[1:] = np.cumsum([len(b) for b in encoded])
    text = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    group.create_dataset("text", data=text, chunks=(min(len(text), 1 << 16),) if len(text) else None)
    group.create_dataset("text_offsets", data=offsets, chunks=(min(n + 1, KEY_BLOCK),))

    kinds = sorted({k.decode() for k in np.unique(columns["kind"])}) if n else []
    decoders = sorted({d.decode() for d in np.unique(columns["decoder"])}) if n else []
    parts = {
        "offsets": columns["offsets"],
        "lengths": columns["lengths"],
        "grid_t": columns["grid_thw"][:, 0],
        "grid_h": columns["grid_thw"][:, 1],
        "grid_w": columns["grid_thw"][:, 2],
        "merged_h": columns["merged_hw"][:, 0],
        "merged_w": columns["merged_hw"][:, 1],
        "orig_h": columns["orig_hw"][:, 0],
        "orig_w": columns["orig_hw"][:, 1],
        "resized_h": columns["resized_hw"][:, 0],
        "resized_w": columns["resized_hw"][:, 1],
        "frame_offsets": columns["frame_offsets"],
        "frame_lengths": columns["frame_lengths"],
        "shard": columns["shard"],
        "shard_offsets": columns["shard_offsets"],
        "kind": np.searchsorted(np.array(kinds, dtype="S"), columns["kind"]) if n else np.empty(0),
        "decoder": np.searchsorted(np.array(decoders, dtype="S"), columns["decoder"]) if n else np.empty(0),
        "processor_h": columns["processor_grid"][:, 0],
        "processor_w": columns["processor_grid"][:, 1],
        "crc32": columns["crc32"],
    }
    table = np.stack([parts[name].astype(np.int64) for name in TABLE_COLUMNS], axis=1) if n else np.empty((0, len(TABLE_COLUMNS)), np.int64)
    dataset = handle.create_dataset("sample_table", data=table, chunks=(min(n, 256), len(TABLE_COLUMNS)) if n else None)
    dataset.attrs["columns"] = json.dumps(list(TABLE_COLUMNS))
    dataset.attrs["kinds"] = json.dumps(kinds)
    dataset.attrs["decoders"] = json.dumps(decoders)


def _root_attrs(out: Path, shards: list[_Shard], attrs: Mapping[str, object] | None) -> dict:
    if shards:
        first = shards[0]
        for shard in shards[1:]:
            if shard.attrs.get("config_hash") != first.attrs.get("config_hash"):
                raise FormatError(
                    f"{out}: shards were written with different settings (config_hash {first.attrs.get('config_hash')} "
                    f"in {first.path.name}, {shard.attrs.get('config_hash')} in {shard.path.name})"
                )
        root = dict(first.attrs)
    elif attrs is not None:
        root = dict(attrs, format=FORMAT_NAME, format_version=FORMAT_VERSION)
        store_dtype = root.get("store_dtype")
        if "dtype" not in root and isinstance(store_dtype, str):
            root["dtype"] = DTYPE_NAMES.get(store_dtype, "bfloat16")
    elif out.exists():
        with open_h5(out) as handle:
            root = decode_attrs(handle.attrs)
    else:
        raise FormatError(f"{out}: nothing to index (no shards in {out.name}.d/)")
    for name in SHARD_ATTRS:
        root.pop(name, None)
    return root


def _write_tokens(handle: h5py.File, out: Path, shards: list[_Shard], dtype: str, dim: int, rows: int) -> None:
    """A virtual dataset over the shards' rows, or an empty real dataset when there are none."""
    np_dtype = NUMPY_DTYPES[dtype]
    if rows == 0:
        tokens = handle.create_dataset("tokens", shape=(0, dim), dtype=np_dtype)
    else:
        layout = h5py.VirtualLayout(shape=(rows, dim), dtype=np_dtype)
        start = 0
        for shard in shards:
            if shard.rows:
                source = h5py.VirtualSource(shard_entry(out, shard.path), "tokens", shape=(shard.rows, dim), dtype=np_dtype)
                layout[start : start + shard.rows] = source
                start += shard.rows
        tokens = handle.create_virtual_dataset("tokens", layout)
    tokens.attrs["dtype"] = dtype


def _concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if parts:
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return {
        "keys": np.empty(0, dtype=object),
        "kind": np.empty(0, dtype="S1"),
        "decoder": np.empty(0, dtype="S1"),
        "offsets": np.empty(0, dtype=np.int64),
        "lengths": np.empty(0, dtype=np.int64),
        "grid_thw": np.empty((0, 3), dtype=np.int32),
        "merged_hw": np.empty((0, 2), dtype=np.int32),
        "orig_hw": np.empty((0, 2), dtype=np.int32),
        "resized_hw": np.empty((0, 2), dtype=np.int32),
        "processor_grid": np.empty((0, 2), dtype=np.int32),
        "crc32": np.empty(0, dtype=np.int64),
        "frame_offsets": np.empty(0, dtype=np.int64),
        "frame_lengths": np.empty(0, dtype=np.int64),
        "frame_indices": np.empty(0, dtype=np.int64),
        "frame_times": np.empty(0, dtype=np.float64),
        "shard": np.empty(0, dtype=np.int32),
        "shard_offsets": np.empty(0, dtype=np.int64),
    }
