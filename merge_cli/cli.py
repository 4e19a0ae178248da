"""The `merge-cli` command line: Typer commands only.

Each command parses options, calls the core, and maps the project's exceptions to one red line
and an exit code. Nothing heavy (torch, h5py, decord) is imported at module level, so `--help`
stays fast; each command imports what it needs when it runs.

Exit codes (also in the README):
  0  success (check-grid: the size is already a valid merge grid)
  1  check-grid: the size is not a valid grid; extract: the run could not start
  2  unusable input or options (a bad size, an unreadable or foreign file)
  3  extract: the run finished but some inputs failed (their error records are in the output);
     under torchrun only with --strict, so that torchrun does not take a few bad files for a crash
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NamedTuple, NoReturn, Optional, TypeVar

import typer

from merge_cli import __version__
from merge_cli.errors import MergeCliError

app = typer.Typer(
    name="merge-cli",
    help="Pre-extract vision-tower features, 2x2-merged, into HDF5 shards for offline LLM training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

T = TypeVar("T")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console():
    from rich.console import Console

    return Console(highlight=False)


def fail(message: str, code: int, json_output: bool = False) -> NoReturn:
    """One line on stderr (or a JSON object on stdout with --json), then exit with `code`."""
    if json_output:
        print(json.dumps({"error": message, "exit_code": code}))
    else:
        from rich.markup import escape

        from merge_cli.records import printable

        # Messages quote file names and file contents: no markup, no control characters, no
        # screenful of one value. Lines stay lines (a settings mismatch lists one per line).
        shown = "\n".join(escape(printable(line, _MAX_MESSAGE_CHARS)) for line in message.split("\n"))
        _stderr_console().print(f"[bold red]merge-cli: error:[/] {shown}", soft_wrap=True, markup=True)
    raise typer.Exit(code)


_MAX_MESSAGE_CHARS = 2000


def run_core(call: Callable[[], T], json_output: bool = False, exit_code: int | None = None) -> T:
    """Run a core function; turn the project's exceptions into their exit codes (or `exit_code`)."""
    try:
        return call()
    except MergeCliError as error:
        fail(str(error), error.exit_code if exit_code is None else exit_code, json_output)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _version_callback(value: bool) -> None:
    if value:
        print(f"merge-cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Pre-extract vision-tower features, 2x2-merged, into HDF5 shards for offline LLM training."""


@app.command("check-grid")
def check_grid(
    target: Annotated[
        Optional[str],
        typer.Argument(help="A size HxW (height first, e.g. 252x448) or an image/video file.", show_default=False),
    ] = None,
    tower: Annotated[
        Optional[str],
        typer.Option(
            help="Answer with extract's exact rule for this checkpoint folder ('demo' or a folder): "
            "its patch size, its processor under --preprocess, its refusals.",
            show_default=False,
        ),
    ] = None,
    preprocess: Annotated[
        Optional[Preprocess],
        typer.Option(help="With --tower: checkpoint or native (default: the tower's, as extract).", show_default=False),
    ] = None,
    patch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Tower patch size in pixels (default: 14, or the tower's).", show_default=False)
    ] = None,
    merge_size: Annotated[int, typer.Option(min=1, help="Merge window side (2 = 2x2).")] = 2,
    min_pixels: Annotated[
        Optional[int], typer.Option(min=1, help="Resize floor in pixels (default: 4 * factor^2).", show_default=False)
    ] = None,
    max_pixels: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Resize ceiling in pixels (default: 1280 * factor^2; for a video file 64 * factor^2).",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        Optional[str], typer.Option(help="Fixed-size policy: resize everything to exactly HxW.", show_default=False)
    ] = None,
    tokens: Annotated[
        Optional[int],
        typer.Option(help="Instead of a size, infer the (h, w) grid of N raster tokens.", show_default=False),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print only JSON (stable keys).")] = False,
) -> None:
    """Is a size a valid merge grid, and what would the resize policy make of it?

    Exit 0 when it already is a valid grid, 1 when it is not (the output still shows the resized
    size, or why extract refuses it), 2 for unusable input.
    """
    from merge_cli.media import grid
    from merge_cli.report import render_check_grid

    if tokens is not None:
        if target is not None:
            fail("give either a size/file or --tokens, not both", 2, json_output)
        if tokens < 1:
            fail(f"--tokens must be a positive number of tokens; got {tokens}", 2, json_output)
        report = run_core(lambda: grid.describe_tokens(tokens, patch_size or grid.DEFAULT_PATCH_SIZE, merge_size), json_output)
    else:
        if target is None:
            fail("give a size HxW (e.g. 252x448), an image or video file, or --tokens N", 2, json_output)
        if preprocess is not None and tower is None:
            fail("--preprocess needs --tower (which checkpoint's processor to follow)", 2, json_output)
        settings = _GridSettings(tower, preprocess.value if preprocess else None, patch_size, merge_size, min_pixels, max_pixels, size)
        report = run_core(lambda: _describe_target(target, settings), json_output)
    if json_output:
        print_json(report)
    else:
        render_check_grid(report, _stdout_console())
    raise typer.Exit(0 if report["valid"] else 1)


class _GridSettings(NamedTuple):
    tower: str | None
    preprocess: str | None
    patch_size: int | None
    merge_size: int
    min_pixels: int | None
    max_pixels: int | None
    size: str | None


def _describe_target(target: str, settings: _GridSettings) -> dict:
    from merge_cli.errors import MediaError, UsageError
    from merge_cli.media import grid
    from merge_cli.records import printable

    path = Path(target)
    source = "size"
    exists = _exists(path)
    if exists or not grid.looks_like_size(target):
        from merge_cli.media.probe import probe_media
        from merge_cli.records import media_kind

        if not exists:
            raise UsageError(f"{printable(target, 60)!r} is neither a size HxW (e.g. 252x448) nor an existing file")
        if media_kind(path) is None:
            raise UsageError(f"{target}: not a recognized image or video file")
        try:
            info = probe_media(path)
        except MediaError as error:
            raise UsageError(f"cannot read the size of {target}: {error}") from error
        height, width, source = info.height, info.width, info.kind
    else:
        height, width = grid.parse_hw(target)
    fixed = grid.parse_hw(settings.size) if settings.size else None
    report: dict = {"input": target, "source": source}
    if settings.tower is not None:
        return _describe_with_tower(target, path, source, height, width, fixed, settings, report)
    patch_size = settings.patch_size or grid.DEFAULT_PATCH_SIZE
    min_pixels, max_pixels = settings.min_pixels, settings.max_pixels
    factor = grid.merge_factor(patch_size, settings.merge_size)
    if source == "video" and max_pixels is None:
        from merge_cli.config import default_video_max_pixels

        max_pixels = default_video_max_pixels(factor)
        min_pixels = min(min_pixels or 4 * factor**2, max_pixels)
    policy = grid.ResizePolicy(patch_size, settings.merge_size, min_pixels, max_pixels, fixed)
    report.update(grid.describe_size(height, width, policy))
    return report


def _exists(path: Path) -> bool:
    """Whether a file or folder is there; False for a name the system refuses (too long)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _describe_with_tower(target, path, source, height, width, fixed, settings: _GridSettings, report: dict) -> dict:
    """extract's own rule for the checkpoint: the same MediaOptions extract builds, and for a video
    file the same frame count (plan_sample) that sets its per-frame budget."""
    from merge_cli.config import ExtractConfig
    from merge_cli.errors import UsageError
    from merge_cli.media import grid
    from merge_cli.media.processor import read_checkpoint_vision

    vision = read_checkpoint_vision(settings.tower)
    if settings.patch_size is not None and settings.patch_size != vision.patch_size:
        raise UsageError(f"--patch-size {settings.patch_size} differs from the tower's patch size {vision.patch_size}")
    config = ExtractConfig(
        inputs=(target,),
        out="unused",
        tower=settings.tower,
        preprocess=settings.preprocess,
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
        size=fixed,
        merge_size=settings.merge_size,
    )
    media = config.media_options(vision)
    policy = media.policy
    report.update(tower=settings.tower, preprocess=media.mode)
    if source == "video":
        from merge_cli.media.images import video_frame_policy
        from merge_cli.media.probe import probe_video
        from merge_cli.media.video import sample_frame_indices

        info = probe_video(path, stage="open")
        frames = len(sample_frame_indices(info.num_frames, info.fps or 0.0, media.video))
        policy = video_frame_policy(media, max(1, frames))
        report["frames"] = frames
    report.update(grid.describe_size(height, width, policy))
    return report


def _output_kind(value: Optional[str]) -> Optional[str]:
    """--output takes projected or merged; a file name there is a slip for --out, so say so."""
    kinds = ("projected", "merged")
    if value is None or value in kinds:
        return value
    hint = f"; did you mean --out {value}?" if any(c in value for c in "./\\") else ""
    raise typer.BadParameter(f"{value!r} is not one of {', '.join(kinds)}{hint}")


class Dtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Compression(str, Enum):
    none = "none"
    lzf = "lzf"
    gzip = "gzip"
    zstd = "zstd"


class Preprocess(str, Enum):
    checkpoint = "checkpoint"
    native = "native"


class TemporalPositions(str, Enum):
    index = "index"
    spread = "spread"


class Batching(str, Enum):
    pack = "pack"
    bucket = "bucket"


class VideoSeek(str, Enum):
    exact = "exact"
    keyframe = "keyframe"


_INPUTS, _MODEL, _OUTPUT, _RESIZE, _VIDEO, _RUN = "Inputs", "Model", "Output", "Resize", "Video", "Run"


def _default_workers() -> int:
    import os

    return min(8, os.cpu_count() or 1)


@app.command("extract")
def extract_command(
    inputs: Annotated[
        list[str],
        typer.Option(
            "--input",
            "-i",
            help="A folder (scanned recursively), a media file, a .txt/.jsonl/LLaVA .json manifest, a WebDataset "
            ".tar shard or a .parquet file; globs and brace ranges ('shards/{00000..00099}.tar') too. Repeatable.",
            rich_help_panel=_INPUTS,
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Output file, e.g. feats.h5 (shards go beside it).",
            rich_help_panel=_OUTPUT,
            show_default=False,
        ),
    ],
    media_root: Annotated[
        Optional[str],
        typer.Option(
            help="Root for relative manifest paths and for keys.", rich_help_panel=_INPUTS, show_default=False
        ),
    ] = None,
    image_column: Annotated[
        Optional[str],
        typer.Option(help="Parquet: the column of image bytes [default: image].", rich_help_panel=_INPUTS, show_default=False),
    ] = None,
    video_column: Annotated[
        Optional[str],
        typer.Option(help="Parquet: the column of video bytes [default: video].", rich_help_panel=_INPUTS, show_default=False),
    ] = None,
    key_column: Annotated[
        Optional[str],
        typer.Option(
            help="Parquet: the column whose value is each row's key [default: id when present, else FILE/ROW].",
            rich_help_panel=_INPUTS,
            show_default=False,
        ),
    ] = None,
    tower: Annotated[
        str,
        typer.Option(
            help="'demo' (built in, meaningless features) or a local checkpoint folder.", rich_help_panel=_MODEL
        ),
    ] = "demo",
    layer: Annotated[
        int, typer.Option(help="Hidden state to take: -1 last layer (before post-norm), -2 ...", rich_help_panel=_MODEL)
    ] = -1,
    projector: Annotated[
        Optional[str],
        typer.Option(
            help="Trained SpatialMergeProjector: .safetensors, mm_projector.bin or a checkpoint folder.",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    projector_eps: Annotated[
        float,
        typer.Option(help="LayerNorm eps of the projector (LLaVA-OneVision-1.5 uses 1e-5).", rich_help_panel=_MODEL),
    ] = 1e-6,
    random_projector: Annotated[
        bool,
        typer.Option(
            "--random-projector",
            help="Project with seeded random weights (tests and demos only).",
            rich_help_panel=_MODEL,
        ),
    ] = False,
    llm_dim: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Output width of --random-projector (default: 4 x tower width).",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Allow transformers to run code shipped with a checkpoint.",
            rich_help_panel=_MODEL,
        ),
    ] = False,
    output: Annotated[
        Optional[str],
        typer.Option(
            metavar="[projected|merged]",
            callback=_output_kind,
            help="projected (default with a projector) or merged 4C tower features (default without).",
            rich_help_panel=_OUTPUT,
            show_default=False,
        ),
    ] = None,
    store_dtype: Annotated[
        Optional[Dtype],
        typer.Option(help="Stored dtype (default: the compute dtype).", rich_help_panel=_OUTPUT, show_default=False),
    ] = None,
    shard_size: Annotated[
        str, typer.Option(help="Largest shard file, e.g. 2GB, 500MiB.", rich_help_panel=_OUTPUT)
    ] = "2GB",
    compression: Annotated[
        Compression,
        typer.Option(
            help="Token compression (zstd needs hdf5plugin, the zstd extra, in every reader).", rich_help_panel=_OUTPUT
        ),
    ] = Compression.none,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an existing output (the default when it exists).", rich_help_panel=_OUTPUT
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete an existing output and start over.", rich_help_panel=_OUTPUT)
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed", help="On resume, try the inputs that failed before again.", rich_help_panel=_OUTPUT
        ),
    ] = False,
    min_pixels: Annotated[
        Optional[int],
        typer.Option(min=1, help="Resize floor (default: 4 * factor^2).", rich_help_panel=_RESIZE, show_default=False),
    ] = None,
    max_pixels: Annotated[
        Optional[int],
        typer.Option(
            min=1, help="Resize ceiling (default: 1280 * factor^2).", rich_help_panel=_RESIZE, show_default=False
        ),
    ] = None,
    size: Annotated[
        Optional[str],
        typer.Option(
            help="Resize everything to exactly HxW (a valid grid).", rich_help_panel=_RESIZE, show_default=False
        ),
    ] = None,
    preprocess: Annotated[
        Optional[Preprocess],
        typer.Option(
            help="Who decides sizes: the checkpoint's own processor, or merge-cli's native policy "
            "(default: checkpoint for Qwen2-VL, Qwen2.5-VL and SigLIP2 NaFlex, native otherwise).",
            rich_help_panel=_RESIZE,
            show_default=False,
        ),
    ] = None,
    temporal_positions: Annotated[
        TemporalPositions,
        typer.Option(
            help="OneVision video: temporal positions 0..T-1 (index) or spread over the rotary table "
            "as the model card does (spread).",
            rich_help_panel=_VIDEO,
        ),
    ] = TemporalPositions.index,
    fast_decode: Annotated[
        bool,
        typer.Option(
            "--fast-decode",
            help="Decode large JPEGs at reduced size first (slightly different pixels, faster).",
            rich_help_panel=_RESIZE,
        ),
    ] = False,
    gif_as_video: Annotated[
        bool,
        typer.Option(
            "--gif-as-video", help="Read animated images as videos, not their first frame.", rich_help_panel=_INPUTS
        ),
    ] = False,
    max_image_pixels: Annotated[
        int,
        typer.Option(min=1, help="Refuse images with more pixels (decompression-bomb guard).", rich_help_panel=_INPUTS),
    ] = 89478485,
    fps: Annotated[
        Optional[float],
        typer.Option(
            help="Frames sampled per second of video (default: 2), within --min-frames..--max-frames.",
            rich_help_panel=_VIDEO,
            show_default=False,
        ),
    ] = None,
    num_frames: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Sample exactly N frames per video, fewer only when it has fewer; not with --fps, "
            "--min-frames or --max-frames (Qwen under --preprocess checkpoint: a multiple of 2).",
            rich_help_panel=_VIDEO,
            show_default=False,
        ),
    ] = None,
    min_frames: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="With --fps: at least this many frames when the video has them (default: 4).",
            rich_help_panel=_VIDEO,
            show_default=False,
        ),
    ] = None,
    max_frames: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="With --fps: at most this many frames (default: 32; Qwen's own rules 768).",
            rich_help_panel=_VIDEO,
            show_default=False,
        ),
    ] = None,
    video_start: Annotated[
        Optional[float],
        typer.Option(help="Seconds into the video to start sampling.", rich_help_panel=_VIDEO, show_default=False),
    ] = None,
    video_end: Annotated[
        Optional[float],
        typer.Option(help="Seconds into the video to stop sampling.", rich_help_panel=_VIDEO, show_default=False),
    ] = None,
    video_max_pixels: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Per-frame ceiling (default: 64 * factor^2, 224x224 at patch 14).",
            rich_help_panel=_VIDEO,
            show_default=False,
        ),
    ] = None,
    video_total_pixels: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Budget over all frames of a video (default: 32 * 64 * factor^2).",
            rich_help_panel=_VIDEO,
            show_default=False,
        ),
    ] = None,
    video_seek: Annotated[
        VideoSeek,
        typer.Option(
            help="exact: the sampled frames; keyframe: each snaps to its nearest keyframe (much faster).",
            rich_help_panel=_VIDEO,
        ),
    ] = VideoSeek.exact,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=_RUN)] = "auto",
    dtype: Annotated[
        Optional[Dtype],
        typer.Option(
            help="Compute dtype (default: bf16 on CUDA, fp32 on CPU).", rich_help_panel=_RUN, show_default=False
        ),
    ] = None,
    batch_tokens: Annotated[
        int, typer.Option(min=1, help="Patch tokens per forward pass.", rich_help_panel=_RUN)
    ] = 16384,
    batching: Annotated[
        Batching, typer.Option(help="pack: mixed shapes per pass; bucket: one shape per pass.", rich_help_panel=_RUN)
    ] = Batching.pack,
    workers: Annotated[
        Optional[int],
        typer.Option(
            min=0, help="Decoding processes (default: CPU cores, at most 8).", rich_help_panel=_RUN, show_default=False
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first input that fails (under torchrun: on every rank) and exit 3.", rich_help_panel=_RUN)
    ] = False,
    unit_size: Annotated[
        int,
        typer.Option(
            min=1, help="Samples per work unit (what a rank claims, what resume skips whole).", rich_help_panel=_RUN
        ),
    ] = 10_000,
    limit: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Take only the first N inputs of the listing (it stops there). A prefix: a later run "
            "without --limit resumes and completes it.",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="List and plan without running the extraction: inputs, tokens and output bytes from "
            "the headers, time from a short timed probe of the tower. Writes nothing.",
            rich_help_panel=_RUN,
        ),
    ] = False,
    rank: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            help="This job's part when splitting by hand (e.g. a Slurm array); with --world-size.",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    world_size: Annotated[
        Optional[int],
        typer.Option(min=1, help="Number of parts when splitting by hand.", rich_help_panel=_RUN, show_default=False),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print nothing but the final JSON summary.")] = False,
) -> None:
    """Extract merged vision features from images and videos into HDF5 shards.

    Exit 0 when every input was written, 3 when some failed (their error records are in the
    output; under torchrun only with --strict), 1 when the run could not start (bad option values, missing tower, other settings
    than the existing output), 2 for command-line syntax errors, 130 when interrupted.
    """
    from merge_cli.config import ExtractConfig, VideoOptions, parse_byte_size
    from merge_cli.media.grid import parse_hw

    if resume and overwrite:
        fail("give either --resume or --overwrite, not both", 1, json_output)

    def build() -> ExtractConfig:
        video = VideoOptions(
            fps=fps,
            num_frames=num_frames,
            min_frames=min_frames,
            max_frames=max_frames,
            start=video_start,
            end=video_end,
            max_pixels=video_max_pixels,
            total_pixels=video_total_pixels,
            seek=video_seek.value,
        )
        return ExtractConfig(
            inputs=tuple(inputs),
            out=out,
            media_root=media_root,
            image_column=image_column,
            video_column=video_column,
            key_column=key_column,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            size=parse_hw(size) if size else None,
            video=video,
            fast_decode=fast_decode,
            gif_as_video=gif_as_video,
            max_image_pixels=max_image_pixels,
            tower=tower,
            trust_remote_code=trust_remote_code,
            layer=layer,
            projector=projector,
            projector_eps=projector_eps,
            random_projector=random_projector,
            llm_dim=llm_dim,
            output=output,
            device=device,
            dtype=dtype.value if dtype else None,
            store_dtype=store_dtype.value if store_dtype else None,
            batch_tokens=batch_tokens,
            batching=batching.value,
            workers=_default_workers() if workers is None else workers,
            shard_bytes=parse_byte_size(shard_size),
            compression=compression.value,
            resume="overwrite" if overwrite else "resume" if resume else "auto",
            retry_failed=retry_failed,
            unit_size=unit_size,
            limit=limit,
            dry_run=dry_run,
            strict=strict,
            rank=rank,
            world_size=world_size,
            preprocess=preprocess.value if preprocess else None,
            temporal_positions=temporal_positions.value,
        )

    # Any problem before the first sample is processed means the run could not start: exit 1.
    config = run_core(build, json_output, exit_code=1)
    if config.dry_run:
        _dry_run(config, json_output)
    summary = run_core(lambda: _run_extract(config, json_output), json_output, exit_code=1)
    if not _is_main_rank():
        pass  # under torchrun, rank 0 prints the summary of the whole job
    elif json_output:
        print_json(summary.to_dict())
    else:
        from merge_cli.report import render_extract_summary

        render_extract_summary(summary.to_dict(), _stdout_console())
    raise typer.Exit(summary.exit_code)


def _dry_run(config, json_output: bool) -> NoReturn:
    """--dry-run: print the plan (or its JSON) and exit 0; a plan that cannot be made exits 1."""
    from merge_cli.run.dry_run import plan_extract
    from merge_cli.run.progress import make_reporter

    def plan():
        try:
            return plan_extract(config, make_reporter(json_output))
        except KeyboardInterrupt:
            fail("interrupted; --dry-run wrote nothing", 130, json_output)

    report = run_core(plan, json_output, exit_code=1)
    if json_output:
        print_json(report.to_dict())
    else:
        from merge_cli.report import render_plan

        render_plan(report.to_dict(), _stdout_console())
    raise typer.Exit(0)


def _is_main_rank() -> bool:
    """False only for torchrun's ranks other than 0 (ranks given by hand all report)."""
    return _torchrun_rank() == 0


def _torchrun_rank() -> int:
    import os

    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _run_extract(config, json_output: bool):
    from merge_cli.run.pipeline import run_extract
    from merge_cli.run.progress import make_reporter

    try:
        return run_extract(config, make_reporter(json_output, rank=_torchrun_rank()))
    except KeyboardInterrupt:
        fail("interrupted; finished shards are kept, run the same command again to resume", 130, json_output)


@app.command("inspect")
def inspect_command(
    path: Annotated[
        Path, typer.Argument(help="A merge-cli output (feats.h5) or one of its shards.", show_default=False)
    ],
    key: Annotated[Optional[str], typer.Option(help="Show this one sample only.", show_default=False)] = None,
    failures: Annotated[
        bool,
        typer.Option(
            "--failures", help="List every error record, one per line: key, stage, type: message (tab-separated)."
        ),
    ] = False,
    check: Annotated[bool, typer.Option("--check", help="Also scan every token for NaN/Inf (reads all data).")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print only JSON (with --failures: one JSON object per line).")
    ] = False,
) -> None:
    """What is in a features file, and is it sound?

    Exit 0 when the file is sound, 1 when an integrity problem was found, 2 when the file is not a
    merge-cli output, is damaged beyond reading, or --key names no sample.
    """
    from merge_cli.output.inspection import (
        inspect_features,
        inspect_sample,
        iter_failures,
    )

    if sum((key is not None, failures, check)) > 1:
        fail("give at most one of --key, --failures and --check", 2, json_output)
    if key is not None:
        sample = run_core(lambda: inspect_sample(path, key), json_output)
        if json_output:
            print_json(sample)
        else:
            from merge_cli.report import render_sample

            render_sample(sample, _stdout_console())
        raise typer.Exit(0)
    if failures:
        run_core(lambda: _print_failures(iter_failures(path), json_output), json_output)
        raise typer.Exit(0)
    report = run_core(lambda: inspect_features(path, check=check), json_output)
    if json_output:
        print_json(report)
    else:
        from merge_cli.report import render_inspect

        render_inspect(report, _stdout_console())
    raise typer.Exit(1 if report.get("problems") else 0)


def _print_failures(records, json_output: bool) -> None:
    """One line per error record, streamed: JSON objects, or tab-separated fields for cut/awk."""
    for record in records:
        if json_output:
            print(json.dumps(record, ensure_ascii=False))
        else:
            fields = (record["key"], record["stage"], f"{record['type']}: {record['message']}")
            print("\t".join(_failure_field(str(field)) for field in fields))


def _failure_field(text: str) -> str:
    """One field of a tab-separated failure line: tabs and newlines as `\\t` and `\\n` (the line
    stays one record), other control characters escaped (a key cannot drive the terminal)."""
    from merge_cli.records import printable

    return printable(text.replace("\t", "\\t").replace("\n", "\\n"))


@app.command("index")
def index_command(
    out: Annotated[Path, typer.Argument(help="The output to (re)build, e.g. feats.h5.", show_default=False)],
    json_output: Annotated[bool, typer.Option("--json", help="Print only JSON.")] = False,
) -> None:
    """Rebuild feats.h5 from whatever complete shards exist beside it (after a crash, or after
    separate --rank/--world-size jobs)."""
    from merge_cli.output.index import build_index

    if out.is_dir():  # an empty argument included: Path("") is the current folder
        fail(f"{out}: is a folder, not a merge-cli output (give the .h5 file)", 2, json_output)
    summary = run_core(lambda: build_index(out), json_output)
    if json_output:
        print_json(summary)
    else:
        from merge_cli.report import render_index_summary

        render_index_summary(summary, _stdout_console())


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (sent by torchrun, Slurm or `kill`) like Ctrl-C: finish the open shard, exit."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _report_file_size_limit() -> None:
    """Ignore SIGXFSZ, which by default kills a process whose file passes `ulimit -f`: the write
    then fails with EFBIG, which the writer reports in one line and a rerun resumes from."""
    import signal

    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main() -> None:
    """Console-script entry point."""
    _interrupt_on_sigterm()
    _report_file_size_limit()
    try:
        app()
    except KeyboardInterrupt:
        print("merge-cli: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
