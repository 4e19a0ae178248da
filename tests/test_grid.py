"""Grid rules: patch grids, validity, the smart-resize policy, and (h, w) inference."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from merge_cli.errors import GridError, UsageError
from merge_cli.media.grid import (
    ResizePolicy,
    describe_size,
    grid_problem,
    infer_hw,
    parse_hw,
    patch_grid,
    smart_resize,
)

FACTOR = 28
MIN_PIXELS = 4 * FACTOR**2
MAX_PIXELS = 1280 * FACTOR**2


@pytest.mark.parametrize(
    ("size", "grid", "merged_tokens"),
    [((448, 448), (32, 32), 256), ((252, 448), (18, 32), 144), ((196, 392), (14, 28), 98)],
)
def test_guide_examples(size, grid, merged_tokens):
    assert patch_grid(*size, 14) == grid
    assert grid_problem(*size, 14, 2) is None
    report = describe_size(*size, ResizePolicy())
    assert report["valid"] and report["merged_tokens"] == merged_tokens
    assert report["tokens"] == grid[0] * grid[1]
    assert report["resized"]["size"] == list(size)  # already valid: unchanged


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ((238, 448), "Grid size (17, 32) not divisible by merge_size 2"),
        ((448, 434), "Grid size (32, 31) not divisible by merge_size 2"),
        ((255, 448), "height 255 is not a multiple of the patch size 14"),
        ((10, 448), "patch grid 0x32 is empty"),
    ],
)
def test_invalid_grids_are_explained(size, fragment):
    problem = grid_problem(*size, 14, 2)
    assert problem is not None and fragment in problem


def test_parse_hw_is_height_first_and_strict():
    assert parse_hw("252x448") == (252, 448)
    assert parse_hw(" 252X448 ") == (252, 448)
    for bad in ["abc", "252", "252x", "x448", "252x448x3", "2.5x4", ""]:
        with pytest.raises(UsageError, match="HxW"):
            parse_hw(bad)
    for bad in ["0x448", "-5x3", "448x0"]:
        with pytest.raises(UsageError, match="positive"):
            parse_hw(bad)


def test_smart_resize_known_values():
    # Already on the grid: unchanged. Rounding halves to even: 42 / 28 = 1.5 -> 2, 70 / 28 = 2.5 -> 2.
    assert smart_resize(252, 448, FACTOR, MIN_PIXELS, MAX_PIXELS) == (252, 448)
    assert smart_resize(70, 70, FACTOR, 0, MAX_PIXELS) == (56, 56)
    assert smart_resize(42, 42, FACTOR, 0, MAX_PIXELS) == (56, 56)
    # 4000x3000 is far above the ceiling: floor after scaling by beta.
    beta = math.sqrt(4000 * 3000 / MAX_PIXELS)
    expected = (math.floor(4000 / beta / 28) * 28, math.floor(3000 / beta / 28) * 28)
    assert smart_resize(4000, 3000, FACTOR, MIN_PIXELS, MAX_PIXELS) == expected == (1148, 840)
    # Tiny input: ceil after scaling up.
    assert smart_resize(20, 30, FACTOR, MIN_PIXELS, MAX_PIXELS) == (56, 84)


def test_thin_images_never_get_a_zero_side():
    # transformers rounds a 10-px side to 0 before its min-pixels branch; here it is clamped.
    assert smart_resize(10, 1800, FACTOR, MIN_PIXELS, MAX_PIXELS) == (28, 1792)
    assert smart_resize(1800, 10, FACTOR, MIN_PIXELS, MAX_PIXELS) == (1792, 28)


def test_aspect_ratio_limit():
    assert smart_resize(10, 2000, FACTOR, MIN_PIXELS, MAX_PIXELS)[0] == 28  # exactly 200: allowed
    with pytest.raises(GridError, match="aspect ratio 200.1"):
        smart_resize(10, 2001, FACTOR, MIN_PIXELS, MAX_PIXELS)


sides = st.integers(min_value=1, max_value=20_000)


@settings(max_examples=400, deadline=None)
@given(height=sides, width=sides)
def test_smart_resize_properties_with_default_bounds(height, width):
    assume(max(height, width) / min(height, width) <= 200)
    new_h, new_w = smart_resize(height, width, FACTOR, MIN_PIXELS, MAX_PIXELS)
    assert new_h % FACTOR == 0 and new_w % FACTOR == 0
    assert new_h >= FACTOR and new_w >= FACTOR
    assert MIN_PIXELS <= new_h * new_w <= MAX_PIXELS
    _assert_aspect_kept(height, width, new_h, new_w, FACTOR)


@settings(max_examples=400, deadline=None)
@given(
    height=sides,
    width=sides,
    factor=st.sampled_from([28, 32, 16, 56]),
    min_tokens=st.integers(1, 64),
    spread=st.integers(4, 4096),
)
def test_smart_resize_properties_with_random_bounds(height, width, factor, min_tokens, spread):
    assume(max(height, width) / min(height, width) <= 200)
    min_pixels = min_tokens * factor**2
    max_pixels = min_pixels * spread  # at least 4x apart, so one factor step fits in between
    new_h, new_w = smart_resize(height, width, factor, min_pixels, max_pixels)
    assert new_h % factor == 0 and new_w % factor == 0 and new_h >= factor and new_w >= factor
    if not min_pixels <= new_h * new_w <= max_pixels:
        # Only reachable by clamping a thin side up to one factor.
        assert min(new_h, new_w) == factor
    _assert_aspect_kept(height, width, new_h, new_w, factor)


def _assert_aspect_kept(height, width, new_h, new_w, factor):
    """Some common scale s maps both sides to within one factor step of the result.

    A side clamped up to `factor` constrains nothing (that is the documented thin-image clamp).
    """
    low, high = 0.0, math.inf
    for old, new in ((height, new_h), (width, new_w)):
        if new > factor:
            low = max(low, (new - factor) / old)
            high = min(high, (new + factor) / old)
    assert low <= high, (height, width, new_h, new_w)


@settings(max_examples=300, deadline=None)
@given(height=st.integers(14, 8000), width=st.integers(14, 8000))
def test_smart_resize_agrees_with_transformers(height, width):
    """Wherever transformers' version does not hit its zero-side bug, both agree exactly."""
    reference = pytest.importorskip(
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl", reason="needs the [hf] extra"
    ).smart_resize
    assume(max(height, width) / min(height, width) <= 200)
    assume(round(height / FACTOR) >= 1 and round(width / FACTOR) >= 1)
    assert smart_resize(height, width, FACTOR, MIN_PIXELS, MAX_PIXELS) == reference(
        height, width, FACTOR, MIN_PIXELS, MAX_PIXELS
    )


