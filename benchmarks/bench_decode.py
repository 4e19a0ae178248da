"""Decode benchmark: how fast one CPU core turns files into pixels ready for a tower.

    python benchmarks/bench_decode.py            # every section (about 40 minutes on a shared 2-core VM)
    python benchmarks/bench_decode.py --quick    # a smoke run with small media (about a minute)
    python benchmarks/bench_decode.py --only video --media-dir /tmp/clips   # one section; keep the clips
    python benchmarks/bench_decode.py --containers   # only the tar / Parquet table (= --only containers)

Generates its own media (in a temporary folder, or in --media-dir to reuse across runs; never in
the repository), measures on one core (one process, torch limited to one thread, every decoder
with one thread), and prints markdown tables whose ratios compare against a baseline measured in
the same run:

  images     merge-cli's decode_sample (+ normalize) against plain Pillow (open, convert("RGB"),
             resize to the same size), on 640x480 and 4000x3000 JPEGs; --fast-decode's speedup and
             its PSNR against the exact path
  breakdown  today's video path (before issue 14, frozen in legacy_video.py) step by step: the CPU
             time of one sampled frame in seek, decode, colour conversion, copy and resize, for
             PyAV and decord, on H.264 720p/1080p, H.265, 10 s / 1 min / 10 min, GOPs of 1-10 s
  video      16 sampled frames per video: videos per CPU-second of today's path against
             merge-cli's decoders now, `--video-seek exact` and `keyframe`, each decoder, with the
             frames decoded and the PSNR of the new pixels against today's
  containers the same JPEGs as loose files (the baseline), inside WebDataset tar shards and
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import legacy_video  # noqa: E402
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


GRAIN = 6
"""Sensor-like grain (+-6 levels) that changes every frame. Without it the clips' P- and B-frames
were nearly free (a pure pan of a static picture: 0.5-0.8 KB against 60-250 KB keyframes), which
no camera footage is; with it they weigh about 1/20 of a keyframe."""


def make_video(
    path: Path, seconds: int, height: int, width: int, fps: int = 30, gop_seconds: float = 2.0, codec: str = "libx264"
) -> Path:
    """x264 / x265 `veryfast`, a keyframe every `gop_seconds`: a panned scene with changing grain.

    The pan goes back and forth (a wrap-around would be a scene cut, and x264 would put a keyframe
    there); the grain cycles through 8 fields, more than x264 veryfast's reference frames can use.
    """
    import av

    rng = np.random.default_rng(7)
    base = photo_like(height, 2 * width, rng).astype(np.int16)  # panned across: motion the encoder can predict
    grain = [rng.integers(-GRAIN, GRAIN + 1, size=(height, width, 1), dtype=np.int16) for _ in range(8)]
    options = {"preset": "veryfast"}
    if codec == "libx265":
        options["x265-params"] = "log-level=error"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = round(gop_seconds * fps)
        for index in range(seconds * fps):
            offset = (index * 4) % (2 * width)
            offset = min(offset, 2 * width - offset)  # back and forth over the picture
            pixels = np.clip(base[:, offset : offset + width] + grain[index % len(grain)], 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
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


# --- video ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """One generated test video."""

    seconds: int
    height: int
    width: int
    gop_seconds: float
    codec: str = "libx264"
    fps: int = 30

    @property
    def label(self) -> str:
        length = f"{self.seconds // 60} min" if self.seconds >= 60 and self.seconds % 60 == 0 else f"{self.seconds} s"
        codec = {"libx264": "H.264", "libx265": "H.265"}.get(self.codec, self.codec)
        return f"{length} {self.width}x{self.height} {codec}, GOP {self.gop_seconds:g} s"

    @property
    def file_name(self) -> str:
        return f"clip_{self.seconds}s_{self.width}x{self.height}_{self.codec}_gop{self.gop_seconds:g}_grain{GRAIN}.mp4"


def clip_file(folder: Path, clip: Clip) -> Path:
    """The clip's file in `folder`, generated unless an earlier run (--media-dir) left it there."""
    path = folder / clip.file_name
    if not path.exists():
        partial = path.with_suffix(".partial.mp4")
        make_video(partial, clip.seconds, clip.height, clip.width, clip.fps, clip.gop_seconds, clip.codec)
        partial.rename(path)
    return path


