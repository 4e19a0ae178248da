"""Pure grid math: parse `HxW`, patch grids, the resize policy, and (h, w) inference.

No torch here: every later stage (media, batching, the work split) asks this module what size an
input becomes and how many tokens it costs. Sizes are always (height, width), written `HxW`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

from merge_cli.errors import GridError, UsageError
from merge_cli.records import printable

DEFAULT_PATCH_SIZE = 14
DEFAULT_MERGE_SIZE = 2
MAX_ASPECT_RATIO = 200.0
MAX_SIDE = 1 << 20
"""The largest side (pixels), patch or merge size any size here may have: 1,048,576, some 30x the
longest side of a real photo. A larger number means nothing, and some would cost without end (a
token count's factor search, float overflow in the resize rule)."""
MAX_PIXELS = MAX_SIDE**2
"""The largest pixel budget (--min-pixels, --max-pixels) or token count (--tokens) accepted."""

class TooSmallError(GridError):
    """A source with a side shorter than one merge window: refused by every resize rule."""


_SIZE_PATTERN = re.compile(r"^\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*$")


def parse_hw(text: str) -> tuple[int, int]:
    """Parse `HxW` (height first, e.g. `252x448`) into positive integers of at most MAX_SIDE."""
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise UsageError(f"expected a size written HxW (height x width), e.g. 252x448; got {printable(text, 60)!r}")
    # Digits counted before int(), which refuses thousands of them with a traceback-worthy message.
    if any(len(side.lstrip("-0")) > len(str(MAX_SIDE)) or int(side) > MAX_SIDE for side in match.groups()):
        raise UsageError(f"size {printable(text.strip(), 60)} is too large: each side is at most {MAX_SIDE:,} pixels")
    height, width = int(match.group(1)), int(match.group(2))
    if height <= 0 or width <= 0:
        raise UsageError(f"both sides of a size must be positive; got {height}x{width}")
    return height, width


def require_at_most(what: str, value: int, limit: int) -> None:
    """UsageError, in one short line, for a number too large to mean anything."""
    if value > limit:
        digits = len(str(value)) if value.bit_length() < 10_000 else "thousands of"
        shown = f"{value:,}" if value.bit_length() <= 64 else f"a number of {digits} digits"
        raise UsageError(f"{what} must be at most {limit:,}; got {shown}")


def looks_like_size(text: str) -> bool:
    """Whether `text` is written as a size `HxW` (possibly an invalid one, such as `0x448`)."""
    return _SIZE_PATTERN.match(text) is not None


def format_hw(height: int, width: int) -> str:
    return f"{height}x{width}"


def merge_factor(patch_size: int, merge_size: int) -> int:
    """Pixels per merged token along one side: 28 for patch 14 with a 2x2 merge."""
    return patch_size * merge_size


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch rows and columns a stride-`patch_size` convolution sees (remainder pixels are dropped)."""
    return height // patch_size, width // patch_size


def grid_problem(height: int, width: int, patch_size: int, merge_size: int) -> str | None:
    """Why `height x width` pixels is not a valid merge grid, or None when it is.

    Valid means: both sides are whole multiples of the patch size (no pixel is silently cropped)
    and the patch grid is divisible by the merge size on both axes.
    """
    problems = []
    for name, side in (("height", height), ("width", width)):
        if side % patch_size:
            problems.append(f"{name} {side} is not a multiple of the patch size {patch_size}")
    h, w = patch_grid(height, width, patch_size)
    if h == 0 or w == 0:
        problems.append(f"patch grid {h}x{w} is empty")
    elif h % merge_size or w % merge_size:
        problems.append(f"Grid size ({h}, {w}) not divisible by merge_size {merge_size}")
    return "; ".join(problems) or None


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> tuple[int, int]:
    """The Qwen2-VL resize rule: both sides multiples of `factor`, area within [min, max] pixels.

    Each side is rounded to the nearest multiple of `factor` (halves to even, as Python's round),
    never below `factor`. If that area exceeds `max_pixels` both sides shrink by
    beta = sqrt(H*W / max_pixels) and are floored to the factor; below `min_pixels` both grow by
    beta = sqrt(min_pixels / (H*W)) and are ceiled. Unlike some implementations, a thin side is
    clamped to `factor` and never becomes 0.
    """
    if height <= 0 or width <= 0:
        raise GridError(f"cannot resize an empty image ({height}x{width})")
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise GridError(
            f"aspect ratio {ratio:.1f} of {height}x{width} exceeds the limit {max_aspect_ratio:g}"
        )
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / beta / factor) * factor)
        new_w = max(factor, math.floor(width / beta / factor) * factor)
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h = max(factor, math.ceil(height * beta / factor) * factor)
        new_w = max(factor, math.ceil(width * beta / factor) * factor)
    return new_h, new_w


RESAMPLE_FILTERS = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")
"""Pillow's resampling filters by name, in the order of their enum values (what a Hugging Face
preprocessor config's integer `resample` means)."""
RESIZE_RULES = ("smart", "fixed", "shortest_edge", "naflex")
PREPROCESS_MODES = ("checkpoint", "native")


@dataclass(frozen=True)
class ResizePlan:
    """What happens to one input of a given size: resize, crop, and the grid that results.

    The source is resized to `resize_hw` (with the policy's filter); then the window `crop`
    (top, left, height, width) of the resized image is kept. `processor_grid` is the patch grid
    the checkpoint's processor gives; `grid` the one used, which always merges (they differ
    only when the processor's grid has a side that does not divide by the merge size).
    """

    resize_hw: tuple[int, int]
    crop: tuple[int, int, int, int]
    processor_grid: tuple[int, int]
    grid: tuple[int, int]

    @property
    def final_hw(self) -> tuple[int, int]:
        return self.crop[2], self.crop[3]

    @property
    def made_even(self) -> bool:
        return self.processor_grid != self.grid


def even_grid(grid: tuple[int, int], merge_size: int, budget: int | None = None) -> tuple[int, int]:
    """The smallest change that makes a patch grid mergeable: every side that does not divide by
    `merge_size` grows to the next multiple (27 -> 28); when that would exceed a token `budget`
    (NaFlex's max_num_patches), such sides shrink to the multiple below instead (21 -> 20),
    never below `merge_size` (so a one-patch side still becomes two, even past the budget)."""
    up = tuple(-(-n // merge_size) * merge_size for n in grid)
    if budget is None or up[0] * up[1] <= budget:
        return up  # type: ignore[return-value]
    return tuple(n if n % merge_size == 0 else max(merge_size, n // merge_size * merge_size) for n in grid)  # type: ignore[return-value]


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """SigLIP2 NaFlex's target size: the largest scale (found by bisection to 1e-5) at which both
    sides, each ceiled to a whole number of patches (at least one), hold at most
    `max_num_patches` patches. The same search as transformers' Siglip2 image processor."""

    def scaled(scale: float, side: int) -> int:
        return max(patch_size, math.ceil(side * scale / patch_size) * patch_size)

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        middle = (low + high) / 2
        if (scaled(middle, height) / patch_size) * (scaled(middle, width) / patch_size) <= max_num_patches:
            low = middle
        else:
            high = middle
    return scaled(low, height), scaled(low, width)


@dataclass(frozen=True)
class ResizePolicy:
    """How every input is resized before the tower.

    Rules (`rule`):
      smart          Qwen2-VL's smart resize within [min_pixels, max_pixels] (the native policy,
                     and Qwen's own processor)
      fixed          resize to `fit` (a checkpoint processor's height/width, e.g. SigLIP 384x384)
      shortest_edge  shortest side to `shortest_edge` (the long side floored), then a center
                     crop to `crop` when set (CLIP, DINOv2)
      naflex         SigLIP2 NaFlex: the largest patch-aligned size with <= max_num_patches
    `size` (the user's --size) overrides every rule and must itself be a valid merge grid.
    `min_pixels` / `max_pixels` default to 4 and 1280 merged tokens' worth of pixels
    (4 * factor**2 and 1280 * factor**2). Every rule keeps only whole patches (the remainder
    pixels at the bottom and right, as a stride-p convolution drops them) and makes a grid
    that cannot merge even (`even_grid`). Sources with a side below one merge window are
    refused by every rule.
    """

    patch_size: int = DEFAULT_PATCH_SIZE
    merge_size: int = DEFAULT_MERGE_SIZE
    min_pixels: int | None = None
    max_pixels: int | None = None
    size: tuple[int, int] | None = None
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    rule: str = "smart"
    fit: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crop: tuple[int, int] | None = None
    max_num_patches: int | None = None
    resample: str = "bicubic"
    mode: str = "native"
    """Who decided the size: `native` (merge-cli's policy) or `checkpoint` (its processor)."""

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise UsageError(f"patch size must be positive; got {self.patch_size}")
        if self.merge_size < 1:
            raise UsageError(f"merge size must be positive; got {self.merge_size}")
        require_at_most("the patch size", self.patch_size, MAX_SIDE)
        require_at_most("the merge size", self.merge_size, MAX_SIDE)
        require_at_most("the merge factor (patch size x merge size)", self.factor, MAX_SIDE)
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None:
                require_at_most(name, getattr(self, name), MAX_PIXELS)
        if self.rule not in RESIZE_RULES:
            raise UsageError(f"resize rule must be one of {', '.join(RESIZE_RULES)}; got {self.rule!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise UsageError(f"resample filter must be one of {', '.join(RESAMPLE_FILTERS)}; got {self.resample!r}")
        if self.mode not in PREPROCESS_MODES:
            raise UsageError(f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}; got {self.mode!r}")
        needs = {"fixed": self.fit, "shortest_edge": self.shortest_edge, "naflex": self.max_num_patches}
        if self.rule in needs and needs[self.rule] is None:
            raise UsageError(f"the {self.rule} resize rule needs its size setting")
        factor = self.factor
        # Resolve the defaults once so that the policy is fully explicit when recorded.
        if self.min_pixels is None:
            object.__setattr__(self, "min_pixels", 4 * factor**2)
        if self.max_pixels is None:
            object.__setattr__(self, "max_pixels", 1280 * factor**2)
        for name in ("size", "fit", "crop"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (int(value[0]), int(value[1])))
        if self.size is not None:
            problem = grid_problem(*self.size, self.patch_size, self.merge_size)
            if problem:
                raise GridError(f"fixed size {format_hw(*self.size)} is not a valid merge grid: {problem}")
        if self.max_pixels < factor**2:
            raise UsageError(
                f"max_pixels {self.max_pixels} is below one merge window ({factor}x{factor} = {factor**2})"
            )
        if self.min_pixels > self.max_pixels:
            raise UsageError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")

    @property
    def factor(self) -> int:
        return merge_factor(self.patch_size, self.merge_size)

    @property
    def kind(self) -> str:
        """`fixed` for the user's --size, else the rule."""
        return "fixed" if self.size is not None else self.rule

    def plan(self, height: int, width: int) -> ResizePlan:
        """Resize, crop and grid for a source of `height x width`; GridError when refused.

        Refused: an empty size, a side shorter than one merge window (a 5x5 image would be blown
        up to 56x56, every token made of interpolated pixels), an aspect ratio above the limit.
        """
        if height <= 0 or width <= 0:
            raise GridError(f"cannot resize an empty image ({height}x{width})")
        factor, p = self.factor, self.patch_size
        if min(height, width) < factor:
            raise TooSmallError(
                f"{height}x{width} is smaller than one {factor}x{factor} merge window; not upscaling it"
            )
        ratio = max(height, width) / min(height, width)
        if ratio > self.max_aspect_ratio:
            raise GridError(
                f"aspect ratio {ratio:.1f} of {height}x{width} exceeds the limit {self.max_aspect_ratio:g}"
            )
        if self.size is not None:
            return self._fixed(self.size)
        if self.rule == "fixed":
            assert self.fit is not None
            return self._fixed(self.fit)
        if self.rule == "shortest_edge":
            return self._shortest_edge(height, width)
        if self.rule == "naflex":
            assert self.max_num_patches is not None
            size = naflex_size(height, width, p, self.max_num_patches)
            grid = (size[0] // p, size[1] // p)
            used = even_grid(grid, self.merge_size, self.max_num_patches)
            resize = (used[0] * p, used[1] * p)
            return ResizePlan(resize, (0, 0, *resize), grid, used)
        assert self.min_pixels is not None and self.max_pixels is not None  # set in __post_init__
        resize = smart_resize(height, width, factor, self.min_pixels, self.max_pixels, self.max_aspect_ratio)
        grid = (resize[0] // p, resize[1] // p)
        return ResizePlan(resize, (0, 0, *resize), grid, grid)

    def _fixed(self, size: tuple[int, int]) -> ResizePlan:
        p = self.patch_size
        grid = (size[0] // p, size[1] // p)
        used = even_grid(grid, self.merge_size)
        if used == grid:  # keep the whole patches, as the convolution does
            return ResizePlan(size, (0, 0, grid[0] * p, grid[1] * p), grid, grid)
        resize = (used[0] * p, used[1] * p)  # as the processor would with this size
        return ResizePlan(resize, (0, 0, *resize), grid, used)

    def _shortest_edge(self, height: int, width: int) -> ResizePlan:
        assert self.shortest_edge is not None
        p = self.patch_size

        def resized(edge: int) -> tuple[int, int]:
            if height <= width:  # the long side floored, as transformers does
                return edge, int(edge * width / height)
            return int(edge * height / width), edge

        resize = resized(self.shortest_edge)
        window = self.crop or resize
        if window[0] > resize[0] or window[1] > resize[1]:
            raise GridError(
                f"the center crop {format_hw(*window)} is larger than the resized image {format_hw(*resize)}"
            )
        grid = (window[0] // p, window[1] // p)
        used = even_grid(grid, self.merge_size)
        if used == grid:
            top, left = (resize[0] - window[0]) // 2, (resize[1] - window[1]) // 2
            return ResizePlan(resize, (top, left, grid[0] * p, grid[1] * p), grid, grid)
        want = (used[0] * p, used[1] * p)
        if self.crop is None:  # no crop: the resized image itself becomes the even size
            return ResizePlan(want, (0, 0, *want), grid, used)
        # The processor with its crop and shortest edge scaled alike, so the crop fits.
        edge = math.ceil(self.shortest_edge * max(want[0] / window[0], want[1] / window[1]))
        resize = resized(edge)
        top, left = (resize[0] - want[0]) // 2, (resize[1] - want[1]) // 2
        return ResizePlan(resize, (top, left, *want), grid, used)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The pixel size the tower sees for an input of `height x width` (after any crop)."""
        return self.plan(height, width).final_hw

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an input of `height x width` after resizing."""
        return self.plan(height, width).grid

    def with_pixels(self, min_pixels: int | None, max_pixels: int) -> ResizePolicy:
        """The same policy with other pixel bounds (video frames use their own)."""
        from dataclasses import replace

        low = min(self.min_pixels or 0, max_pixels) if min_pixels is None else min(min_pixels, max_pixels)
        return replace(self, min_pixels=low, max_pixels=max_pixels)

    def with_max_pixels(self, max_pixels: int) -> ResizePolicy:
        """The same policy with another pixel ceiling (video frames use their own)."""
        return self.with_pixels(None, max_pixels)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kind"] = self.kind
        for name in ("size", "fit", "crop"):
            data[name] = list(data[name]) if data[name] is not None else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def infer_hw(num_tokens: int, merge_size: int = DEFAULT_MERGE_SIZE) -> tuple[int, int]:
    """Guess the grid (h, w) of `num_tokens` raster tokens: the factor pair closest to square.

    Only pairs with both sides divisible by `merge_size` qualify; h <= w. This is a guess, not
    knowledge (576 tokens give 24x24, not 18x32): pass explicit sizes for dynamic resolution.
    """
    if num_tokens < 1:
        raise GridError(f"Cannot find valid H, W factors for N={num_tokens} divisible by merge_size={merge_size}")
    require_at_most("a token count", num_tokens, MAX_PIXELS)  # the search below takes sqrt(N) steps
    best: tuple[int, int] | None = None
    for h in range(1, math.isqrt(num_tokens) + 1):
        if num_tokens % h:
            continue
        w = num_tokens // h
        if h % merge_size == 0 and w % merge_size == 0:
            best = (h, w)  # later h is closer to sqrt(N): closer to square
    if best is None:
        raise GridError(f"Cannot find valid H, W factors for N={num_tokens} divisible by merge_size={merge_size}")
    return best


def describe_size(height: int, width: int, policy: ResizePolicy) -> dict:
    """What `check-grid` reports for a pixel size: its grid, validity, and what resizing makes of it.

    Keys are a stable, documented contract (README, "check-grid --json").
    """
    patch, merge = policy.patch_size, policy.merge_size
    h, w = patch_grid(height, width, patch)
    problem = grid_problem(height, width, patch, merge)
    report: dict = {
        "size": [height, width],
        "patch_size": patch,
        "merge_size": merge,
        "factor": policy.factor,
        "patch_grid": [h, w],
        "valid": problem is None,
        "problem": problem,
        "tokens": h * w,
        "merged_tokens": h * w // merge**2 if problem is None else None,
        "policy": policy.to_dict(),
    }
    try:
        plan = policy.plan(height, width)
    except GridError as error:
        report["resized"] = None
        report["resize_error"] = str(error)
        return report
    new_h, new_w = plan.final_hw
    grid_h, grid_w = plan.grid
    report["resized"] = {
        "size": [new_h, new_w],
        "patch_grid": [grid_h, grid_w],
        "merged_grid": [grid_h // merge, grid_w // merge],
        "tokens": grid_h * grid_w,
        "merged_tokens": grid_h * grid_w // merge**2,
        "changed": [new_h, new_w] != [height, width],
        "resize": list(plan.resize_hw),
        "crop": list(plan.crop),
        "processor_grid": list(plan.processor_grid),
        "made_even": plan.made_even,
    }
    report["resize_error"] = None
    return report


def describe_tokens(num_tokens: int, patch_size: int, merge_size: int) -> dict:
    """What `check-grid --tokens N` reports: the inferred grid, or the reason there is none.
    UsageError for numbers too large to mean anything."""
    require_at_most("--tokens", num_tokens, MAX_PIXELS)
    require_at_most("--patch-size", patch_size, MAX_SIDE)
    require_at_most("--merge-size", merge_size, MAX_SIDE)
    report: dict = {"tokens": num_tokens, "patch_size": patch_size, "merge_size": merge_size}
    try:
        h, w = infer_hw(num_tokens, merge_size)
    except GridError as error:
        report.update(valid=False, problem=str(error), patch_grid=None, merged_grid=None, merged_tokens=None, size=None)
        return report
    report.update(
        valid=True,
        problem=None,
        patch_grid=[h, w],
        merged_grid=[h // merge_size, w // merge_size],
        merged_tokens=num_tokens // merge_size**2,
        size=[h * patch_size, w * patch_size],
    )
    return report
