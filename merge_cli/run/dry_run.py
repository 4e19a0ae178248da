"""`extract --dry-run`: list and plan a run without running it, to size it before it starts.

The plan is what the run would do, measured where it can be and estimated only where it must be:

  inputs   listed exactly as the run lists them (units, --limit, the resume scan of an existing
           output: what is done already is not planned again);
  tokens   from the headers only (`plan_sample`: the grid rule on each file's size and frame count,
           in the --workers processes, no pixel decoded), through the tower's own token grid:
           exact wherever decoding agrees with the header (tests hold them equal), estimated from
           the duration for videos whose header keeps no frame count (Matroska, WebM);
  bytes    tokens x token width x stored dtype size, plus an allowance per sample (the shard and
           index tables, about 0.4 KB measured) and a chunk per shard and for a new index (their
           last chunk is stored whole);
           with --compression the uncompressed size, an upper bound;
  time     from a probe: the first few samples of each kind are decoded (timed, one core each) and
           one full --batch-tokens batch of them runs through the tower (timed after a warm-up
           pass). The estimate is the slower of decoding (per-kind time x count / workers) and
           compute (patch tokens / the measured rate), as the run overlaps them. Writing and model
           loading are not counted. When no sample of a planned kind could be decoded there is no
           time estimate (it would be a guess), and the plan says why.

Nothing is written: no shard, no index, no lock (an output being written by another run can be
planned), no stale temporary removed.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from merge_cli.config import ExtractConfig, MediaOptions
from merge_cli.errors import MediaError, UsageError
from merge_cli.records import Failure, Item, Sample, escape_text

PROBE_PER_KIND = 4
"""Samples of each kind (image, video) decoded and run through the tower for the time estimate."""
PROBE_MAX_ITEMS = 1024
"""At most this many (repeated) probe samples in the timed batch, however large --batch-tokens is."""
PER_SAMPLE_BYTES = 512
"""Allowance for one sample's rows in its shard's and the index's tables (the index alone measures
about 360 B per sample in benchmarks/bench_scale.py)."""
FAILURE_PREVIEW = 5


@dataclass
class Plan:
    """What `extract` would do (see the module docstring for how each figure is made)."""

    out: str
    listed: int = 0
    """Inputs listed (within --limit)."""
    to_do: int = 0
    """Inputs the run would process (listed minus those the output already holds)."""
    skipped: int = 0
    would_fail: int = 0
    """Inputs whose headers already show they would fail (also counted in to_do)."""
    ignored_files: int = 0
    images: int = 0
    videos: int = 0
    frames: int = 0
    patch_tokens: int = 0
    tokens: int = 0
    """Stored (merged) tokens."""
    token_dim: int = 0
    store_dtype: str = ""
    dtype_bytes: int = 0
    bytes: int = 0
    """Estimated bytes the run would add (shards and index)."""
    compression: str = "none"
    limit: int | None = None
    tower: str = ""
    output: str = ""
    device: str = ""
    workers: int = 0
    estimated_seconds: float | None = None
    estimate: dict | None = None
    """How the time estimate was made: the probe's measurements (None without an estimate)."""
    estimate_note: str = ""
    """Why there is no time estimate, or what it leaves out."""
    failures: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["dry_run"] = True
        data["failures_left_out"] = self.would_fail - len(self.failures)
        return data


class _PlanDataset(torch.utils.data.Dataset):
    """Todo descriptors in, (sample, (frames, rows, cols)) or a Failure out: headers only."""

    def __init__(self, media: MediaOptions) -> None:
        self.media = media

    def __getitem__(self, todo) -> tuple[Sample | None, tuple[int, int, int] | Failure]:
        from merge_cli.media.images import plan_sample

        entry = todo.entry
        if isinstance(entry, Failure):
            return None, entry
        try:
            return entry, plan_sample(entry, self.media)
        except MediaError as error:
            return entry, Failure(entry.key, error.stage, error.error_type, escape_text(str(error)))
        except Exception as error:  # as decode_sample: one sample's row, never a crash
            return entry, Failure(entry.key, "open", type(error).__name__, escape_text(str(error) or type(error).__name__))


