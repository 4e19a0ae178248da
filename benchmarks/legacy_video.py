"""merge-cli's video path before issue 14, frozen as the benchmark's baseline ("today's path").

decord `get_batch` on the sampled indices (8 at a time) at full size, or PyAV seeking to the
keyframe before each far-away frame and decoding every frame forward; both convert full frames to
RGB, then Pillow resizes each (bicubic, antialiased). Kept only to measure against; not used by
merge-cli itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DECODE_CHUNK = 8
SEEK_AHEAD_SECONDS = 2.0


def decord_frames(path: Path, indices: Sequence[int]) -> Iterator[np.ndarray]:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    try:
        for start in range(0, len(indices), DECODE_CHUNK):
            yield reader.get_batch(list(indices[start : start + DECODE_CHUNK])).asnumpy()
    finally:
        reader.seek(0)
        del reader


def pyav_frames(path: Path, indices: Sequence[int]) -> Iterator[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate)
        start = stream.start_time or 0

        def index_of(frame) -> int:
            return round(float((frame.pts - start) * stream.time_base) * fps)

        far = max(1, round(SEEK_AHEAD_SECONDS * fps))
        frames = container.decode(stream)
        position, last = -1, None
        for target in indices:
            if target - position > far:
                container.seek(int(target / fps / stream.time_base) + start, stream=stream, backward=True)
                frames, position, last = container.decode(stream), -1, None
            while last is None or position < target:
                last = next(frames)
                position = index_of(last)
            yield last.to_ndarray(format="rgb24")[None]


def resize(frame: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    height, width = target
    return np.asarray(Image.fromarray(frame, "RGB").resize((width, height), Image.Resampling.BICUBIC))


def decode(path: Path, indices: Sequence[int], target: tuple[int, int], backend: str = "decord") -> torch.Tensor:
    """Today's uint8 (T, 3, H, W) pixels of the sampled frames."""
    chunks = decord_frames(path, indices) if backend == "decord" else pyav_frames(path, indices)
    frames = [resize(frame, target) for chunk in chunks for frame in chunk]
    return torch.from_numpy(np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2)))
