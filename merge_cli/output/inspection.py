"""`merge-cli inspect`: what is in a features file, and is it sound?

`inspect_features` returns a JSON-able report with stable keys (docs/FORMAT.md, "inspect");
merge_cli.report.render_inspect draws it. Integrity findings go to `problems` (exit 1), harmless
observations to `notes`; a file that is not a merge-cli output or cannot be read at all raises
FormatError (exit 2).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from merge_cli.errors import FormatError
from merge_cli.output.format import (
    NO_CHECKSUM,
    TABLE_COLUMNS,
    TABLE_SOURCES,
    first_line,
    list_shards,
    list_temporaries,
    read_strings,
    rows_checksum,
    shard_dir,
    table_values,
)
from merge_cli.output.reader import FeatureFile, open_features
from merge_cli.records import plural

TOP_GRIDS = 10
FIRST_ERRORS = 10
HISTOGRAM_BINS = 10
EXAMPLES = 5
"""How many keys a problem names before '...'."""
CHECK_BLOCK_BYTES = 64 * 1024 * 1024
"""Rows read at once by --check."""

_NONFINITE_MASKS = {"bfloat16": 0x7F80, "float16": 0x7C00}
"""Exponent bits of the 16-bit formats: all ones means Inf or NaN."""


def inspect_features(path: Path, *, key: str | None = None, check: bool = False) -> dict:
    """Report on a merge-cli output (`feats.h5`) or one shard; see the module docstring."""
    path = Path(path)
    with _open(path) as features:
        try:
            return _inspect(features, key, check)
        except (OSError, KeyError, ValueError) as error:
            raise FormatError(f"{path}: damaged merge-cli output ({first_line(error)})") from error


def inspect_sample(path: Path, key: str) -> dict:
    """`inspect --key`: the one sample's report (the `sample` entry of `inspect_features`) alone,
    without reading anything about the rest of the file but its keys and error records."""
    path = Path(path)
    with _open(path) as features:
        try:
            return _sample_report(features, key)
        except (OSError, KeyError, ValueError) as error:
            raise FormatError(f"{path}: damaged merge-cli output ({first_line(error)})") from error


def iter_failures(path: Path) -> Iterator[dict]:
    """`inspect --failures`: every error record, `{key, stage, type, message}`, in stored order."""
    path = Path(path)
    with _open(path) as features:
        try:
            failures = features.failures()
        except (OSError, KeyError, ValueError) as error:
            raise FormatError(f"{path}: damaged merge-cli output ({first_line(error)})") from error
        for failure in failures:
            yield _error_entry(failure)


def _open(path: Path) -> FeatureFile:
    """open_features, but a missing index beside complete shards says how to rebuild it."""
    if not path.exists():
        shards = list_shards(path)
        if shards:
            raise FormatError(
                f"{path} does not exist, but {shard_dir(path)} holds {plural(len(shards), 'complete shard')} (a run stopped before "
                f"writing the index?); rebuild it with: merge-cli index {path}"
            )
    return open_features(path)


def _inspect(features: FeatureFile, key: str | None, check: bool) -> dict:
    problems: list[str] = []
    notes: list[str] = []
    shards = _shards(features, problems, notes)
    lengths = features.column("lengths")
    kinds = features.column("kind")
    errors = _errors(features)
    report: dict[str, Any] = {
        "path": str(features.path),
        "role": features.role,
        "format": features.attrs.get("format"),
        "format_version": features.attrs.get("format_version"),
        "dtype": features.dtype_name,
        "token_dim": features.token_dim,
        "attrs": features.attrs,
        "shards": shards,
        "counts": {
            "samples": len(features),
            "tokens": int(lengths.sum()),
            "images": int((kinds == b"image").sum()),
            "videos": int((kinds == b"video").sum()),
            "frames": int(features.column("frame_lengths").sum()),
            "errors": len(errors),
            "made_even": int(
                (features.column("processor_grid") != features.column("grid_thw")[:, 1:]).any(axis=1).sum()
            ),
            "shards": len(shards),
            "shard_bytes": sum(s["bytes"] or 0 for s in shards),
        },
        "grids": _grids(features),
        "token_stats": _token_stats(lengths),
        "errors": errors[:FIRST_ERRORS],
        "errors_left_out": max(0, len(errors) - FIRST_ERRORS),
        "error_types": dict(Counter(e["type"] for e in errors).most_common()),
        "checked": check,
        "problems": problems,
        "notes": notes,
        "sample": None,
    }
    _check_tables(features, shards, problems)
    if features.role == "index":
        _check_virtual_tokens(features, shards, problems)
        _check_sample_table(features, problems)
    if features.duplicate_keys:
        problems.append(f"{plural(features.duplicate_keys, 'key')} stored more than once (the reader returns the first)")
    if check and not problems:
        _check_values(features, problems, notes)
    elif check:
        notes.append("--check skipped the value scan because of the problems above")
    if key is not None:
        report["sample"] = _sample_report(features, key)
    return report


def _shards(features: FeatureFile, problems: list[str], notes: list[str]) -> list[dict]:
    """One entry per shard: name, bytes, samples, rows, errors, exists."""
    if features.role != "index":
        return [
            {
                "name": features.path.name,
                "bytes": features.path.stat().st_size,
                "samples": len(features),
                "rows": features.rows,
                "errors": int(features.h5["errors/key"].shape[0]),
                "exists": True,
            }
        ]
    group = features.h5["shards"]
    names = read_strings(group["path"])
    rows, samples, errors = group["rows"][()], group["samples"][()], group["errors"][()]
    out = []
    for number, (name, path) in enumerate(zip(names, features.shard_paths)):
        exists = path.is_file()
        entry = {
            "name": name,
            "bytes": path.stat().st_size if exists else None,
            "samples": int(samples[number]),
            "rows": int(rows[number]),
            "errors": int(errors[number]),
            "exists": exists,
        }
        out.append(entry)
        if not exists:
            problems.append(f"shard {name} is missing")
            continue
        try:
            actual = features.shard_tokens(number).shape[0]
        except FormatError as error:
            problems.append(f"shard {name} cannot be read: {error}")
            continue
        if actual != entry["rows"]:
            problems.append(f"shard {name} has {actual} token rows, the index expects {entry['rows']} (run merge-cli index)")
    indexed = {p.resolve() for p in features.shard_paths}
    unindexed = [p for p in list_shards(features.path) if p.resolve() not in indexed]
    if unindexed:
        problems.append(
            f"{plural(len(unindexed), 'shard')} not in the index, e.g. {unindexed[0].name} "
            f"(run: merge-cli index {features.path})"
        )
    leftovers = list_temporaries(features.path)
    if leftovers:
        notes.append(f"{plural(len(leftovers), 'unfinished file')} of an interrupted run (*.tmp); the next run deletes them")
    duplicates = int(features.attrs.get("duplicate_keys", 0) or 0)
    if duplicates:
        notes.append(f"ignored {plural(duplicates, 'sample')} stored twice across shards (the first copy is used)")
    return out


def _check_tables(features: FeatureFile, shards: list[dict], problems: list[str]) -> None:
    """Lengths that disagree with grids, rows outside `tokens`, overlapping samples, frame tables."""
    keys = features.keys()
    grid = features.column("grid_thw").astype(np.int64)
    merged = features.column("merged_hw").astype(np.int64)
    lengths = features.column("lengths")
    offsets = features.column("offsets")
    merge = int(features.attrs.get("merge_size", 2) or 2)

    def report(mask: np.ndarray, what: str) -> None:
        if mask.any():
            problems.append(f"{plural(int(mask.sum()), 'sample')} {what}: {_examples(keys, mask)}")

    report(lengths != grid[:, 0] * merged[:, 0] * merged[:, 1], "with a token count that does not match the grid")
    report((merged[:, 0] * merge != grid[:, 1]) | (merged[:, 1] * merge != grid[:, 2]),
           f"with merged_hw that is not grid_thw / {merge}")
    report((offsets < 0) | (offsets + lengths > features.rows), f"pointing outside the {plural(features.rows, 'token row')}")
    kinds = features.column("kind")
    if kinds.dtype.kind != "S":
        problems.append(f"the kind table holds {kinds.dtype} values, not the names image and video")
    else:
        report((kinds != b"image") & (kinds != b"video"), "whose kind is neither image nor video")
    order = np.argsort(offsets, kind="stable")
    ends = (offsets + lengths)[order]
    overlap = np.zeros(len(keys), dtype=bool)
    overlap[order[1:]] = offsets[order[1:]] < ends[:-1]
    report(overlap, "overlapping the rows of another sample")
    if features.role == "index":
        rows = np.array([s["rows"] for s in shards], dtype=np.int64)
        shard = features.column("shard")
        local = features.column("shard_offsets")
        valid = (shard >= 0) & (shard < len(rows))
        report(~valid, "naming a shard that is not in the shard list")
        shard_rows = np.zeros(len(shard), dtype=np.int64)
        shard_rows[valid] = rows[shard[valid]]
        report(valid & ((local < 0) | (local + lengths > shard_rows)), "pointing outside their shard's rows")
    frame_total = features.h5["frame_indices"].shape[0]
    frame_offsets, frame_lengths = features.column("frame_offsets"), features.column("frame_lengths")
    report((frame_offsets < 0) | (frame_offsets + frame_lengths > frame_total), "pointing outside the frame tables")
    if features.h5["frame_times"].shape[0] != frame_total:
        problems.append("frame_indices and frame_times have different lengths")


def _check_values(features: FeatureFile, problems: list[str], notes: list[str]) -> None:
    """--check: read every stored row once; name the samples with NaN or Inf, and those whose rows
    do not match their CRC-32 (swapped, truncated, zeroed or foreign data)."""
    nonfinite = np.zeros(len(features), dtype=bool)
    mismatch = np.zeros(len(features), dtype=bool)
    shard_of = features.column("shard")
    local = features.column("shard_offsets")
    lengths = features.column("lengths")
    stored = features.column("crc32")
    row_bytes = max(1, features.token_dim * np.dtype(features.h5["tokens"].dtype).itemsize)
    block = max(1, CHECK_BLOCK_BYTES // row_bytes)
    for number, path in enumerate(features.shard_paths):
        members = np.nonzero(shard_of == number)[0]
        if not len(members):
            continue
        members = members[np.argsort(local[members], kind="stable")]
        starts, ends = local[members], local[members] + lengths[members]
        running = np.zeros(len(members), dtype=np.int64)  # each member's CRC-32 so far
        tokens = features.shard_tokens(number)
        for begin in range(0, tokens.shape[0], block):
            try:
                values = tokens[begin : begin + block]
            except OSError as error:
                problems.append(f"shard {path.name}: rows {begin}..{begin + block} cannot be read ({first_line(error)})")
                break
            stop = begin + len(values)
            bad_rows = np.nonzero(_nonfinite_rows(values, features.dtype_name))[0] + begin
            if len(bad_rows):
                owner = np.searchsorted(starts, bad_rows, side="right") - 1
                inside = (owner >= 0) & (bad_rows < ends[owner.clip(0)])
                nonfinite[members[owner[inside]]] = True
            # Members with rows in this block: [first, last), as offsets are sorted.
            first, last = np.searchsorted(ends, begin, side="right"), np.searchsorted(starts, stop, side="left")
            for i in range(first, last):
                lo, hi = max(starts[i], begin), min(ends[i], stop)
                running[i] = rows_checksum(values[lo - begin : hi - begin], int(running[i]))
        known = stored[members] != NO_CHECKSUM
        mismatch[members[known & (running != stored[members])]] = True
    keys = features.keys() if nonfinite.any() or mismatch.any() else []
    if mismatch.any():
        problems.append(
            f"{plural(int(mismatch.sum()), 'sample')} whose rows do not match their checksum (changed after "
            f"they were written: a swapped, truncated or foreign shard?): {_examples(keys, mismatch)}"
        )
    if nonfinite.any():
        problems.append(f"{plural(int(nonfinite.sum()), 'sample')} with NaN or Inf tokens: {_examples(keys, nonfinite)}")
    unverifiable = int((stored == NO_CHECKSUM).sum())
    if unverifiable:
        notes.append(
            f"{plural(unverifiable, 'sample')} written without checksums (before merge-cli stored them): "
            "their rows could not be verified"
        )


def _check_virtual_tokens(features: FeatureFile, shards: list[dict], problems: list[str]) -> None:
    """The index's `tokens` (what plain h5py reads) must map exactly the shards' rows, in order:
    a virtual source anywhere else would hand h5py users another file's data."""
    tokens = features.h5["tokens"]
    expected = [(entry["name"], entry["rows"]) for entry in shards if entry["rows"]]
    if not tokens.is_virtual:
        if expected or tokens.shape[0]:
            problems.append("the index's tokens are not a view of its shards (rebuild it with merge-cli index)")
        return
    found = []
    for source in tokens.virtual_sources():  # where each source lands in the index's rows
        (first, _), (last, _) = source.vspace.get_select_bounds()
        found.append((source.file_name, source.dset_name, int(first), int(last) + 1))
    starts = np.concatenate([[0], np.cumsum([rows for _, rows in expected])])
    if found != [(name, "tokens", int(starts[i]), int(starts[i + 1])) for i, (name, _) in enumerate(expected)]:
        outside = next((f for f in found if f[0] not in {name for name, _ in expected} or f[1] != "tokens"), None)
        where = f" (e.g. {outside[0][:200]!r}:{outside[1][:50]})" if outside else ""
        problems.append(
            f"the index's tokens map other data than its shards' rows{where}: plain h5py readers would read "
            "the wrong rows (rebuild it with merge-cli index)"
        )


