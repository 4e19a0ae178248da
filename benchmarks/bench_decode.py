"""Decode benchmark: how fast one CPU core turns files into pixels ready for a tower.

    python benchmarks/bench_decode.py            # the full run (about 2 minutes on a 2-core VM)
    python benchmarks/bench_decode.py --quick    # a smoke run with small media (seconds)
    python benchmarks/bench_decode.py --containers   # only the tar / Parquet table

Generates its own media in a temporary folder, measures on one core (one process, torch limited
to one thread, decord with one thread), and prints markdown tables whose ratios compare against
a baseline measured in the same run:

  images  merge-cli's decode_sample (+ normalize) against plain Pillow (open, convert("RGB"),
          resize to the same size), on 640x480 and 4000x3000 JPEGs; --fast-decode's speedup and
          its PSNR against the exact path
  video   sampling 16 frames from a 60 s 720p video with decord (get_batch on the indices)
          against decoding every frame; merge-cli's decode_sample with decord and with PyAV
  containers  the same JPEGs as loose files (the baseline), inside WebDataset tar shards and
          inside Parquet files (a binary column, and a Hugging Face Image struct column):
          listing them, and decode_sample on each (read in place + decode + resize)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from merge_cli.config import MediaOptions, VideoOptions  # noqa: E402
from merge_cli.inputs.sources import collect_samples  # noqa: E402
from merge_cli.media import video  # noqa: E402
from merge_cli.media.images import decode_sample, normalize  # noqa: E402
from merge_cli.records import Item, Sample  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- media ----------------------------------------------------------------------------------------


def photo_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth shapes and gradients with mild sensor-like noise: compresses like a photo, not like noise.

    The smooth part is drawn at 1/8 size and enlarged (it is smooth anyway); the noise is full size.
    """
    small_h, small_w = max(8, height // 8), max(8, width // 8)
    ys = np.linspace(0, 1, small_h, dtype=np.float32)[:, None, None]
    xs = np.linspace(0, 1, small_w, dtype=np.float32)[None, :, None]
    picture = rng.uniform(40, 200, 3).astype(np.float32) + 60 * ys * rng.uniform(-1, 1, 3) + 60 * xs * rng.uniform(-1, 1, 3)
    for _ in range(12):  # soft blobs
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.3)
        blob = np.exp(-((ys - cy) ** 2 + ((xs - cx) * width / height) ** 2) / radius**2)
        picture = picture + blob * rng.uniform(-80, 80, 3).astype(np.float32)
    smooth = Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.integers(-10, 11, size=(height, width, 1), dtype=np.int16)
    return np.clip(np.asarray(smooth, dtype=np.int16) + noise, 0, 255).astype(np.uint8)


def make_jpegs(folder: Path, count: int, height: int, width: int, rng) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"photo_{height}x{width}_{index}.jpg"
        Image.fromarray(photo_like(height, width, rng)).save(path, quality=90)
        paths.append(path)
    return paths


def make_video(path: Path, seconds: int, height: int, width: int, fps: int = 30, gop_seconds: float = 2.0) -> Path:
    """H.264 (x264 veryfast), a keyframe every `gop_seconds`: a moving scene, cheap to generate."""
    import av

    rng = np.random.default_rng(7)
    base = photo_like(height, 2 * width, rng)  # panned across: motion the encoder can predict
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = round(gop_seconds * fps)
        for index in range(seconds * fps):
            offset = (index * 4) % width
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, offset : offset + width]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --- timing ---------------------------------------------------------------------------------------


def rates(functions: dict, items: list, rounds: int) -> dict[str, float]:
    """Items per second of each function: the median over `rounds` passes through `items`.

    The functions take turns pass by pass, so that load from other processes on a shared machine
    falls on all of them alike; each gets one warm-up call first.
    """
    for function in functions.values():
        function(items[0])
    passes: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            started = time.perf_counter()
            for item in items:
                function(item)
            passes[name].append(time.perf_counter() - started)
    return {name: len(items) / statistics.median(times) for name, times in passes.items()}


def median_seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --- images ---------------------------------------------------------------------------------------