def plan_extract(config: ExtractConfig, reporter=None) -> Plan:
    """Plan `config` without writing anything; raises MergeCliError where the run would not start."""
    from merge_cli.inputs.parquet import ParquetColumns
    from merge_cli.inputs.sources import ListingStats, stream_units
    from merge_cli.output.preflight import check_output_location
    from merge_cli.run.compute import resolve_device
    from merge_cli.run.distributed import DistContext, unit_claims
    from merge_cli.run.feed import UnitPlan, WorkFeed
    from merge_cli.run.pipeline import (
        _checkpoint_vision,
        _decoded,
        build_models,
        output_attrs,
    )
    from merge_cli.run.progress import Reporter

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UsageError("--dry-run plans in one process: run it without torchrun (it plans the whole job)")
    reporter = reporter or Reporter()
    check_output_location(config.out, try_writing=False)
    out = Path(config.out)
    device = resolve_device(config.device)
    stats = ListingStats()
    units = stream_units(
        [Path(p) for p in config.inputs],
        Path(config.media_root) if config.media_root else None,
        unit_size=config.unit_size,
        gif_as_video=config.gif_as_video,
        stats=stats,
        columns=ParquetColumns(config.image_column, config.video_column, config.key_column),
        check_roots=True,
        limit=config.limit,
    )
    models = build_models(config)
    tower = models.tower
    media = config.media_options(_checkpoint_vision(config, tower))
    compute_dtype = config.dtype or ("bf16" if device.type == "cuda" else "fp32")
    store_dtype = config.store_dtype or compute_dtype
    attrs = output_attrs(config, models, media, compute_dtype, store_dtype)
    if tower.is_demo:
        from merge_cli.models.towers.demo import DEMO_WARNING

        reporter.warn(DEMO_WARNING)
    scan = _existing_output(config, out, attrs)
    dist = DistContext.detect(config.rank, config.world_size)
    feed = WorkFeed(
        units, unit_claims(dist), UnitPlan(scan, out, retry_failed=config.retry_failed, warn=reporter.warn),
        on_total=reporter.set_total, listing_ended=lambda: stats.ended,
    )
    token_dim = models.projector.llm_dim if models.projector is not None else tower.hidden_size * config.merge_size**2
    plan = Plan(
        out=str(out), token_dim=token_dim, store_dtype=store_dtype, dtype_bytes=_DTYPE_BYTES[store_dtype],
        compression=config.compression, limit=config.limit, tower=tower.name, output=config.output_kind,
        device=str(device), workers=config.workers,
    )
    probes: dict[str, list[Sample]] = {"image": [], "video": []}
    reporter.start(0, "planning")
    try:
        units_touched = _plan_entries(plan, feed, _decoded(feed, media, config.workers, _PlanDataset(media)), tower,
                                      config.merge_size, probes, reporter)
    finally:
        reporter.finish()
    plan.listed, plan.skipped, plan.ignored_files = feed.listed, feed.skipped, stats.ignored
    if feed.exhausted and not feed.listed:
        reporter.warn(f"no images or videos found in {', '.join(config.inputs)}")
    token_bytes = plan.tokens * token_dim * plan.dtype_bytes
    chunks = units_touched + token_bytes // config.shard_bytes  # each shard's last chunk is stored whole
    plan.bytes = token_bytes + plan.to_do * PER_SAMPLE_BYTES + chunks * _chunk_bytes()
    _estimate_time(plan, probes, media, models, config, device, compute_dtype, store_dtype)
    plan.warnings = list(reporter.warnings)
    return plan


_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _chunk_bytes() -> int:
    from merge_cli.output.format import CHUNK_TARGET_BYTES

    return CHUNK_TARGET_BYTES


def _existing_output(config: ExtractConfig, out: Path, attrs: dict):
    """The resume scan of an existing output, read only (no temporary removed); refused settings
    are refused as the run would refuse them. --overwrite plans a fresh start (nothing removed)."""
    from merge_cli.output import store
    from merge_cli.run.pipeline import _check_same_settings

    if config.resume == "overwrite":
        return None
    scan = store.scan_units(out, rank=config.rank or 0, remove_temporaries=False)
    if scan is not None:
        _check_same_settings(scan.attrs, attrs, out)
    return scan


def _plan_entries(plan: Plan, feed, planned_entries, tower, merge_size: int, probes, reporter) -> int:
    """Count every planned entry into `plan` (keeping the first few of each kind for the probe);
    the number of units that would get new shards."""
    units_touched = 0
    for sample, planned in planned_entries:
        before = plan.patch_tokens
        _count(plan, sample, planned, tower, merge_size, probes)
        failed = isinstance(planned, Failure)
        if failed:
            reporter.advance(failures=1)
        else:
            reporter.advance(samples=1, tokens=plan.patch_tokens - before)
        # Done with the entry: the feed then holds only the units in flight, as in a run.
        key = planned.key if failed else sample.key
        unit = feed.unit_of(key)
        if feed.stored(planned if failed else Failure(key, "plan", "", "")):
            feed.marker(unit, [])
            units_touched += 1
        while not feed.empty_units.empty():
            feed.marker(feed.empty_units.get(), [])
    return units_touched


