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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from merge_cli.errors import UsageError
from merge_cli.inputs import parquet, webdataset
from merge_cli.inputs.parquet import ParquetColumns
from merge_cli.records import Failure, MediaKind, Sample, escape_text, media_kind

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


def collect_samples(
    inputs: Sequence[Path | str],
    media_root: Path | None = None,
    *,
    gif_as_video: bool = False,
    columns: ParquetColumns | None = None,
) -> SampleSet:
    """Every sample the inputs name, keyed and deduplicated, before any decoding.

    Raises UsageError for a missing input, an unreadable or malformed manifest, a Parquet schema
    that does not fit the columns asked for, and for two different loose files that would get
    the same key (naming both and where they came from).
    """
    root = None
    if media_root is not None:
        root = _absolute(media_root)
        if not root.is_dir():
            raise UsageError(f"--media-root {media_root}: not a directory")
    collector = _Collector(gif_as_video, columns or ParquetColumns())
    for raw in inputs:
        for given in _expanded(raw):
            _collect_one(collector, given, root)
    return SampleSet(collector.samples, collector.failures, collector.ignored)


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


def _collect_one(collector: _Collector, raw: Path | str, root: Path | None) -> None:
    path = _absolute(raw)
    if path.is_dir():
        base = root if root is not None and _is_inside(path, root) else path
        collector.add_folder(path, base, origin=f"--input {raw}")
    elif not path.exists():
        raise UsageError(f"--input {raw}: no such file or directory")
    elif _is_container(path):
        base = root if root is not None and _is_inside(path, root) else path.parent
        collector.add_container(path, key_for(path, base))
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        collector.add_manifest(path, root if root is not None else path.parent)
    elif media_kind(path) is not None:
        base = root if root is not None and _is_inside(path, root) else path.parent
        collector.add(path, base, origin=f"--input {raw}")
    else:
        webdataset.refuse_compressed(raw)
        raise UsageError(
            f"--input {raw}: not a folder, an image or video file, a .tar shard, a .parquet file, "
            "or a manifest (.txt, .jsonl, .json)"
        )


def _is_container(path: Path) -> bool:
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
class _Collector:
    gif_as_video: bool
    columns: ParquetColumns
    samples: list[Sample] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    ignored: int = 0
    _seen: dict[str, tuple[Path | str, str]] = field(default_factory=dict)
    """key -> (path or container location, where it came from), for deduplication."""

    def kind_of(self, path: Path) -> MediaKind | None:
        kind = media_kind(path)
        if kind == "image" and self.gif_as_video and path.suffix.lower() == ".gif":
            return "video"
        return kind  # type: ignore[return-value]

    def claim(self, key: str, path: Path | str, origin: str) -> bool:
        """Register `key` for `path`; False when this very file already has it (named twice)."""
        seen = self._seen.get(key)
        if seen is None:
            self._seen[key] = (path, origin)
            return True
        if seen[0] == path:
            return False
        raise UsageError(
            f"two inputs map to the same key {key!r}: {escape_text(str(seen[0]))} (from {seen[1]}) "
            f"and {escape_text(str(path))} (from {origin}); give them different --input folders "
            "or a --media-root that tells them apart"
        )

    def add_container(self, path: Path, label: str) -> None:
        """The samples of a tar shard or Parquet file; a taken key makes an error record, not a stop."""
        if webdataset.is_tar(path):
            found = webdataset.tar_samples(path, label, self.gif_as_video)
        else:
            found = parquet.parquet_samples(path, label, self.columns)
        for item in found:
            if item is None:
                self.ignored += 1  # a sample or row without media
            elif isinstance(item, Failure):
                self.failures.append(item)
            else:
                self._add_member(item, label)

    def _add_member(self, sample: Sample, label: str) -> None:
        location = sample.location
        seen = self._seen.get(sample.key)
        if seen is None:
            self._seen[sample.key] = (location, label)
            self.samples.append(sample)
            return
        if seen[0] == location:
            return  # the same shard named twice
        where = _short_location(sample, label)
        self.failures.append(
            Failure(
                where,
                "source",
                "DuplicateKey",
                f"key {sample.key!r} of {where} is already taken by {escape_text(str(seen[0]))}; "
                "this one is not extracted (give it another key or input)",
            )
        )

    def add(self, path: Path, root: Path, origin: str) -> None:
        key = key_for(path, root)
        kind = self.kind_of(path)
        if not self.claim(key, path, origin):
            return
        if kind is None:
            self.failures.append(
                Failure(
                    key,
                    "source",
                    "UnsupportedMedia",
                    f"{path.suffix or 'no extension'}: not a recognized image or video extension ({origin})",
                )
            )
        else:
            self.samples.append(Sample(key, path, kind))

    def add_folder(self, folder: Path, root: Path, origin: str) -> None:
        found = []
        for path in _walk(folder, self.failures, root):
            if media_kind(path) is None and not _is_container(path):
                self.ignored += 1
            else:
                found.append((key_for(path, root), path))
        for key, path in sorted(found, key=lambda pair: pair[0]):
            if _is_container(path):
                self.add_container(path, key)
            else:
                self.add(path, root, origin)

    def add_manifest(self, manifest: Path, root: Path) -> None:
        for location, text in _manifest_entries(manifest):
            if not text:
                raise UsageError(f"{location}: empty path")
            self.add(_absolute(root / text), root, location)