def bench_images(label: str, paths: list[Path], repeats: int) -> list[tuple]:
    exact, fast = MediaOptions(), MediaOptions(fast_decode=True)
    samples = [Sample(path.name, path, "image") for path in paths]
    targets = {}
    for sample in samples:
        item = decode_sample(sample, exact)
        assert isinstance(item, Item), item
        targets[sample.path] = item.resized_hw

    def baseline(sample: Sample) -> None:
        height, width = targets[sample.path]
        with Image.open(sample.path) as image:
            image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)

    def ours(options):
        return lambda sample: normalize(decode_sample(sample, options).pixels, CLIP_MEAN, CLIP_STD)

    measured = rates(
        {
            "baseline": baseline,
            "decode": lambda sample: decode_sample(sample, exact),
            "full": ours(exact),
            "fast": ours(fast),
        },
        samples,
        repeats,
    )
    base, decode_only, full, quick = (measured[name] for name in ("baseline", "decode", "full", "fast"))
    quality = min(psnr(decode_sample(s, fast).pixels, decode_sample(s, exact).pixels) for s in samples)
    size = f"-> {targets[samples[0].path][0]}x{targets[samples[0].path][1]}"
    return [
        (label, f"Pillow open + convert + resize {size} (baseline)", base, 1.0, ""),
        (label, "merge-cli decode_sample", decode_only, decode_only / base, ""),
        (label, "merge-cli decode_sample + normalize", full, full / base, ""),
        (label, "... with --fast-decode", quick, quick / base, f"{quick / full:.2f}x faster, PSNR {quality:.1f} dB"),
    ]


# --- video ----------------------------------------------------------------------------------------


