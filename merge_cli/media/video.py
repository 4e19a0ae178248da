"""Video frames: which frames to sample (a pure function), and two decoders behind one interface.

decord reads first: it decodes only the sampled frames (`get_batch` on their indices). PyAV is the
fallback for files decord cannot open or read (and for paths decord cannot take, such as non-UTF-8
names): it seeks to the keyframe before each far-away frame and decodes forward, matching frames
by their presentation timestamps. `images.py` resizes what they return.

Frame timestamps are `index / fps` for both decoders, so that a record does not depend on which one
read the file.

A video inside a tar shard or a Parquet file arrives as bytes: decord and PyAV both read it from
an in-memory buffer (a fresh one per reader).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from merge_cli.config import VideoOptions
from merge_cli.errors import MediaError

DECORD_THREADS = 1
"""decord's decoding threads per reader: DataLoader workers give the parallelism; 0 (decord's
default, one per core) oversubscribes the CPU once several workers each open a video."""

DECODE_CHUNK = 8
"""Frames decoded per `get_batch` call: bounds memory to a few full-size frames before resizing."""

_SEEK_AHEAD_SECONDS = 2.0
"""PyAV: decode forward (no seek) when the next wanted frame is at most this far ahead."""

_FPS_TOLERANCE = 1e-6


def sample_frame_indices(total_frames: int, video_fps: float, options: VideoOptions) -> list[int]:
    """Indices of the frames to sample, evenly spread over the range, ascending and unique.

    The range is [ceil(start * fps), floor(end * fps)] clipped to the video (the whole video by
    default). The count is `num_frames`, or else round(range duration * `options.fps`), clamped to
    [min_frames, max_frames] and then to the frames the range has: a short video gets all its
    frames, never an error. The indices are round(linspace(first, last, n)), as qwen-vl-utils
    does. Under the `qwen` rule the count is qwen-vl-utils' own (`smart_nframes`: floored to a
    multiple of the temporal patch, `processor.qwen_frame_count`).
    An empty list means the range holds no frame (e.g. a start past the end of the video).
    """
    if total_frames <= 0 or not video_fps > 0:
        return []
    if options.min_frames is None or options.max_frames is None or (options.fps is None and options.num_frames is None):
        options = options.resolved(28)  # unset counts take the native defaults (no pixel setting is read here)
    first, last = 0, total_frames - 1
    if options.start is not None:
        first = max(first, math.ceil(options.start * video_fps - _FPS_TOLERANCE))
    if options.end is not None:
        last = min(last, math.floor(options.end * video_fps + _FPS_TOLERANCE))
    if first > last:
        return []
    available = last - first + 1
    assert options.min_frames is not None and options.max_frames is not None  # resolved in MediaOptions
    if options.rule == "qwen":
        wanted = _qwen_count(available, video_fps, options)
    elif options.num_frames is not None:
        wanted = options.num_frames
    else:
        assert options.fps is not None  # resolved in MediaOptions
        wanted = round(available / video_fps * options.fps)
    if options.rule != "qwen":
        wanted = max(1, min(max(wanted, options.min_frames), options.max_frames, available))
    indices = np.round(np.linspace(first, last, wanted)).astype(np.int64)
    return sorted({int(index) for index in indices})


def _qwen_count(available: int, video_fps: float, options: VideoOptions) -> int:
    """qwen-vl-utils' frame count: `num_frames` rounded to the temporal patch, or its fps rule."""
    from merge_cli.media.processor import qwen_frame_count

    multiple = options.frame_multiple
    if options.num_frames is not None:
        count = round(options.num_frames / multiple) * multiple
        return max(1, min(count if count >= multiple else multiple, available))
    assert options.fps is not None and options.min_frames is not None and options.max_frames is not None
    return qwen_frame_count(available, video_fps, options.fps, options.min_frames, options.max_frames, multiple)


def frame_times(indices: Sequence[int], video_fps: float) -> list[float]:
    """Timestamp in seconds of each frame index."""
    return [index / video_fps for index in indices]


