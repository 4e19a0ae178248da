"""The small typed records that flow between stages.

sources -> Sample -> media -> Item | Failure -> tower + merger -> Features | Failure -> store
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is only needed by those who hold tensors
    import torch

MediaKind = Literal["image", "video"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".mov", ".avi"})

def media_kind(path: Path | str) -> MediaKind | None:
    """`image`, `video`, or None for an extension merge-cli does not read."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()  # Path(path).suffix, without parsing a Path
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    return None


def escape_text(text: str) -> str:
    """Make `text` storable UTF-8: undecodable file-name bytes and NUL become backslash escapes.

    On POSIX a file name is bytes; Python decodes the bytes that are not UTF-8 to lone surrogates
    (`caf\\udce9.jpg`), which HDF5 and JSON cannot store. They are written as `\\xe9` instead,
    so the key of the file named b"caf\\xe9.jpg" is the 12-character string `caf\\xe9.jpg`.
    HDF5 strings end at a NUL byte, so a NUL (possible in a manifest) is written as `\\x00`.
    """
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name (e.g. JSON "\ud800")
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\0", "\\x00") if "\0" in text else text


MAX_KEY_BYTES = 4096
"""Longest key stored (UTF-8 bytes; Linux's PATH_MAX): a longer one is an error record instead."""
MAX_TEXT_CHARS = 4096
"""Error-record fields (messages) longer than this are cut when stored."""


def key_problem(key: str) -> str | None:
    """Why `key` cannot be stored as a sample key, or None when it can: HDF5 keeps UTF-8 text
    without NUL bytes, and keys are bounded (a key is read per lookup)."""
    if "\0" in key:
        return "the key holds a NUL byte"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "the key is not valid Unicode text (a lone surrogate)"
    if size > MAX_KEY_BYTES:
        return f"the key is {size:,} bytes long (at most {MAX_KEY_BYTES:,})"
    return None


def storable_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """`text` escaped as `escape_text` does and cut to `limit` characters (with a note of how many
    were cut): every string field of an error record goes through this before it is stored."""
    text = escape_text(str(text))
    if len(text) > limit:
        text = f"{text[: limit - 32]}... ({len(text) - limit + 32:,} more characters)"
    return text


# C0 and C1 controls (ESC starts ANSI/OSC sequences, CR rewrites a line), DEL, the Unicode line
# separators, and the bidirectional overrides/isolates that reorder what a terminal shows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escaped_char(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, limit: int | None = None) -> str:
    """`text` from a file or an input, safe to print for a human: valid UTF-8 (see escape_text),
    control characters written as backslash escapes (`\\x1b`, `\\x0a`), so that a file name cannot
    move the cursor or retitle the terminal, and, given `limit`, cut after that many characters
    with the full length said. JSON output keeps the exact text; this is for terminals only."""
    text = str(text)
    length = len(text)
    if limit is not None and length > limit:
        text = text[:limit]  # cut first: escaping a 50 MB attribute to show 200 characters is waste
    text = _UNPRINTABLE.sub(_escaped_char, escape_text(text))
    if limit is not None and length > limit:
        text += f"... ({length:,} characters)"
    return text


@dataclass(frozen=True)
class TarMember:
    """Where a sample's bytes lie inside a tar shard: read with one seek, never unpacked."""

    name: str
    """The member's path inside the tar (its extension says image or video)."""
    offset: int
    """Byte offset of the member's data in the tar file."""
    size: int


@dataclass(frozen=True)
class ParquetCell:
    """Where a sample's bytes lie inside a Parquet file: one value of one row."""

    row_group: int
    row: int
    """Row number within the row group."""
    file_row: int
    """Row number within the file (for messages and keys)."""
    column: str
    """A binary column, or a struct column holding {bytes, path} (Hugging Face `datasets` Image)."""


@dataclass(frozen=True)
class Sample:
    """One input to extract: where it is and the key its features are stored under."""

    key: str
    """Stable key: path relative to the scanned folder or --media-root, POSIX separators; a tar
    sample's WebDataset `__key__`; a Parquet row's key column."""
    path: Path
    """Where the file is on disk (absolute): the media file, or the tar / Parquet file holding it."""
    kind: MediaKind
    member: TarMember | ParquetCell | None = None
    """For media inside a container: where in `path` its bytes are; None for a file of its own."""

    @property
    def suffix(self) -> str:
        """The media's extension, lowercase (`.jpg`); empty for a Parquet value, which has none."""
        if isinstance(self.member, ParquetCell):
            return ""
        name = self.member.name if isinstance(self.member, TarMember) else self.path.name
        return Path(name).suffix.lower()

    @property
    def location(self) -> str:
        """Where the sample is: the path, `shard.tar:member` or `file.parquet:row N:column`."""
        if isinstance(self.member, TarMember):
            return f"{self.path}:{self.member.name}"
        if isinstance(self.member, ParquetCell):
            return f"{self.path}:row {self.member.file_row}:{self.member.column}"
        return str(self.path)


@dataclass(frozen=True)
class Failure:
    """An input that could not be turned into features. Stored as an error record, never raised."""

    key: str
    stage: str
    """Where it failed: open, probe, decode, resize, tower, write, ..."""
    error_type: str
    """The cause's type name, e.g. UnidentifiedImageError, DecompressionBombError, OutOfMemoryError."""
    message: str


@dataclass
class Item:
    """A decoded, resized input ready for a tower (not yet normalized)."""

    key: str
    kind: MediaKind
    pixels: torch.Tensor
    """uint8 (T, 3, H, W), H and W multiples of patch_size * merge_size; T = 1 for images."""
    orig_hw: tuple[int, int]
    """Size of the source as displayed (after EXIF orientation), before resizing."""
    resized_hw: tuple[int, int]
    decoder: str
    """What read the pixels: pillow, decord or pyav."""
    processor_grid: tuple[int, int] | None = None
    """The patch grid the checkpoint's processor gives (differs from the grid used only when that
    one could not merge and was made even); None when unknown."""
    frame_indices: list[int] = field(default_factory=list)
    """For videos: the source frame index of every sampled frame."""
    frame_times: list[float] = field(default_factory=list)
    """For videos: the timestamp in seconds of every sampled frame."""

    @property
    def num_frames(self) -> int:
        return int(self.pixels.shape[0])


@dataclass
class Features:
    """One sample's output, ready to store."""

    key: str
    kind: MediaKind
    tokens: torch.Tensor
    """(t, h/m * w/m, D) on CPU, in the stored dtype."""
    grid_thw: tuple[int, int, int]
    """Frames (or temporal patches), patch rows and patch columns before merging."""
    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    decoder: str
    frame_indices: list[int] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)
    processor_grid: tuple[int, int] | None = None
    """Patch rows and columns the checkpoint's processor gives (grid_thw's unless made even)."""


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 sample`, `2 samples`, `1,000 videos` (`nouns` for irregular plurals)."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"
