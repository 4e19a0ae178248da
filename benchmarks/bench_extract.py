"""How fast is extraction, against the limits that matter? Ratio tables, baselines run beside.

    python benchmarks/bench_extract.py                # CPU part, about 5-8 minutes on 2 cores
    python benchmarks/bench_extract.py --quick        # a smoke run of every section (~1 min)
    python benchmarks/bench_extract.py --gpu          # the GPU part: one short script for one H100
    python benchmarks/bench_extract.py --gpu --quick  # the GPU part on a tiny model, any device

Every figure is a ratio against a baseline measured in the same run on the same data, because
absolute rates move with a shared machine. Sections (CPU part):

  mixed       tower + merger on preloaded tensors: uniform 448x448 vs mixed aspect ratios,
              token-budget packing (default) vs one-shape buckets
  pipeline    end-to-end extract (decode, resize, tower, merger, HDF5) vs tower + merger alone
  writer      the shard writer (uncompressed) vs a raw sequential write + fsync of the same bytes
  compression none / lzf / gzip / zstd on real tower outputs: write speed and ratio
  reader      random access by key through open_features vs one .npy file per sample
  flops       FLOPs per image of the OneVision-large shape (arithmetic, no timing)

The GPU part measures the card's bf16 matmul rate, then OneVision-large (random weights) at
448x448 in bf16: tower + merger alone, end-to-end extract, decode alone with the DataLoader
workers, and mixed vs uniform resolutions; it writes its table to --report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from merge_cli.media.grid import ResizePolicy
from merge_cli.models.towers.demo import demo_state_dict
from merge_cli.models.towers.onevision import OneVisionConfig, OneVisionTower
from merge_cli.records import Features, Item
from merge_cli.run.batching import TokenBatcher
from merge_cli.run.compute import FeatureExtractor

ONEVISION_LARGE = OneVisionConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
)
# A CPU-sized stand-in with the same structure (head_dim 64 as in the large model).
ONEVISION_SMALL = OneVisionConfig(
    hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6, patch_size=14
)
ONEVISION_TINY = OneVisionConfig(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, patch_size=14
)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def say(text: str = "") -> None:
    print(text, flush=True)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table (so it can be pasted into benchmarks/README.md as printed)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def random_tower(config: OneVisionConfig) -> OneVisionTower:
    """A OneVision tower with fixed random weights (timing does not depend on the values)."""
    tower = OneVisionTower.empty(config, name="bench", kind="onevision")
    tower.load_weights(demo_state_dict(config), "bench")
    return tower.eval()


def save_checkpoint(config: OneVisionConfig, folder: Path) -> Path:
    """A OneVision checkpoint folder as published ones are laid out, for `--tower FOLDER`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    payload = {"model_type": "onevision_encoder", **{k: v for k, v in config.__dict__.items()}}
    (folder / "config.json").write_text(json.dumps(payload))
    save_file({k: v.contiguous() for k, v in demo_state_dict(config).items()}, str(folder / "model.safetensors"))
    return folder


def mixed_sizes(count: int, max_pixels: int, rng: random.Random) -> list[tuple[int, int]]:
    """Resized (H, W) of `count` photos with aspect ratios spread log-uniformly over [1/3, 3]."""
    policy = ResizePolicy(max_pixels=max_pixels)
    sizes = []
    for _ in range(count):
        ratio = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        area = rng.uniform(1.2, 4.0) * max_pixels  # photos larger than the ceiling, as in real data
        height = int(math.sqrt(area * ratio))
        sizes.append(policy.target_size(height, int(area / height)))
    return sizes


def items_for(sizes: list[tuple[int, int]], frames: int = 1) -> list[Item]:
    """Preloaded uint8 pixels of the given sizes (what decoding would hand to the device step)."""
    items = []
    for index, (height, width) in enumerate(sizes):
        pixels = torch.randint(0, 256, (frames, 3, height, width), dtype=torch.uint8)
        items.append(Item(f"s{index:06d}", "image", pixels, (height, width), (height, width), "bench"))
    return items


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batches(extractor: FeatureExtractor, items: list[Item], batch_tokens: int, mode: str) -> tuple[float, int, float]:
    """Seconds, patch tokens and batch fill for tower + merger over `items` (results copied to host)."""
    def tokens(item: Item) -> int:
        t, h, w = extractor.feature_grid(item)
        return t * h * w

    batcher = TokenBatcher(batch_tokens, tokens, mode)
    batches = [b for item in items for b in batcher.add(item)] + batcher.flush()
    sync(extractor.device)
    started = time.perf_counter()
    pending = [extractor.extract(batch.items) for batch in batches]
    for output in pending:
        output.wait()
    sync(extractor.device)
    return time.perf_counter() - started, sum(b.tokens for b in batches), batcher.stats.fill


