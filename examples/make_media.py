"""Regenerate the tiny example media in examples/media/ (committed, so this only documents them).

    python examples/make_media.py

Images of several sizes and aspect ratios, one RGBA PNG, and a short MP4 clip: enough to see
mixed resolutions, transparency and video go through `merge-cli extract`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "media"


def scene(height: int, width: int, seed: int) -> Image.Image:
    """A small synthetic picture: a gradient sky, a horizon and a few shapes."""
    rng = np.random.default_rng(seed)
    ys = np.linspace(0, 1, height)[:, None, None]
    top, bottom = rng.uniform(60, 200, 3), rng.uniform(20, 120, 3)
    pixels = (top * (1 - ys) + bottom * ys) * np.ones((1, width, 1))
    pixels += rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        radius = int(rng.integers(4, max(5, min(height, width) // 4)))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse([x0 - radius, y0 - radius, x0 + radius, y0 + radius], fill=color)
    return image


def main() -> None:
    (HERE / "photos").mkdir(parents=True, exist_ok=True)
    (HERE / "clips").mkdir(parents=True, exist_ok=True)
    scene(240, 320, 1).save(HERE / "photos" / "street.jpg", quality=85)
    scene(480, 270, 2).save(HERE / "photos" / "portrait.jpg", quality=85)
    scene(252, 448, 3).save(HERE / "photos" / "wide.jpg", quality=85)
    logo = scene(96, 96, 4).convert("RGBA")
    alpha = Image.new("L", logo.size, 0)
    ImageDraw.Draw(alpha).ellipse([8, 8, 88, 88], fill=255)
    logo.putalpha(alpha)
    logo.save(HERE / "photos" / "logo.png")
    make_clip(HERE / "clips" / "orbit.mp4")


def make_clip(path: Path, seconds: float = 3.0, fps: int = 10, height: int = 180, width: int = 320) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "32"}
        for index in range(int(seconds * fps)):
            frame = scene(height, width, 5)
            angle = 2 * np.pi * index / (seconds * fps)
            cx, cy = width / 2 + 80 * np.cos(angle), height / 2 + 50 * np.sin(angle)
            ImageDraw.Draw(frame).ellipse([cx - 20, cy - 20, cx + 20, cy + 20], fill=(250, 220, 40))
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


if __name__ == "__main__":
    main()