SAMPLED = VideoOptions(num_frames=16)
"""16 frames per video, the issue's measure (OneVision-large: 16 frames x 256 patches)."""


def cpu_seconds(function, repeats: int) -> float:
    """Median CPU time of `function` (this process, all its threads): the cost on the cores it
    used, which other processes on a shared machine disturb far less than wall time."""
    function()
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        times.append(time.process_time() - started)
    return statistics.median(times)


def _frame_index(stream, fps: float, frame) -> int:
    return round(float((frame.pts - (stream.start_time or 0)) * stream.time_base) * fps)


def breakdown_pyav(path: Path, indices: list[int], target: tuple[int, int]) -> dict[str, float]:
    """Today's PyAV path, step by step: ms per sampled frame in each step, and frames decoded."""
    import av

    clock = time.process_time
    spent = dict.fromkeys(("seek", "decode", "colour", "copy", "resize"), 0.0)
    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        far = round(legacy_video.SEEK_AHEAD_SECONDS * fps)
        frames, position, last = container.decode(stream), -1, None
        for target_index in indices:
            if target_index - position > far:
                started = clock()
                container.seek(int(target_index / fps / stream.time_base), stream=stream, backward=True)
                frames, position, last = container.decode(stream), -1, None
                spent["seek"] += clock() - started
            started = clock()
            while last is None or position < target_index:
                last = next(frames)
                decoded += 1
                position = _frame_index(stream, fps, last)
            spent["decode"] += clock() - started
            started = clock()
            rgb = last.reformat(format="rgb24")
            spent["colour"] += clock() - started
            started = clock()
            array = rgb.to_ndarray()
            spent["copy"] += clock() - started
            started = clock()
            legacy_video.resize(array, target)
            spent["resize"] += clock() - started
    result = {name: 1000 * value / len(indices) for name, value in spent.items()}
    result["frames"] = decoded / len(indices)
    return result


def breakdown_decord(path: Path, indices: list[int], target: tuple[int, int]) -> dict[str, float]:
    """Today's decord path: opening (its frame index), get_batch (seek + decode + colour: decord does
    them inside one call), asnumpy (copy), Pillow resize; ms per sampled frame."""
    import decord

    clock = time.process_time
    started = clock()
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    opened = clock() - started
    spent = dict.fromkeys(("get_batch", "copy", "resize"), 0.0)
    for start in range(0, len(indices), legacy_video.DECODE_CHUNK):
        started = clock()
        batch = reader.get_batch(indices[start : start + legacy_video.DECODE_CHUNK])
        spent["get_batch"] += clock() - started
        started = clock()
        arrays = batch.asnumpy()
        spent["copy"] += clock() - started
        started = clock()
        for array in arrays:
            legacy_video.resize(array, target)
        spent["resize"] += clock() - started
    del reader
    result = {name: 1000 * value / len(indices) for name, value in spent.items()}
    result["open"] = 1000 * opened / len(indices)
    return result


