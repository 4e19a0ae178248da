"""The on-disk contract (docs/FORMAT.md): names, versions, dtypes, attributes, file naming.

Everything that both writes and reads merge-cli files lives here, so that the writer (store),
the index builder and the readers agree by construction and import in one direction only.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import socket
import sys
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from merge_cli.errors import FormatError, OutputWriteError, UsageError
from merge_cli.records import escape_text

if TYPE_CHECKING:  # pragma: no cover
    import torch

FORMAT_NAME = "merge-cli-features"
FORMAT_VERSION = 2
"""2: shards record their work unit, units have completion markers, the index has a sorted key-hash
table and a one-read-per-sample table (version-1 indexes are rebuilt with `merge-cli index`)."""

STORE_DTYPES = ("bf16", "fp16", "fp32")
COMPRESSIONS = ("none", "lzf", "gzip", "zstd")

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Store dtype option -> the `dtype` attribute written on `tokens` (and at the root)."""
NUMPY_DTYPES = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
"""Real dtype -> the HDF5/numpy dtype it is stored as (bfloat16 as its raw 16-bit pattern)."""

SHARD_SUFFIX = ".h5"
TMP_SUFFIX = ".tmp"
SHARD_NAME = re.compile(r"^r(\d{3,})-(\d{5,})\.h5$")
UNIT_MARKER = re.compile(r"^unit-(\d{8,})\.json$")
"""`feats.h5.d/unit-00000042.json`: unit 42 is complete (written last, after its shards)."""
NO_UNIT = -1
"""The `unit` attribute of a shard written outside the unit loop (ShardWriter used directly)."""

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

NUMERIC_COLUMNS = (
    "offsets", "lengths", "grid_thw", "merged_hw", "orig_hw", "resized_hw", "processor_grid", "frame_offsets",
    "frame_lengths", "crc32",
)
SAMPLE_COLUMNS = ("keys", *NUMERIC_COLUMNS, "kind", "decoder")
"""Per-sample datasets (first axis = sample), in every shard and in the index."""
OPTIONAL_COLUMNS = ("processor_grid", "crc32")
"""Per-sample datasets files written before them lack; `processor_grid` then equals grid_thw[:, 1:]
and `crc32` is unknown (NO_CHECKSUM)."""
NO_CHECKSUM = -1
"""`crc32` of a sample written before checksums: its rows cannot be verified."""
KINDS = ("image", "video")
"""The values of the `kind` column (sorted: the index's `sample_table` codes are positions here)."""
FRAME_COLUMNS = ("frame_indices", "frame_times")
"""Ragged per-frame datasets, addressed by frame_offsets/frame_lengths."""

STRING = h5py.string_dtype("utf-8")

JSON_ATTRS = ("resize_policy", "video_options", "media_options", "settings")
"""Attributes that hold JSON text by contract (given as text or as dicts); readers decode them."""
SHARD_ATTRS = ("role", "shard_rank", "shard_sequence", "unit", "shard_id")
"""Root attributes that describe one shard file and are not copied into the index."""
ERROR_FIELDS = ("key", "stage", "type", "message")

TABLE_COLUMNS = (
    "offsets", "lengths", "grid_t", "grid_h", "grid_w", "merged_h", "merged_w", "orig_h", "orig_w",
    "resized_h", "resized_w", "frame_offsets", "frame_lengths", "shard", "shard_offsets", "kind", "decoder",
    "processor_h", "processor_w", "crc32",
)
"""Columns of the index's `sample_table` (int64, one row per sample: what a reader needs about a
sample in one read). `kind` and `decoder` are codes into the `kinds` / `decoders` attributes."""
TABLE_COLUMNS_BEFORE_CHECKSUMS = TABLE_COLUMNS[:-1]
TABLE_SOURCES = {
    "offsets": ("offsets", None), "lengths": ("lengths", None),
    "grid_t": ("grid_thw", 0), "grid_h": ("grid_thw", 1), "grid_w": ("grid_thw", 2),
    "merged_h": ("merged_hw", 0), "merged_w": ("merged_hw", 1), "orig_h": ("orig_hw", 0), "orig_w": ("orig_hw", 1),
    "resized_h": ("resized_hw", 0), "resized_w": ("resized_hw", 1), "frame_offsets": ("frame_offsets", None),
    "frame_lengths": ("frame_lengths", None), "shard": ("shard", None), "shard_offsets": ("shard_offsets", None),
    "processor_h": ("processor_grid", 0), "processor_w": ("processor_grid", 1), "crc32": ("crc32", None),
}
"""`sample_table` column -> (per-sample dataset, its column or None): every column but the `kind`
and `decoder` codes, which are positions in the table's `kinds` / `decoders` attributes."""


def table_values(column: Callable[[str], np.ndarray], name: str) -> np.ndarray:
    """The values of `sample_table` column `name`, taken from the per-sample datasets (`column`)."""
    source, part = TABLE_SOURCES[name]
    values = column(source)
    return values if part is None else values[:, part]
