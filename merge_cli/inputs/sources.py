"""Inputs -> an ordered list of samples with stable keys.

An `--input` is a folder (scanned recursively in sorted order, following symlinks but never a
symlink loop), a media file, or a manifest: `.txt` (one path per line), `.jsonl` (one object per
line with a `path`, `image` or `video` field) or a LLaVA-style `.json` (a list of records whose
`image` is a path or a list of paths and/or whose `video` is a path or a list of paths).

A sample's key is its path relative to the root it was found under, with POSIX separators:
  - a folder's files: relative to `--media-root` when the folder lies inside it, else to the folder
  - a media file named directly: relative to `--media-root` when inside it, else its file name
  - a manifest's paths: relative paths resolve against `--media-root` (or, without one, against
    the manifest's own folder); the key is the normalized path relative to that root, or the
    absolute path for a file outside it
so that a training job finds features under the same string its JSON uses.

Containers (see webdataset.py and parquet.py): an `--input` may also be a WebDataset `.tar`
shard, a `.parquet` file, a folder holding them, or a glob / brace range of them
(`'shards/{00000..00099}.tar'`, `'data/*.parquet'`). Their samples are keyed by the tar's
`__key__` or the Parquet key column, not by a path. A container sample whose key is already
taken (keys colliding across shards, two rows with one id) becomes an error record keyed by
where it is (`00001.tar:000123.jpg`, `train.parquet:row 17`); the first keeps the key.

Nothing here opens a media file: a missing file named by a manifest becomes a sample whose decoding
fails with an error record, as do broken links and directories named like media.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from merge_cli.errors import UsageError
from merge_cli.inputs import parquet, webdataset
from merge_cli.inputs.parquet import ParquetColumns
from merge_cli.inputs.units import Listed, Unit, WholeUnit
from merge_cli.records import (
    Failure,
    MediaKind,
    Sample,
    escape_text,
    media_kind,
    printable,
)

MANIFEST_SUFFIXES = frozenset({".txt", ".jsonl", ".json"})
RECORD_FIELDS = ("path", "image", "video")
"""Fields of a .jsonl or .json record that name media; records with none of them are skipped."""


@dataclass(frozen=True)
class SampleSet:
    samples: list[Sample]
    """Unique keys, in input order (a folder's files sorted by key, a manifest's in its order)."""
    failures: list[Failure]
    """Inputs that fail before decoding (an unknown extension in a manifest), stage `source`."""
    ignored: int
    """Files in scanned folders with extensions merge-cli does not read, tar samples and
    Parquet rows without media."""


@dataclass
class ListingStats:
    """Counted while the listing streams by (complete once it is exhausted)."""

    ignored: int = 0
    """Files in scanned folders with extensions merge-cli does not read."""
    ended: bool = False
    """The listing has ended: every input walked, or --limit reached (set before the last unit is
    handed on)."""


def collect_samples(
    inputs: Sequence[Path | str],
    media_root: Path | None = None,
    *,
    gif_as_video: bool = False,
    columns: ParquetColumns | None = None,
) -> SampleSet:
    """Every sample the inputs name, keyed and deduplicated, held in memory: for small input sets
    and tests. `merge-cli extract` streams the same listing as units (`stream_units`).

    Raises UsageError for a missing input, an unreadable or malformed manifest, and for two
    different files that would get the same key (naming both and where they came from).
    """
    from merge_cli.inputs.units import iter_units

    stats = ListingStats()
    samples: list[Sample] = []
    failures: list[Failure] = []
    listing = make_listing(inputs, media_root, gif_as_video=gif_as_video, stats=stats, columns=columns)
    for unit in iter_units(listing, unit_size=1 << 62):
        for entry in unit.entries:
            (samples if isinstance(entry, Sample) else failures).append(entry)  # type: ignore[arg-type]
    return SampleSet(samples, failures, stats.ignored)


def stream_units(
    inputs: Sequence[Path | str],
    media_root: Path | None = None,
    *,
    unit_size: int,
    gif_as_video: bool = False,
    stats: ListingStats | None = None,
    columns: ParquetColumns | None = None,
    check_roots: bool = False,
    limit: int | None = None,
) -> Iterator[Unit]:
    """The inputs as a stream of work units (see merge_cli/inputs/units.py), never held whole.
    Input paths are checked before the first unit (with `check_roots`, also the first paths of
    each manifest: `check_manifest_root`); a manifest is read as the stream reaches it. With
    `limit`, only the first `limit` entries (`first_entries`): the listing stops there."""
    from merge_cli.inputs.units import first_entries, iter_units

    stats = stats if stats is not None else ListingStats()
    listing = make_listing(
        inputs, media_root, gif_as_video=gif_as_video, stats=stats, columns=columns, check_roots=check_roots
    )
    units = iter_units(listing, unit_size)
    if limit is None:
        return units

    def reached() -> None:
        stats.ended = True

    return first_entries(units, limit, reached)


def make_listing(
    inputs: Sequence[Path | str],
    media_root: Path | None,
    *,
    gif_as_video: bool,
    stats: ListingStats,
    columns: ParquetColumns | None = None,
    check_roots: bool = False,
) -> Callable[[], Iterator[Listed | WholeUnit]]:
    """Check the inputs now; return a function that starts the listing (again) from the top."""
    root = None
    if media_root is not None:
        root = _absolute(media_root)
        if not root.is_dir():
            raise UsageError(f"--media-root {media_root}: not a directory")
    plan: list[tuple[str, Path, Path, str]] = []  # (how, path, root, origin or label)
    for raw in (given for each in inputs for given in _expanded(each)):
        path = _absolute(raw)
        if path.is_dir():
            base = root if root is not None and _is_inside(path, root) else path
            plan.append(("folder", path, base, f"--input {raw}"))
        elif not path.exists():
            raise UsageError(f"--input {raw}: no such file or directory")
        elif _is_container(path):
            base = root if root is not None and _is_inside(path, root) else path.parent
            plan.append(("container", path, base, key_for(path, base)))
            if parquet.is_parquet(path):
                parquet.check_schema(path, key_for(path, base), columns or ParquetColumns())
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            if not os.access(path, os.R_OK):
                raise UsageError(f"cannot read manifest {path}: Permission denied")
            plan.append(("manifest", path, root if root is not None else path.parent, ""))
            if check_roots:
                check_manifest_root(path, root if root is not None else path.parent, media_root_given=root is not None)
        elif media_kind(path) is not None:
            base = root if root is not None and _is_inside(path, root) else path.parent
            plan.append(("file", path, base, f"--input {raw}"))
        else:
            webdataset.refuse_compressed(raw)
            raise UsageError(
                f"--input {raw}: not a folder, an image or video file, a .tar shard, a .parquet file, "
                "or a manifest (.txt, .jsonl, .json)"
            )
    counted = [False]

    def listing() -> Iterator[Listed | WholeUnit]:
        lister = _Lister(gif_as_video, columns or ParquetColumns(), stats if not counted[0] else ListingStats())
        for how, path, base, origin in plan:
            if how == "folder":
                yield from lister.folder(path, base, origin)
            elif how == "container":
                yield lister.container(path, origin)
            elif how == "manifest":
                yield from lister.manifest(path, base)
            else:
                yield lister.entry(path, base, origin)
        if not counted[0]:
            stats.ended = True
        counted[0] = True  # a second walk (to explain a duplicate key) must not count again

    return listing


def _expanded(raw: Path | str) -> list[Path | str]:
    """An --input, or what its glob / brace range names when it is a pattern and not a file."""
    text = os.fspath(raw)
    if os.path.lexists(text) or not webdataset.is_pattern(text):
        return [raw]
    matches = webdataset.expand_pattern(text)
    if not matches:
        raise UsageError(f"--input {raw}: the pattern matches no file")
    missing = [match for match in matches if not os.path.lexists(match)]
    if missing:
        raise UsageError(f"--input {raw}: {missing[0]} does not exist ({len(missing)} of {len(matches)} named files missing)")
    return matches  # type: ignore[return-value]


def _is_container(path: Path | str) -> bool:
    return webdataset.is_tar(path) or parquet.is_parquet(path)


def key_for(path: Path, root: Path) -> str:
    """The key of `path` (absolute, normalized) found under `root`: relative POSIX path, escaped."""
    if _is_inside(path, root):
        key = PurePosixPath(*path.relative_to(root).parts).as_posix()
    else:
        key = path.as_posix()
    return escape_text(key)


def _absolute(path: Path | str) -> Path:
    """Absolute and normalized (`..` removed), without resolving symlinks: a link keeps its name."""
    return Path(os.path.abspath(os.fspath(path)))


def _is_inside(path: Path, root: Path) -> bool:
    return path != root and root in path.parents


@dataclass
class _Lister:
    gif_as_video: bool
    columns: ParquetColumns
    stats: ListingStats

    def kind_of(self, path: Path) -> MediaKind | None:
        kind = media_kind(path)
        if kind == "image" and self.gif_as_video and os.fspath(path).lower().endswith(".gif"):
            return "video"
        return kind  # type: ignore[return-value]

    def entry(self, path: Path, root: Path, origin: str, key: str | None = None) -> Listed:
        key = key_for(path, root) if key is None else key
        kind = self.kind_of(path)
        if kind is None:
            reason = f"{path.suffix or 'no extension'}: not a recognized image or video extension ({origin})"
            return Listed(Failure(key, "source", "UnsupportedMedia", reason), path, origin)
        return Listed(Sample(key, path, kind), path, origin)

    def folder(self, folder: Path, root: Path, origin: str) -> Iterator[Listed]:
        # Keys by string concatenation (what key_for gives for a path under `folder`): building
        # and relating Path objects was most of the listing's time at millions of files.
        prefix = "" if folder == root else key_for(folder, root) + "/"
        for path, relative, failure in _walk(folder, root):
            if failure is not None:
                yield Listed(failure, path, origin)
            elif _is_container(relative):
                yield self.container(path, prefix + escape_text(relative))
            elif media_kind(relative) is None:
                self.stats.ignored += 1
            else:
                yield self.entry(path, root, origin, prefix + escape_text(relative))

    def container(self, path: Path, label: str) -> WholeUnit:
        """A tar shard or Parquet file is one unit of its own. Its members are identified by
        their location (`shard.tar:member`), and a member whose key is taken becomes an error
        record (DuplicateKey), not a stop."""
        if webdataset.is_tar(path):
            found = webdataset.tar_samples(path, label, self.gif_as_video)
        else:
            found = parquet.parquet_samples(path, label, self.columns)
        members = []
        for item in found:
            if item is None:
                self.stats.ignored += 1  # a sample or row without media
            elif isinstance(item, Failure):
                members.append(Listed(item, f"{label}\0{item.key}", label))
            else:
                members.append(Listed(item, item.location, label, _short_location(item, label)))
        return WholeUnit(tuple(members))

    def manifest(self, manifest: Path, root: Path) -> Iterator[Listed]:
        for location, text in _manifest_entries(manifest):
            if not text:
                raise UsageError(f"{location}: empty path")
            yield self.entry(_absolute(root / text), root, location)


def _short_location(sample: Sample, label: str) -> str:
    """`00001.tar:000123.jpg` or `train.parquet:row 17`: a container sample as the user sees it."""
    member = sample.member
    if member is None:
        return escape_text(label)
    detail = escape_text(member.name) if hasattr(member, "name") else f"row {member.file_row}"  # type: ignore[union-attr]
    return f"{escape_text(label)}:{detail}"


def _walk(folder: Path, root: Path) -> Iterator[tuple[Path, str, Failure | None]]:
    """Every non-directory entry under `folder` (symlinks followed, loops skipped), depth first, in
    the order of their keys (a folder sorts as its name plus '/'), with a Failure for a subfolder
    that cannot be listed. Only one folder's names are held at a time, per level of depth."""

    def visit(
        directory: Path, relative: str, ancestors: frozenset[tuple[int, int]]
    ) -> Iterator[tuple[Path, str, Failure | None]]:
        try:
            info = directory.stat()
            identity = (info.st_dev, info.st_ino)
            if identity in ancestors:
                return  # a symlink back to a folder we are inside: a loop
            names = []
            with os.scandir(directory) as scan:
                for entry in scan:
                    try:
                        is_dir = entry.is_dir()  # follows symlinks; a broken link is not a folder
                    except OSError:
                        is_dir = False
                    names.append(entry.name + "/" if is_dir else entry.name)
        except OSError as error:
            message = f"cannot list folder {escape_text(str(directory))}: {error.strerror}"
            if directory == folder:
                raise UsageError(message) from error
            yield directory, relative, Failure(key_for(directory, root), "source", type(error).__name__, message)
            return
        names.sort()
        inner = ancestors | {identity}
        for name in names:
            if name.endswith("/"):
                yield from visit(directory / name[:-1], relative + name, inner)
            else:
                yield directory / name, relative + name, None

    yield from visit(folder, "", frozenset())