def test_fixed_policy():
    policy = ResizePolicy(size=(448, 448))
    assert policy.target_size(1000, 37) == (448, 448)
    with pytest.raises(GridError, match="not a valid merge grid"):
        ResizePolicy(size=(450, 448))
    with pytest.raises(GridError, match="not divisible by merge_size 2"):
        ResizePolicy(size=(434, 448))


def test_policy_defaults_follow_the_factor():
    assert ResizePolicy().min_pixels == 4 * 28**2 and ResizePolicy().max_pixels == 1280 * 28**2
    policy16 = ResizePolicy(patch_size=16)
    assert policy16.factor == 32 and policy16.max_pixels == 1280 * 32**2
    assert policy16.target_size(448, 448) == (448, 448)
    with pytest.raises(UsageError):
        ResizePolicy(min_pixels=10_000, max_pixels=5_000)


def test_infer_hw_prefers_square():
    assert infer_hw(1024) == (32, 32)
    assert infer_hw(576) == (24, 24)  # a guess: an 18x32 grid also has 576 tokens
    assert infer_hw(392) == (14, 28)
    assert infer_hw(8) == (2, 4)
    assert infer_hw(36, merge_size=3) == (6, 6)


@pytest.mark.parametrize("num_tokens", [7, 2, 18, 0])
def test_infer_hw_error(num_tokens):
    with pytest.raises(GridError, match=f"Cannot find valid H, W factors for N={num_tokens} divisible by merge_size=2"):
        infer_hw(num_tokens)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 60), w=st.integers(1, 60))
def test_infer_hw_matches_brute_force(h, w):
    num_tokens = 4 * h * w
    pairs = [(a, num_tokens // a) for a in range(1, num_tokens + 1) if num_tokens % a == 0]
    valid = [(a, b) for a, b in pairs if a % 2 == 0 and b % 2 == 0 and a <= b]
    assert infer_hw(num_tokens) == min(valid, key=lambda pair: pair[1] - pair[0])