def _short_location(sample: Sample, label: str) -> str:
    """`00001.tar:000123.jpg` or `train.parquet:row 17`: a container sample as the user sees it."""
    member = sample.member
    if member is None:
        return escape_text(label)
    detail = escape_text(member.name) if hasattr(member, "name") else f"row {member.file_row}"  # type: ignore[union-attr]
    return f"{escape_text(label)}:{detail}"


def _walk(folder: Path, failures: list[Failure], root: Path) -> Iterator[Path]:
    """Every non-directory entry under `folder` (symlinks followed, loops skipped), depth first."""

    def visit(directory: Path, ancestors: frozenset[tuple[int, int]]) -> Iterator[Path]:
        try:
            info = directory.stat()
            identity = (info.st_dev, info.st_ino)
            if identity in ancestors:
                return  # a symlink back to a folder we are inside: a loop
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            message = f"cannot list folder {escape_text(str(directory))}: {error.strerror}"
            if directory == folder:
                raise UsageError(message) from error
            failures.append(Failure(key_for(directory, root), "source", type(error).__name__, message))
            return
        inner = ancestors | {identity}
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks; a broken link is not a folder
            except OSError:
                is_dir = False
            if is_dir:
                yield from visit(Path(entry.path), inner)
            else:
                yield Path(entry.path)

    yield from visit(folder, frozenset())


def _manifest_entries(manifest: Path) -> Iterator[tuple[str, str]]:
    """(location, path text) for every media path a manifest names, in manifest order."""
    suffix = manifest.suffix.lower()
    try:
        raw = manifest.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read manifest {manifest}: {error.strerror}") from error
    if suffix == ".txt":
        text = raw.removeprefix(b"\xef\xbb\xbf")
        for number, line in enumerate(text.splitlines(), start=1):
            entry = os.fsdecode(line).strip()  # non-UTF-8 bytes survive as in a file name
            if entry and not entry.startswith("#"):
                yield f"{manifest.name} line {number}", entry
        return
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UsageError(f"manifest {manifest} is not UTF-8 text: {error}") from error
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            location = f"{manifest.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{location}: not valid JSON ({error.msg})") from error
            yield from _record_paths(record, location)
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"manifest {manifest}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(records, list):
        raise UsageError(f"manifest {manifest}: expected a list of records (LLaVA format), got {type(records).__name__}")
    for number, record in enumerate(records):
        yield from _record_paths(record, f"{manifest.name} record {number}")


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
                raise UsageError(f"{location}: {name!r} must be a path or a list of paths; got {item!r}")
            yield location, item