def _check_sample_table(features: FeatureFile, problems: list[str]) -> None:
    """The index's `sample_table` (what open_features reads) must equal its per-sample datasets
    (what inspect and plain h5py read)."""
    table = features.h5["sample_table"]
    if table.shape[1] not in (len(TABLE_COLUMNS), len(TABLE_COLUMNS) - 1):
        return  # the reader refused such a table already
    values = table[()]
    differ = [
        name for number, name in enumerate(TABLE_COLUMNS[: table.shape[1]])
        if name in TABLE_SOURCES and not np.array_equal(values[:, number], table_values(features.column, name))
    ]
    for name in ("kind", "decoder"):  # codes: positions in the table's list of names
        names = np.array([n.encode() for n in _json_list(table.attrs.get(f"{name}s"))], dtype="S")
        codes = values[:, TABLE_COLUMNS.index(name)]
        valid = bool(((codes >= 0) & (codes < len(names))).all())  # also true for no samples
        if not valid or not np.array_equal(names[codes], features.column(name)):
            differ.append(name)
    if differ:
        problems.append(
            f"the index's sample_table disagrees with its tables ({', '.join(differ[:5])}): open_features would "
            "read other numbers than plain h5py (rebuild it with merge-cli index)"
        )


def _json_list(value: object) -> list[str]:
    import json

    try:
        decoded = json.loads(value.decode() if isinstance(value, bytes) else str(value))
    except ValueError:
        return []
    return [str(v) for v in decoded] if isinstance(decoded, list) else []


