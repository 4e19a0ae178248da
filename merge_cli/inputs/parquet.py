"""Parquet files (Hugging Face `datasets` among them) -> one sample per row with media.

The image column holds encoded image bytes, or a `datasets` Image struct `{bytes, path}` (bytes
win; a struct with only a path reads that file, relative to the Parquet file's folder, as
`datasets` does). The video column likewise. Defaults: `image`, `video`, and `id` as the key
when the file has such a column; otherwise a row is keyed `FILE/ROW` (its row number in that
file). Rows whose media columns are all null are skipped (text-only rows, as in LLaVA data).

Listing reads the footer and, per row group, the key column and the null masks of the media
columns (a struct's mask from its small `path` leaf, a binary column's only when its statistics
count nulls), so the image bytes are read once, when decoding. Decoding reads a row group's
media column once per process and keeps that one row group while its rows are decoded (each
DataLoader worker reads the row groups its samples fall in: reading costs far less than
decoding the images in it). pyarrow reads on the calling thread (`use_threads=False`): the
DataLoader workers are the parallelism, and pyarrow's own pool only oversubscribes the cores.

pyarrow is an optional dependency (`pip install 'merge-cli[parquet]'`); without it a Parquet input
is refused with one line naming the extra.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from merge_cli.errors import MediaError, UsageError
from merge_cli.records import Failure, MediaKind, ParquetCell, Sample, escape_text

PARQUET_SUFFIX = ".parquet"
EXTRA = "pip install 'merge-cli[parquet]'"
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_VIDEO_COLUMN = "video"
DEFAULT_KEY_COLUMN = "id"


@dataclass(frozen=True)
class ParquetColumns:
    """Which columns hold the media and the key; None: the default, used only when present."""

    image: str | None = None
    video: str | None = None
    key: str | None = None


def is_parquet(path: Path | str) -> bool:
    return str(path).lower().endswith(PARQUET_SUFFIX)


def _pyarrow(label: str):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError(f"--input {label}: reading Parquet needs pyarrow: {EXTRA}") from None
    return pyarrow


def check_schema(path: Path, label: str, columns: ParquetColumns) -> None:
    """The UsageError `parquet_samples` would raise for this file's schema, now (the listing
    streams, so a Parquet file named on the command line is checked before any work starts)."""
    pa = _pyarrow(label)
    try:
        schema = pa.parquet.ParquetFile(path).schema_arrow
    except (pa.ArrowException, OSError):
        return  # not Parquet: an error record when the listing reaches it
    _media_columns(schema, columns, label)
    _key_column(schema, columns, label)


def parquet_samples(path: Path, label: str, columns: ParquetColumns) -> Iterator[Sample | Failure | None]:
    """Every row with media of one Parquet file, streamed by row group.

    Raises UsageError for a schema that cannot be read as asked (a named column missing, a
    column of the wrong type); a file that is not Parquet is a Failure keyed by `label`. Yields
    None for each row without media.
    """
    pa = _pyarrow(label)
    try:
        file = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        yield Failure(label, "source", "NotParquet", f"{label} is not a Parquet file ({error})")
        return
    schema = file.schema_arrow
    media = _media_columns(schema, columns, label)
    key_column = _key_column(schema, columns, label)
    metadata = file.metadata
    file_row = 0
    for group in range(file.num_row_groups):
        rows = metadata.row_group(group).num_rows
        try:
            keys = _read_keys(file, group, key_column)
            masks = {name: _present(file, group, name, schema.field(name).type, pa) for name, _ in media}
        except (pa.ArrowException, OSError) as error:
            yield Failure(
                label, "source", "DamagedParquet", f"{label}: row group {group} cannot be read ({error}); rows {file_row}.. skipped"
            )
            file_row += rows
            continue
        for row in range(rows):
            present = [(name, kind) for name, kind in media if masks[name] is None or masks[name][row]]
            if not present:
                yield None
            else:
                if keys is None:
                    key = f"{label}/{file_row + row}"
                elif keys[row] is None:
                    yield Failure(
                        f"{label}/{file_row + row}",
                        "source",
                        "NullKey",
                        f"{label}: row {file_row + row} has no {key_column!r}; it is not extracted",
                    )
                    continue
                else:
                    key = escape_text(str(keys[row]))
                for name, kind in present:
                    yield Sample(key, path, kind, ParquetCell(group, row, file_row + row, name))
        file_row += rows


def _media_columns(schema, columns: ParquetColumns, label: str) -> list[tuple[str, MediaKind]]:
    found: list[tuple[str, MediaKind]] = []
    for given, default, kind, option in (
        (columns.image, DEFAULT_IMAGE_COLUMN, "image", "--image-column"),
        (columns.video, DEFAULT_VIDEO_COLUMN, "video", "--video-column"),
    ):
        name = given or default
        if name not in schema.names:
            if given:
                raise UsageError(f"{label}: no column {given!r} ({option}); its columns are {', '.join(schema.names)}")
            continue
        _check_media_type(schema.field(name).type, name, label)
        found.append((name, kind))  # type: ignore[arg-type]
    if not found:
        raise UsageError(
            f"{label}: no {columns.image or DEFAULT_IMAGE_COLUMN!r} or {columns.video or DEFAULT_VIDEO_COLUMN!r} column; "
            f"its columns are {', '.join(schema.names)}: name the media with --image-column or --video-column"
        )
    return found


def _check_media_type(arrow_type, name: str, label: str) -> None:
    import pyarrow as pa

    if _is_binary(arrow_type):
        return
    if pa.types.is_struct(arrow_type):
        fields = {arrow_type.field(i).name: arrow_type.field(i).type for i in range(arrow_type.num_fields)}
        if "bytes" in fields and _is_binary(fields["bytes"]) and ("path" not in fields or _is_text(fields["path"])):
            return
    raise UsageError(
        f"{label}: column {name!r} is {arrow_type}; expected encoded bytes (binary) or a "
        "Hugging Face Image/Video struct {bytes, path}"
    )


def _key_column(schema, columns: ParquetColumns, label: str) -> str | None:
    import pyarrow as pa

    name = columns.key or DEFAULT_KEY_COLUMN
    if name not in schema.names:
        if columns.key:
            raise UsageError(f"{label}: no key column {columns.key!r} (--key-column); its columns are {', '.join(schema.names)}")
        return None
    arrow_type = schema.field(name).type
    if not (_is_text(arrow_type) or pa.types.is_integer(arrow_type)):
        raise UsageError(f"{label}: key column {name!r} is {arrow_type}; expected strings or integers")
    return name


def _is_binary(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _read_keys(file, group: int, key_column: str | None) -> list | None:
    if key_column is None:
        return None
    return file.read_row_group(group, columns=[key_column], use_threads=False).column(0).to_pylist()


def _present(file, group: int, name: str, arrow_type, pa):
    """Which rows of a media column are not null (None: all), reading as little as the type allows."""
    import numpy as np

    if pa.types.is_struct(arrow_type):
        leaf = "path" if arrow_type.get_field_index("path") >= 0 else "bytes"
        column = file.read_row_group(group, columns=[f"{name}.{leaf}"], use_threads=False).column(0)
    else:
        meta = file.metadata.row_group(group)
        for index in range(meta.num_columns):
            chunk = meta.column(index)
            if chunk.path_in_schema == name and chunk.statistics is not None and chunk.statistics.has_null_count:
                if chunk.statistics.null_count == 0:
                    return None
        column = file.read_row_group(group, columns=[name], use_threads=False).column(0)
    if column.null_count == 0:
        return None
    return np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


# --- decoding side: the bytes of one cell ---------------------------------------------------------

_cache_lock = threading.Lock()
_cached: tuple[tuple[str, int], dict] | None = None
"""(file, row group) -> {column: _Cells}: the one row group this process is decoding."""


class _Binary:
    """A binary array's values by row, sliced straight out of its data buffer (one copy per value)."""

    def __init__(self, array) -> None:
        import numpy as np
        import pyarrow as pa

        self.valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        buffers = array.buffers()
        width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
        self.offsets = np.frombuffer(buffers[1], dtype=width)[array.offset : array.offset + len(array) + 1]
        self.data = memoryview(buffers[2]) if buffers[2] is not None else memoryview(b"")

    def get(self, row: int) -> bytes | None:
        if not self.valid[row]:
            return None
        return bytes(self.data[int(self.offsets[row]) : int(self.offsets[row + 1])])


