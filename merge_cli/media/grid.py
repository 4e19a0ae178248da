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

DEFAULT_PATCH_SIZE = 14
DEFAULT_MERGE_SIZE = 2
MAX_ASPECT_RATIO = 200.0

_SIZE_PATTERN = re.compile(r"^\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*$")


def parse_hw(text: str) -> tuple[int, int]:
    """Parse `HxW` (height first, e.g. `252x448`) into positive integers."""
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise UsageError(f"expected a size written HxW (height x width), e.g. 252x448; got {text!r}")
    height, width = int(match.group(1)), int(match.group(2))
    if height <= 0 or width <= 0:
        raise UsageError(f"both sides of a size must be positive; got {height}x{width}")
    return height, width


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


@dataclass(frozen=True)
class ResizePolicy:
    """How every input is resized before the tower: Qwen2-VL's smart resize, or a fixed size.

    `min_pixels` / `max_pixels` default to 4 and 1280 merged tokens' worth of pixels
    (4 * factor**2 and 1280 * factor**2). With `size` set, every input is resized to exactly that
    size, which must itself be a valid merge grid.
    """

    patch_size: int = DEFAULT_PATCH_SIZE
    merge_size: int = DEFAULT_MERGE_SIZE
    min_pixels: int | None = None
    max_pixels: int | None = None
    size: tuple[int, int] | None = None
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise UsageError(f"patch size must be positive; got {self.patch_size}")
        if self.merge_size < 1:
            raise UsageError(f"merge size must be positive; got {self.merge_size}")
        factor = self.factor
        # Resolve the defaults once so that the policy is fully explicit when recorded.
        if self.min_pixels is None:
            object.__setattr__(self, "min_pixels", 4 * factor**2)
        if self.max_pixels is None:
            object.__setattr__(self, "max_pixels", 1280 * factor**2)
        if self.size is not None:
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
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

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The pixel size an input of `height x width` is resized to."""
        if self.size is not None:
            if height <= 0 or width <= 0:
                raise GridError(f"cannot resize an empty image ({height}x{width})")
            return self.size
        assert self.min_pixels is not None and self.max_pixels is not None  # set in __post_init__
        return smart_resize(
            height, width, self.factor, self.min_pixels, self.max_pixels, self.max_aspect_ratio
        )

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an input of `height x width` after resizing."""
        return patch_grid(*self.target_size(height, width), self.patch_size)

    def with_max_pixels(self, max_pixels: int) -> ResizePolicy:
        """The same policy with another pixel ceiling (video frames use their own)."""
        min_pixels = min(self.min_pixels or 0, max_pixels)
        return ResizePolicy(
            self.patch_size, self.merge_size, min_pixels, max_pixels, self.size, self.max_aspect_ratio
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kind"] = "fixed" if self.size is not None else "smart"
        data["size"] = list(self.size) if self.size is not None else None
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
        new_h, new_w = policy.target_size(height, width)
    except GridError as error:
        report["resized"] = None
        report["resize_error"] = str(error)
        return report
    grid_h, grid_w = patch_grid(new_h, new_w, patch)
    report["resized"] = {
        "size": [new_h, new_w],
        "patch_grid": [grid_h, grid_w],
        "merged_grid": [grid_h // merge, grid_w // merge],
        "tokens": grid_h * grid_w,
        "merged_tokens": grid_h * grid_w // merge**2,
        "changed": [new_h, new_w] != [height, width],
    }
    report["resize_error"] = None
    return report


def describe_tokens(num_tokens: int, patch_size: int, merge_size: int) -> dict:
    """What `check-grid --tokens N` reports: the inferred grid, or the reason there is none."""
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