"""The `sample_table` of indexes written before checksums (still read; cannot be verified)."""
KEY_BLOCK = 4096
"""Rows per block of the index's `key_table`: `key_table/fence` holds every block's first hash, so
a lookup reads the fence once and then one block (its chunk) per key."""


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
            elif rank is None and path.name.endswith(TMP_SUFFIX) and UNIT_MARKER.match(path.name[: -len(TMP_SUFFIX)]):
                found.append(path)  # a unit marker being written (guarded by the output lock)
    if rank is None:
        found += list_index_temporaries(out)
    return sorted(found)


def list_index_temporaries(out: Path) -> list[Path]:
    """Indexes being built (or left by a killed builder): `feats.h5.<host>-<pid>.tmp`."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.glob(f"{glob.escape(out.name)}.*{TMP_SUFFIX}") if p.is_file())


def unit_marker_name(unit: int) -> str:
    return f"unit-{unit:08d}.json"


def list_unit_markers(out: Path) -> list[tuple[int, Path]]:
    """(unit, path) of every completion marker of `out`, by unit."""
    folder = shard_dir(out)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / entry.name) for entry in os.scandir(folder) if (m := UNIT_MARKER.match(entry.name))]
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
# Confinement: a reader of `feats.h5` touches files inside `feats.h5.d/` only


def shard_entry(out: Path, shard: Path) -> str:
    """How an index names one of its shards: `feats.h5.d/r000-00000.h5`, relative to its folder."""
    return f"{shard_dir(out).name}/{Path(shard).name}"


def confined_shard(out: Path, entry: str) -> Path:
    """The file an index's `shards/path` entry names, when that is a shard inside `feats.h5.d/`.

    FormatError for anything else: an absolute path, `..`, another folder, a name that is not a
    shard's. Checked by name only (no file system access), so it is cheap for every entry."""
    parts = str(entry).split("/")
    folder = shard_dir(out)
    if len(parts) != 2 or parts[0] != folder.name or parse_shard_name(parts[1]) is None:
        raise FormatError(
            f"{out}: the index names a shard {escape_text(str(entry))[:200]!r} outside {folder.name}/ "
            "(merge-cli reads shards only there); rebuild the index with merge-cli index"
        )
    return folder / parts[1]


def check_inside_folder(out: Path, shard: Path) -> None:
    """FormatError when `shard` (a path inside `feats.h5.d/`) is a link that leads out of it."""
    real_folder = os.path.realpath(shard_dir(out))
    if os.path.dirname(os.path.realpath(shard)) != real_folder:
        raise FormatError(
            f"{shard} is a link to a file outside {shard_dir(out).name}/ (merge-cli reads shards only there); "
            "copy the file in place of the link"
        )


def require_local_objects(handle: h5py.File, names: tuple[str, ...] | list[str], path: Path | str) -> None:
    """FormatError unless every object named (and every group on the way) is stored in this very
    file: an external or soft link would make a reader follow it into another file."""
    for name in names:
        parts = name.split("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            link = handle.get(prefix, getlink=True)
            if link is not None and not isinstance(link, h5py.HardLink):
                raise FormatError(
                    f"{path}: damaged merge-cli output ({prefix!r} is a link to {_link_target(link)}, "
                    "not data stored in the file)"
                )


def _link_target(link: object) -> str:
    if isinstance(link, h5py.ExternalLink):
        return f"another file ({escape_text(str(link.filename))[:200]})"
    return "another place"


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
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError(f"{path}: damaged merge-cli output (format_version is {str(version)[:40]!r}, not an integer)")
    if version > FORMAT_VERSION:
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
# Writing

RERUN = "run the same command again (finished shards are kept)"
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def write_error(error: OSError, path: Path, needed: int | None = None) -> OutputWriteError:
    """One line for a failed write of the output (disk full, file too large, I/O or permission
    error): the path, the reason, the bytes that were needed when known, and how to go on."""
    reason = os.strerror(error.errno) if error.errno else first_line(error)
    detail = f" (this file needed about {needed / 1e6:,.1f} MB" if needed else ""
    if error.errno in SPACE_ERRNOS:
        try:
            detail += f", {shutil.disk_usage(path.parent).free / 1e6:,.1f} MB are free" if detail else ""
        except OSError:
            pass
        advice = f"free space and {RERUN}"
    elif error.errno == errno.EFBIG:
        advice = f"lower --shard-size or raise the file size limit (ulimit -f), and {RERUN}"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        detail, advice = "", f"make {path.parent} writable and {RERUN}"
    else:
        detail, advice = "", RERUN
    return OutputWriteError(f"cannot write {path}: {reason}{detail + ')' if detail else ''}; {advice}")


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


def rows_checksum(rows: np.ndarray, running: int = 0) -> int:
    """CRC-32 (zlib's, IEEE) of stored rows as little-endian bytes in row-major order; `running`
    continues a checksum over rows read in parts."""
    rows = np.ascontiguousarray(rows)
    if sys.byteorder != "little" and rows.dtype.itemsize > 1:
        rows = rows.astype(rows.dtype.newbyteorder("<"))
    return zlib.crc32(rows.reshape(-1).view(np.uint8), running)


# ---------------------------------------------------------------------------------------------
# Tables


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