def _count(plan: Plan, sample, planned, tower, merge_size: int, probes: dict[str, list[Sample]]) -> None:
    plan.to_do += 1
    if isinstance(planned, Failure):
        plan.would_fail += 1
        if len(plan.failures) < FAILURE_PREVIEW:
            plan.failures.append(asdict(planned))
        return
    frames, rows, cols = planned
    patch = tower.patch_size
    t, h, w = tower.feature_grid(frames, rows * patch, cols * patch)
    plan.patch_tokens += t * h * w
    plan.tokens += t * (h // merge_size) * (w // merge_size)
    if sample.kind == "video":
        plan.videos += 1
        plan.frames += frames
    else:
        plan.images += 1
    if len(probes[sample.kind]) < PROBE_PER_KIND:
        probes[sample.kind].append(sample)


def _estimate_time(plan: Plan, probes, media, models, config, device, compute_dtype, store_dtype) -> None:
    """Decode the probe samples and time one full batch of them through the tower (see module doc)."""
    from merge_cli.media.images import decode_sample
    from merge_cli.run.compute import FeatureExtractor

    if not plan.patch_tokens:
        plan.estimate_note = "nothing to run"
        plan.estimated_seconds = 0.0 if plan.to_do == plan.would_fail else None
        return
    items: list[Item] = []
    decode_seconds: dict[str, list[float]] = {"image": [], "video": []}
    for kind, samples in probes.items():
        for sample in samples:
            started = time.perf_counter()
            item = decode_sample(sample, media)
            if isinstance(item, Item):
                decode_seconds[kind].append(time.perf_counter() - started)
                items.append(item)
    wanted = {"image": plan.images, "video": plan.videos}
    missing = [kind for kind, count in wanted.items() if count and not decode_seconds[kind]]
    if missing:
        plan.estimate_note = (
            f"no time estimate: none of the first {' or '.join(f'{kind}s' for kind in missing)} could be decoded "
            "to time it"
        )
        return
    extractor = FeatureExtractor(
        models.tower, models.projector, merge_size=config.merge_size, device=device,
        compute_dtype=compute_dtype, store_dtype=store_dtype, rescale_factor=media.rescale_factor,
    )
    size = {id(item): _patch_tokens(extractor, item) for item in items}
    extractor.extract([min(items, key=lambda item: size[id(item)])]).wait()  # warm-up: first-call costs
    batch: list[Item] = []
    tokens = 0
    while len(batch) < PROBE_MAX_ITEMS:  # one full batch of the probe samples, as the run packs them
        item = items[len(batch) % len(items)]
        if batch and tokens + size[id(item)] > config.batch_tokens:
            break
        batch.append(item)
        tokens += size[id(item)]
    started = time.perf_counter()
    extractor.extract(batch).wait()
    tower_seconds = time.perf_counter() - started
    rate = tokens / max(tower_seconds, 1e-9)
    per_sample = {kind: sum(seconds) / len(seconds) for kind, seconds in decode_seconds.items() if seconds}
    decoding = sum(per_sample.get(kind, 0.0) * count for kind, count in wanted.items())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parallel = max(1, min(config.workers, cores))
    compute = plan.patch_tokens / rate
    if config.workers == 0:  # decoding runs in the main process, between the batches
        seconds, bound = decoding + compute, "decode + compute (--workers 0)"
    else:
        seconds, bound = max(decoding / parallel, compute), "decode" if decoding / parallel > compute else "compute"
    plan.estimated_seconds = seconds
    plan.estimate = {
        "tower_patch_tokens_per_second": rate,
        "probe_batch_patch_tokens": tokens,
        "decode_seconds_per_sample": per_sample,
        "decode_workers": parallel,
        "decode_seconds": decoding / parallel if config.workers else decoding,
        "compute_seconds": compute,
        "bound": bound,
    }
    plan.estimate_note = "writing and model loading not counted"


def _patch_tokens(extractor, item: Item) -> int:
    t, h, w = extractor.feature_grid(item)
    return t * h * w