class _Cells:
    """One media column of one row group: encoded bytes, or a struct's bytes and path."""

    def __init__(self, array) -> None:
        import numpy as np
        import pyarrow as pa

        self.struct_valid = None
        self.paths: list | None = None
        if pa.types.is_struct(array.type):
            self.struct_valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            self.values = _Binary(array.field("bytes"))
            if array.type.get_field_index("path") >= 0:
                self.paths = array.field("path").to_pylist()
        else:
            self.values = _Binary(array)

    def get(self, row: int) -> bytes | str | None:
        """The bytes; else a struct's path; None for a null value."""
        if self.struct_valid is not None and not self.struct_valid[row]:
            return None
        data = self.values.get(row)
        if data is None and self.paths is not None:
            return self.paths[row] or None
        return data


def read_cell(path: Path, cell: ParquetCell) -> bytes | Path:
    """The encoded bytes of one cell, or the file a path-only struct names (relative to `path`'s folder).

    Raises MediaError for a null value (a struct with neither bytes nor path) or an unreadable file.
    """
    global _cached
    pa = _pyarrow(str(path))
    where = (str(path), cell.row_group)
    with _cache_lock:
        if _cached is None or _cached[0] != where:
            _cached = (where, {})  # a new row group: drop the last one
        columns = _cached[1]
        if cell.column not in columns:
            try:
                table = pa.parquet.ParquetFile(path).read_row_group(cell.row_group, columns=[cell.column], use_threads=False)
                chunked = table.column(0)
                columns[cell.column] = _Cells(chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks())
            except (pa.ArrowException, OSError) as error:
                raise MediaError("open", f"cannot read {path} row group {cell.row_group}: {error}", type(error).__name__) from error
    found = columns[cell.column].get(cell.row)
    if isinstance(found, str):
        return path.parent / found
    if found is None:
        raise MediaError("open", f"{path}: row {cell.file_row} has a null {cell.column!r} (no bytes, no path)", "NullImage")
    if not found:
        raise MediaError("open", f"{path}: row {cell.file_row} has an empty {cell.column!r} (0 bytes)", "EmptyFile")
    return found
