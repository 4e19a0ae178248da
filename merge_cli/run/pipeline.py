"""The extract loop: sources -> DataLoader (decode) -> batches -> tower + merger -> writer.

`run_extract` is the whole job behind `merge-cli extract`. Decoding runs in DataLoader worker
processes (they receive Sample descriptors, never models); the main process batches by token
budget and runs the models; a writer thread stores results so disk I/O overlaps the next batch.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from merge_cli import __version__
from merge_cli.config import ExtractConfig, MediaOptions
from merge_cli.errors import ConfigMismatchError
from merge_cli.hashing import hash_json
from merge_cli.media.images import decode_sample
from merge_cli.models.merger import SpatialMergeProjector, load_projector_with_hash
from merge_cli.records import Failure, Features, Item
from merge_cli.run.batching import TokenBatcher
from merge_cli.run.compute import FeatureExtractor, PendingOutput, resolve_device
from merge_cli.run.distributed import DistContext, unit_claims
from merge_cli.run.feed import Todo, UnitPlan, WorkFeed
from merge_cli.run.lifeline import exit_with_parent
from merge_cli.run.progress import Reporter

RANDOM_PROJECTOR_SEED = 1234
FAILURE_PREVIEW = 5


@dataclass
class Models:
    """What runs on the device, with the provenance the output records."""

    tower: torch.nn.Module
    projector: SpatialMergeProjector | None
    projector_source: str
    projector_hash: str


@dataclass
class Timings:
    """Where the wall time went (seconds). decode_wait: the main loop blocked on decoding."""

    decode_wait: float = 0.0
    decode_cpu: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    loop: float = 0.0
    """Wall time of the extract loop itself (first decode to last write), without model loading."""


@dataclass
class RunSummary:
    """The outcome of one extract run (of this rank, or merged over ranks)."""

    out: str
    samples: int = 0
    written: int = 0
    skipped: int = 0
    failed: int = 0
    ignored_files: int = 0
    tokens: int = 0
    patch_tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    batches: int = 0
    batch_fill: float = 0.0
    stopped_early: bool = False
    tower: str = ""
    tower_is_demo: bool = False
    output: str = ""
    device: str = ""
    compute_dtype: str = ""
    store_dtype: str = ""
    world_size: int = 1
    torchrun: bool = False
    """The ranks were connected (torchrun): partial failure then exits 0 unless `strict`."""
    strict: bool = False
    preprocess: str = "native"
    """Who decided the sizes: `checkpoint` (its own processor) or `native` (merge-cli's policy)."""
    made_even: int = 0
    """Samples whose processor grid could not merge and was made even (both grids are stored)."""
    limit: int | None = None
    """--limit: only the first this many inputs of the listing were taken."""
    timings: Timings = field(default_factory=Timings)
    failures: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """3 when inputs failed, 0 otherwise; under torchrun 0 unless --strict.

        torchrun's elastic agent reads any non-zero exit as a crashed worker: it tears the job
        down and prints ChildFailedError, although a run with a few bad files produced a sound
        output. So every rank exits 0 and rank 0's summary says how many failed; --strict makes
        failures fatal (exit 3 on every rank).
        """
        if not self.failed:
            return 0
        return 3 if self.strict or not self.torchrun else 0

    def to_dict(self) -> dict:
        data = asdict(self)
        seconds = max(self.seconds, 1e-9)
        data["samples_per_second"] = self.written / seconds
        data["patch_tokens_per_second"] = self.patch_tokens / seconds
        data["failures_left_out"] = self.failed - len(self.failures)  # the list holds the first few
        data["exit_code"] = self.exit_code
        return data


def run_extract(config: ExtractConfig, reporter: Reporter | None = None) -> RunSummary:
    """Run `merge-cli extract`; raises MergeCliError subclasses for runs that cannot start."""
    from merge_cli.output.preflight import check_output_location

    check_output_location(config.out)  # first: a bad --out fails before any model or media work
    reporter = reporter or Reporter()
    started = time.perf_counter()
    dist = DistContext.detect(config.rank, config.world_size)
    device = resolve_device(dist.device_name(config.device))
    dist.setup(device.type)
    from merge_cli.output.format import shard_dir

    shards = shard_dir(Path(config.out))
    new_output = not shards.exists()
    held = claim_output(Path(config.out), dist)  # before any temporary is touched
    try:
        return _run_claimed(config, reporter, dist, device, started)
    finally:
        for lock in reversed(held):
            lock.release()
        if new_output:
            _remove_if_empty(shards)  # a run refused before writing leaves nothing, not even the lock folder


def _remove_if_empty(folder: Path) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass  # not empty (shards were written, or another rank's lock is there), or already gone


def claim_output(out: Path, dist: DistContext) -> list:
    """Take this process's locks on `out` (merge_cli/output/locks.py), or refuse the run.

    Every process holds its rank's lock (its shards and temporaries). The process that lists,
    removes and indexes for the whole job (alone, or rank 0 under torchrun) also holds the output
    lock for the whole run. Ranks started by hand take the output lock only while indexing. Under
    torchrun the ranks agree: if one is refused, all are, with the same line.
    """
    from merge_cli.errors import MergeCliError, OutputBusyError, UsageError
    from merge_cli.output import locks

    if not out.name:
        raise UsageError(f"--out must name a file such as feats.h5; got {str(out)!r}")
    held: list = []
    problem: str | None = None
    try:
        if dist.is_main and (dist.connected or not dist.is_split):
            held.append(locks.acquire(locks.output_lock_path(out), str(out)))
        held.append(locks.acquire(locks.rank_lock_path(out, dist.rank), f"{out} (rank {dist.rank})"))
    except MergeCliError as error:
        problem = str(error)
    if dist.connected:
        problem = next((p for p in dist.gather(problem) if p), None)  # type: ignore[misc]
    if problem is not None:
        for lock in reversed(held):
            lock.release()
        raise OutputBusyError(problem)
    return held


def _run_claimed(
    config: ExtractConfig, reporter: Reporter, dist: DistContext, device: torch.device, started: float
) -> RunSummary:
    from merge_cli.inputs.parquet import ParquetColumns
    from merge_cli.inputs.sources import ListingStats, stream_units
    from merge_cli.output import store
    from merge_cli.output.index import build_index

    compute_dtype = config.dtype or ("bf16" if device.type == "cuda" else "fp32")
    store_dtype = config.store_dtype or compute_dtype
    out = Path(config.out)

    stats = ListingStats()
    # The inputs are checked now (cheap: paths, Parquet schemas, manifest roots), before the tower
    # loads and before --overwrite removes anything; they are listed only as the work goes.
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
    models = build_models(config)  # before any input is listed or decoded
    tower = models.tower
    media = config.media_options(_checkpoint_vision(config, tower))
    attrs = output_attrs(config, models, media, compute_dtype, store_dtype)
    if tower.is_demo:
        from merge_cli.models.towers.demo import DEMO_WARNING

        reporter.warn(DEMO_WARNING)
    if config.projector and models.projector is None:
        reporter.warn(f"--output merged stores tower features before the projector: {config.projector} is not used")
    scan = _scan_output(config, out, attrs, dist)
    plan = UnitPlan(scan, out, retry_failed=config.retry_failed, warn=reporter.warn)
    feed = WorkFeed(units, unit_claims(dist), plan, on_total=reporter.set_total, listing_ended=lambda: stats.ended)

    summary = RunSummary(
        out=str(out),
        tower=tower.name,
        tower_is_demo=tower.is_demo,
        output=config.output_kind,
        device=str(device),
        compute_dtype=compute_dtype,
        store_dtype=store_dtype,
        world_size=dist.world_size,
        torchrun=dist.connected,
        strict=config.strict,
        preprocess=media.mode,
        limit=config.limit,
    )
    extractor = FeatureExtractor(
        tower,
        models.projector,
        merge_size=config.merge_size,
        device=device,
        compute_dtype=compute_dtype,
        store_dtype=store_dtype,
        rescale_factor=media.rescale_factor,
    )
    writer = store.ShardWriter(
        out,
        attrs,
        rank=dist.rank,
        shard_bytes=config.shard_bytes,
        compression=config.compression,
        store_dtype=store_dtype,
    )
    if dist.connected:  # rank 0 shows the whole job's progress (every rank lists every unit)
        reporter.job = dist.job_counts()
    reporter.start(0)
    marker_extra = {"rank": dist.rank, "config_hash": attrs["config_hash"], "unit_size": config.unit_size}
    try:
        _extract_loop(config, media, feed, extractor, writer, reporter, summary, marker_extra)
    except KeyboardInterrupt:
        if not dist.connected:  # make what was finished readable through feats.h5 right away
            build_index(out, attrs=attrs)
        raise
    finally:
        reporter.finish()
    summary.samples, summary.skipped, summary.ignored_files = feed.listed, feed.skipped, stats.ignored
    if feed.exhausted and not feed.listed:
        reporter.warn(f"no images or videos found in {', '.join(config.inputs)}")
    summary.seconds = time.perf_counter() - started
    summary = _finish(out, attrs, dist, summary, reporter)
    return summary


def _checkpoint_vision(config: ExtractConfig, tower):
    """What the tower's own processor decides (from its folder), with the loaded tower's patch
    size and temporal patch (the authority over a config.json guess)."""
    from dataclasses import replace

    from merge_cli.media.processor import read_checkpoint_vision

    vision = read_checkpoint_vision(config.tower)
    return replace(
        vision, patch_size=tower.patch_size, temporal_patch_size=getattr(tower, "temporal_patch_size", 1)
    )


def build_models(config: ExtractConfig) -> Models:
    """Load the tower (and projector) once per process, on the CPU; the extractor moves them."""
    from merge_cli.models.towers import load_tower

    tower = load_tower(config.tower, layer=config.layer, trust_remote_code=config.trust_remote_code)
    if hasattr(tower, "set_temporal_positions"):
        tower.set_temporal_positions(config.temporal_positions)
    elif config.temporal_positions != "index":
        from merge_cli.errors import UsageError

        raise UsageError(f"--temporal-positions applies to OneVision towers only; {tower.name} is {tower.kind}")
    if config.output_kind == "merged":
        return Models(tower, None, "none", "none")
    if config.random_projector:
        projector = random_projector(tower.hidden_size, config.llm_dim or 4 * tower.hidden_size, config)
        from merge_cli.hashing import hash_state_dict

        return Models(tower, projector, "random", hash_state_dict(projector.state_dict()))
    loaded = load_projector_with_hash(config.projector, eps=config.projector_eps)
    if loaded.module.vit_dim != tower.hidden_size:
        from merge_cli.errors import CheckpointError

        raise CheckpointError(
            f"projector {config.projector} expects tower width {loaded.module.vit_dim}, "
            f"but {tower.name} produces {tower.hidden_size}"
        )
    if loaded.module.spatial_merge_size != config.merge_size:
        from merge_cli.errors import CheckpointError

        raise CheckpointError(
            f"projector {config.projector} merges {loaded.module.spatial_merge_size}x"
            f"{loaded.module.spatial_merge_size} windows, but --merge-size is {config.merge_size}"
        )
    return Models(tower, loaded.module, loaded.source, loaded.content_hash)


def random_projector(vit_dim: int, llm_dim: int, config: ExtractConfig) -> SpatialMergeProjector:
    """A projector with seeded random weights (tests and demos): the same on every rank and run."""
    generator = torch.Generator().manual_seed(RANDOM_PROJECTOR_SEED)
    projector = SpatialMergeProjector(llm_dim, vit_dim, config.merge_size, eps=config.projector_eps)
    with torch.no_grad():
        for parameter in projector.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        projector.ln_q.weight.add_(1.0)
    return projector.eval()


def output_attrs(
    config: ExtractConfig, models: Models, media: MediaOptions, compute_dtype: str, store_dtype: str
) -> dict:
    """Root attributes of every shard and the index, with the hash of what changes the numbers."""
    tower = models.tower
    media_settings = media.to_dict()
    media_settings.pop("max_image_pixels")  # decides failing, not the numbers
    settings = {
        "tower": tower.name,
        "tower_hash": tower.content_hash,
        "layer": config.layer,
        "output": config.output_kind,
        "projector_hash": models.projector_hash,
        "projector_eps": config.projector_eps if models.projector is not None else None,
        "merge_size": config.merge_size,
        "compute_dtype": compute_dtype,
        "store_dtype": store_dtype,
        "media": media_settings,
        "temporal_positions": config.temporal_positions if tower.kind in ("onevision", "demo") else None,
    }
    return {
        "merge_cli_version": __version__,
        "tower": tower.name,
        "tower_kind": tower.kind,
        "tower_hash": tower.content_hash,
        "tower_is_demo": bool(tower.is_demo),
        "projector": models.projector_source,
        "projector_hash": models.projector_hash,
        "output": config.output_kind,
        "layer": config.layer,
        "patch_size": tower.patch_size,
        "merge_size": config.merge_size,
        "temporal_patch_size": getattr(tower, "temporal_patch_size", 1),
        "compute_dtype": compute_dtype,
        "store_dtype": store_dtype,
        "preprocess": media.mode,
        "temporal_positions": settings["temporal_positions"] or "none",
        "resize_policy": media.policy.to_json(),
        "video_options": json_text(media_settings["video"]),
        "media_options": json_text(media_settings),
        "settings": json_text(settings),
        "config_hash": hash_json(settings),
    }


def json_text(value: object) -> str:
    """Settings as stable JSON text (sorted keys), the form root attributes keep them in."""
    import json

    return json.dumps(value, sort_keys=True)


def _scan_output(config: ExtractConfig, out: Path, attrs: dict, dist: DistContext):
    """What an earlier run left (store.UnitScan), or None; --overwrite removes it first.

    Connected ranks (torchrun) all scan before anyone writes, so they agree on what is done.
    Each rank deletes only its own temporaries, which no live process can own."""
    from merge_cli.output import store

    if config.resume == "overwrite":
        if dist.is_main:
            store.remove_output(out)
        dist.barrier()
        return None
    scan = store.scan_units(out, rank=dist.rank)
    dist.barrier()
    if scan is not None:
        _check_same_settings(scan.attrs, attrs, out)
    return scan


def _check_same_settings(old: dict, new: dict, out: Path) -> None:
    import json

    if old.get("config_hash") == new["config_hash"]:
        return
    try:
        before, after = json.loads(old.get("settings", "{}")), json.loads(new["settings"])
    except (TypeError, ValueError):
        before, after = {}, {}
    lines = setting_changes(before, after) or [f"config_hash: {old.get('config_hash')} -> {new['config_hash']}"]
    raise ConfigMismatchError(
        f"{out} was written with other settings (use --overwrite to start over, or another --out):\n"
        + "\n".join(f"  {line}" for line in lines)
    )


def setting_changes(before: dict, after: dict) -> list[str]:
    """`name: old -> new` for each hashed setting that differs, nested ones as `media.video.fps`.

    The tower hash covers the layer (a different layer is a different function), so a changed
    layer alone would also show as a changed `tower_hash`: the layer line says it all.
    """
    old, new = _flatten(before), _flatten(after)
    changed = sorted(name for name in old.keys() | new.keys() if old.get(name, _UNSET) != new.get(name, _UNSET))
    if "layer" in changed and "tower" not in changed:
        changed = [name for name in changed if name != "tower_hash"]
    return [f"{name}: {_setting_text(old.get(name, _UNSET))} -> {_setting_text(new.get(name, _UNSET))}" for name in changed]


_UNSET = object()


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _setting_text(value: object) -> str:
    import json

    if value is _UNSET:
        return "(not set)"
    return value if isinstance(value, str) else json.dumps(value)


class _DecodeDataset(torch.utils.data.Dataset):
    """Todo descriptors in (from the WorkFeed sampler), decoded items (or failures) out; runs in
    DataLoader worker processes, which hold nothing but the entry they decode."""

    def __init__(self, media: MediaOptions) -> None:
        self.media = media

    def __getitem__(self, todo: Todo) -> tuple[Item | Failure, float]:
        if isinstance(todo.entry, Failure):  # failed before decoding (stage source): passed on
            return todo.entry, 0.0
        started = time.perf_counter()
        result = decode_sample(todo.entry, self.media)
        return result, time.perf_counter() - started


def _identity(value):
    return value


def _decoded(
    feed: WorkFeed, media: MediaOptions, workers: int, dataset: torch.utils.data.Dataset | None = None
) -> Iterator:
    """`dataset[todo]` (by default the decoded sample) for every Todo the feed hands out,
    computed in `workers` processes."""
    dataset = _DecodeDataset(media) if dataset is None else dataset
    options: dict = dict(batch_size=None, sampler=feed, num_workers=workers, collate_fn=_identity)
    if workers > 0:
        # Workers die with this process, even by kill -9 (see lifeline.py).
        options.update(prefetch_factor=4, persistent_workers=False, worker_init_fn=partial(exit_with_parent, os.getpid()))
        if "in_order" in torch.utils.data.DataLoader.__init__.__code__.co_varnames:
            options["in_order"] = False  # a slow video must not hold up the images behind it
    return iter(torch.utils.data.DataLoader(dataset, **options))


class _BackgroundWriter:
    """Stores results on a thread so disk writes overlap the next batch's compute."""

    def __init__(self, writer, summary: RunSummary, reporter: Reporter, feed: WorkFeed, marker_extra: dict) -> None:
        self.writer = writer
        self.summary = summary
        self.reporter = reporter
        self.feed = feed
        self.marker_extra = marker_extra
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.busy = 0.0
        self.thread = threading.Thread(target=self._run, name="merge-cli-writer", daemon=True)
        self.thread.start()

    def submit(self, pending: PendingOutput | int) -> None:
        """Results to store, or a unit number: that unit has nothing left, write its marker."""
        self._raise_if_failed()
        self.queue.put(pending)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            pending = self.queue.get()
            if pending is None:
                return
            if self.error is not None:
                continue  # drain so that submit never blocks forever
            try:
                started = time.perf_counter()
                if isinstance(pending, int):
                    self._finish_unit(pending)
                else:
                    self._store(pending.wait())
                self.busy += time.perf_counter() - started
            except BaseException as error:  # re-raised in the main thread
                self.error = error

    def _finish_unit(self, unit: int) -> None:
        """The unit's last result is stored: commit its shard, then write its marker (last)."""
        from merge_cli.output.store import write_unit_marker

        names = self.writer.finish_unit(unit)
        marker = self.feed.marker(unit, names, **self.marker_extra)
        if marker is not None:  # None: a unit cut short by --limit is committed, never marked whole
            write_unit_marker(self.writer.out, unit, marker)

    def _store(self, results: Iterable[Features | Failure]) -> None:
        from merge_cli.output.store import UnstorableSample

        for result in results:
            unit = self.feed.unit_of(result.key)
            failure = result if isinstance(result, Failure) else None
            if failure is None:
                try:
                    self.writer.add(result, unit)
                except UnstorableSample as error:  # one poison sample stays one error record
                    failure = Failure(result.key, "store", "UnstorableKey", str(error))
            if failure is not None:
                self.writer.add_failure(failure, unit)
                _record_failure(self.summary, failure)
                self.reporter.failed(failure)
                self.reporter.advance(failures=1)
            else:
                assert isinstance(result, Features)
                self.summary.written += 1
                if result.processor_grid is not None and tuple(result.processor_grid) != tuple(result.grid_thw[1:]):
                    self.summary.made_even += 1
                self.summary.tokens += int(result.tokens.shape[0] * result.tokens.shape[1])
                patch_tokens = result.grid_thw[0] * result.grid_thw[1] * result.grid_thw[2]
                self.summary.patch_tokens += patch_tokens
                self.reporter.advance(samples=1, tokens=patch_tokens)
            if self.feed.stored(failure or result):
                self._finish_unit(unit)


def _record_failure(summary: RunSummary, failure: Failure) -> None:
    summary.failed += 1
    if len(summary.failures) < FAILURE_PREVIEW:
        summary.failures.append(asdict(failure))


def _extract_loop(
    config: ExtractConfig,
    media: MediaOptions,
    feed: WorkFeed,
    extractor: FeatureExtractor,
    writer,
    reporter: Reporter,
    summary: RunSummary,
    marker_extra: dict,
) -> None:
    def patch_tokens(item: Item) -> int:
        t, h, w = extractor.feature_grid(item)
        return t * h * w

    loop_started = time.perf_counter()
    batcher = TokenBatcher(config.batch_tokens, patch_tokens, config.batching)
    decoded = _decoded(feed, media, config.workers)  # workers fork before the writer thread starts
    background = _BackgroundWriter(writer, summary, reporter, feed, marker_extra)
    timings = summary.timings

    def run(batches) -> None:
        for batch in batches:
            started = time.perf_counter()
            pending = extractor.extract(batch.items)
            timings.compute += time.perf_counter() - started
            background.submit(pending)

    def finish_empty_units() -> None:
        while not feed.empty_units.empty():
            background.submit(feed.empty_units.get())

    try:
        while True:
            started = time.perf_counter()
            try:
                result, decode_seconds = next(decoded)
            except StopIteration:
                finish_empty_units()
                break
            finish_empty_units()
            timings.decode_wait += time.perf_counter() - started
            timings.decode_cpu += decode_seconds
            if isinstance(result, Failure):
                background.submit(PendingOutput([result]))
                if config.strict:
                    summary.stopped_early = True
                    break
                continue
            run(batcher.add(result))
            if config.strict and reporter.failures:  # under torchrun: another rank's failure too
                summary.stopped_early = True
                break
        if not summary.stopped_early:
            run(batcher.flush())
    finally:
        # Whatever happened (an interrupt included), everything already computed is stored and
        # the open shard is completed, so a rerun resumes from here.
        try:
            background.close()
        finally:
            writer.close()
        timings.write = background.busy
        timings.loop = time.perf_counter() - loop_started
        summary.batches = batcher.stats.batches
        summary.batch_fill = batcher.stats.fill
        summary.bytes = writer.bytes_written
        if config.strict and summary.failed:
            summary.stopped_early = True


def _finish(out: Path, attrs: dict, dist: DistContext, summary: RunSummary, reporter: Reporter) -> RunSummary:
    """Wait for every rank, merge their summaries, and (rank 0) write the index."""
    from merge_cli.output.index import build_index

    summary.warnings = list(reporter.warnings)
    dist.barrier()
    if dist.connected:
        summary = merge_summaries([s for s in dist.gather(summary)])  # type: ignore[misc]
    if (dist.is_main or not dist.connected) and not _index_is_current(out, summary):
        build_index(out, attrs=attrs)  # ranks started by hand each index what exists so far
    dist.barrier()
    return summary


def _index_is_current(out: Path, summary: RunSummary) -> bool:
    """A run that stored nothing over an index of every shard leaves it as it is: a resume with
    nothing to do writes nothing (rebuilding reads every shard's tables)."""
    from merge_cli.errors import FormatError
    from merge_cli.output.format import list_shards, open_h5

    if summary.written or summary.failed or not out.exists():
        return False
    try:
        with open_h5(out) as handle:
            indexed = int(handle.attrs.get("shard_count", -1))
            version = int(handle.attrs.get("format_version", 0))
    except (FormatError, TypeError, ValueError):
        return False
    from merge_cli.output.format import FORMAT_VERSION

    return version == FORMAT_VERSION and indexed == len(list_shards(out))


def merge_summaries(parts: Sequence[RunSummary]) -> RunSummary:
    """One summary for the whole job: counts summed, time the slowest rank's."""
    merged = copy.deepcopy(parts[0])
    for part in parts[1:]:
        for name in ("written", "failed", "tokens", "patch_tokens", "bytes", "batches", "made_even"):
            setattr(merged, name, getattr(merged, name) + getattr(part, name))
        for name in ("decode_wait", "decode_cpu", "compute", "write"):
            setattr(merged.timings, name, getattr(merged.timings, name) + getattr(part.timings, name))
        merged.timings.loop = max(merged.timings.loop, part.timings.loop)
        merged.seconds = max(merged.seconds, part.seconds)
        merged.stopped_early = merged.stopped_early or part.stopped_early
        merged.failures.extend(part.failures[: max(0, FAILURE_PREVIEW - len(merged.failures))])
    fills = [(p.batch_fill, p.batches) for p in parts]
    total = sum(b for _, b in fills)
    merged.batch_fill = sum(f * b for f, b in fills) / total if total else 0.0
    return merged