def bench_video(path: Path, repeats: int) -> tuple[list[tuple], str]:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=video.DECORD_THREADS)
    total, fps = len(reader), reader.get_avg_fps()
    del reader
    options = VideoOptions(num_frames=16, max_frames=16)
    indices = video.sample_frame_indices(total, fps, options)

    def decode_every_frame() -> None:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=video.DECORD_THREADS)
        for start in range(0, total, 32):
            reader.get_batch(list(range(start, min(total, start + 32)))).asnumpy()
        del reader

    def sample_16() -> None:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=video.DECORD_THREADS)
        reader.get_batch(indices).asnumpy()
        del reader

    media = MediaOptions(video=options)
    sample = Sample(path.name, path, "video")

    def ours() -> None:
        item = decode_sample(sample, media)
        assert isinstance(item, Item) and item.decoder == "decord", item
        normalize(item.pixels, CLIP_MEAN, CLIP_STD)

    def ours_pyav() -> None:
        saved = video.DECODERS
        video.DECODERS = (video.PyAVSource,)
        try:
            item = decode_sample(sample, media)
        finally:
            video.DECODERS = saved
        assert isinstance(item, Item) and item.decoder == "pyav", item
        normalize(item.pixels, CLIP_MEAN, CLIP_STD)

    every = median_seconds(decode_every_frame, max(1, repeats // 3))
    sampled = median_seconds(sample_16, repeats)
    full = median_seconds(ours, repeats)
    fallback = median_seconds(ours_pyav, repeats)
    resized = decode_sample(sample, media).resized_hw
    rows = [
        ("decord, decode every frame (baseline)", total, every, total / every, 1.0),
        ("decord get_batch, 16 sampled frames", 16, sampled, 16 / sampled, every / sampled),
        (f"merge-cli decode_sample, decord (+ resize to {resized[0]}x{resized[1]}, normalize)", 16, full, 16 / full, every / full),
        ("merge-cli decode_sample, PyAV fallback (same)", 16, fallback, 16 / fallback, every / fallback),
    ]
    return rows, f"{total} frames at {fps:g} fps"


# --- containers -----------------------------------------------------------------------------------


def write_containers(folder: Path, paths: list[Path], per_shard: int) -> dict[str, Path]:
    """The same files as tar shards and as Parquet files (binary and datasets-struct columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    made = {name: folder / name for name in ("tars", "parquet", "hf")}
    for target in made.values():
        target.mkdir()
    for number, start in enumerate(range(0, len(paths), per_shard)):
        chunk = paths[start : start + per_shard]
        with tarfile.open(made["tars"] / f"{number:05d}.tar", "w") as archive:
            for path in chunk:
                archive.add(path, arcname=path.name)
        ids, data = [path.stem for path in chunk], [path.read_bytes() for path in chunk]
        pq.write_table(pa.table({"id": ids, "image": data}), made["parquet"] / f"train-{number:05d}.parquet", row_group_size=64)
        structs = pa.array([{"bytes": d, "path": None} for d in data], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        pq.write_table(pa.table({"id": ids, "image": structs}), made["hf"] / f"train-{number:05d}.parquet", row_group_size=64)
    return made


def bench_containers(label: str, folder: Path, paths: list[Path], repeats: int) -> list[tuple]:
    loose_folder = paths[0].parent
    made = write_containers(folder, paths, per_shard=max(1, len(paths) // 2))
    sources = {"loose files (baseline)": loose_folder, "WebDataset tars": made["tars"], "Parquet, binary column": made["parquet"], "Parquet, datasets Image struct": made["hf"]}
    samples = {name: sorted(collect_samples([where]).samples, key=lambda s: s.key.split(".")[0]) for name, where in sources.items()}
    assert all(len(found) == len(paths) for found in samples.values()), {n: len(f) for n, f in samples.items()}
    options = MediaOptions()
    reference = [decode_sample(sample, options).pixels for sample in samples["loose files (baseline)"]]
    for name, found in samples.items():  # the same bytes decoded the same way: identical pixels
        assert all(torch.equal(decode_sample(s, options).pixels, r) for s, r in zip(found, reference)), name

    def decoder(found):
        return lambda index: decode_sample(found[index], options)

    decoded = rates({name: decoder(found) for name, found in samples.items()}, list(range(len(paths))), repeats)
    listed = rates({name: (lambda _, where=where: collect_samples([where])) for name, where in sources.items()}, [0], max(3, repeats))
    base, base_listing = decoded["loose files (baseline)"], listed["loose files (baseline)"]
    rows = []
    for name in sources:
        rows.append((label, name, decoded[name], decoded[name] / base, listed[name] * len(paths), listed[name] / base_listing))
    return rows


def bench_images_and_video(small_paths, large_paths, clip, small, large, video_spec, repeats) -> None:
    print("## Images (JPEG, quality 90; default policy: at most 1280 merged tokens)\n")
    print("| input | path | images/s | vs baseline | note |")
    print("| --- | --- | ---: | ---: | --- |")
    for count, height, width, times in (small, large):
        paths = small_paths if (height, width) == small[1:3] else large_paths
        for row in bench_images(f"{width}x{height}", paths, times):
            print(f"| {row[0]} | {row[1]} | {row[2]:.1f} | {row[3]:.2f}x | {row[4]} |")

    rows, description = bench_video(clip, repeats)
    seconds, height, width = video_spec
    print(f"\n## Video ({seconds} s {width}x{height} H.264, keyframe every 2 s, {description})\n")
    print("| path | frames | seconds | frames/s | speedup vs decoding every frame |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, frames, seconds_taken, per_second, speedup in rows:
        print(f"| {name} | {frames} | {seconds_taken:.3f} | {per_second:.1f} | {speedup:.2f}x |")


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small media, few repeats: a smoke run")
    parser.add_argument("--containers", action="store_true", help="only the containers table (tars, Parquet)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    if args.quick:
        small, large, video_spec, repeats = (4, 480, 640, 2), (2, 1200, 1600, 1), (5, 360, 640), 2
        thumbs = (8, 256, 256, 2)
    else:
        small, large, video_spec, repeats = (20, 480, 640, 10), (4, 3000, 4000, 3), (60, 720, 1280), 5
        thumbs = (200, 256, 256, 5)

    print(f"# merge-cli decode benchmark{' (--quick)' if args.quick else ''}\n")
    print(
        f"{datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, Pillow {Image.__version__}, torch {torch.__version__}, "
        f"numpy {np.__version__}; one core (torch threads 1, decord threads {video.DECORD_THREADS}); "
        f"load average at start {os.getloadavg()[0]:.2f}\n"
    )
    with tempfile.TemporaryDirectory(prefix="merge-cli-bench-") as tmp:
        folder = Path(tmp)
        for name in ("small", "large", "thumbs"):
            (folder / name).mkdir()
        small_paths = make_jpegs(folder / "small", small[0], small[1], small[2], rng)
        thumb_paths = make_jpegs(folder / "thumbs", thumbs[0], thumbs[1], thumbs[2], rng)
        if not args.containers:
            large_paths = make_jpegs(folder / "large", large[0], large[1], large[2], rng)
            clip = make_video(folder / "clip.mp4", *video_spec)
        generated = time.perf_counter() - started

        if not args.containers:
            bench_images_and_video(small_paths, large_paths, clip, small, large, video_spec, repeats)
        print("\n## Containers (the same JPEGs as loose files, in 2 tar shards, in 2 Parquet files; page cache warm)\n")
        print("| input | read from | images/s decoded | vs loose files | samples/s listed | listing vs loose files |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for count, height, width, times in (small, thumbs):
            paths = small_paths if (height, width) == small[1:3] else thumb_paths
            where = folder / f"containers-{width}x{height}"
            where.mkdir()
            for row in bench_containers(f"{width}x{height}", where, paths, times):
                print(f"| {row[0]} | {row[1]} | {row[2]:.1f} | {row[3]:.2f}x | {row[4]:.0f} | {row[5]:.2f}x |")
    total = time.perf_counter() - started
    print(f"\nGenerating media took {generated:.0f} s; the whole run {total:.0f} s; load average at end {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