def _manifest_entries(manifest: Path) -> Iterator[tuple[str, str]]:
    """(location, path text) for every media path a manifest names, in manifest order. Text and
    JSON Lines manifests stream line by line; a LLaVA .json list is parsed whole."""
    suffix = manifest.suffix.lower()
    try:
        handle = open(manifest, "rb")
    except OSError as error:
        raise UsageError(f"cannot read manifest {manifest}: {error.strerror}") from error
    with handle:
        if suffix == ".txt":
            for number, line in enumerate(handle, start=1):
                if number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                entry = os.fsdecode(line.rstrip(b"\r\n")).strip()  # non-UTF-8 bytes survive as in a file name
                if entry and not entry.startswith("#"):
                    yield f"{manifest.name} line {number}", entry
            return
        if suffix == ".jsonl":
            for number, raw_line in enumerate(handle, start=1):
                try:
                    line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise UsageError(f"manifest {manifest} is not UTF-8 text: {error}") from error
                if not line.strip():
                    continue
                location = f"{manifest.name} line {number}"
                yield from _record_paths(_parse_json(line, location), location)
            return
        raw = handle.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UsageError(f"manifest {manifest} is not UTF-8 text: {error}") from error
    records = _parse_json(text, f"manifest {manifest}", whole_file=True)
    if not isinstance(records, list):
        raise UsageError(f"manifest {manifest}: expected a list of records (LLaVA format), got {type(records).__name__}")
    for number, record in enumerate(records):
        yield from _record_paths(record, f"{manifest.name} record {number}")


