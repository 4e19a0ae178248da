"""Generate tiny test media (images with Pillow, videos with PyAV): no binary blobs in the repo."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    # Drawn from the global seed that conftest sets freshly per test, so failures can be replayed.
    return rng if rng is not None else np.random.default_rng(np.random.randint(0, 2**31))


def random_rgb(height: int, width: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A smooth random RGB picture (uint8 HxWx3): gradients plus noise, so resizing is non-trivial."""
    rng = _rng(rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-1, 1, size=(2, 3)) * 128
    picture = base + ys[..., None] / max(height, 1) * slope[0] + xs[..., None] / max(width, 1) * slope[1]
    picture += rng.normal(0, 12, size=(height, width, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


def make_image(path: Path, height: int, width: int, mode: str = "RGB", rng=None, **save_kwargs) -> Path:
    """Write an image of `height x width` pixels (size written HxW, as everywhere in merge-cli)."""
    from PIL import Image

    image = Image.fromarray(random_rgb(height, width, rng), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_kwargs)
    return path


def video_frame(index: int, height: int, width: int, rng=None) -> np.ndarray:
    """Frame `index`: random texture whose mean level encodes the index (survives compression)."""
    rng = _rng(rng)
    level = (index * 37) % 200 + 28
    frame = np.full((height, width, 3), level, np.float32)
    frame += rng.normal(0, 4, size=frame.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


def make_video(
    path: Path,
    num_frames: int,
    height: int,
    width: int,
    fps: int = 10,
    codec: str = "libx264",
    rng=None,
) -> Path:
    """Write a short video; yuv420p needs even sides."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(video_frame(index, height, width, rng), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