def bench_breakdown(clips: dict[Clip, Path]) -> list[str]:
    lines = [
        "| clip | decoder | open | seek | decode | colour | copy | resize | total | frames decoded per sample |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for clip, path in clips.items():
        sample = Sample(path.name, path, "video")
        item = decode_sample(sample, MediaOptions(video=SAMPLED))
        assert isinstance(item, Item), item
        indices, target = sample_indices(path), item.resized_hw
        pyav = min((breakdown_pyav(path, indices, target) for _ in range(2)), key=lambda r: r["decode"])
        dec = min((breakdown_decord(path, indices, target) for _ in range(2)), key=lambda r: r["get_batch"])
        total = sum(pyav[name] for name in ("seek", "decode", "colour", "copy", "resize"))
        lines.append(
            f"| {clip.label} | PyAV | - | {pyav['seek']:.1f} | {pyav['decode']:.1f} | {pyav['colour']:.1f} | "
            f"{pyav['copy']:.2f} | {pyav['resize']:.1f} | {total:.1f} | {pyav['frames']:.1f} |"
        )
        total = sum(dec[name] for name in ("open", "get_batch", "copy", "resize"))
        lines.append(
            f"| {clip.label} | decord | {dec['open']:.1f} | (in decode) | {dec['get_batch']:.1f} (seek + decode + "
            f"colour) | (in decode) | {dec['copy']:.2f} | {dec['resize']:.1f} | {total:.1f} | - |"
        )
    return lines


def sample_indices(path: Path) -> list[int]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return video.sample_frame_indices(stream.frames, float(stream.average_rate), SAMPLED)


def bench_video(clips: dict[Clip, Path], repeats: int) -> list[str]:
    """Per-core rates (videos per CPU-second) of today's path and of merge-cli's decoders now."""
    lines = [
        "| clip | path | decoder | frames decoded | videos/s per core | vs today's path | PSNR vs today |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for clip, path in clips.items():
        sample = Sample(path.name, path, "video")
        indices = sample_indices(path)
        exact, keyframe = MediaOptions(video=SAMPLED), MediaOptions(video=replace(SAMPLED, seek="keyframe"))
        chosen = video.decoder_order("exact")[0].name
        target = decode_sample(sample, exact).resized_hw
        today = legacy_video.decode(path, indices, target, "decord")
        today_seconds = cpu_seconds(lambda: legacy_video.decode(path, indices, target, "decord"), repeats)

        def row(name, decoder, seconds, pixels=None, decoded="") -> str:
            quality = "" if pixels is None else f"{psnr(pixels, today):.1f} dB"
            return (
                f"| {clip.label} | {name} | {decoder} | {decoded} | {1 / seconds:.2f} | "
                f"{today_seconds / seconds:.2f}x | {quality} |"
            )

        lines.append(row("today: decord get_batch, full-size RGB, Pillow resize (baseline)", "decord", today_seconds))
        fallback = cpu_seconds(lambda: legacy_video.decode(path, indices, target, "pyav"), repeats)
        lines.append(row("today: PyAV fallback (same resize)", "pyav", fallback))
        for mode, options in (("exact", exact), ("keyframe", keyframe)):
            for decoder in video.DECODERS:
                item, counted = decode_with(sample, options, decoder)
                seconds = cpu_seconds(lambda: decode_with(sample, options, decoder), repeats)
                mark = " (chosen)" if decoder.name == chosen else ""
                pixels = item.pixels if mode == "exact" else None
                lines.append(row(f"now: `--video-seek {mode}`", decoder.name + mark, seconds, pixels, counted))
    return lines


def decode_with(sample: Sample, options: MediaOptions, decoder) -> tuple[Item, str]:
    """decode_sample through one decoder only; with PyAV also how many frames it decoded."""
    counted = {}
    original = decoder.read

    def counting_read(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        counted["frames"] = getattr(self, "frames_decoded", None)
        return result

    saved = video.DECODERS
    video.DECODERS = (decoder,)
    decoder.read = counting_read
    try:
        item = decode_sample(sample, options)
    finally:
        video.DECODERS = saved
        decoder.read = original
    assert isinstance(item, Item) and item.decoder == decoder.name, item
    frames = counted.get("frames")
    return item, "" if frames is None else str(frames)


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


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small media, few repeats: a smoke run")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="run only these sections")
    parser.add_argument("--containers", action="store_true", help="only the containers table (tars, Parquet)")
    parser.add_argument(
        "--media-dir", type=Path, help="generate the clips here and reuse them on later runs (default: a temporary folder)"
    )
    parser.add_argument("--clips", help="only the clips whose label contains this text, e.g. H.265")
    args = parser.parse_args()
    if args.containers:
        args.only = ["containers"]
    torch.set_num_threads(1)
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    if args.quick:
        small, large = (4, 480, 640, 2), (2, 1200, 1600, 1)
        thumbs = (8, 256, 256, 2)
        reference, clips, video_repeats = Clip(6, 360, 640, 2.0), [Clip(60, 180, 320, 10.0)], 1
    else:
        small, large = (20, 480, 640, 10), (4, 3000, 4000, 3)
        thumbs = (200, 256, 256, 5)
        reference, video_repeats = Clip(60, 720, 1280, 2.0), 3
        clips = [
            Clip(10, 720, 1280, 1.0),
            Clip(10, 720, 1280, 10.0),
            Clip(10, 1080, 1920, 2.0),
            Clip(10, 720, 1280, 2.0, "libx265"),
            Clip(600, 360, 640, 10.0),  # 10 minutes: kept small in resolution so that it generates in minutes
        ]

    print(f"# merge-cli decode benchmark{' (--quick)' if args.quick else ''}\n")
    print(
        f"{datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, Pillow {Image.__version__}, torch {torch.__version__}, "
        f"numpy {np.__version__}; one core (torch threads 1, decoder threads 1); "
        f"load average at start {os.getloadavg()[0]:.2f}\n"
    )
    with tempfile.TemporaryDirectory(prefix="merge-cli-bench-") as tmp:
        folder = Path(tmp)
        media = args.media_dir or folder
        media.mkdir(parents=True, exist_ok=True)
        generated = 0.0
        for name in ("small", "large", "thumbs"):
            (folder / name).mkdir()
        if {"images", "containers"} & set(args.only):
            small_paths = make_jpegs(folder / "small", small[0], small[1], small[2], rng)
        if "images" in args.only:
            large_paths = make_jpegs(folder / "large", large[0], large[1], large[2], rng)
        if "containers" in args.only:
            thumb_paths = make_jpegs(folder / "thumbs", thumbs[0], thumbs[1], thumbs[2], rng)
        if {"breakdown", "video"} & set(args.only):
            before = time.perf_counter()
            chosen = [clip for clip in [reference, *clips] if args.clips is None or args.clips in clip.label]
            videos = {clip: clip_file(media, clip) for clip in chosen}
            generated = time.perf_counter() - before

        if "images" in args.only:
            print("## Images (JPEG, quality 90; default policy: at most 1280 merged tokens)\n")
            print("| input | path | images/s | vs baseline | note |")
            print("| --- | --- | ---: | ---: | --- |")
            for count, height, width, times in (small, large):
                paths = small_paths if (height, width) == small[1:3] else large_paths
                for row in bench_images(f"{width}x{height}", paths, times):
                    print(f"| {row[0]} | {row[1]} | {row[2]:.1f} | {row[3]:.2f}x | {row[4]} |")
            print()

        if "breakdown" in args.only:
            print("## Video: where one sampled frame's time goes today (ms of CPU per sampled frame, 16 frames per video)\n")
            print("\n".join(bench_breakdown(videos)) + "\n")

        if "video" in args.only:
            print("## Video: 16 sampled frames per video, per-core rates against today's path (CPU time)\n")
            print("\n".join(bench_video(videos, video_repeats)))
            print()

        if "containers" in args.only:
            print("## Containers (the same JPEGs as loose files, in 2 tar shards, in 2 Parquet files; page cache warm)\n")
            print("| input | read from | images/s decoded | vs loose files | samples/s listed | listing vs loose files |")
            print("| --- | --- | ---: | ---: | ---: | ---: |")
            for count, height, width, times in (small, thumbs):
                paths = small_paths if (height, width) == small[1:3] else thumb_paths
                where = folder / f"containers-{width}x{height}"
                where.mkdir()
                for row in bench_containers(f"{width}x{height}", where, paths, times):
                    print(f"| {row[0]} | {row[1]} | {row[2]:.1f} | {row[3]:.2f}x | {row[4]:.0f} | {row[5]:.2f}x |")
            print()
    total = time.perf_counter() - started
    print(f"Generating videos took {generated:.0f} s; the whole run {total:.0f} s; load average at end {os.getloadavg()[0]:.2f}.")


SECTIONS = ("images", "breakdown", "video", "containers")


if __name__ == "__main__":
    main()