MAX_JSON_DIGITS = 100
"""Longest integer a manifest may hold. Python's int() refuses more than 4,300 digits with a
message about sys.set_int_max_str_digits, and a manifest has no use for even 100."""


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_DIGITS:
        raise _NumberTooLong(f"a number of {len(digits):,} digits (at most {MAX_JSON_DIGITS} are read)")
    return int(digits)


class _NumberTooLong(ValueError):
    pass


def _parse_json(text: str, location: str, *, whole_file: bool = False) -> object:
    """One JSON document of a manifest, or a UsageError in one line: syntax errors, integers too
    long to mean anything, and nesting deeper than Python's JSON parser goes (it stops with a
    RecursionError at about a thousand levels, long before memory is at risk)."""
    try:
        return json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as error:
        where = f" at line {error.lineno}" if whole_file else ""
        raise UsageError(f"{location}: not valid JSON ({error.msg}{where})") from None
    except _NumberTooLong as error:
        raise UsageError(f"{location}: holds {error}") from None
    except RecursionError:
        raise UsageError(f"{location}: JSON nested more deeply than can be read") from None


def _record_paths(record: object, location: str) -> Iterator[tuple[str, str]]:
    if not isinstance(record, dict):
        raise UsageError(f"{location}: expected an object with a path, image or video field")
    for name in RECORD_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not isinstance(item, str):
                raise UsageError(f"{location}: {name!r} must be a path or a list of paths; got {printable(repr(item), 60)}")
            yield location, item


