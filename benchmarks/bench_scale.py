"""Does merge-cli stay flat from 10k to 1M inputs? (issue 10)

    python benchmarks/bench_scale.py                 # 10k, 100k, 1M; prints the table
    python benchmarks/bench_scale.py --write         # ... and writes it into benchmarks/README.md and README.md
    python benchmarks/bench_scale.py --sizes 2000 20000

Inputs are distinct symlinks (nested folders of 1,000, as large image sets are laid out) to a pool
of 300 small generated JPEGs, under /tmp/merge-cli-bench-scale (never in the repository). For each
size, in one run:

- time to the first committed shard and the peak RSS (VmHWM) of the main process and of its decode
  worker at that moment: a real `merge-cli extract` (demo tower, CPU, 1 worker, --unit-size 500),
  killed once its first shard is committed (decoding 1M images on 2 cores would take hours);
- a finished output of N samples (1 token of 8 floats each, one shard and one completion marker
  per unit of 10,000, written with ShardWriter and write_unit_marker exactly as extract writes
  them, keys and fingerprints from the same listing), then on it:
  - the resume scan (store.scan_units), and the files it opened;
  - a resume run with nothing to do (`merge-cli extract` again: it lists every input, so its time
    grows with N; it must write nothing);
  - open_features time and RSS growth, and a FeatureDataset in a DataLoader worker;
  - random key lookups (feats.index(key), and feats[key] which also reads the tokens), timed on a
    second pass: the first pass opens every shard once (its time is its own row).

The 10k column is the baseline; the last column is 1M / 10k. The machine is shared with other
work (2 cores), so timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/tmp/merge-cli-bench-scale")
POOL_SIZE = 300
FOLDER_SIZE = 1000
FIRST_SHARD_UNIT = 500
FINISHED_UNIT = 10_000
LOOKUPS = 2000
REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench_scale:begin -->", "<!-- bench_scale:end -->"


def make_pool() -> Path:
    pool = ROOT / "pool"
    if (pool / ".complete").exists():
        return pool
    import numpy as np
    from PIL import Image

    pool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(POOL_SIZE):
        h, w = 48 + 8 * (index % 7), 48 + 8 * (index % 5)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pool / f"p{index:03d}.jpg", quality=90)
    (pool / ".complete").touch()
    return pool


def key_of(index: int) -> str:
    return f"d{index // FOLDER_SIZE:04d}/{index:07d}.jpg"


def make_farm(n: int, pool: Path) -> Path:
    farm = ROOT / f"farm-{n}"
    if (farm / ".complete").exists():
        return farm
    shutil.rmtree(farm, ignore_errors=True)
    for start in range(0, n, FOLDER_SIZE):
        (farm / key_of(start)).parent.mkdir(parents=True)
        for index in range(start, min(n, start + FOLDER_SIZE)):
            os.symlink(pool / f"p{index % POOL_SIZE:03d}.jpg", farm / key_of(index))
    (farm / ".complete").touch()
    return farm


def _status(pid: int, field: str) -> int:
    """VmHWM / VmRSS of a process in bytes (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def first_shard(n: int, farm: Path) -> dict:
    run = ROOT / f"run-{n}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    out = run / "feats.h5"
    command = [sys.executable, "-m", "merge_cli", "extract", "--input", str(farm), "--out", str(out), "--device",
               "cpu", "--dtype", "fp32", "--workers", "1", "--unit-size", str(FIRST_SHARD_UNIT), "--json"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    shards = run / "feats.h5.d"
    worker_peak = 0
    try:
        while process.poll() is None:
            for child in _children(process.pid):
                worker_peak = max(worker_peak, _status(child, "VmHWM"))
            if shards.is_dir() and any(p.suffix == ".h5" for p in shards.iterdir()):
                seconds = time.perf_counter() - started
                main_peak = _status(process.pid, "VmHWM")
                for child in _children(process.pid):
                    worker_peak = max(worker_peak, _status(child, "VmHWM"))
                return {"first_shard_s": seconds, "main_peak_mb": main_peak / 1e6, "worker_peak_mb": worker_peak / 1e6}
            time.sleep(0.02)
        raise SystemExit(f"extract ended before its first shard: {process.stderr.read().decode()[-2000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(run, ignore_errors=True)


def finished_output(n: int, farm: Path) -> tuple[Path, float]:
    """A complete output over the farm's listing, as extract would leave it (tiny features)."""
    out = ROOT / f"finished-{n}" / "feats.h5"
    if (out.parent / ".complete").exists():
        return out, float((out.parent / ".complete").read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    import torch

    from merge_cli.config import ExtractConfig
    from merge_cli.inputs.sources import stream_units
    from merge_cli.output.index import build_index
    from merge_cli.output.store import ShardWriter, write_unit_marker
    from merge_cli.records import Features
    from merge_cli.run.pipeline import build_models, output_attrs

    config = ExtractConfig(inputs=(str(farm),), out=str(out), device="cpu", dtype="fp32", unit_size=FINISHED_UNIT)
    models = build_models(config)
    media = config.media_options(models.tower.patch_size)
    attrs = output_attrs(config, models, media, "fp32", "fp32")
    generator = torch.Generator().manual_seed(0)
    with ShardWriter(out, attrs, store_dtype="fp32") as writer:
        for unit in stream_units([farm], unit_size=FINISHED_UNIT):
            tokens = torch.randn((len(unit.entries), 1, 1, 8), generator=generator)
            for entry, rows in zip(unit.entries, tokens):
                writer.add(Features(entry.key, "image", rows, (1, 2, 2), (64, 64), (28, 28), "pillow"), unit.id)
            names = writer.finish_unit(unit.id)
            write_unit_marker(out, unit.id, {
                "fingerprint": unit.fingerprint, "entries": len(unit.entries), "samples": len(unit.entries),
                "failures": 0, "shards": names, "rank": 0, "config_hash": attrs["config_hash"],
                "unit_size": FINISHED_UNIT,
            })
    started = time.perf_counter()
    build_index(out)
    index_seconds = time.perf_counter() - started
    (out.parent / ".complete").write_text(str(index_seconds))
    return out, index_seconds


PROBE = r"""
import json, os, random, sys, time
import h5py, numpy, torch  # imported first: the RSS growth below is the open itself
def rss(field="VmRSS"):
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
out, n, lookups, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from merge_cli.output import store
from merge_cli.output.reader import FeatureDataset, open_features
opened = []
real = store.open_h5
store.open_h5 = lambda path, **kw: opened.append(str(path)) or real(path, **kw)
started = time.perf_counter(); scan = store.scan_units(out); scan_s = time.perf_counter() - started
store.open_h5 = real
before = rss(); started = time.perf_counter()
feats = open_features(out)
open_s = time.perf_counter() - started; open_mb = (rss() - before) / 1e6
assert len(feats) == n
rng = random.Random(1)
keys = [f"d{i // folder:04d}/{i:07d}.jpg" for i in (rng.randrange(n) for _ in range(lookups + 1))]
started = time.perf_counter()
for key in keys:  # the first lookup reads the key table's fence; every shard is opened once
    assert feats[key].key == key
warm_s = time.perf_counter() - started
keys = [f"d{i // folder:04d}/{i:07d}.jpg" for i in (rng.randrange(n) for _ in range(lookups))]
started = time.perf_counter()
rows = [feats.index(key) for key in keys]
index_us = (time.perf_counter() - started) / lookups * 1e6
started = time.perf_counter()
for key in keys:
    assert feats[key].key == key
get_us = (time.perf_counter() - started) / lookups * 1e6
feats.close()
class Probe(torch.utils.data.Dataset):
    def __init__(self):
        self.data = FeatureDataset(out)
    def __len__(self):
        return len(self.data)
    def __getitem__(self, i):
        self.data[i]
        return rss("VmHWM")
loader = torch.utils.data.DataLoader(Probe(), batch_size=None, num_workers=1, sampler=[rng.randrange(n) for _ in range(50)])
worker_mb = max(loader) / 1e6
print(json.dumps({"scan_s": scan_s, "scan_opened": len(opened), "units": len(scan.complete), "shards": scan.shard_count,
                  "open_s": open_s, "open_mb": open_mb, "index_us": index_us, "get_us": get_us, "warm_s": warm_s,
                  "dataset_worker_mb": worker_mb}))
"""


def probe(out: Path, n: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(out), str(n), str(LOOKUPS), str(FOLDER_SIZE)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout)


RESUME = r"""
import resource, sys, time
from merge_cli.cli import app
started = time.perf_counter()
try:
    app(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(f"{time.perf_counter() - started} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024} {code}", file=sys.stderr)
"""


def resume_run(out: Path, farm: Path) -> dict:
    before = sorted(p.name for p in out.with_name(out.name + ".d").iterdir()) + [str(out.stat().st_mtime_ns)]
    done = subprocess.run([sys.executable, "-c", RESUME, "extract", "--input", str(farm), "--out", str(out),
                           "--device", "cpu", "--dtype", "fp32", "--unit-size", str(FINISHED_UNIT), "--json"],
                          capture_output=True, text=True, check=False)
    seconds, peak, code = done.stderr.strip().splitlines()[-1].split()
    summary = json.loads(done.stdout)
    after = sorted(p.name for p in out.with_name(out.name + ".d").iterdir()) + [str(out.stat().st_mtime_ns)]
    if code != "0" or summary["written"] != 0 or before != after:
        raise SystemExit(f"the resume with nothing to do wrote something or failed: {done.stderr[-2000:]}")
    return {"resume_run_s": float(seconds), "resume_run_mb": int(peak) / 1e6}


ROWS = [
    ("time to the first committed shard", "first_shard_s", "{:.1f} s"),
    ("peak RSS, main process (at the first shard)", "main_peak_mb", "{:.0f} MB"),
    ("peak RSS, decode worker (at the first shard)", "worker_peak_mb", "{:.0f} MB"),
    ("resume scan of the finished output", "scan_s", "{:.3f} s"),
    ("  files the scan opened (markers are JSON, not counted)", "scan_opened", "{:d}"),
    ("  units / shards in the output", "units_shards", "{}"),
    ("open_features time", "open_s", "{:.1f} ms"),
    ("open_features RSS growth", "open_mb", "{:.1f} MB"),
    ("FeatureDataset in a DataLoader worker, peak RSS", "dataset_worker_mb", "{:.0f} MB"),
    ("random key lookup, feats.index(key)", "index_us", "{:.0f} us"),
    ("random sample by key, feats[key] (tokens too)", "get_us", "{:.0f} us"),
    ("  the first pass of lookups (opens every shard once)", "warm_s", "{:.2f} s"),
    ("resume run with nothing to do (lists every input)", "resume_run_s", "{:.1f} s"),
    ("  its peak RSS", "resume_run_mb", "{:.0f} MB"),
    ("build_index of the finished output", "index_build_s", "{:.1f} s"),
    ("  index file size per sample", "index_bytes_per_sample", "{:.0f} B"),
]
FLAT = {"first_shard_s", "main_peak_mb", "worker_peak_mb", "open_s", "open_mb", "dataset_worker_mb", "index_us", "get_us"}
"""The figures the issue wants within 1.5x from 10k to 1M."""


def table(results: dict[int, dict]) -> str:
    sizes = sorted(results)
    head = "| figure | " + " | ".join(f"{n:,}" for n in sizes) + f" | {sizes[-1]:,} / {sizes[0]:,} |"
    lines = [head, "|" + " --- |" * (len(sizes) + 2)]
    for label, name, form in ROWS:
        cells = []
        for n in sizes:
            value = results[n].get(name)
            if name == "open_s":
                value = value * 1e3
            cells.append(form.format(value) if value is not None else "-")
        first, last = results[sizes[0]].get(name), results[sizes[-1]].get(name)
        ratio = f"{last / first:.2f}x" if isinstance(first, (int, float)) and first and name != "units_shards" else ""
        if name in FLAT and ratio:
            ratio += " (ok)" if last / first <= 1.5 else " (over 1.5x)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def write_between_markers(path: Path, text: str) -> None:
    content = path.read_text()
    start, end = content.index(BEGIN) + len(BEGIN), content.index(END)
    path.write_text(content[:start] + "\n" + text + "\n" + content[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/README.md and README.md")
    parser.add_argument("--from-log", type=Path, help="make the table from the stderr of an earlier run instead of measuring")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    results: dict[int, dict] = {}
    if args.from_log:  # the per-size lines this script prints on stderr
        for line in args.from_log.read_text().splitlines():
            if " inputs: {" in line:
                size, rest = line.split(" inputs: ", 1)
                results[int(size.replace(",", ""))] = json.loads(rest[: rest.rindex("}") + 1])
        args.sizes = sorted(results)
    pool = make_pool() if not args.from_log else None
    for n in args.sizes if not args.from_log else []:
        started = time.perf_counter()
        farm = make_farm(n, pool)  # type: ignore[arg-type]
        figures = first_shard(n, farm)
        out, index_seconds = finished_output(n, farm)
        figures.update(probe(out, n), index_build_s=index_seconds, index_bytes_per_sample=out.stat().st_size / n)
        figures["units_shards"] = f"{figures.pop('units')} / {figures.pop('shards')}"
        figures.update(resume_run(out, farm))
        results[n] = figures
        print(f"{n:,} inputs: {json.dumps(figures)} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    text = (
        f"`python benchmarks/bench_scale.py --sizes {' '.join(map(str, args.sizes))}` on "
        f"{time.strftime('%Y-%m-%d')}, 2 shared CPU cores, no GPU (timings are noisy):\n\n" + table(results)
    )
    print(text)
    if args.write:
        write_between_markers(REPO / "benchmarks" / "README.md", text)
        write_between_markers(REPO / "README.md", table(results))


if __name__ == "__main__":
    main()
