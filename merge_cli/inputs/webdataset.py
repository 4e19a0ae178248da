"""WebDataset tar shards -> samples keyed by their `__key__`, read in place (never unpacked).

Follows WebDataset's conventions: members are grouped in tar order; consecutive members whose
paths share everything up to the first dot of the basename (`shard/000123.jpg`,
`shard/000123.json` -> `shard/000123`) form one sample, whose `__key__` that prefix is. Member
names without a dot in the basename, names starting with a dot, `__meta__` members and anything
that is not a regular file are passed over, as WebDataset's loader does.

The media member is picked by its last extension (images and videos as for loose files). A
sample with one media member is stored under its `__key__`; a sample with several (`000123.jpg`
and `000123.seg.png`) stores each under `__key__.EXT` (`000123.jpg`, `000123.seg.png`), the key
plus the field name a WebDataset loader gives it. Samples without media are counted as ignored.

Listing reads only the 512-byte headers (seeking past the data); a sample remembers its member's
data offset and size, and decoding reads exactly those bytes. Damage becomes error records and
never loses the members before it: a tar that is not a tar, or whose headers stop early, gives
a record keyed by the shard; a member whose data is cut off gives a record under its key.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from merge_cli.errors import MediaError, UsageError
from merge_cli.records import (
    Failure,
    MediaKind,
    Sample,
    TarMember,
    escape_text,
    media_kind,
)

TAR_SUFFIX = ".tar"
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
_BRACE_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
_GLOB_CHARS = frozenset("*?[")
_BLOCK = tarfile.BLOCKSIZE


def is_tar(path: Path | str) -> bool:
    return str(path).lower().endswith(TAR_SUFFIX)


def refuse_compressed(path: Path | str) -> None:
    """A compressed tar cannot be read by offset: refuse it with the fix."""
    if str(path).lower().endswith(COMPRESSED_TAR_SUFFIXES):
        raise UsageError(
            f"--input {path}: a compressed tar cannot be read member by member; "
            "decompress it to a plain .tar (WebDataset shards of JPEGs gain nothing from compression)"
        )


def is_pattern(text: str) -> bool:
    """Whether an --input holds a glob (`*.tar`) or a brace range/list (`{00000..00099}`)."""
    return bool(_GLOB_CHARS & set(text)) or bool(_BRACE_RANGE.search(text) or _BRACE_LIST.search(text))


def expand_pattern(text: str) -> list[str]:
    """Brace ranges and lists as WebDataset writes them, then globs; sorted within each glob.

    `shards/{00000..00002}.tar` -> `shards/00000.tar`, `shards/00001.tar`, `shards/00002.tar`
    (zero padding kept); `{a,b}` lists; `*`, `?`, `[...]` globs. Brace results are kept in
    order and must exist; a glob that matches nothing contributes nothing.
    """
    import glob

    found: list[str] = []
    for expanded in _expand_braces(text):
        if _GLOB_CHARS & set(expanded):
            found.extend(sorted(glob.glob(expanded)))
        else:
            found.append(expanded)
    return found


def _expand_braces(text: str) -> list[str]:
    """Expand the leftmost brace first, as a shell (and WebDataset's braceexpand) does."""
    found = [m for m in (_BRACE_RANGE.search(text), _BRACE_LIST.search(text)) if m is not None]
    if not found:
        return [text]
    match = min(found, key=lambda m: m.start())
    head, tail = text[: match.start()], text[match.end() :]
    if match.re is _BRACE_RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.lstrip("-").startswith("0") and len(first) > 1 else 0
        step = 1 if int(last) >= int(first) else -1
        values = [f"{number:0{width}d}" for number in range(int(first), int(last) + step, step)]
    else:
        values = match.group(1).split(",")
    return [expanded for value in values for expanded in _expand_braces(head + value + tail)]


def split_member_name(name: str) -> tuple[str, str] | None:
    """(`__key__`, extension) of a member path, or None for a member WebDataset passes over.

    The key is the path up to the first dot of the basename; the extension is the rest,
    lowercased as WebDataset's loader does (`a/b/000123.Seg.PNG` -> (`a/b/000123`, `seg.png`)).
    """
    folder, _, basename = name.rpartition("/")
    if "." not in basename or basename.startswith("."):
        return None
    stem, extension = basename.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def tar_samples(path: Path, label: str, gif_as_video: bool = False) -> Iterator[Sample | Failure | None]:
    """Every sample of one tar shard, in tar order, and a Failure for whatever is damaged.

    `label` names the shard in messages and in its shard-level error records (the input as the
    user wrote it, e.g. `shards/00001.tar`), and None for each sample without media. Yields
    samples as their groups complete, so a shard of any size is listed in constant memory.
    """
    try:
        size = os.stat(path).st_size
        handle = open(path, "rb")
    except OSError as error:
        yield Failure(label, "source", type(error).__name__, f"cannot read tar shard {label}: {error.strerror}")
        return
    with handle:
        try:
            archive = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.TarError as error:
            yield Failure(label, "source", "NotATar", f"{label} is not a tar file ({error})")
            return
        group: list[tarfile.TarInfo] = []
        group_key: str | None = None
        last_complete: str | None = None
        members = iter(archive)
        broken = False
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except (tarfile.TarError, OSError) as error:
                yield _damaged(label, last_complete, str(error))
                broken = True
                break
            if not member.isreg() or _META_MEMBER.match(member.name):
                continue
            parts = split_member_name(member.name)
            if parts is None:
                continue
            if parts[0] != group_key and group:
                yield from _group_samples(group, path, label, size, gif_as_video)
                group = []
            group_key = parts[0]
            group.append(member)
            if member.offset_data + member.size <= size:
                last_complete = member.name
        if group:
            yield from _group_samples(group, path, label, size, gif_as_video)
        if not broken:
            problem = _end_problem(handle, archive.offset, size)
            if problem is not None:
                yield _damaged(label, last_complete, problem)


def _end_problem(handle, offset: int, size: int) -> str | None:
    """Why the headers ended at `offset` when that is not at a proper end-of-archive block."""
    handle.seek(offset)
    block = handle.read(_BLOCK)
    if len(block) < _BLOCK:
        return f"the file ends at byte {size} without the end-of-archive block"
    if block.count(0) != len(block):
        return f"the header at byte {offset} is not a tar header"
    return None


def _damaged(label: str, last_complete: str | None, problem: str) -> Failure:
    after = f"members after {last_complete} are lost" if last_complete else "no member could be read"
    return Failure(label, "source", "TruncatedTar", f"{label} is truncated or damaged: {problem}; {after}")


def _group_samples(
    group: list[tarfile.TarInfo], path: Path, label: str, size: int, gif_as_video: bool
) -> Iterator[Sample | Failure | None]:
    """The samples of one `__key__` group: one per media member (see the module doc for keys)."""
    key = split_member_name(group[0].name)[0]  # type: ignore[index]
    media: list[tuple[str, tarfile.TarInfo, MediaKind]] = []
    seen: set[str] = set()
    for member in group:
        extension = split_member_name(member.name)[1]  # type: ignore[index]
        if extension in seen:
            yield Failure(
                f"{label}:{escape_text(member.name)}",
                "source",
                "DuplicateMember",
                f"{label}: a second member {escape_text(member.name)} in sample {escape_text(key)}; the first is kept",
            )
            continue
        seen.add(extension)
        kind = member_kind(member.name, gif_as_video)
        if kind is not None:
            media.append((extension, member, kind))
    if not media:
        yield None
    for extension, member, kind in media:
        sample_key = escape_text(key if len(media) == 1 else f"{key}.{extension}")
        if member.offset_data + member.size > size:
            yield Failure(
                sample_key,
                "open",
                "TruncatedTar",
                f"{label}: member {escape_text(member.name)} is cut off ({member.size} bytes promised, "
                f"{max(0, size - member.offset_data)} present)",
            )
            continue
        yield Sample(sample_key, path, kind, TarMember(member.name, member.offset_data, member.size))


def member_kind(name: str, gif_as_video: bool = False) -> MediaKind | None:
    kind = media_kind(PurePosixPath(name).name)
    if kind == "image" and gif_as_video and name.lower().endswith(".gif"):
        return "video"
    return kind


def read_member(path: Path, member: TarMember) -> bytes:
    """The data of one member: one seek and one read of exactly its bytes."""
    try:
        with open(path, "rb") as handle:
            handle.seek(member.offset)
            data = handle.read(member.size)
    except OSError as error:
        raise MediaError("open", f"cannot read {path}: {error.strerror}", type(error).__name__) from error
    if len(data) != member.size:
        raise MediaError(
            "open",
            f"{path}: member {member.name} is cut off ({member.size} bytes promised, {len(data)} present)",
            "TruncatedTar",
        )
    if not data:
        raise MediaError("open", f"{path}: member {member.name} is empty (0 bytes)", "EmptyFile")
    return data