# --- a manifest resolved against the wrong folder --------------------------------------------------

ROOT_CHECK_PATHS = 100
"""Relative paths at the head of a manifest checked for existence before a run starts."""
_JSON_HEAD_BYTES = 1 << 20
"""How much of a LLaVA .json the check reads (it is parsed whole only once, by the listing)."""


def check_manifest_root(manifest: Path, root: Path, *, media_root_given: bool) -> None:
    """Refuse a manifest whose relative paths mostly do not exist under the folder they resolve
    against, suggesting --media-root: a LLaVA JSON names paths relative to an image folder, not to
    the JSON's own folder, and without this every input would become an error record.

    Only the first `ROOT_CHECK_PATHS` relative paths are looked at (a few stat calls, whatever the
    manifest's size), so that a listing of any length still starts at once. A manifest with a few
    missing files is not refused: those become error records as before. Absolute paths say
    nothing about the root and are not counted.
    """
    relative = [text for _, text in _manifest_head(manifest) if not os.path.isabs(text)]
    missing = [text for text in relative if not os.path.lexists(root / text)]
    if not relative or 2 * len(missing) <= len(relative):
        return
    counted = f"{len(missing)} of the first {len(relative)} relative paths in {escape_text(str(manifest))}"
    example = escape_text(missing[0])
    found = _folder_holding(missing, root)
    hint = f"; they are under {escape_text(str(found))}: --media-root {escape_text(str(found))}" if found else ""
    if media_root_given:
        raise UsageError(
            f"{counted} do not exist under --media-root {escape_text(str(root))} (e.g. {example!r}): "
            f"is it the folder they are relative to?{hint}"
        )
    raise UsageError(
        f"{counted} do not exist under the manifest's folder {escape_text(str(root))} (e.g. {example!r}); "
        f"give the folder they are relative to with --media-root{hint}"
    )


