"""Cheap media metadata: size (and for videos frame count and rate) without decoding pixels.

Used by `check-grid FILE`, and to estimate a sample's cost (tokens after resizing) before any
decoding, e.g. for balancing work across ranks.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from merge_cli.errors import MediaError, error_text
from merge_cli.records import media_kind

# EXIF orientations 5..8 rotate by 90 degrees: the displayed image has height and width swapped.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class MediaInfo:
    """What a file header says. Sizes are as displayed (after EXIF orientation)."""

    kind: str
    height: int
    width: int
    num_frames: int = 1
    fps: float | None = None
    duration: float | None = None


def probe_media(path: Path | str) -> MediaInfo:
    """Read a file's header. Raises MediaError (stage `probe`) when it cannot."""
    path = Path(path)
    kind = media_kind(path)
    if kind is None:
        raise MediaError("probe", "not a recognized image or video extension", "UnsupportedMedia")
    if not path.is_file():
        raise MediaError("probe", "no such file", "FileNotFoundError")
    return probe_image(path) if kind == "image" else probe_video(path)


_pillow_lock = threading.Lock()
_pillow_users = 0
_pillow_saved_limit: int | None = None


@contextmanager
def pillow_limit_lifted() -> Iterator[None]:
    """Switch off Pillow's global decompression-bomb check (`Image.MAX_IMAGE_PIXELS`) inside.

    merge-cli applies its own explicit, configurable limit from the header instead (see
    `images.py`), which Pillow's global could otherwise undercut. Reference-counted under a lock, so
    that threads probing at once (cost estimates) restore Pillow's value exactly once, at the end.
    """
    from PIL import Image

    global _pillow_users, _pillow_saved_limit
    with _pillow_lock:
        if _pillow_users == 0:
            _pillow_saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pillow_users += 1
    try:
        yield
    finally:
        with _pillow_lock:
            _pillow_users -= 1
            if _pillow_users == 0:
                Image.MAX_IMAGE_PIXELS = _pillow_saved_limit


def image_orientation(image) -> int:
    """The EXIF orientation (1..8) of an opened Pillow image; 1 when it has none. Reads headers only."""
    exif = _png_header_exif(image) if image.format == "PNG" and "exif" not in image.info else image.getexif()
    orientation = exif.get(_EXIF_ORIENTATION_TAG, 1)
    return orientation if orientation in range(1, 9) else 1


# A chunk header is 12 bytes: this many chunks is hundreds of MB of nothing but headers.
_MAX_PNG_CHUNKS = 1 << 20


def _png_header_exif(image):
    """A PNG's EXIF from its chunk headers, never by decoding.

    A PNG may put its eXIf chunk after the image data, which Pillow's `getexif()` reaches by
    decoding every pixel (916 MB for a 30000x30000 image, for one number). The chunks are walked
    here, their data skipped with seeks; an eXIf found is stored as Pillow's own chunk reader
    stores it, and the base class's `getexif` (which never decodes) reads it with the other
    header sources of orientation (text profiles, XMP).
    """
    from PIL import Image

    data = _png_exif_chunk(image.fp)
    if data is not None:
        image.info["exif"] = b"Exif\x00\x00" + data
    return Image.Image.getexif(image)


def _png_exif_chunk(fp) -> bytes | None:
    """The data of the eXIf chunk of the PNG open in `fp`, or None; `fp`'s position is kept."""
    try:
        position = fp.tell()
    except (AttributeError, OSError, ValueError):  # no file (decoded and closed) or not seekable
        return None
    try:
        fp.seek(8)  # past the signature
        for _ in range(_MAX_PNG_CHUNKS):
            header = fp.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                data = fp.read(length)
                return data if len(data) == length else None
            if kind == b"IEND":
                return None
            fp.seek(length + 4, os.SEEK_CUR)  # the chunk's data and CRC
        return None
    except (OSError, ValueError):
        return None
    finally:
        fp.seek(position)


def transposes(orientation: int) -> bool:
    """Whether an EXIF orientation rotates by 90 degrees (height and width swap on display)."""
    return orientation in _TRANSPOSING_ORIENTATIONS


def probe_image(path: Path, stage: str = "probe") -> MediaInfo:
    """Size as displayed, from the header only (no pixel decoding; any size can be probed)."""
    from PIL import Image

    try:
        with pillow_limit_lifted(), Image.open(path) as image:
            width, height = image.size
            orientation = image_orientation(image)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise MediaError(stage, error_text(error), type(error).__name__) from error
    if transposes(orientation):
        height, width = width, height
    return MediaInfo("image", height, width)


def av_input(source: Path | str | bytes):
    """What av.open reads: a path as text, or a fresh in-memory buffer over a container's bytes."""
    import io

    return io.BytesIO(source) if isinstance(source, bytes) else str(source)


def probe_video(path: Path | bytes, stage: str = "probe") -> MediaInfo:
    """A video's header; `path` may be the bytes of a tar member or a Parquet cell."""
    import av

    try:
        with av.open(av_input(path)) as container:
            if not container.streams.video:
                raise MediaError(stage, "no video stream", "NoVideoStream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = float(stream.average_rate) if stream.average_rate else None
            # An estimate for planning: a container's duration will do when the stream has none.
            duration = stream_duration(container, stream, whole_container=True)
            num_frames = header_frame_count(container, stream, fps, whole_container=True) or 0
    except MediaError:
        raise
    except (OSError, ValueError, av.FFmpegError) as error:
        raise MediaError(stage, error_text(error), type(error).__name__) from error
    if not width or not height:
        raise MediaError(stage, "video stream has no frame size", "NoVideoStream")
    return MediaInfo("video", height, width, num_frames, fps, duration)


def stream_duration(container, stream, *, whole_container: bool) -> float | None:
    """Seconds of a PyAV video stream by its header: the stream's own duration, else (only with
    `whole_container`) the container's, which also covers any audio track."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if whole_container and container.duration is not None:
        return container.duration / 1_000_000  # container durations are in microseconds
    return None


def header_frame_count(container, stream, rate: float | None, *, whole_container: bool) -> int | None:
    """Frames a video stream's header promises: its own count, else duration x rate; None when
    the header does not say."""
    if stream.frames:
        return int(stream.frames)
    duration = stream_duration(container, stream, whole_container=whole_container)
    if duration is None or not rate:
        return None
    return round(duration * float(rate))
