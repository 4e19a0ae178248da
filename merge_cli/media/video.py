"""Video frames: which frames to sample (a pure function), and the decoders that read them.

`sample_frame_indices` decides *which* frames a video gives; a decoder (`VideoSource`) decides
*how* they are read. Every decoder takes the same request, `read(indices, size, seek)`, and
returns the frames already at the target size, so that a decoder that can scale on the way out
(swscale in PyAV and decord, later an NVDEC scaler) never makes a full-size RGB frame:

  exact     the frames at `indices` (the frame at, or the first after, each index). PyAV seeks only
            when the next index lies in a later GOP (from the container's keyframe index), decodes
            forward otherwise, and does not decode non-reference frames that are not kept.
  keyframe  each index snaps to its nearest keyframe and only that frame is decoded: one decoded
            frame per sample. The returned indices are the keyframes really used.

Sources are paths or in-memory bytes / file-like objects (videos inside tar or Parquet files).
Which decoder reads a file first is chosen per file (`decoder_order`); the other is the fallback
for files the first cannot open or read. Frame timestamps are `index / fps` for every decoder, so
that a record does not depend on which one read the file.

A GPU decoder (NVDEC) fits as one more `VideoSource` subclass listed in `DECODERS`: it reads the
same request and may return a torch tensor on its device instead of a numpy array.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from merge_cli.config import VideoOptions
from merge_cli.errors import MediaError

VideoInput = Union[Path, bytes, bytearray, memoryview, BinaryIO]
"""A video on disk, or in memory: its bytes or a seekable binary file object."""

SEEK_MODES = ("exact", "keyframe")

DECORD_THREADS = 1
"""decord's decoding threads per reader when nothing else is said: DataLoader workers give the
parallelism; 0 (decord's default, one per core) oversubscribes the CPU once several workers each
open a video."""

DECODE_CHUNK = 8
"""Frames asked of decord per `get_batch` call: bounds its memory to a few frames at a time."""

SCALE_INTERPOLATION = "BICUBIC"
"""swscale's filter for scaling in the decoder when the resize filter is bicubic (the default).
Against merge-cli's earlier full-size RGB + Pillow bicubic it measures about 47 dB PSNR
(benchmarks/README.md)."""

SWSCALE_FILTERS = {
    "bicubic": SCALE_INTERPOLATION,
    "bilinear": "BILINEAR",
    "lanczos": "LANCZOS",
    "nearest": "POINT",
    "box": "AREA",
    "hamming": "BILINEAR",  # swscale has no Hamming window; bilinear is the closest of its filters
}
"""swscale's filter for each Pillow resampling filter a processor may name."""

SKIP_NONREF_CODECS = frozenset({"h264"})
"""Codecs whose non-reference frames are left undecoded when not kept. Only H.264, checked bit for
bit against decoding every frame (tests/test_video.py). H.265 was bit-exact too on one x265 clip,
but an HEVC "sub-layer non-reference" frame may still be referenced from a higher temporal layer,
so H.265 and the rest decode every frame from the keyframe on until that is checked."""

_SEEK_AHEAD_SECONDS = 2.0
"""PyAV without a keyframe index: decode forward (no seek) when the next frame is this close."""

_FPS_TOLERANCE = 1e-6


def sample_frame_indices(total_frames: int, video_fps: float, options: VideoOptions) -> list[int]:
    """Indices of the frames to sample, evenly spread over the range, ascending and unique.

    The range is [ceil(start * fps), floor(end * fps)] clipped to the video (the whole video by
    default). The count is `num_frames` exactly, or else round(range duration * `options.fps`)
    clamped to [min_frames, max_frames]; either is then capped by the frames the range has: a
    short video gets all its frames, never an error. The indices are round(linspace(first, last,
    n)), as qwen-vl-utils does. Under the `qwen` rule the count is qwen-vl-utils' own
    (`smart_nframes`: floored to a multiple of the temporal patch, `processor.qwen_frame_count`).
    An empty list means the range holds no frame (e.g. a start past the end of the video).
    """
    if total_frames <= 0 or not video_fps > 0:
        return []
    if options.num_frames is None and (options.min_frames is None or options.max_frames is None or options.fps is None):
        options = options.resolved(28)  # unset counts take the native defaults (no pixel setting is read here)
    first, last = 0, total_frames - 1
    if options.start is not None:
        first = max(first, math.ceil(options.start * video_fps - _FPS_TOLERANCE))
    if options.end is not None:
        last = min(last, math.floor(options.end * video_fps + _FPS_TOLERANCE))
    if first > last:
        return []
    available = last - first + 1
    if options.rule == "qwen":
        wanted = _qwen_count(available, video_fps, options)
    elif options.num_frames is not None:
        wanted = min(options.num_frames, available)
    else:
        assert options.fps is not None and options.min_frames is not None and options.max_frames is not None
        wanted = round(available / video_fps * options.fps)
        wanted = max(1, min(max(wanted, options.min_frames), options.max_frames, available))
    indices = np.round(np.linspace(first, last, wanted)).astype(np.int64)
    return sorted({int(index) for index in indices})


def _qwen_count(available: int, video_fps: float, options: VideoOptions) -> int:
    """qwen-vl-utils' frame count: `num_frames` (a multiple of the temporal patch, checked in
    VideoOptions) capped by the range as its fps rule is (floored to the multiple; a range shorter
    than one temporal patch gives all its frames), or its fps rule."""
    from merge_cli.media.processor import qwen_frame_count

    multiple = options.frame_multiple
    if options.num_frames is not None:
        if options.num_frames <= available:
            return options.num_frames
        return available // multiple * multiple or available
    assert options.fps is not None and options.min_frames is not None and options.max_frames is not None
    return qwen_frame_count(available, video_fps, options.fps, options.min_frames, options.max_frames, multiple)


def frame_times(indices: Sequence[int], video_fps: float) -> list[float]:
    """Timestamp in seconds of each frame index."""
    return [index / video_fps for index in indices]


def snap_to_keyframes(indices: Sequence[int], keyframes: Sequence[int]) -> list[int]:
    """Each index moved to its nearest keyframe (the earlier one on a tie).

    Only keyframes inside [indices[0], indices[-1]] are candidates when there are any, so that a
    --video-start/--video-end range is not left; two indices may snap to the same keyframe.
    """
    if not indices or not keyframes:
        return list(indices)
    inside = [k for k in keyframes if indices[0] <= k <= indices[-1]] or sorted(keyframes)
    snapped = []
    for index in indices:
        after = bisect.bisect_left(inside, index)
        candidates = inside[max(0, after - 1) : after + 1]
        snapped.append(min(candidates, key=lambda k: (abs(k - index), k)))
    return snapped


@dataclass(frozen=True)
class VideoHeader:
    """What the container says about its first video stream, without decoding."""

    codec: str
    height: int
    width: int
    fps: float
    promised_frames: int | None
    """The frame count the header promises (see `promised_frames`), or None."""


def _rewound(source: VideoInput):
    """What av.open / decord take for `source`: a path string or a file object at its start."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    if hasattr(source, "read"):
        source.seek(0)
        return source
    return str(source)  # non-UTF-8 names survive as surrogate escapes, which av.open accepts


def read_header(source: VideoInput) -> VideoHeader | None:
    """The header of the first video stream, or None when it cannot be read (the decoders say why)."""
    import av

    try:
        with av.open(_rewound(source)) as container:
            return _header_of(container)
    except Exception:  # an unreadable header: the decoders will say why
        return None


def _header_of(container) -> VideoHeader | None:
    """The header of an open PyAV container's first video stream.

    The promised frame count is the stream's own count when the container keeps one (MP4, MOV,
    AVI); otherwise duration x rate, but only for a file whose single stream is the video, since
    a container's duration also covers its audio. A decoder that finds far fewer frames is reading
    a truncated file.
    """
    from merge_cli.media.probe import header_frame_count

    if not container.streams.video:
        return None
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    context = stream.codec_context
    promised = header_frame_count(container, stream, rate, whole_container=len(container.streams) == 1)
    fps = float(rate) if rate else 0.0
    return VideoHeader(context.name or "", context.height or 0, context.width or 0, fps, promised)


def promised_frames(path: Path) -> int | None:
    """How many frames the header says the video has, or None when it does not say."""
    header = read_header(path)
    return header.promised_frames if header else None


def looks_truncated(found: int, promised: int | None) -> bool:
    """Whether `found` frames fall clearly short of the `promised` count (2 frames or 2% slack)."""
    return promised is not None and found < promised - max(2, 0.02 * promised)


@dataclass
class DecodedFrames:
    """What a decoder read: frames at the requested size, and which source frames they are."""

    pixels: np.ndarray
    """uint8 (T, H, W, 3) at the requested size."""
    indices: list[int]
    """The source frame index of each frame actually used (keyframes in keyframe mode)."""


class DecoderError(Exception):
    """One decoder could not open or read a file; the next decoder gets a try."""

    def __init__(self, decoder: str, stage: str, cause: BaseException):
        super().__init__(f"{decoder}: {cause}")
        self.decoder = decoder
        self.stage = stage
        self.cause = cause
        self.header: VideoHeader | None = None  # what the decoder read of the header before failing


class VideoSource:
    """An opened video: its frame count, rate and size, and its frames by index at a given size.

    Use as a context manager: the reader is released on exit, whatever happened.
    """

    name: str
    num_frames: int
    fps: float
    height: int
    width: int
    header: VideoHeader | None
    """What the container's header says (for the truncation check), when this decoder reads it."""
    reads_header = False
    """Whether opening reads the header anyway (else the caller reads it beforehand, once)."""

    def read(
        self, indices: Sequence[int], size: tuple[int, int] | None, seek: str = "exact", resample: str = "bicubic"
    ) -> DecodedFrames:
        """The frames at `indices` (ascending) scaled to `size` (H, W), per the `seek` mode, with
        the decoder's nearest equivalent of the Pillow filter `resample`; at full size (RGB) when
        `size` is None.

        Raises DecoderError when this decoder cannot read the file (the next one gets a try) and
        MediaError when the file itself is at fault (truncated, nothing decodable).
        """
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class DecordSource(VideoSource):
    """decord's VideoReader on the CPU, scaling in its own filter graph (swscale bicubic).

    decord fixes the output size when it opens a file, so the reader opens at `size_hint` (the
    size the caller expects to ask for) and opens again only when `read` asks for another size.
    """

    name = "decord"

    def __init__(
        self,
        source: VideoInput,
        threads: int = DECORD_THREADS,
        size_hint: tuple[int, int] | None = None,
        header: VideoHeader | None = None,
    ):
        self._source = source
        self.header = header
        self._threads = threads
        self._reader = None
        self._size: tuple[int, int] | None = None
        try:
            self._open(size_hint)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
            self.height, self.width = self._full_size()
        except Exception as error:  # decord raises RuntimeError, DECORDError, UnicodeEncodeError, ...
            self.close()
            raise DecoderError(self.name, "open", error) from error

    def _open(self, size: tuple[int, int] | None) -> None:
        import decord

        from merge_cli.media.native_stderr import quiet_decord

        quiet_decord()
        self.close()
        height, width = size if size is not None else (-1, -1)
        # str(path) fails for non-UTF-8 names (decord encodes it strictly): PyAV takes over.
        self._reader = decord.VideoReader(
            _rewound(self._source), ctx=decord.cpu(0), width=width, height=height, num_threads=self._threads
        )
        self._size = size

    def _full_size(self) -> tuple[int, int]:
        """The frame size before scaling: the header's, else one frame decoded at full size."""
        if self.header is not None and self.header.height and self.header.width:
            return self.header.height, self.header.width
        if self._size is not None:
            self._open(None)
        height, width, _ = self._reader[0].shape
        self._reader.seek(0)
        return int(height), int(width)

    def read(
        self, indices: Sequence[int], size: tuple[int, int] | None, seek: str = "exact", resample: str = "bicubic"
    ) -> DecodedFrames:
        # decord's filter graph always scales bicubic: `resample` cannot change it.
        try:
            size = tuple(size) if size is not None else None
            if self._size != size:
                self._open(size)
            wanted = list(indices)
            if seek == "keyframe":
                wanted = snap_to_keyframes(wanted, [int(k) for k in self._reader.get_key_indices()])
            unique = sorted(set(wanted))
            parts = [
                self._reader.get_batch(unique[start : start + DECODE_CHUNK]).asnumpy()
                for start in range(0, len(unique), DECODE_CHUNK)
            ]
        except Exception as error:
            raise DecoderError(self.name, "decode", error) from error
        frames = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if len(unique) != len(wanted):  # keyframes used by several samples
            frames = frames[[unique.index(index) for index in wanted]]
        return DecodedFrames(np.ascontiguousarray(frames), wanted)

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.seek(0)  # releases decoded-frame buffers (decord's known memory growth)
            except Exception:  # closing must not replace the error that got us here
                pass
            del self._reader
            self._reader = None


