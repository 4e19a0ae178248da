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
    KINDS,
    LIBVER,
    NO_CHECKSUM,
    NO_UNIT,
    NUMERIC_COLUMNS,
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
    table_values,
    write_error,
)

INDEX_BYTES_PER_SAMPLE = 512
"""Room the index needs per sample besides its key (measured ~350 B with short keys)."""
INDEX_BYTES_PER_SHARD = 1024
INDEX_FIXED_BYTES = 256 * 1024


@dataclass
class _Shard:
    """What the first pass keeps of one complete shard: its numbers, its key hashes (8 bytes per
    sample), its error records. No per-sample Python object: the index of 100M samples is built
    in about 20 bytes of memory per sample plus one shard's tables at a time."""

    path: Path
    attrs: dict
    dtype: str
    rows: int
    dim: int
    samples: int
    hashes: np.ndarray
    """key_hash of every sample's key, in shard order."""
    key_bytes: int
    frames: int
    decoders: set[str]
    failures: list[tuple[str, str, str, str]]
    size: int
    keep: np.ndarray | None = None
    """Which samples the index keeps (the first copy of each key), set by `_keep_first`."""


def _scan_shard(path: Path) -> _Shard:
    """First pass over one complete shard: everything but its per-sample tables and tokens."""
    with open_h5(path) as handle:
        try:
            attrs = decode_attrs(handle.attrs)
            tokens = handle["tokens"]
            keys = read_strings(handle["keys"])
            missing = [name for name in (*SAMPLE_COLUMNS, *FRAME_COLUMNS) if name not in handle and name not in OPTIONAL_COLUMNS]
            if missing:
                raise KeyError(missing[0])
            decoders = {d.decode("ascii", "replace") for d in np.unique(handle["decoder"][()])} if keys else set()
            errors = [read_strings(handle["errors"][name]) for name in ERROR_FIELDS]
            rows, dim = (int(s) for s in tokens.shape)
            dtype = str(tokens.attrs.get("dtype", attrs.get("dtype")))
            frames = int(handle["frame_indices"].shape[0])
        except (KeyError, OSError, ValueError) as error:
            raise FormatError(f"{path}: damaged shard ({error})") from error
    if dtype not in NUMPY_DTYPES:
        raise FormatError(f"{path}: unknown stored dtype {dtype!r}")
    return _Shard(
        path, attrs, dtype, rows, dim, len(keys), key_hashes(keys), sum(len(k.encode("utf-8")) for k in keys),
        frames, decoders, list(zip(*errors)), path.stat().st_size,
    )


def _read_columns(shard: _Shard) -> dict[str, np.ndarray]:
    """Second pass: one shard's per-sample and per-frame tables."""
    with open_h5(shard.path) as handle:
        try:
            columns = {
                name: object_array(read_strings(handle[name])) if name == "keys" else handle[name][()]
                for name in (*SAMPLE_COLUMNS, *FRAME_COLUMNS)
                if name not in OPTIONAL_COLUMNS or name in handle
            }
        except (KeyError, OSError, ValueError) as error:
            raise FormatError(f"{shard.path}: damaged shard ({error})") from error
    n = shard.samples
    if "processor_grid" not in columns:  # a shard from before the column: the grid used
        columns["processor_grid"] = columns["grid_thw"][:, 1:].astype(np.int32)
    if "crc32" not in columns:  # a shard from before checksums: its rows cannot be verified
        columns["crc32"] = np.full(n, NO_CHECKSUM, dtype=np.int64)
    if any(len(columns[name]) != n for name in SAMPLE_COLUMNS) or not np.array_equal(key_hashes(columns["keys"]), shard.hashes):
        raise FormatError(f"{shard.path}: damaged shard (its tables do not all have {n} rows), or it changed while indexed")
    expected = np.concatenate([[0], np.cumsum(columns["frame_lengths"])[:-1]]) if n else columns["frame_offsets"]
    if not np.array_equal(columns["frame_offsets"], expected) or int(columns["frame_lengths"].sum()) != len(columns["frame_indices"]):
        raise FormatError(f"{shard.path}: damaged shard (frame offsets do not match frame lengths)")
    return columns


