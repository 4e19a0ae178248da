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


def frame_level(index: int) -> int:
    """The mean gray level of frame `index` of a `make_video` video."""
    return (index * 37) % 200 + 28


def video_frame(index: int, height: int, width: int, rng=None) -> np.ndarray:
    """Frame `index`: random texture whose mean level encodes the index (survives compression)."""
    rng = _rng(rng)
    level = frame_level(index)
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
    container_options: dict | None = None,
    keyint: int | None = None,
) -> Path:
    """Write a short video; yuv420p needs even sides. Frame i has mean level `frame_level(i)`.

    `keyint` (x264 only): a keyframe exactly every `keyint` frames (no scene-cut keyframes), with
    B-frames in a pyramid, so that GOPs hold reference and non-reference frames.
    """
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    options = {}
    if keyint is not None and codec == "libx265":  # x265 writes open GOPs: leading frames follow a keyframe
        options["x265-params"] = f"keyint={keyint}:min-keyint={keyint}:scenecut=0:log-level=error"
    elif keyint is not None:
        options["x264-params"] = f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=3:b-pyramid=normal"
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(video_frame(index, height, width, rng), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def save_array(path: Path, array: np.ndarray, mode: str | None = None, **save_kwargs) -> Path:
    """Write exactly these pixels (lossless formats keep them bit for bit)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, **save_kwargs)
    return path


def exif_orientation(orientation: int):
    """An EXIF block holding only an orientation tag (pass as `exif=` when saving)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def make_gif(path: Path, levels: list[int], size: tuple[int, int] = (56, 56), durations: list[int] | None = None) -> Path:
    """An animated GIF whose frame i is a flat gray of `levels[i]` (size HxW)."""
    from PIL import Image

    height, width = size
    frames = [Image.new("RGB", (width, height), (level, level, level)) for level in levels]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations or 100, loop=0)
    return path


def png_header(path: Path, height: int, width: int) -> Path:
    """A tiny PNG that claims `height x width` pixels: the header of a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def with_trailing_exif(path: Path, orientation: int) -> Path:
    """Insert an eXIf chunk with this orientation just before a PNG's IEND, after the image data:
    where Pillow finds it only by decoding every pixel (in place)."""
    import struct
    import zlib

    tiff = exif_orientation(orientation).tobytes().removeprefix(b"Exif\x00\x00")
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    data = path.read_bytes()
    end = data.rindex(b"IEND") - 4  # the IEND chunk starts with its 4-byte length
    path.write_bytes(data[:end] + chunk + data[end:])
    return path


def truncate(path: Path, fraction: float = 0.5, target: Path | None = None) -> Path:
    """Keep the first `fraction` of the file's bytes (in place, or written to `target`)."""
    data = path.read_bytes()
    target = target or path
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def make_audio_only(path: Path) -> Path:
    """An MP4 holding one short AAC audio stream and no video."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def zero_video_data(path: Path) -> Path:
    """Zero the coded frames of an MP4 whose index (moov) follows its data (mdat): nothing decodes."""
    data = bytearray(path.read_bytes())
    start, end = data.find(b"mdat"), data.find(b"moov")
    assert 0 <= start < end, "expects an MP4 with its index (moov) after the data (mdat)"
    data[start + 4 + 64 : end - 8] = bytes(end - 8 - (start + 4 + 64))
    path.write_bytes(bytes(data))
    return path