def best_of(repeats: int, measure) -> tuple[float, ...]:
    """The fastest of `repeats` runs (the least disturbed by other load on a shared machine)."""
    return min((measure() for _ in range(repeats)), key=lambda result: result[0])


# ---------------------------------------------------------------------------------------------
# Sections


def bench_mixed(args, device: torch.device, config: OneVisionConfig, dtype: str) -> list[dict]:
    """Mixed resolutions vs uniform 448x448, packing vs bucketing, on preloaded tensors."""
    rng = random.Random(0)
    count = args.images
    uniform = items_for([(448, 448)] * count)
    mixed = items_for(mixed_sizes(count, 448 * 448, rng))
    extractor = FeatureExtractor(
        random_tower(config), None, merge_size=2, device=device, compute_dtype=dtype, store_dtype=dtype
    )
    run_batches(extractor, uniform[: max(2, count // 8)], args.batch_tokens, "pack")  # warm up
    cases = [("uniform 448x448", uniform, "pack"), ("mixed aspect ratios", mixed, "pack"),
             ("mixed aspect ratios", mixed, "bucket")]
    results = []
    for name, items, mode in cases:
        seconds, tokens, fill = best_of(args.repeats, lambda: run_batches(extractor, items, args.batch_tokens, mode))
        results.append({"corpus": name, "batching": mode, "tokens_per_s": tokens / seconds, "fill": fill,
                         "shapes": len({tuple(i.pixels.shape) for i in items})})
    base = results[0]["tokens_per_s"]
    say(table(
        ["corpus", "batching", "distinct shapes", "batch fill", "patch tokens/s", "vs uniform"],
        [[r["corpus"], r["batching"], r["shapes"], f"{r['fill']:.0%}", f"{r['tokens_per_s']:,.0f}",
          f"{r['tokens_per_s'] / base:.2f}x"] for r in results],
    ))
    return results


def make_jpegs(folder: Path, count: int, height: int, width: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    for index in range(count):
        base = rng.uniform(40, 200, 3)
        picture = base + (ys[..., None] * rng.uniform(-0.2, 0.2, 3)) + (xs[..., None] * rng.uniform(-0.2, 0.2, 3))
        picture += rng.normal(0, 8, picture.shape)
        Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)
    return folder


def bench_pipeline(args, device: torch.device, config: OneVisionConfig, dtype: str, work: Path) -> dict:
    """End-to-end extract against tower + merger alone on the same images, preloaded."""
    from merge_cli.config import ExtractConfig, MediaOptions
    from merge_cli.inputs.sources import collect_samples
    from merge_cli.media.images import decode_sample
    from merge_cli.run.pipeline import run_extract

    images = make_jpegs(work / "jpegs", args.pipeline_images, 480, 640)  # COCO-sized
    tower_dir = save_checkpoint(config, work / "tower")
    extract = ExtractConfig(
        inputs=(str(images),), out=str(work / "feats.h5"), tower=str(tower_dir), size=(448, 448),
        device=str(device), dtype=dtype, store_dtype="bf16", workers=args.workers,
        batch_tokens=args.batch_tokens, resume="overwrite",
    )
    media = MediaOptions(ResizePolicy(size=(448, 448)))
    items = [decode_sample(s, media) for s in collect_samples([images]).samples]
    extractor = FeatureExtractor(
        random_tower(config), None, merge_size=2, device=device, compute_dtype=dtype, store_dtype="bf16"
    )
    run_batches(extractor, items[: max(2, len(items) // 8)], args.batch_tokens, "pack")  # warm up
    alone, tokens, _ = best_of(args.repeats, lambda: run_batches(extractor, items, args.batch_tokens, "pack"))

    def end_to_end() -> tuple[float, object]:
        summary = run_extract(extract)
        return summary.timings.loop, summary  # the loop itself: decoding, compute, writing overlapped

    seconds, summary = best_of(args.repeats, end_to_end)
    timings = summary.timings
    result = {
        "images": len(items), "alone_images_per_s": len(items) / alone, "e2e_images_per_s": len(items) / seconds,
        "decode_wait_s": timings.decode_wait, "compute_s": timings.compute, "write_s": timings.write,
        "seconds": seconds, "workers": args.workers,
    }
    say(table(
        ["path", "images/s", "vs tower + merger alone"],
        [["tower + merger alone, preloaded tensors (baseline)", f"{result['alone_images_per_s']:,.1f}", "1.00x"],
         [f"end-to-end extract, {args.workers} decode workers", f"{result['e2e_images_per_s']:,.1f}",
          f"{result['e2e_images_per_s'] / result['alone_images_per_s']:.2f}x"]],
    ))
    say(f"end-to-end time split: waiting for decode {timings.decode_wait:.1f} s, compute {timings.compute:.1f} s, "
        f"write {timings.write:.1f} s (on its thread), loop {seconds:.1f} s; whole run with loading "
        f"{summary.seconds:.1f} s")
    return result


def bench_writer(args, work: Path) -> dict:
    """ShardWriter against a raw sequential write + fsync of the same bytes on the same disk."""
    from merge_cli.output.store import ShardWriter

    rows_per_sample, dim = 256, 3584  # a 448x448 image projected to a Qwen2.5-7B width, bf16
    samples = max(8, int(args.write_mb * 2**20 / (rows_per_sample * dim * 2)))
    tokens = torch.randn(samples, 1, rows_per_sample, dim).to(torch.bfloat16)
    total = tokens.numel() * 2

    def raw() -> tuple[float]:
        path = work / "raw.bin"
        started = time.perf_counter()
        with open(path, "wb") as handle:
            for sample in tokens:
                handle.write(sample.view(torch.int16).numpy().tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        seconds = time.perf_counter() - started
        path.unlink()
        return (seconds,)

    def writer() -> tuple[float]:
        out = work / "w.h5"
        started = time.perf_counter()
        with ShardWriter(out, {"config_hash": "bench"}, shard_bytes=10**12, store_dtype="bf16") as shards:
            for index, sample in enumerate(tokens):
                shards.add(Features(f"k{index}", "image", sample, (1, 32, 32), (448, 448), (448, 448), "bench"))
        seconds = time.perf_counter() - started
        shutil.rmtree(out.parent / (out.name + ".d"))
        return (seconds,)

    raw_s = best_of(args.repeats, raw)[0]
    writer_s = best_of(args.repeats, writer)[0]
    result = {"megabytes": total / 1e6, "raw_mb_per_s": total / raw_s / 1e6, "writer_mb_per_s": total / writer_s / 1e6}
    say(table(
        ["path", "MB/s", "vs raw write"],
        [["raw sequential write + fsync (baseline)", f"{result['raw_mb_per_s']:,.0f}", "1.00x"],
         ["ShardWriter, uncompressed bf16, commit + fsync", f"{result['writer_mb_per_s']:,.0f}",
          f"{result['writer_mb_per_s'] / result['raw_mb_per_s']:.2f}x"]],
    ))
    say(f"({result['megabytes']:,.0f} MB, {samples} samples of {rows_per_sample} x {dim} bf16)")
    return result


def demo_outputs(count: int, work: Path) -> list[torch.Tensor]:
    """Real tower outputs: merged features of the demo tower on generated photos (bf16)."""
    from merge_cli.config import MediaOptions
    from merge_cli.inputs.sources import collect_samples
    from merge_cli.media.images import decode_sample
    from merge_cli.models.towers import load_tower

    folder = make_jpegs(work / "photos", count, 480, 640)
    media = MediaOptions(ResizePolicy(size=(448, 448)))
    extractor = FeatureExtractor(load_tower("demo"), None, merge_size=2, device=torch.device("cpu"),
                                 compute_dtype="fp32", store_dtype="bf16")
    items = [decode_sample(s, media) for s in collect_samples([folder]).samples]
    return [r.tokens for r in extractor.extract(items).wait()]


def bench_compression(args, work: Path) -> list[dict]:
    from merge_cli.output.store import ShardWriter

    outputs = demo_outputs(args.images, work)
    raw_bytes = sum(t.numel() * 2 for t in outputs)
    results = []
    for compression in ("none", "lzf", "gzip", "zstd"):
        def write() -> tuple[float, int]:
            out = work / f"c-{compression}.h5"
            started = time.perf_counter()
            with ShardWriter(out, {"config_hash": "bench"}, shard_bytes=10**12, compression=compression,
                             store_dtype="bf16") as shards:
                for index, sample in enumerate(outputs):
                    shards.add(Features(f"k{index}", "image", sample, (1, 32, 32), (448, 448), (448, 448), "bench"))
            seconds = time.perf_counter() - started
            folder = out.parent / (out.name + ".d")
            size = sum(p.stat().st_size for p in folder.glob("*.h5"))
            shutil.rmtree(folder)
            return seconds, size

        try:
            seconds, size = best_of(args.repeats, write)
        except Exception as error:  # zstd without hdf5plugin
            say(f"{compression}: skipped ({error})")
            continue
        results.append({"compression": compression, "mb_per_s": raw_bytes / seconds / 1e6, "ratio": raw_bytes / size})
    base = results[0]["mb_per_s"]
    say(table(
        ["compression", "write MB/s", "vs none", "ratio (raw / file)"],
        [[r["compression"], f"{r['mb_per_s']:,.0f}", f"{r['mb_per_s'] / base:.2f}x", f"{r['ratio']:.2f}"] for r in results],
    ))
    say(f"({len(outputs)} demo-tower outputs, {raw_bytes / 1e6:,.1f} MB of bf16 merged features)")
    return results


def bench_reader(args, work: Path) -> dict:
    """Random access by key: open_features vs np.load of one .npy per sample, same data, warm cache."""
    from merge_cli.output.index import build_index
    from merge_cli.output.reader import open_features
    from merge_cli.output.store import ShardWriter

    count, rows, dim = args.reader_samples, 256, 1024
    out = work / "r.h5"
    npy = work / "npy"
    npy.mkdir()
    with ShardWriter(out, {"config_hash": "bench"}, store_dtype="bf16") as shards:
        for index in range(count):
            sample = torch.randn(1, rows, dim).to(torch.bfloat16)
            shards.add(Features(f"img/{index:06d}.jpg", "image", sample, (1, 32, 32), (448, 448), (448, 448), "bench"))
            np.save(npy / f"{index:06d}.npy", sample.view(torch.int16).numpy())
    build_index(out, attrs={"config_hash": "bench"})
    rng = random.Random(1)
    order = [rng.randrange(count) for _ in range(min(count, 2000))]

    def by_npy() -> tuple[float]:
        started = time.perf_counter()
        for index in order:
            torch.from_numpy(np.load(npy / f"{index:06d}.npy")).view(torch.bfloat16)
        return (time.perf_counter() - started,)

    def by_key() -> tuple[float]:
        with open_features(out) as features:
            started = time.perf_counter()
            for index in order:
                features[f"img/{index:06d}.jpg"].tokens
            return (time.perf_counter() - started,)

    by_npy(), by_key()  # warm the page cache for both
    npy_s = best_of(args.repeats, by_npy)[0]
    key_s = best_of(args.repeats, by_key)[0]
    result = {"npy_us": npy_s / len(order) * 1e6, "reader_us": key_s / len(order) * 1e6}
    say(table(
        ["path", "us per sample", "speed vs .npy"],
        [["np.load, one .npy per sample (baseline)", f"{result['npy_us']:,.0f}", "1.00x"],
         ["open_features(...)[key].tokens", f"{result['reader_us']:,.0f}", f"{npy_s / key_s:.2f}x"]],
    ))
    say(f"({len(order)} random reads of {count} samples of {rows} x {dim} bf16, page cache warm)")
    return result


def onevision_flops(config: OneVisionConfig, height: int, width: int, frames: int = 1) -> float:
    """Forward FLOPs (2 per multiply-add) of the encoder and the 2x2 merge for one sample."""
    n = frames * (height // config.patch_size) * (width // config.patch_size)
    c, inner = config.hidden_size, config.intermediate_size
    embed = 2 * n * 3 * config.patch_size**2 * c
    per_layer = 2 * n * c * c * 4 + 2 * 2 * n * n * c + 2 * 2 * n * c * inner  # q,k,v,out; QK^T, AV; MLP
    return embed + config.num_hidden_layers * per_layer  # merging is a reshape: no FLOPs


def bench_flops() -> dict:
    rows, result = [], {}
    for height, width in ((448, 448), (224, 224)):
        flops = onevision_flops(ONEVISION_LARGE, height, width)
        result[f"{height}x{width}"] = flops
        rows.append([f"{height}x{width}", f"{(height // 14) * (width // 14)}", f"{flops / 1e9:,.1f}"])
    say(table(["image", "patch tokens", "GFLOP per image (OneVision-large forward)"], rows))
    return result


# ---------------------------------------------------------------------------------------------
# The GPU part


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def bench_decode_only(args, folder: Path, media) -> float:
    """Images/s that `--workers` DataLoader processes decode and resize, with nothing else running."""
    from merge_cli.inputs.sources import collect_samples
    from merge_cli.run.pipeline import _decoded

    samples = collect_samples([folder]).samples
    started = time.perf_counter()
    count = sum(1 for _ in _decoded(samples, media, args.workers))
    return count / (time.perf_counter() - started)


def gpu_part(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    config = ONEVISION_TINY if args.quick else ONEVISION_LARGE
    dtype = "bf16" if device.type == "cuda" else "fp32"
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "model": "tiny" if args.quick else "OneVision-large", "dtype": dtype}
    say(f"# GPU part on {report['device']}, {report['model']}, {dtype}, torch {torch.__version__}")
    peak = matmul_tflops(device, 1024 if args.quick else 8192)
    report["matmul_tflops"] = peak
    say(f"measured bf16 matmul rate: {peak:,.1f} TFLOP/s")
    flops_per_image = onevision_flops(config, 448, 448)
    limit = peak * 1e12 / flops_per_image
    report["flop_bound_images_per_s"] = limit

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        say("\n## tower + merger alone vs end-to-end extract, 448x448")
        pipeline = bench_pipeline(args, device, config, dtype, work)
        report["pipeline"] = pipeline
        from merge_cli.config import MediaOptions

        decode_rate = bench_decode_only(args, work / "jpegs", MediaOptions(ResizePolicy(size=(448, 448))))
        report["decode_images_per_s"] = decode_rate
        say("\n## mixed resolutions")
        report["mixed"] = bench_mixed(args, device, config, dtype)
    alone, e2e = pipeline["alone_images_per_s"], pipeline["e2e_images_per_s"]
    rows = [
        ["FLOP-bound limit (measured matmul rate / FLOPs per image)", f"{limit:,.0f}", "1.00x"],
        ["tower + merger alone, preloaded", f"{alone:,.0f}", f"{alone / limit:.2f}x"],
        [f"end-to-end extract ({args.workers} workers)", f"{e2e:,.0f}", f"{e2e / limit:.2f}x"],
        [f"decode + resize alone ({args.workers} workers)", f"{decode_rate:,.0f}", f"{decode_rate / limit:.2f}x"],
    ]
    say("\n" + table(["448x448, " + report["dtype"], "images/s", "vs FLOP-bound limit"], rows))
    say(f"end-to-end / tower alone: {e2e / alone:.2f}")
    return report


# ---------------------------------------------------------------------------------------------


@dataclass
class Section:
    name: str
    title: str


SECTIONS = [
    Section("mixed", "mixed resolutions: tower + merger on preloaded tensors"),
    Section("pipeline", "end-to-end extract vs tower + merger alone"),
    Section("writer", "shard writer vs raw sequential write"),
    Section("compression", "compression on real tower outputs"),
    Section("reader", "random access by key vs one .npy per sample"),
    Section("flops", "FLOPs per image"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every section")
    parser.add_argument("--gpu", action="store_true", help="run the GPU part instead of the CPU part")
    parser.add_argument("--only", nargs="*", choices=[s.name for s in SECTIONS], help="CPU sections to run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: CPU cores, at most 16)")
    parser.add_argument("--report", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    args.workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    args.repeats = 1 if args.quick else 3
    args.images = 8 if args.quick else (512 if args.gpu else 48)
    args.pipeline_images = 8 if args.quick else (2048 if args.gpu else 48)
    args.batch_tokens = 2048 if args.quick else (32768 if args.gpu else 8192)
    args.write_mb = 16 if args.quick else 512
    args.reader_samples = 200 if args.quick else 4000
    torch.manual_seed(0)

    say(f"merge-cli benchmarks, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    started = time.perf_counter()
    if args.gpu:
        report = gpu_part(args)
    else:
        report = cpu_part(args)
    report["seconds"] = time.perf_counter() - started
    say(f"\ntotal {report['seconds']:.0f} s")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2, default=str))


def cpu_part(args) -> dict:
    device = torch.device("cpu")
    config = ONEVISION_TINY if args.quick else ONEVISION_SMALL
    chosen = args.only or [s.name for s in SECTIONS]
    report: dict = {"model": "tiny" if args.quick else "OneVision-shaped small (384 wide, 4 layers)"}
    say(f"model for the compute sections: {report['model']}, fp32 on CPU, batch {args.batch_tokens} tokens, "
        f"{args.workers} decode workers")
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERGE_CLI_BENCH_DIR")) as tmp:
        work = Path(tmp)
        for section in SECTIONS:
            if section.name not in chosen:
                continue
            say(f"\n## {section.title}")
            sub = work / section.name
            sub.mkdir()
            if section.name == "mixed":
                report["mixed"] = bench_mixed(args, device, config, "fp32")
            elif section.name == "pipeline":
                report["pipeline"] = bench_pipeline(args, device, config, "fp32", sub)
            elif section.name == "writer":
                report["writer"] = bench_writer(args, sub)
            elif section.name == "compression":
                report["compression"] = bench_compression(args, sub)
            elif section.name == "reader":
                report["reader"] = bench_reader(args, sub)
            elif section.name == "flops":
                report["flops"] = bench_flops()
    return report


if __name__ == "__main__":
    main()