def _keys_at(shards: list[_Shard], starts: np.ndarray, positions: np.ndarray) -> dict[int, str]:
    """The keys at global sample positions (shard order), reading each shard's keys at most once."""
    found: dict[int, str] = {}
    owners = np.searchsorted(starts, positions, side="right") - 1
    for number in np.unique(owners):
        shard = shards[int(number)]
        wanted = positions[owners == number]
        with open_h5(shard.path) as handle:
            keys = read_strings(handle["keys"])
        for position in wanted.tolist():
            found[position] = keys[position - int(starts[number])]
    return found


def _keep_first(shards: list[_Shard]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mark the first copy of every key, in shard order (`keep` of each shard); return every
    sample's hash and keep flag (shard order) and the sample start of each shard.

    Equal 64-bit hashes are checked on the keys themselves, which are read again only for them:
    later copies of a key (overlapping --rank runs) or, about once in 10^4 outputs of 100M
    samples, two keys sharing a hash."""
    counts = np.array([s.samples for s in shards], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]) if len(shards) else np.zeros(1, np.int64)
    hashes = np.concatenate([s.hashes for s in shards]) if shards else np.empty(0, np.uint64)
    keep = np.ones(len(hashes), dtype=bool)
    order = np.argsort(hashes, kind="stable")  # equal hashes stay in shard order
    sorted_hashes = hashes[order]
    same = np.nonzero(sorted_hashes[1:] == sorted_hashes[:-1])[0]
    if len(same):
        in_runs = np.unique(np.concatenate([same, same + 1]))
        keys = _keys_at(shards, starts, order[in_runs])
        seen_in_run: set[str] = set()
        for i, position in enumerate(order[in_runs].tolist()):
            if i and sorted_hashes[in_runs[i]] != sorted_hashes[in_runs[i - 1]]:
                seen_in_run = set()  # a new run of equal hashes
            if keys[position] in seen_in_run:
                keep[position] = False
            seen_in_run.add(keys[position])
    for number, shard in enumerate(shards):
        shard.keep = keep[starts[number] : starts[number + 1]]
    return hashes, keep, starts


def _errors_without_features(
    shards: list[_Shard], kept_sorted: np.ndarray, hashes_and_keep: tuple[np.ndarray, np.ndarray], starts: np.ndarray
) -> list[tuple[str, str, str, str]]:
    """Error records of keys that have no features in any shard; a key's last record wins.
    `kept_sorted`: the kept samples' hashes, sorted; `hashes_and_keep`: every sample's."""
    records = [record for shard in shards for record in shard.failures]
    if not records:
        return []
    hashes = key_hashes(record[0] for record in records)
    hit = np.zeros(len(records), dtype=bool)
    if len(kept_sorted):
        position = np.minimum(np.searchsorted(kept_sorted, hashes), len(kept_sorted) - 1)
        hit = kept_sorted[position] == hashes
    stored: set[str] = set()
    if hit.any():  # an error key whose hash is a stored sample's: compare the keys themselves
        all_hashes, keep = hashes_and_keep
        candidates = np.nonzero(keep & np.isin(all_hashes, hashes[hit]))[0]
        stored = set(_keys_at(shards, starts, candidates).values())
    last: dict[str, tuple[str, str, str, str]] = {}  # in order of first failure, each key's last record
    for record in records:
        if record[0] not in stored:
            last[record[0]] = record
    return list(last.values())


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
    shards = [_scan_shard(path) for path in paths]
    root = _root_attrs(out, shards, attrs)

    dims = {s.dim for s in shards if s.rows}
    dtypes = {s.dtype for s in shards}
    if len(dims) > 1 or len(dtypes) > 1:
        raise FormatError(f"{out}: shards disagree on token dim {sorted(dims)} or dtype {sorted(dtypes)}")
    dtype = dtypes.pop() if dtypes else str(root.get("dtype", "bfloat16"))
    dim = dims.pop() if dims else int(root.get("token_dim", 0) or 0)

    hashes, keep, starts = _keep_first(shards)
    duplicates = int((~keep).sum())
    kept_hashes = hashes[keep]
    kept_order = np.argsort(kept_hashes, kind="stable")  # the key table's order
    kept_sorted = kept_hashes[kept_order]
    failures = _errors_without_features(shards, kept_sorted, (hashes, keep), starts)
    n = len(kept_hashes)
    rows = sum(s.rows for s in shards)

    tmp = index_temporary(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in list_index_temporaries(out):  # the output lock is ours: their builders are gone
        stale.unlink(missing_ok=True)
    needed = (
        INDEX_BYTES_PER_SAMPLE * n + 3 * sum(s.key_bytes for s in shards) + 16 * sum(s.frames for s in shards)
        + INDEX_BYTES_PER_SHARD * len(shards) + INDEX_FIXED_BYTES
    )
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
            _write_tokens(handle, out, shards, dtype, dim, rows)
            decoders = sorted({d for s in shards for d in s.decoders})
            frames, key_bytes = sum(s.frames for s in shards), sum(s.key_bytes for s in shards)
            tokens = _IndexTables(handle, n, decoders, frames, key_bytes).write(shards)
            write_errors(handle, failures)
            _write_key_table(handle, kept_sorted, kept_order)
            group = handle.create_group("shards")
            group.create_dataset("path", data=object_array([shard_entry(out, s.path) for s in shards]), dtype=STRING)
            group.create_dataset("rows", data=np.array([s.rows for s in shards], dtype=np.int64))
            group.create_dataset("samples", data=np.array([int(s.keep.sum()) for s in shards], dtype=np.int64))
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
        "tokens": tokens,
        "rows": rows,
        "errors": len(failures),
        "duplicates": duplicates,
        "token_dim": dim,
        "dtype": dtype,
        "shard_bytes": sum(s.size for s in shards),
        "index_bytes": out.stat().st_size,
    }


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


PAIRS = {"grid_thw": 3, "merged_hw": 2, "orig_hw": 2, "resized_hw": 2, "processor_grid": 2}
"""Per-sample datasets with a second axis (int32), and its length; the others are int64 vectors."""
GROW_ROWS = 1 << 16
"""Largest chunk of the index's appendable datasets (frames, key text); smaller when the shards
hold less (a chunk is stored whole, so a small output keeps a small index)."""


class _IndexTables:
    """The index's per-sample datasets, its `sample_table` and its key text, written shard by
    shard (the second pass), so that only one shard's tables are in memory at a time."""

    def __init__(self, handle: h5py.File, n: int, decoders: list[str], frames: int, key_bytes: int) -> None:
        """`frames` and `key_bytes`: at most how many frames and key bytes will be appended."""
        self.handle = handle
        self.n = n
        self.decoders = decoders
        handle.create_dataset("keys", shape=(n,), dtype=STRING)
        for name in NUMERIC_COLUMNS:
            width = PAIRS.get(name)
            handle.create_dataset(name, shape=(n, width) if width else (n,), dtype=np.int32 if width else np.int64)
        handle.create_dataset("kind", shape=(n,), dtype="S5")
        handle.create_dataset("decoder", shape=(n,), dtype=f"S{max((len(d) for d in decoders), default=1)}")
        handle.create_dataset("shard", shape=(n,), dtype=np.int32)
        handle.create_dataset("shard_offsets", shape=(n,), dtype=np.int64)
        for name, dtype in (("frame_indices", np.int64), ("frame_times", np.float64)):
            handle.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(min(max(frames, 1), GROW_ROWS),), dtype=dtype)
        group = handle.create_group("key_table")
        group.create_dataset(
            "text", shape=(0,), maxshape=(None,), chunks=(min(max(key_bytes, 1), GROW_ROWS),), dtype=np.uint8
        )
        group.create_dataset("text_offsets", shape=(n + 1,), chunks=(min(n + 1, KEY_BLOCK),), dtype=np.int64)
        table = handle.create_dataset(
            "sample_table", shape=(n, len(TABLE_COLUMNS)), chunks=(min(n, 256), len(TABLE_COLUMNS)) if n else None,
            dtype=np.int64,
        )
        table.attrs["columns"] = json.dumps(list(TABLE_COLUMNS))
        table.attrs["kinds"] = json.dumps(list(KINDS))
        table.attrs["decoders"] = json.dumps(decoders)

    def write(self, shards: list[_Shard]) -> int:
        """Append every shard's kept samples; return the tokens they hold."""
        row = frame = text = rows_before = tokens = 0
        for number, shard in enumerate(shards):
            assert shard.keep is not None
            if shard.keep.any():
                columns = _read_columns(shard)
                row, frame, text = self._append(columns, shard.keep, number, rows_before, row, frame, text)
                tokens += int(columns["lengths"][shard.keep].sum())
            rows_before += shard.rows
        assert row == self.n
        self.handle["key_table/text_offsets"][self.n] = text
        return tokens

    def _append(self, columns: dict, keep: np.ndarray, number: int, rows_before: int, row: int, frame: int, text: int):
        handle, k = self.handle, int(keep.sum())
        part = {name: columns[name][keep] for name in SAMPLE_COLUMNS}
        frame_keep = np.repeat(keep, columns["frame_lengths"])
        lengths = part["frame_lengths"]
        part["frame_offsets"] = frame + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if k else lengths
        part["shard"] = np.full(k, number, dtype=np.int32)
        part["shard_offsets"] = part["offsets"].astype(np.int64)
        part["offsets"] = part["offsets"] + rows_before
        for name in (*SAMPLE_COLUMNS, "shard", "shard_offsets"):
            handle[name][row : row + k] = part[name]
        frames = {name: columns[name][frame_keep] for name in FRAME_COLUMNS}
        frame_count = len(frames["frame_indices"])
        for name, values in frames.items():
            handle[name].resize((frame + frame_count,))
            handle[name][frame:] = values
        # The keys again as one UTF-8 blob with offsets: one key reads in two small fixed-size
        # reads, where one element of the variable-length `keys` costs a heap read.
        encoded = [key.encode("utf-8") for key in part["keys"]]
        offsets = text + np.concatenate([[0], np.cumsum([len(b) for b in encoded])[:-1]]) if k else np.empty(0, np.int64)
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        handle["key_table/text_offsets"][row : row + k] = offsets
        handle["key_table/text"].resize((text + len(blob),))
        handle["key_table/text"][text:] = blob
        handle["sample_table"][row : row + k] = self._table_rows(part)
        return row + k, frame + frame_count, text + len(blob)

    def _table_rows(self, part: dict[str, np.ndarray]) -> np.ndarray:
        """What a reader needs about each sample, one int64 row each (TABLE_COLUMNS)."""
        kinds = np.searchsorted(np.array(KINDS, dtype="S"), part["kind"])
        if not np.array_equal(np.array(KINDS, dtype="S")[kinds.clip(0, len(KINDS) - 1)], part["kind"]):
            raise FormatError("damaged shard (a kind other than image or video)")
        codes = {"kind": kinds, "decoder": np.searchsorted(np.array(self.decoders, dtype="S"), part["decoder"])}
        values = [codes[name] if name in codes else table_values(part.__getitem__, name) for name in TABLE_COLUMNS]
        return np.stack([np.asarray(v, dtype=np.int64) for v in values], axis=1)


def _write_key_table(handle: h5py.File, sorted_hashes: np.ndarray, order: np.ndarray) -> None:
    """The kept samples' key hashes sorted, with the sample each belongs to (`order`), and the
    block fence: what lets a reader find a key in two small reads."""
    n = len(sorted_hashes)
    block = (min(n, KEY_BLOCK),) if n else None
    group = handle["key_table"]
    group.create_dataset("hash", data=sorted_hashes, chunks=block)
    group.create_dataset("row", data=order.astype(np.int64), chunks=block)
    group.create_dataset("fence", data=sorted_hashes[::KEY_BLOCK])
    group.attrs["block"] = KEY_BLOCK


def write_errors(handle: h5py.File, failures: list[tuple[str, str, str, str]]) -> None:
    group = handle.create_group("errors")
    for name, values in failures_columns(failures).items():
        group.create_dataset(name, data=values, dtype=STRING)


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
