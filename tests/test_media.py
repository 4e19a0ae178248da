"""Image decoding: every mode to the right RGB, EXIF orientation, resizing, normalization, fast decode."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from media_factory import exif_orientation, make_gif, make_image, save_array
from PIL import Image

from merge_cli.config import MediaOptions
from merge_cli.media.grid import ResizePolicy
from merge_cli.media.images import decode_sample, normalize, plan_sample
from merge_cli.records import Failure, Item, Sample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _decode(path, options=None, kind="image") -> Item:
    item = decode_sample(Sample(path.name, path, kind), options or MediaOptions())
    assert isinstance(item, Item), item
    return item


def _rgb(item: Item) -> np.ndarray:
    """The single frame of an image item as (H, W, 3)."""
    return item.pixels[0].permute(1, 2, 0).numpy()


# --- modes -> RGB (56x56 is a valid grid at the default policy: no resizing, exact values) ----------

SIDE = 56


def _random_u8(*shape) -> np.ndarray:
    return np.random.randint(0, 256, size=shape, dtype=np.uint8)


def test_rgb_is_kept(tmp_path):
    pixels = _random_u8(SIDE, SIDE, 3)
    assert np.array_equal(_rgb(_decode(save_array(tmp_path / "a.png", pixels))), pixels)


def test_l_is_replicated(tmp_path):
    gray = _random_u8(SIDE, SIDE)
    assert np.array_equal(_rgb(_decode(save_array(tmp_path / "a.png", gray, "L"))), np.stack([gray] * 3, axis=-1))


def test_bilevel_becomes_black_and_white(tmp_path):
    bits = np.random.randint(0, 2, size=(SIDE, SIDE)).astype(bool)
    path = tmp_path / "a.png"
    Image.fromarray(bits).save(path)
    assert np.array_equal(_rgb(_decode(path)), np.stack([bits * 255] * 3, axis=-1).astype(np.uint8))


def _on_white(value: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """value * a / 255 + 255 * (1 - a / 255), computed by hand."""
    a = alpha.astype(np.float64) / 255.0
    return value.astype(np.float64) * a + 255.0 * (1.0 - a)


def test_la_is_composited_onto_white(tmp_path):
    la = _random_u8(SIDE, SIDE, 2)
    got = _rgb(_decode(save_array(tmp_path / "a.png", la, "LA"))).astype(np.float64)
    expected = _on_white(la[..., 0], la[..., 1])
    for channel in range(3):
        assert np.abs(got[..., channel] - expected).max() <= 1.0


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = _random_u8(SIDE, SIDE, 4)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255  # fully transparent -> white; opaque -> unchanged
    got = _rgb(_decode(save_array(tmp_path / "a.png", rgba, "RGBA"))).astype(np.float64)
    expected = _on_white(rgba[..., :3], rgba[..., 3:])
    assert np.abs(got - expected).max() <= 1.0
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == rgba[0, 1, :3].tolist()


def test_palette_with_and_without_transparency(tmp_path):
    palette = _random_u8(256, 3)
    index = np.random.randint(0, 256, size=(SIDE, SIDE)).astype(np.uint8)
    index[0, 0] = 7
    image = Image.fromarray(index, "P")
    image.putpalette(palette.flatten().tolist())
    image.save(tmp_path / "opaque.png")
    image.save(tmp_path / "clear.png", transparency=7)
    opaque = _rgb(_decode(tmp_path / "opaque.png"))
    assert np.array_equal(opaque, palette[index])
    clear = _rgb(_decode(tmp_path / "clear.png"))
    expected = palette[index].copy()
    expected[index == 7] = 255  # the transparent palette entry shows the white background
    assert np.array_equal(clear, expected)


def test_cmyk_uses_the_standard_formula(tmp_path):
    cmyk = _random_u8(SIDE, SIDE, 4)
    got = _rgb(_decode(save_array(tmp_path / "a.tif", cmyk, "CMYK"))).astype(np.float64)
    k = cmyk[..., 3:].astype(np.float64)
    expected = (255.0 - k) * (255.0 - cmyk[..., :3]) / 255.0  # R = (255 - K)(255 - C) / 255
    assert np.abs(got - expected).max() <= 1.0


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    deep = np.random.randint(0, 65536, size=(SIDE, SIDE)).astype(np.uint16)
    path = save_array(tmp_path / "a.png", deep)
    assert Image.open(path).mode == "I;16"
    got = _rgb(_decode(path))
    expected = np.round(deep / 257.0).astype(np.uint8)  # 65535 -> 255, 257 -> 1
    assert np.array_equal(got, np.stack([expected] * 3, axis=-1))


def test_gif_first_frame_unless_read_as_video(tmp_path):
    path = make_gif(tmp_path / "anim.gif", [40, 120, 200])
    first = _decode(path)
    assert first.num_frames == 1 and first.kind == "image"
    assert abs(float(first.pixels.float().mean()) - 40) <= 1
    as_video = _decode(path, kind="video")
    assert as_video.kind == "video" and as_video.num_frames == 3


# --- EXIF orientation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "orientation, turn",
    [
        (1, lambda a: a),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored sideways: displayed turned 90 degrees clockwise
        (8, lambda a: np.rot90(a, 1)),
        (2, lambda a: a[:, ::-1]),
        (5, lambda a: a.transpose(1, 0, 2)),  # transpose
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    stored = _random_u8(56, 112, 3)  # 56 high, 112 wide as stored
    path = save_array(tmp_path / "a.png", stored, exif=exif_orientation(orientation))
    item = _decode(path)
    expected = np.ascontiguousarray(turn(stored))
    assert item.orig_hw == expected.shape[:2] == item.resized_hw
    assert np.array_equal(_rgb(item), expected)
    assert plan_sample(Sample("a.png", path, "image"), MediaOptions()) == (1, expected.shape[0] // 14, expected.shape[1] // 14)


def test_exif_rotation_of_a_jpeg(tmp_path):
    path = make_image(tmp_path / "photo.jpg", 300, 400, exif=exif_orientation(6), quality=95)
    item = _decode(path)
    assert item.orig_hw == (400, 300)
    assert item.resized_hw == MediaOptions().policy.target_size(400, 300)
    with Image.open(path) as image:
        upright = image.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    height, width = item.resized_hw
    expected = np.asarray(upright.resize((width, height), Image.Resampling.BICUBIC))
    assert np.array_equal(_rgb(item), expected)


# --- resizing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_resize_matches_pillow_called_directly(tmp_path, suffix):
    height, width = np.random.randint(60, 700, size=2)
    path = make_image(tmp_path / f"a{suffix}", int(height), int(width))
    policy = ResizePolicy(max_pixels=256 * 28 * 28)
    item = _decode(path, MediaOptions(policy=policy))
    target = policy.target_size(int(height), int(width))
    assert item.orig_hw == (height, width) and item.resized_hw == target
    assert target[0] % 28 == 0 and target[1] % 28 == 0
    with Image.open(path) as image:
        expected = np.asarray(image.convert("RGB").resize(target[::-1], Image.Resampling.BICUBIC))
    assert np.array_equal(_rgb(item), expected)
    assert plan_sample(Sample(path.name, path, "image"), MediaOptions(policy=policy)) == (1, target[0] // 14, target[1] // 14)


def test_fixed_size_policy(tmp_path):
    item = _decode(make_image(tmp_path / "a.png", 100, 300), MediaOptions(policy=ResizePolicy(size=(224, 448))))
    assert item.resized_hw == (224, 448) and tuple(item.pixels.shape) == (1, 3, 224, 448)


def test_item_layout_and_pickling(tmp_path):
    item = _decode(make_image(tmp_path / "a.jpg", 90, 130))
    assert item.pixels.dtype == torch.uint8 and item.pixels.is_contiguous()
    assert tuple(item.pixels.shape) == (1, 3, *item.resized_hw)
    again = pickle.loads(pickle.dumps(item))  # DataLoader workers send items through pipes
    assert torch.equal(again.pixels, item.pixels) and again.orig_hw == (90, 130)
    assert pickle.loads(pickle.dumps(decode_sample)) is decode_sample


# --- fast decode ----------------------------------------------------------------------------------


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_fast_decode_drafts_large_jpegs(tmp_path):
    path = make_image(tmp_path / "big.jpg", 1200, 1600, quality=92)
    policy = ResizePolicy(max_pixels=64 * 28 * 28)  # target ~196x252: 1/4-scale decoding applies
    exact = _decode(path, MediaOptions(policy=policy))
    fast = _decode(path, MediaOptions(policy=policy, fast_decode=True))
    assert fast.orig_hw == exact.orig_hw == (1200, 1600) and fast.resized_hw == exact.resized_hw
    assert not torch.equal(fast.pixels, exact.pixels)  # it did take the reduced path
    assert _psnr(_rgb(fast), _rgb(exact)) > 30


def test_fast_decode_leaves_small_targets_and_pngs_exact(tmp_path):
    jpeg = make_image(tmp_path / "a.jpg", 300, 400)  # target 308x392: less than 2x smaller
    png = make_image(tmp_path / "b.png", 1200, 1600)
    for path in (jpeg, png):
        policy = ResizePolicy(max_pixels=64 * 28 * 28) if path == png else ResizePolicy()
        exact = _decode(path, MediaOptions(policy=policy))
        fast = _decode(path, MediaOptions(policy=policy, fast_decode=True))
        assert torch.equal(fast.pixels, exact.pixels)


def test_fast_decode_of_a_rotated_jpeg(tmp_path):
    path = make_image(tmp_path / "big.jpg", 1200, 1600, exif=exif_orientation(6))
    policy = ResizePolicy(max_pixels=64 * 28 * 28)
    exact = _decode(path, MediaOptions(policy=policy))
    fast = _decode(path, MediaOptions(policy=policy, fast_decode=True))
    assert fast.orig_hw == exact.orig_hw == (1600, 1200) and fast.resized_hw == exact.resized_hw
    assert _psnr(_rgb(fast), _rgb(exact)) > 30


# --- decompression-bomb limit ---------------------------------------------------------------------


def test_pixel_limit_is_configurable(tmp_path):
    path = make_image(tmp_path / "a.png", 100, 80)
    assert isinstance(decode_sample(Sample("a.png", path, "image"), MediaOptions(max_image_pixels=8000)), Item)
    failure = decode_sample(Sample("a.png", path, "image"), MediaOptions(max_image_pixels=7999))
    assert failure == Failure(
        "a.png", "open", "DecompressionBombError",
        "100x80 is 8,000 pixels, over the limit of 7,999 (--max-image-pixels): refusing a possible decompression bomb",
    )


def test_pillow_global_limit_is_left_as_it_was(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    _decode(make_image(tmp_path / "a.png", 60, 60), MediaOptions(max_image_pixels=None))
    assert Image.MAX_IMAGE_PIXELS == before


# --- normalize ------------------------------------------------------------------------------------


def test_normalize_matches_the_formula():
    pixels = torch.randint(0, 256, (3, 3, 28, 56), dtype=torch.uint8)
    got = normalize(pixels, CLIP_MEAN, CLIP_STD)
    expected = torch.empty(pixels.shape, dtype=torch.float64)
    for c in range(3):
        expected[:, c] = (pixels[:, c].double() / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
    assert got.dtype == torch.float32 and got.shape == pixels.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_normalize_to_bfloat16():
    pixels = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    got = normalize(pixels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), pixels.float() / 127.5 - 1.0, atol=1e-2, rtol=0)


def test_normalize_refuses_what_is_not_uint8_pixels():
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(1, 3, 2, 2), CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        normalize(torch.zeros(1, 4, 2, 2, dtype=torch.uint8), CLIP_MEAN, CLIP_STD)



def test_threads_probing_at_once_restore_pillow_limit(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    before = Image.MAX_IMAGE_PIXELS
    samples = [Sample(f"{i}.png", make_image(tmp_path / f"{i}.png", 60 + i, 90), "image") for i in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # as the pipeline's cost estimate does
        plans = list(pool.map(lambda sample: plan_sample(sample, MediaOptions()), samples * 4))
    assert len(plans) == 64 and Image.MAX_IMAGE_PIXELS == before


def test_decodes_in_a_dataloader_worker(tmp_path):
    samples = [
        Sample("a.jpg", make_image(tmp_path / "a.jpg", 70, 90), "image"),
        Sample("b.jpg", tmp_path / "missing.jpg", "image"),
    ]

    class Decoded(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, index):
            return decode_sample(samples[index], MediaOptions())

    loader = torch.utils.data.DataLoader(Decoded(), batch_size=None, num_workers=1, collate_fn=lambda x: x)
    item, failure = list(loader)
    assert isinstance(item, Item) and item.resized_hw == (56, 84)
    assert failure == Failure("b.jpg", "open", "FileNotFoundError", f"no such file: {tmp_path / 'missing.jpg'}")