def promised_frames(path: Path | bytes) -> int | None:
    """How many frames the header says the video has, or None when it does not say.

    The stream's own frame count when the container keeps one (MP4, MOV, AVI); otherwise duration
    x rate, but only for a file whose single stream is the video, since a container's duration
    also covers its audio. A decoder that finds far fewer frames is reading a truncated file.
    """
    import av

    from merge_cli.media.probe import av_input, header_frame_count

    try:
        with av.open(av_input(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            # A promise to hold the decoder to: the container's duration only when nothing but
            # the video is in it.
            return header_frame_count(container, stream, rate, whole_container=len(container.streams) == 1)
    except Exception:  # an unreadable header: the decoders will say why
        return None


def looks_truncated(found: int, promised: int | None) -> bool:
    """Whether `found` frames fall clearly short of the `promised` count (2 frames or 2% slack)."""
    return promised is not None and found < promised - max(2, 0.02 * promised)


class DecoderError(Exception):
    """One decoder could not open or read a file; the next decoder gets a try."""

    def __init__(self, decoder: str, stage: str, cause: BaseException):
        super().__init__(f"{decoder}: {cause}")
        self.decoder = decoder
        self.stage = stage
        self.cause = cause


class VideoSource:
    """An opened video: its frame count and rate, and its frames by index, in chunks.

    Use as a context manager: the reader is released on exit, whatever happened.
    """

    name: str
    num_frames: int
    fps: float

    def chunks(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """The frames at `indices` (ascending), as uint8 (k, H, W, 3) arrays."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class DecordSource(VideoSource):
    """decord's VideoReader on the CPU; `get_batch` decodes only the requested frames."""

    name = "decord"

    def __init__(self, path: Path | bytes):
        try:
            import decord

            # str(path) fails for non-UTF-8 names (decord encodes it strictly): PyAV takes over.
            where = io.BytesIO(path) if isinstance(path, bytes) else str(path)
            self._reader = decord.VideoReader(where, ctx=decord.cpu(0), num_threads=DECORD_THREADS)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
        except Exception as error:  # decord raises RuntimeError, DECORDError, UnicodeEncodeError, ...
            self._reader = None
            raise DecoderError(self.name, "open", error) from error

    def chunks(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        for start in range(0, len(indices), DECODE_CHUNK):
            part = list(indices[start : start + DECODE_CHUNK])
            try:
                yield self._reader.get_batch(part).asnumpy()
            except Exception as error:
                raise DecoderError(self.name, "decode", error) from error

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.seek(0)  # releases decoded-frame buffers (decord's known memory growth)
            except Exception:  # closing must not replace the error that got us here
                pass
            del self._reader
            self._reader = None


class PyAVSource(VideoSource):
    """PyAV: seek to the keyframe before a far-away frame, decode forward, match frames by pts."""

    name = "pyav"

    def __init__(self, path: Path | bytes):
        import av

        from merge_cli.media.probe import av_input

        try:
            self._container = av.open(av_input(path))
        except Exception as error:
            raise DecoderError(self.name, "open", error) from error
        try:
            if not self._container.streams.video:
                raise MediaError("open", "the file has no video stream", "NoVideoStream")
            self._stream = stream = self._container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            self.num_frames = stream.frames or self._count_packets()
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

    def _index_of(self, frame) -> int | None:
        if frame.pts is None:
            return None
        start = self._stream.start_time or 0
        return round(float((frame.pts - start) * self._stream.time_base) * self.fps)

    def _seek_to(self, index: int) -> None:
        start = self._stream.start_time or 0
        offset = int(index / self.fps / self._stream.time_base) + start
        self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)

    def _frames(self) -> Iterator:
        """Decoded frames from the current position; a corrupt packet is skipped, not fatal."""
        import av

        for packet in self._container.demux(self._stream):
            try:
                yield from packet.decode()
            except av.InvalidDataError:
                continue

    def chunks(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        far = max(1, round(_SEEK_AHEAD_SECONDS * self.fps))
        frames = self._frames()
        position, last = -1, None  # index and pixels of the last decoded frame
        decoded_any = False
        found: list[np.ndarray] = []
        produced = 0
        try:
            for target in indices:
                if target - position > far:
                    self._seek_to(target)
                    frames, position, last = self._frames(), -1, None
                while last is None or position < target:
                    frame = next(frames, None)
                    if frame is None:
                        break
                    decoded_any = True
                    index = self._index_of(frame)
                    position = index if index is not None else position + 1
                    last = frame
                if last is None or position < target:
                    break  # the stream ended first
                found.append(last.to_ndarray(format="rgb24"))  # the frame at (or just after) target
                produced += 1
                if len(found) == DECODE_CHUNK:
                    yield np.stack(found)
                    found = []
        except Exception as error:
            raise DecoderError(self.name, "decode", error) from error
        if not decoded_any:
            raise MediaError("decode", "no decodable video frames", "NoDecodableFrames")
        if found:
            yield np.stack(found)
        if produced < len(indices):
            raise MediaError(
                "decode",
                f"frame {indices[produced]} of {self.num_frames} could not be decoded: the stream ends "
                f"after frame {position}; the file looks truncated",
                "TruncatedVideo",
            )

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
            self._container = None


DECODERS: tuple[type[VideoSource], ...] = (DecordSource, PyAVSource)
"""Tried in order: the first that opens and reads a file wins."""