def _nonfinite_rows(values: np.ndarray, dtype_name: str) -> np.ndarray:
    """Per row: does it hold a NaN or Inf? 16-bit formats are tested on their bit patterns."""
    if dtype_name in _NONFINITE_MASKS:
        exponent = _NONFINITE_MASKS[dtype_name]
        bits = values.view(np.uint16)
        return ((bits & exponent) == exponent).any(axis=1)
    return ~np.isfinite(values).all(axis=1)


def _grids(features: FeatureFile) -> list[dict]:
    grid = features.column("grid_thw")
    merged = features.column("merged_hw")
    if not len(grid):
        return []
    unique, first, counts = np.unique(grid, axis=0, return_index=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:TOP_GRIDS]
    total = len(grid)
    return [
        {
            "grid_thw": [int(v) for v in unique[i]],
            "merged_hw": [int(v) for v in merged[first[i]]],
            "tokens": int(unique[i][0] * merged[first[i]][0] * merged[first[i]][1]),
            "count": int(counts[i]),
            "share": round(float(counts[i]) / total, 4),
        }
        for i in order
    ]


def _token_stats(lengths: np.ndarray) -> dict | None:
    """Tokens per sample: min, median, mean, max and a histogram of integer bins [lo, hi]."""
    if not len(lengths):
        return None
    low, high = int(lengths.min()), int(lengths.max())
    width = max(1, -(-(high - low + 1) // HISTOGRAM_BINS))
    edges = np.arange(low, high + width + 1, width)
    counts, _ = np.histogram(lengths, bins=edges)
    return {
        "min": low,
        "median": float(np.median(lengths)),
        "mean": round(float(lengths.mean()), 2),
        "max": high,
        "histogram": [
            {"from": int(edges[i]), "to": int(edges[i + 1]) - 1, "count": int(c)} for i, c in enumerate(counts)
        ],
    }


def _errors(features: FeatureFile) -> list[dict]:
    return [_error_entry(f) for f in features.failures()]


def _error_entry(failure) -> dict:
    return {"key": failure.key, "stage": failure.stage, "type": failure.error_type, "message": failure.message}


def _sample_report(features: FeatureFile, key: str) -> dict:
    if key not in features:
        failed = next((_error_entry(f) for f in features.failures() if f.key == key), None)
        if failed:
            raise FormatError(
                f"{key!r} has no features: it failed at {failed['stage']} ({failed['type']}: {failed['message']})"
            )
        raise FormatError(f"no sample with key {key!r} in {features.path}")
    sample = features[key]
    row = sample.index
    values = sample.tokens.float().numpy().astype(np.float64, copy=False)
    finite = values[np.isfinite(values)]
    shard = int(features.column("shard")[row])
    return {
        "key": sample.key,
        "index": row,
        "kind": sample.kind,
        "grid_thw": list(sample.grid_thw),
        "merged_hw": list(sample.merged_hw),
        "shape": list(sample.tokens.shape),
        "dtype": features.dtype_name,
        "orig_hw": list(sample.orig_hw),
        "resized_hw": list(sample.resized_hw),
        "processor_grid": list(sample.processor_grid or sample.grid_thw[1:]),
        "decoder": sample.decoder,
        "frame_indices": sample.frame_indices,
        "frame_times": sample.frame_times,
        "shard": features.shard_paths[shard].name,
        "offset": int(features.column("offsets")[row]),
        "stats": {
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "nan": int(np.isnan(values).sum()),
            "inf": int(np.isinf(values).sum()),
        },
    }


def _examples(keys: list[str], mask: np.ndarray) -> str:
    chosen = [keys[i] for i in np.nonzero(mask)[0][:EXAMPLES]]
    more = ", ..." if int(mask.sum()) > EXAMPLES else ""
    return ", ".join(repr(k) for k in chosen) + more