class PyAVSource(VideoSource):
    """PyAV (FFmpeg's decoders): keyframe-index seeking, reference frames only, swscale to size.

    exact: the frames between a seek and a kept frame are decoded only when other frames refer to
    them (`skip_frame = NONREF` for every packet shown before the next kept index); the decoder
    seeks only when the next kept index lies past a later keyframe, so samples in one GOP cost one
    forward pass. Frames are matched to indices by their presentation timestamps.
    """

    name = "pyav"
    reads_header = True

    def __init__(
        self,
        source: VideoInput,
        threads: int = 1,
        size_hint: tuple[int, int] | None = None,
        header: VideoHeader | None = None,
    ):
        import av
        from av.video.reformatter import VideoReformatter

        self._threads = max(1, threads)
        try:
            self._container = av.open(_rewound(source))
        except Exception as error:
            raise DecoderError(self.name, "open", error) from error
        try:
            if not self._container.streams.video:
                raise MediaError("open", "the file has no video stream", "NoVideoStream")
            self.header = _header_of(self._container)
            self._stream = stream = self._container.streams.video[0]
            context = stream.codec_context
            # Frame threads only where the worker was given spare cores (see MediaOptions).
            context.thread_count = self._threads
            context.thread_type = "AUTO" if self._threads > 1 else "SLICE"
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            self.height, self.width = context.height, context.width
            self.num_frames = stream.frames or self._count_packets()
            self._scaler = VideoReformatter()
            self._interpolation = SCALE_INTERPOLATION
            self.frames_decoded = 0  # frames out of the decoder so far: what a read cost
        except MediaError:
            self.close()
            raise
        except Exception as error:
            self.close()
            raise DecoderError(self.name, "open", error) from error

    def _count_packets(self) -> int:
        """Frames in the stream when the header does not say (Matroska, WebM): demux, no decoding."""
        count = sum(1 for packet in self._container.demux(self._stream) if packet.size)
        self._container.seek(0)
        return count

    def _index_of_pts(self, pts: int | None) -> int | None:
        if pts is None:
            return None
        start = self._stream.start_time or 0
        return round(float((pts - start) * self._stream.time_base) * self.fps)

    def keyframes(self, near: Sequence[int] = ()) -> list[int] | None:
        """Display indices of keyframes from the container's index, or None when it keeps none
        (Matroska loads its cues only on a first seek; AVI and MPEG-TS keep none).

        With one index entry per frame (MP4, MOV) the entries are in decoding order and a
        keyframe's display index is its entry's position (exact for closed GOPs, as x264 writes by
        default; the decoded frame's own timestamp names the index finally recorded). There, given
        `near`, only the keyframes at or before and at or after each of those indices are looked
        up (two binary searches each, not a scan of a long video's index); otherwise every
        keyframe, its display index from the entry's timestamp.
        """
        entries = self._stream.index_entries
        count = len(entries)
        if count < 2:
            return None
        if count == self.num_frames:
            if near:
                found = set()
                for index in near:
                    stamp = entries[min(max(index, 0), count - 1)].timestamp
                    for backward in (True, False):
                        position = entries.search_timestamp(stamp, backward=backward)
                        if position >= 0:
                            found.add(position)
                return sorted(found) or None
            return [position for position in range(count) if entries[position].is_keyframe] or None
        start = self._stream.start_time or 0
        time_base = float(self._stream.time_base)
        shown = [
            round((entries[position].timestamp - start) * time_base * self.fps)
            for position in range(count)
            if entries[position].is_keyframe
        ]
        return sorted(shown) or None

    def _seek_to_index(self, index: int) -> None:
        """To the keyframe at or before frame `index`; the decoder starts afresh.

        The seek asks for half a frame past the index, so that rounding never lands one keyframe
        early when the index is itself a keyframe.
        """
        start = self._stream.start_time or 0
        offset = int((index + 0.5) / self.fps / self._stream.time_base) + start
        self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
        self._stream.codec_context.flush_buffers()

    def _convert(self, frame, size: tuple[int, int]) -> np.ndarray:
        """YUV -> RGB and the scaling in one swscale pass, straight to the target size."""
        height, width = size
        if (height, width) == (frame.height, frame.width):
            return frame.to_ndarray(format="rgb24")  # no scaling: as PyAV converts by default
        rgb = self._scaler.reformat(
            frame, width=width, height=height, format="rgb24", interpolation=self._interpolation, threads=1
        )
        return rgb.to_ndarray()

    def read(
        self, indices: Sequence[int], size: tuple[int, int] | None, seek: str = "exact", resample: str = "bicubic"
    ) -> DecodedFrames:
        import av

        size = tuple(size) if size is not None else (self.height, self.width)
        self._interpolation = SWSCALE_FILTERS.get(resample.lower(), SCALE_INTERPOLATION)
        try:
            if seek == "keyframe":
                return self._read_keyframes(indices, size)
            return self._read_exact(indices, size)
        except (MediaError, DecoderError):
            raise
        except av.FFmpegError as error:
            raise DecoderError(self.name, "decode", error) from error
        except Exception as error:
            raise DecoderError(self.name, "decode", error) from error

    def _read_exact(self, indices: Sequence[int], size: tuple[int, int]) -> DecodedFrames:
        import av

        wanted = list(indices)
        out = np.empty((len(wanted), size[0], size[1], 3), np.uint8)
        keyframe_positions = self.keyframes(wanted) or []
        far = max(1, round(_SEEK_AHEAD_SECONDS * self.fps))
        context = self._stream.codec_context
        may_skip = context.name in SKIP_NONREF_CODECS
        packets = None
        gop = -1  # display index of the keyframe the decoder last started from
        position = -1  # display index of the last frame out of the decoder
        filled = 0
        decoded_any = False
        landing = None  # after a seek: where it was asked to land, until the first frame shows
        back_off = 0
        while filled < len(wanted):
            target = wanted[filled]
            at = bisect.bisect_right(keyframe_positions, target) - 1
            if landing is not None:  # the seek landed past the target: seek again, further back
                jump, aim = True, max(0, landing - back_off)
                back_off *= 2
            elif at >= 0:  # seek only when the target's keyframe lies past the one decoded from
                jump, aim = packets is None or keyframe_positions[at] > gop, target
                back_off = max(1, round(self.fps))
            else:
                jump, aim = packets is None or target - position > far, target
                back_off = max(1, round(self.fps))
            if jump:
                self._seek_to_index(aim)
                gop = keyframe_positions[at] if at >= 0 else -1
                packets, position, landing = self._container.demux(self._stream), -1, aim
            progressed = False
            for packet in packets:
                shown = self._index_of_pts(packet.pts)
                if packet.is_keyframe and shown is not None:
                    gop = max(gop, shown)
                # A frame shown before the next kept one matters only if others refer to it.
                keep = not may_skip or shown is None or shown >= wanted[filled]
                context.skip_frame = "DEFAULT" if keep else "NONREF"
                try:
                    frames = context.decode(packet)
                except av.InvalidDataError:  # a corrupt packet is skipped, not fatal
                    continue
                self.frames_decoded += len(frames)
                for frame in frames:
                    decoded_any = True
                    shown_frame = self._index_of_pts(frame.pts)
                    position = shown_frame if shown_frame is not None else position + 1
                    if landing is not None:
                        # Open GOPs: the container may seek to a keyframe whose leading frames
                        # (shown before it) cannot be decoded from there; the target is one.
                        overshot = shown_frame is not None and shown_frame > target and landing > 0
                        landing = landing if overshot else None
                        if overshot:
                            break
                    if filled < len(wanted) and wanted[filled] <= position:
                        converted = self._convert(frame, size)
                        while filled < len(wanted) and wanted[filled] <= position:
                            out[filled] = converted  # the frame at (or just after) each index
                            filled += 1
                if landing is not None and decoded_any and position > target:
                    progressed = True  # seek again
                    break
                if filled > 0 and wanted[filled - 1] >= target:
                    progressed = True
                    break
            if not progressed:
                break  # the stream ended first
        context.skip_frame = "DEFAULT"
        if not decoded_any:
            raise MediaError("decode", "no decodable video frames", "NoDecodableFrames")
        if filled < len(wanted):
            raise MediaError(
                "decode",
                f"frame {wanted[filled]} of {self.num_frames} could not be decoded: the stream ends "
                f"after frame {position}; the file looks truncated",
                "TruncatedVideo",
            )
        return DecodedFrames(out, wanted)

    def _read_keyframes(self, indices: Sequence[int], size: tuple[int, int]) -> DecodedFrames:
        """One decoded frame per distinct keyframe: seek to it, decode its packet alone, drain."""
        import av

        keyframes = self.keyframes(indices)
        # Without an index, seeking to each index finds the keyframe at or before it.
        snapped = snap_to_keyframes(indices, keyframes) if keyframes else list(indices)
        context = self._stream.codec_context
        decoded: dict[int, tuple[int, np.ndarray]] = {}
        for wanted in sorted(set(snapped)):
            self._seek_to_index(wanted)
            frames = []
            for packet in self._container.demux(self._stream):
                if not packet.size:
                    break
                if not packet.is_keyframe:
                    continue  # nothing before the keyframe matters
                try:
                    frames = list(context.decode(packet)) + list(context.decode(None))
                except av.InvalidDataError:
                    frames = []
                context.flush_buffers()
                self.frames_decoded += len(frames)
                if frames:
                    break
            if not frames:
                raise MediaError(
                    "decode",
                    f"no keyframe could be decoded near frame {wanted} of {self.num_frames}; "
                    "the file looks truncated",
                    "TruncatedVideo",
                )
            frame = frames[0]
            used = self._index_of_pts(frame.pts)
            decoded[wanted] = (wanted if used is None else used, self._convert(frame, size))
        out = np.stack([decoded[k][1] for k in snapped])
        return DecodedFrames(out, [decoded[k][0] for k in snapped])

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
            self._container = None


DECODERS: tuple[type[VideoSource], ...] = (DecordSource, PyAVSource)
"""Every decoder, in the order a file's failure report lists them (the last one's error is the
one reported: PyAV's words are the clearest)."""


def decoder_order(seek: str = "exact", decoders: Sequence[type[VideoSource]] | None = None):
    """The decoders to try on one file, fastest first (from benchmarks/bench_decode.py).

    PyAV first: with non-reference frames skipped, GOP-forward decoding and swscale straight to
    the target size it measured faster than decord (benchmarks/README.md), and in keyframe mode
    it decodes one frame per sample from the container's index where decord first indexes the
    whole file. decord stays the fallback for files PyAV cannot open or read.
    """
    decoders = tuple(DECODERS if decoders is None else decoders)
    first = [d for d in decoders if d.name == "pyav"]
    return tuple(first + [d for d in decoders if d not in first])
