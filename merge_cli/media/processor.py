"""What a checkpoint's own processor decides, read from its folder's JSON files (no torch here).

`read_checkpoint_vision` reads `config.json` (patch, merge and temporal patch size),
`preprocessor_config.json` and `video_preprocessor_config.json`; `resize_policy` and
`video_defaults` turn them into merge-cli's policies for `--preprocess checkpoint|native`.
extract and `check-grid --tower` both go through here, so they apply one rule.

Always taken from the checkpoint, in both modes (the model's input contract, not a policy
choice): the resample filter and the rescale factor (mean and std are read by the towers).
`checkpoint` also follows the processor's size rule:

  family     processor rule                                      (defaults without a config)
  qwen       smart resize within min/max pixels (size shortest/longest_edge)   3136..1003520
  siglip2    NaFlex: the largest patch-aligned size with <= max_num_patches    256
  siglip     fixed height x width                                              224x224
  clip       shortest edge, then center crop                                   224, 224x224
  dinov2     shortest edge, then center crop                                   256, 224x224

A folder with no processor rule (OneVision, the demo, remote code) has nothing to follow:
`checkpoint` is then the native policy. Video in `checkpoint` mode follows the published
qwen-vl-utils rules for Qwen (values from video_preprocessor_config.json where there is one);
for the image towers, video frames are images to their processor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_cli.errors import CheckpointError, UsageError
from merge_cli.media.grid import RESAMPLE_FILTERS, ResizePolicy

FAMILIES = {
    "onevision_encoder": "onevision",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "siglip2": "siglip2",
    "siglip2_vision_model": "siglip2",
    "clip": "clip",
    "clip_vision_model": "clip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "qwen2_vl": "qwen",
    "qwen2_vl_vision": "qwen",
    "qwen2_5_vl": "qwen",
    "qwen2_5_vl_vision": "qwen",
}
"""config.json model_type -> processor family; merge_cli.models.towers derives its module table from it."""

CHECKPOINT_BY_DEFAULT = frozenset({"qwen", "siglip2"})
"""Families whose own processor is native-resolution: `--preprocess` defaults to checkpoint."""

_DEFAULT_RESAMPLE = {"siglip2": "bilinear"}  # every other family's processor is bicubic

# qwen-vl-utils' published video rules, in units of factor**2 pixels.
QWEN_VIDEO_MIN_TOKENS = 128
QWEN_VIDEO_MAX_TOKENS = 768
QWEN_VIDEO_CONTEXT_TOKENS = 128000
QWEN_VIDEO_MAX_FRAMES = 768
QWEN_IMAGE_MIN_PIXELS = 56 * 56
QWEN_IMAGE_MAX_PIXELS = 28 * 28 * 1280
QWEN_VIDEO_RESIZER = "torchvision"
"""qwen-vl-utils resizes video frames with torchvision (bicubic, antialias), not Pillow: merge-cli
makes the same pixels (config.VideoOptions.resizer)."""


@dataclass(frozen=True)
class CheckpointVision:
    """What the media stage needs from a checkpoint folder (or the demo), from JSON alone."""

    family: str
    """qwen, siglip, siglip2, clip, dinov2, onevision, demo or other."""
    patch_size: int
    temporal_patch_size: int = 1
    image: dict[str, Any] | None = None
    """preprocessor_config.json, when the folder has one."""
    video: dict[str, Any] | None = None
    """video_preprocessor_config.json, when the folder has one."""
    source: str = "demo"
    notes: list[str] = field(default_factory=list)

    @property
    def default_mode(self) -> str:
        return "checkpoint" if self.family in CHECKPOINT_BY_DEFAULT else "native"

    @property
    def resample(self) -> str:
        return _resample(self.image, _DEFAULT_RESAMPLE.get(self.family, "bicubic"))

    @property
    def rescale_factor(self) -> float:
        """What pixel values are multiplied by before mean/std: 1/255, or 1 with do_rescale false."""
        config = self.image or {}
        if config.get("do_rescale") is False:
            return 1.0
        factor = config.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
            raise CheckpointError(f"{self.source}: rescale_factor must be a positive number; got {factor!r}")
        return float(factor)

    def has_rule(self) -> bool:
        """Whether the checkpoint's processor decides sizes at all (else checkpoint = native)."""
        return self.family in ("qwen", "siglip2", "siglip", "clip", "dinov2") or _rule_keys(self.image)


