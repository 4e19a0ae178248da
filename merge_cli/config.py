"""Run settings as frozen dataclasses, validated on construction.

Everything here is plain data (no torch): the CLI builds these, the core reads them, and the
settings that change the numbers are hashed into the output's `config_hash`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from merge_cli.errors import UsageError
from merge_cli.media.grid import (
    MAX_PIXELS,
    PREPROCESS_MODES,
    ResizePolicy,
    require_at_most,
)
from merge_cli.records import printable

if TYPE_CHECKING:
    from merge_cli.media.processor import CheckpointVision

# Pillow's own default decompression-bomb limit (Image.MAX_IMAGE_PIXELS), kept explicit here.
PILLOW_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)


def default_video_max_pixels(factor: int) -> int:
    """Per-frame pixel ceiling for video: 64 merged tokens (224x224 for patch 14), as OneVision saw."""
    return 64 * factor**2


def default_video_total_pixels(factor: int) -> int:
    """Pixel budget over all sampled frames of one video: 32 frames at the per-frame default."""
    return 32 * default_video_max_pixels(factor)


VIDEO_RULES = ("native", "qwen")
VIDEO_SEEK_MODES = ("exact", "keyframe")
VIDEO_RESIZERS = ("torchvision",)
"""Frame resizers other than Pillow (the default, None); see VideoOptions.resizer."""


@dataclass(frozen=True)
class VideoOptions:
    """How frames are sampled from a video and how large each may be.

    Settings left None are filled by `resolved` from the preprocessing mode's defaults
    (merge_cli.media.processor.video_defaults); a value given here always wins.
    """

    fps: float | None = None
    """Frames sampled per second of video [default: 2]; not with `num_frames`."""
    num_frames: int | None = None
    """Sample exactly this many frames, capped only by the frames the video (or its start/end
    range) has; the fps rule and its frame bounds do not apply, so they may not be given with it.
    Under the `qwen` rule it must be a multiple of `frame_multiple` (see `resolved`)."""
    min_frames: int | None = None
    """Lower bound on the fps rule's frame count when the video has that many [default: 4]."""
    max_frames: int | None = None
    """Upper bound on the fps rule's frame count [default: 32; 768 for Qwen's own rules]."""
    start: float | None = None
    """Seconds into the video where sampling starts."""
    end: float | None = None
    """Seconds into the video where sampling ends."""
    max_pixels: int | None = None
    """Per-frame resize ceiling in pixels [default: 64 * factor^2]."""
    total_pixels: int | None = None
    """Budget over all sampled frames in pixels [default: 32 * 64 * factor^2]."""
    min_pixels: int | None = None
    """Per-frame resize floor in pixels [default: the image policy's; Qwen's rules 128 * factor^2]."""
    rule: str = "native"
    """`native`, or `qwen`: qwen-vl-utils' frame count (floored to `frame_multiple`) and per-frame
    ceiling (an even share of `total_pixels` per temporal patch, at least 1.05 x min_pixels)."""
    frame_multiple: int = 1
    """The frame count is a multiple of this (Qwen's temporal patch size) under the qwen rule."""
    resample: str | None = None
    """Resampling filter for frames [default: the image policy's]."""
    resizer: str | None = None
    """What resizes frames that the decoder does not scale: None, Pillow with `resample`; or
    `torchvision`: the pixels torchvision's tensor resize (bicubic, antialias) gives, as
    qwen-vl-utils resizes Qwen video frames (images.torchvision_resize; torchvision not needed)."""
    seek: str = "exact"
    """`exact`: the sampled frames themselves; `keyframe`: each snaps to its nearest keyframe."""

    def __post_init__(self) -> None:
        if self.seek not in VIDEO_SEEK_MODES:
            raise UsageError(f"--video-seek must be one of {', '.join(VIDEO_SEEK_MODES)}; got {self.seek!r}")
        for option, value in (("--fps", self.fps), ("--video-start", self.start), ("--video-end", self.end)):
            require_finite(option, value)
        if self.fps is not None and self.fps <= 0:
            raise UsageError(f"--fps must be positive; got {self.fps}")
        if self.num_frames is not None and self.num_frames < 1:
            raise UsageError(f"--num-frames must be at least 1; got {self.num_frames}")
        if self.num_frames is not None:
            given = [name for name, value in (("--fps", self.fps), ("--min-frames", self.min_frames),
                                              ("--max-frames", self.max_frames)) if value is not None]
            if given:
                raise UsageError(
                    f"--num-frames samples exactly {self.num_frames} frames; {' and '.join(given)} "
                    f"{'sets' if len(given) == 1 else 'set'} the other way of counting frames (--fps within "
                    "--min-frames..--max-frames): give one or the other"
                )
        if self.min_frames is not None and self.min_frames < 1:
            raise UsageError(f"--min-frames must be at least 1; got {self.min_frames}")
        if self.max_frames is not None and self.min_frames is not None and self.max_frames < self.min_frames:
            raise UsageError(f"--max-frames {self.max_frames} is below --min-frames {self.min_frames}")
        if self.start is not None and self.start < 0:
            raise UsageError(f"--video-start must not be negative; got {self.start}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise UsageError(f"--video-end {self.end} must be after --video-start {self.start}")
        for name in ("max_pixels", "total_pixels", "min_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"video {name} must be positive; got {value}")
            if value is not None:  # refused here, not by each video's frame policy (an error record per video)
                require_at_most(f"video {name}", value, MAX_PIXELS)
        if self.rule not in VIDEO_RULES:
            raise UsageError(f"video rule must be one of {', '.join(VIDEO_RULES)}; got {self.rule!r}")
        if self.frame_multiple < 1:
            raise UsageError(f"frame_multiple must be positive; got {self.frame_multiple}")
        if self.resizer is not None and self.resizer not in VIDEO_RESIZERS:
            raise UsageError(f"video resizer must be one of {', '.join(VIDEO_RESIZERS)} (or unset: Pillow); got {self.resizer!r}")
        if self.resizer == "torchvision" and self.resample not in (None, "bicubic"):
            raise UsageError(f"the torchvision video resizer is bicubic only; got resample {self.resample!r}")

    def resolved(self, factor: int, defaults: dict | None = None) -> VideoOptions:
        """A copy with every unset setting filled in from `defaults` (a mode's video defaults;
        the native ones when None) for this merge factor. The rule, frame multiple and filter
        come from `defaults` when given. With `num_frames` the fps rule's settings (fps, min and
        max frames) stay unset: they do not apply, and the config hash says so.

        Under the `qwen` rule an explicit `num_frames` must be a multiple of the temporal patch
        (`frame_multiple`): Qwen's tower turns each pair of frames into one temporal token, so an
        odd count could only be met by rounding it (qwen-vl-utils rounds 3 to 4) or by padding with
        a repeated frame, and either would not be the N frames asked for. It is refused instead."""
        from dataclasses import replace

        if defaults is None:
            defaults = {
                "fps": 2.0,
                "min_frames": 4,
                "max_frames": 32,
                "max_pixels": default_video_max_pixels(factor),
                "total_pixels": default_video_total_pixels(factor),
            }
        counting = () if self.num_frames is not None else ("fps", "min_frames", "max_frames")
        filled = {
            name: defaults.get(name) if getattr(self, name) is None else getattr(self, name)
            for name in (*counting, "max_pixels", "total_pixels", "min_pixels", "resample", "resizer")
        }
        if "rule" in defaults:
            filled.update(rule=defaults["rule"], frame_multiple=defaults["frame_multiple"])
        multiple = filled.get("frame_multiple", self.frame_multiple)
        if self.num_frames is not None and filled.get("rule", self.rule) == "qwen" and self.num_frames % multiple:
            lower = self.num_frames // multiple * multiple
            choices = " or ".join(str(n) for n in (lower, lower + multiple) if n)
            raise UsageError(
                f"--num-frames {self.num_frames} is not a multiple of {multiple}: this Qwen tower encodes "
                f"{multiple} frames per temporal patch under --preprocess checkpoint; give {choices} "
                "(or --preprocess native, where the tower repeats an odd last frame)"
            )
        if self.num_frames is not None:
            return replace(self, **filled)
        if self.min_frames is None and self.max_frames is not None:
            filled["min_frames"] = min(filled["min_frames"], self.max_frames)
        if self.max_frames is None and self.min_frames is not None:
            filled["max_frames"] = max(filled["max_frames"], self.min_frames)
        return replace(self, **filled)


@dataclass(frozen=True)
class MediaOptions:
    """Everything between a path on disk and a resized pixel tensor."""

    policy: ResizePolicy = field(default_factory=ResizePolicy)
    """Resize policy for images (and, with the video ceiling, for video frames)."""
    video: VideoOptions = field(default_factory=VideoOptions)
    fast_decode: bool = False
    """Let Pillow decode large JPEGs at reduced size (draft mode) when the target is much smaller."""
    gif_as_video: bool = False
    """Read animated images as videos instead of taking their first frame."""
    max_image_pixels: int | None = PILLOW_MAX_IMAGE_PIXELS
    """Decompression-bomb guard: images with more pixels are refused (None: no limit)."""
    rescale_factor: float = 1 / 255
    """Pixel values are multiplied by this before mean/std (the checkpoint's processor says)."""
    video_defaults: dict | None = None
    """The mode's video defaults (processor.video_defaults); None: the native ones."""
    decode_threads: int = 1
    """Codec threads per video reader: the cores a decode worker has to itself. Changes the speed,
    not the pixels, so it is not part of `to_dict` (nor of the config hash)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "video", self.video.resolved(self.policy.factor, self.video_defaults))
        if self.decode_threads < 1:
            raise UsageError(f"decode threads must be at least 1; got {self.decode_threads}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise UsageError(f"--max-image-pixels must be positive; got {self.max_image_pixels}")

    @property
    def mode(self) -> str:
        return self.policy.mode

    def to_dict(self) -> dict:
        video = asdict(self.video)
        if video["resizer"] is None:  # Pillow, as before the setting existed: those outputs keep their hash
            del video["resizer"]
        return {
            "policy": self.policy.to_dict(),
            "video": video,
            "fast_decode": self.fast_decode,
            "gif_as_video": self.gif_as_video,
            "max_image_pixels": self.max_image_pixels,
            "rescale_factor": self.rescale_factor,
            "preprocess": self.policy.mode,
        }


def spare_decode_threads(workers: int) -> int:
    """Codec threads each decode worker may use: the cores this node gives the process, shared by
    its decode workers and by the other ranks on the node (torchrun's LOCAL_WORLD_SIZE); 1 when
    decoding runs in the main process beside the compute, or when cores are fewer than workers."""
    import os

    if workers < 1:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // (workers * local_ranks))


def require_finite(option: str, value: float | None) -> None:
    """Refuse NaN and infinities: every comparison with NaN is false, so later range checks would
    let it through and each video would fail on its own instead of the run refusing to start."""
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number; got {value}")


COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
TEMPORAL_POSITIONS = ("index", "spread")
OUTPUT_KINDS = ("projected", "merged")
BATCHING_MODES = ("pack", "bucket")
RESUME_MODES = ("auto", "resume", "overwrite")
DEFAULT_SHARD_BYTES = 2 * 10**9
MAX_LLM_DIM = 1 << 16
"""Widest --llm-dim accepted: 4x the widest LLM hidden size in use; more means nothing and would
only allocate a projector of that width."""


def parse_byte_size(text: str) -> int:
    """`2GB`, `512MiB`, `100k`, `123` -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if match is None:
        raise UsageError(f"expected a size in bytes such as 2GB, 512MiB or 1000000; got {printable(text, 60)!r}")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    power = " KMGT".index(unit) if unit else 0
    scaled = number * (1024 if binary else 1000) ** power
    if not scaled < 2**63:  # also catches a number of hundreds of digits, which is inf as a float
        raise UsageError(f"a size must be below 8 EiB; got {printable(text, 60)}")
    value = int(scaled)
    if value < 1:
        raise UsageError(f"a size must be at least one byte; got {text!r}")
    return value


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `merge-cli extract` needs; built by the CLI, read by the pipeline."""

    inputs: tuple[str, ...]
    """Folders, media files, or .txt/.jsonl/.json manifests."""
    out: str
    """The output to write, e.g. feats.h5 (its shards live beside it)."""
    media_root: str | None = None
    """Root that manifest paths are relative to, and that keys are made relative to."""
    image_column: str | None = None
    """Parquet inputs: the column of image bytes [default: `image`]."""
    video_column: str | None = None
    """Parquet inputs: the column of video bytes [default: `video`]."""
    key_column: str | None = None
    """Parquet inputs: the column that names each row [default: `id` when present, else FILE/ROW]."""
    min_pixels: int | None = None
    """Resize floor in pixels [default: 4 * factor^2]; the factor comes from the tower's patch size."""
    max_pixels: int | None = None
    """Resize ceiling in pixels [default: 1280 * factor^2]."""
    size: tuple[int, int] | None = None
    """Fixed-size policy: resize everything to exactly this (height, width)."""
    merge_size: int = 2
    video: VideoOptions = field(default_factory=VideoOptions)
    fast_decode: bool = False
    gif_as_video: bool = False
    max_image_pixels: int | None = PILLOW_MAX_IMAGE_PIXELS
    tower: str = "demo"
    """`demo` or a local checkpoint folder."""
    trust_remote_code: bool = False
    """Only ever passed to transformers when the user says so explicitly."""
    layer: int = -1
    """Which hidden state of the tower (transformers convention: -1 last layer, before post-norm)."""
    projector: str | None = None
    """A trained SpatialMergeProjector checkpoint."""
    projector_eps: float = 1e-6
    """LayerNorm eps of the projector's ln_q (not stored in checkpoints; LLaVA-OneVision-1.5 uses 1e-5)."""
    random_projector: bool = False
    """Project with randomly initialized (seeded) weights: for tests and demos only."""
    llm_dim: int | None = None
    """Width of the random projector's output [default: 4 x tower width]."""
    output: str | None = None
    """`projected` or `merged` [default: projected with a projector, merged without]."""
    device: str = "auto"
    dtype: str | None = None
    """Compute dtype [default: bf16 on CUDA, fp32 on CPU]."""
    store_dtype: str | None = None
    """Stored dtype [default: the compute dtype]."""
    batch_tokens: int = 16384
    """Patch tokens per forward pass (before merging)."""
    batching: str = "pack"
    """`pack`: mix shapes in one pass; `bucket`: one shape per pass."""
    workers: int = 2
    """Decoding worker processes (0 decodes in the main process)."""
    shard_bytes: int = DEFAULT_SHARD_BYTES
    compression: str = "none"
    resume: str = "auto"
    retry_failed: bool = False
    """On resume, run the inputs that failed before again (by default their error records stand)."""
    unit_size: int = 10_000
    """Samples per work unit: the piece a rank claims and the piece resume skips whole."""
    limit: int | None = None
    """Take only the first this many inputs of the listing (a prefix: a later run without it
    resumes and completes the rest). Not hashed: it changes how much is done, not the numbers."""
    dry_run: bool = False
    """List and plan (headers only, a short timed probe of the tower), write nothing."""
    strict: bool = False
    """Stop at the first input that fails."""
    rank: int | None = None
    """This process's rank when splitting work by hand (Slurm arrays); torchrun sets it otherwise."""
    world_size: int | None = None
    preprocess: str | None = None
    """`checkpoint` (the checkpoint's processor decides sizes) or `native` (merge-cli's policy)
    [default: checkpoint for Qwen2-VL, Qwen2.5-VL and SigLIP2 NaFlex, native for the rest]."""
    temporal_positions: str = "index"
    """OneVision video: temporal rotary positions 0..T-1 (`index`) or spread over the rotary
    table (`spread`: linspace(0, rope_temporal_size - 1, T), as the model card builds them)."""

    def __post_init__(self) -> None:
        if self.preprocess is not None and self.preprocess not in PREPROCESS_MODES:
            raise UsageError(f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}; got {self.preprocess!r}")
        if self.temporal_positions not in TEMPORAL_POSITIONS:
            raise UsageError(
                f"--temporal-positions must be one of {', '.join(TEMPORAL_POSITIONS)}; got {self.temporal_positions!r}"
            )
        if not self.inputs:
            raise UsageError("give at least one --input")
        if not self.out.strip():
            raise UsageError("--out must name a file, e.g. feats.h5; got an empty name")
        for option, value in (
            ("--image-column", self.image_column),
            ("--video-column", self.video_column),
            ("--key-column", self.key_column),
        ):
            if value is not None and not value.strip():
                raise UsageError(f"{option} must name a column; got an empty name")
        if self.output is not None and self.output not in OUTPUT_KINDS:
            raise UsageError(f"--output must be one of {', '.join(OUTPUT_KINDS)}; got {self.output!r}")
        for name, value in (("--dtype", self.dtype), ("--store-dtype", self.store_dtype)):
            if value is not None and value not in COMPUTE_DTYPES:
                raise UsageError(f"{name} must be one of {', '.join(COMPUTE_DTYPES)}; got {value!r}")
        if self.batching not in BATCHING_MODES:
            raise UsageError(f"--batching must be one of {', '.join(BATCHING_MODES)}; got {self.batching!r}")
        if self.resume not in RESUME_MODES:
            raise UsageError(f"resume mode must be one of {', '.join(RESUME_MODES)}; got {self.resume!r}")
        if self.batch_tokens < 1:
            raise UsageError(f"--batch-tokens must be positive; got {self.batch_tokens}")
        if self.unit_size < 1:
            raise UsageError(f"--unit-size must be at least 1; got {self.unit_size}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1; got {self.limit}")
        if self.workers < 0:
            raise UsageError(f"--workers must not be negative; got {self.workers}")
        require_finite("--projector-eps", self.projector_eps)
        if self.projector_eps <= 0:
            raise UsageError(f"--projector-eps must be positive; got {self.projector_eps}")
        if self.llm_dim is not None and not 1 <= self.llm_dim <= MAX_LLM_DIM:
            raise UsageError(f"--llm-dim must be in 1..{MAX_LLM_DIM:,}; got {printable(self.llm_dim, 60)}")
        if self.projector and self.random_projector:
            raise UsageError("give either --projector or --random-projector, not both")
        if self.output == "projected" and not (self.projector or self.random_projector):
            raise UsageError(
                "--output projected needs trained weights (--projector CKPT); "
                "--random-projector projects with random weights, for tests and demos only"
            )
        if (self.rank is None) != (self.world_size is None):
            raise UsageError("give --rank and --world-size together")
        if self.world_size is not None and not 0 <= (self.rank or 0) < self.world_size:
            raise UsageError(f"--rank must be in [0, {self.world_size}); got {self.rank}")

    def media_options(self, vision: CheckpointVision | int) -> MediaOptions:
        """Media settings for the tower `vision` describes (`read_checkpoint_vision(self.tower)`),
        or, given a patch size, the native policy for a tower without a processor config."""
        from merge_cli.media import processor

        if isinstance(vision, int):
            vision = processor.CheckpointVision("demo", vision)
        mode = processor.resolve_mode(vision, self.preprocess)
        policy = processor.resize_policy(
            vision, mode, merge_size=self.merge_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels, size=self.size
        )
        return MediaOptions(
            policy,
            self.video,
            self.fast_decode,
            self.gif_as_video,
            self.max_image_pixels,
            rescale_factor=vision.rescale_factor,
            video_defaults=processor.video_defaults(vision, mode, policy.factor),
            decode_threads=spare_decode_threads(self.workers),
        )

    @property
    def output_kind(self) -> str:
        if self.output is not None:
            return self.output
        return "projected" if (self.projector or self.random_projector) else "merged"