def _folder_holding(missing: Sequence[str], root: Path) -> Path | None:
    """The working folder or a folder above the root where most of the missing paths exist."""
    probe = missing[:10]
    for folder in (_absolute(Path.cwd()), *list(root.parents)[:3]):
        if folder != root and 2 * sum(os.path.lexists(folder / text) for text in probe) > len(probe):
            return folder
    return None


def _manifest_head(manifest: Path) -> Iterator[tuple[str, str]]:
    """The first `ROOT_CHECK_PATHS` (location, path text) of a manifest, without reading it all: a
    LLaVA .json is decoded record by record from its first MiB (fewer paths when records are huge)."""
    from contextlib import closing
    from itertools import islice

    if manifest.suffix.lower() != ".json":
        with closing(_manifest_entries(manifest)) as entries:
            yield from islice(entries, ROOT_CHECK_PATHS)
        return
    try:
        with open(manifest, "rb") as handle:
            text = handle.read(_JSON_HEAD_BYTES).decode("utf-8-sig", errors="ignore")
    except OSError as error:
        raise UsageError(f"cannot read manifest {manifest}: {error.strerror}") from error
    paths = (path for number, record in enumerate(_json_list_head(text)) for path in _record_paths(record, f"{manifest.name} record {number}"))
    yield from islice(paths, ROOT_CHECK_PATHS)


def _json_list_head(text: str) -> Iterator[object]:
    """The complete records at the start of a JSON list held in `text` (the head of a file); stops
    quietly at the first thing it cannot decode (the listing's own parse reports real errors)."""
    import re

    space = re.compile(r"\s*")
    decoder = json.JSONDecoder()
    position = space.match(text).end()  # type: ignore[union-attr]
    if not text.startswith("[", position):
        return
    position = space.match(text, position + 1).end()  # type: ignore[union-attr]
    while position < len(text) and text[position] != "]":
        try:
            record, position = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):  # JSONDecodeError, or too long or too deep: see _parse_json
            return
        yield record
        position = space.match(text, position).end()  # type: ignore[union-attr]
        if not text.startswith(",", position):
            return
        position = space.match(text, position + 1).end()  # type: ignore[union-attr]