def read_checkpoint_vision(spec: str) -> CheckpointVision:
    """The processor facts of `--tower` (`demo` or a folder); CheckpointError for bad JSON."""
    if spec == "demo":
        return CheckpointVision("demo", 14)
    folder = Path(spec).expanduser()
    config = _read_json(folder / "config.json", "model config")
    if config is None:
        raise CheckpointError(f"{folder} has no config.json: --tower takes 'demo' or a Hugging Face-style model folder")
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type, "other") if isinstance(model_type, str) else "other"
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else config
    patch = vision.get("patch_size", 16 if family == "onevision" else 14)
    temporal = vision.get("temporal_patch_size", 2 if family == "qwen" else 1)
    for name, value in (("patch_size", patch), ("temporal_patch_size", temporal)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{folder / 'config.json'}: {name} must be a positive integer; got {value!r}")
    return CheckpointVision(
        family,
        patch,
        temporal,
        _read_json(folder / "preprocessor_config.json", "preprocessor config"),
        _read_json(folder / "video_preprocessor_config.json", "video preprocessor config"),
        str(folder),
    )


def resolve_mode(vision: CheckpointVision, asked: str | None) -> str:
    """`--preprocess` as asked, else the family's default."""
    mode = asked or vision.default_mode
    if mode not in ("checkpoint", "native"):
        raise UsageError(f"--preprocess must be checkpoint or native; got {mode!r}")
    return mode


def resize_policy(
    vision: CheckpointVision,
    mode: str,
    *,
    merge_size: int = 2,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    size: tuple[int, int] | None = None,
) -> ResizePolicy:
    """The image policy of `mode`; explicit options override the one setting they name."""
    base = dict(patch_size=vision.patch_size, merge_size=merge_size, resample=vision.resample, mode=mode, size=size)
    if mode == "native" or not vision.has_rule():
        return ResizePolicy(min_pixels=min_pixels, max_pixels=max_pixels, **base)
    rule = image_rule(vision)
    if rule["rule"] != "smart":
        for flag, value in (("--min-pixels", min_pixels), ("--max-pixels", max_pixels)):
            if value is not None and size is None:
                raise UsageError(
                    f"{flag} does not apply to {vision.family}'s own processor ({rule['rule'].replace('_', ' ')} "
                    "resize); use --size, or --preprocess native"
                )
        return ResizePolicy(**base, **rule)
    return ResizePolicy(
        min_pixels=min_pixels if min_pixels is not None else rule["min_pixels"],
        max_pixels=max_pixels if max_pixels is not None else rule["max_pixels"],
        **base,
        rule="smart",
    )


def image_rule(vision: CheckpointVision) -> dict[str, Any]:
    """The processor's size rule as ResizePolicy fields."""
    config = vision.image or {}
    where = vision.source
    size = config.get("size")
    if vision.family == "siglip2" or "max_num_patches" in config:
        return {"rule": "naflex", "max_num_patches": _positive(config.get("max_num_patches", 256), "max_num_patches", where)}
    if vision.family == "qwen" or "min_pixels" in config or (
        isinstance(size, dict) and "longest_edge" in size and "shortest_edge" in size
    ):
        size = size if isinstance(size, dict) else {}
        low = config.get("min_pixels", size.get("shortest_edge", QWEN_IMAGE_MIN_PIXELS))
        high = config.get("max_pixels", size.get("longest_edge", QWEN_IMAGE_MAX_PIXELS))
        return {"rule": "smart", "min_pixels": _positive(low, "min_pixels", where), "max_pixels": _positive(high, "max_pixels", where)}
    if size is None:
        size = {"siglip": {"height": 224, "width": 224}, "clip": {"shortest_edge": 224}}.get(
            vision.family, {"shortest_edge": 256}
        )
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size} if vision.family == "siglip" else {"shortest_edge": size}
    if not isinstance(size, dict):
        raise CheckpointError(f"{where}: preprocessor size {size!r} is not understood")
    if "height" in size and "width" in size:
        fit = (_positive(size["height"], "size.height", where), _positive(size["width"], "size.width", where))
        return {"rule": "fixed", "fit": fit}
    if "shortest_edge" not in size:
        raise CheckpointError(f"{where}: preprocessor size {size!r} is not understood")
    crop = None
    if config.get("do_center_crop", vision.family in ("clip", "dinov2") or "crop_size" in config):
        raw = config.get("crop_size", {"height": 224, "width": 224})
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = {"height": raw, "width": raw}
        if not isinstance(raw, dict) or "height" not in raw or "width" not in raw:
            raise CheckpointError(f"{where}: crop_size {raw!r} is not understood")
        crop = (_positive(raw["height"], "crop_size.height", where), _positive(raw["width"], "crop_size.width", where))
    return {"rule": "shortest_edge", "shortest_edge": _positive(size["shortest_edge"], "size.shortest_edge", where), "crop": crop}


def video_defaults(vision: CheckpointVision, mode: str, factor: int) -> dict[str, Any]:
    """VideoOptions settings that the mode decides (explicit options override each one).

    native: 2 fps, 4..32 frames, 64 merged tokens per frame, 32 frames' worth in all.
    checkpoint, Qwen: qwen-vl-utils: 2 fps, 4..768 frames, the count floored to a multiple of
    the temporal patch, 128..768 tokens per frame and 0.9 x 128000 tokens over the video, each
    value from video_preprocessor_config.json where it has one; frames resized as its
    `fetch_video` does (torchvision's bicubic antialiased tensor resize, `QWEN_VIDEO_RESIZER`)
    unless the video processor names a filter other than bicubic (then Pillow with that filter).
    """
    if mode != "checkpoint" or vision.family != "qwen":
        return {
            "rule": "native",
            "fps": 2.0,
            "min_frames": 4,
            "max_frames": 32,
            "min_pixels": None,
            "max_pixels": 64 * factor**2,
            "total_pixels": 32 * 64 * factor**2,
            "frame_multiple": 1,
            "resample": None,
            "resizer": None,
        }
    config = vision.video or {}
    where = vision.source
    size = config.get("size") if isinstance(config.get("size"), dict) else {}
    low = config.get("min_pixels", size.get("shortest_edge", QWEN_VIDEO_MIN_TOKENS * factor**2))
    high = config.get("max_pixels", size.get("longest_edge", QWEN_VIDEO_MAX_TOKENS * factor**2))
    context = config.get("max_video_tokens", QWEN_VIDEO_CONTEXT_TOKENS)
    fps = config.get("fps") or 2.0
    resample = _resample(config, vision.resample)
    return {
        "rule": "qwen",
        "fps": float(fps),
        "min_frames": _positive(config.get("min_frames", 4), "min_frames", where),
        "max_frames": _positive(config.get("max_frames", QWEN_VIDEO_MAX_FRAMES), "max_frames", where),
        "min_pixels": _positive(low, "min_pixels", where),
        "max_pixels": _positive(high, "max_pixels", where),
        "total_pixels": int(_positive(context, "max_video_tokens", where) * factor**2 * 0.9),
        "frame_multiple": _positive(config.get("temporal_patch_size", vision.temporal_patch_size), "temporal_patch_size", where),
        "resample": resample if config else None,
        "resizer": QWEN_VIDEO_RESIZER if resample == "bicubic" else None,
    }


def qwen_frame_ceiling(min_pixels: int, max_pixels: int, total_pixels: int, frames: int, multiple: int) -> float:
    """qwen-vl-utils' per-frame pixel ceiling: an even share of the total budget per temporal
    patch, within the per-frame maximum, never below 1.05 x the per-frame minimum."""
    return max(min(max_pixels, total_pixels / max(1, frames) * multiple), int(min_pixels * 1.05))


def qwen_frame_count(available: int, video_fps: float, fps: float, min_frames: int, max_frames: int, multiple: int) -> int:
    """qwen-vl-utils' `smart_nframes` for fps sampling: duration x fps within [min, max] frames
    (min ceiled, max floored to `multiple`), then floored to a multiple of `multiple`. A clip with
    fewer frames than `multiple` gives all of them (qwen-vl-utils refuses it; the tower repeats
    the last frame, as Qwen's processor does)."""
    low = math.ceil(min_frames / multiple) * multiple
    high = math.floor(min(max_frames, available) / multiple) * multiple
    wanted = min(max(available / video_fps * fps, low), high, available)
    count = math.floor(wanted / multiple) * multiple
    return count if count >= multiple else min(available, multiple)


def _rule_keys(config: dict | None) -> bool:
    return bool(config) and any(k in config for k in ("size", "max_num_patches", "min_pixels", "crop_size"))  # type: ignore[operator]


def _resample(config: dict | None, default: str) -> str:
    if not config or "resample" not in config:
        return default
    value = config["resample"]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(RESAMPLE_FILTERS):
        return RESAMPLE_FILTERS[value]
    if isinstance(value, str) and value.lower() in RESAMPLE_FILTERS:
        return value.lower()
    raise CheckpointError(f"preprocessor resample {value!r} is not a Pillow filter ({', '.join(RESAMPLE_FILTERS)})")


def _positive(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: preprocessor {name} must be a positive integer; got {value!r}")
    return value


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`, or one clear CheckpointError saying why it is unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"cannot read {what} {path}: {error.strerror or error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{what} {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} does not hold a JSON object")
    return data


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    """read_json, or None where the (optional) file is absent."""
    return read_json(path, what) if path.is_file() else None
