"""Offline equals online: with `--preprocess checkpoint`, the stored tokens equal what transformers'
own processor (PIL backend) + model compute from the same file, for every Hugging Face tower.

Each test saves a tiny random model and its processor with save_pretrained, runs `extract` on
images of odd sizes, and compares every stored sample with transformers (fp32, relative error of
the whole sample at most 1e-5). Grids that cannot merge are compared with the processor run at
the even size merge-cli documents (docs: README "The resize policy"). Qwen video frames are made
as qwen-vl-utils makes them (its frame rules, torchvision's float32 bicubic resize written out
with torch: tests/test_frame_resize.py checks that resize against numpy and torchvision), then
rescaled and normalized by the processor.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")

from media_factory import make_image, make_video  # noqa: E402
from PIL import Image  # noqa: E402
from test_towers_hf import TINY_VIT, qwen_reference_patches, window_order_to_raster  # noqa: E402
from tower_factory import save_hf  # noqa: E402

from merge_cli.config import ExtractConfig  # noqa: E402
from merge_cli.output.reader import open_features  # noqa: E402
from merge_cli.run.pipeline import run_extract  # noqa: E402

SIZES = [(333, 517), (1080, 1920), (29, 1000), (150, 200)]  # height, width: odd on purpose
MAX_RELATIVE_ERROR = 1e-5


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def merged(raster: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h*w, C) raster tokens -> (1, h/2 * w/2, 4C): each 2x2 window TL, TR, BL, BR (written out)."""
    c = raster.shape[-1]
    grid = raster.reshape(h, w, c)
    rows = [torch.cat([grid[i, j], grid[i, j + 1], grid[i + 1, j], grid[i + 1, j + 1]]) for i in range(0, h, 2) for j in range(0, w, 2)]
    return torch.stack(rows)[None]


def images(folder, sizes=SIZES):
    paths = {}
    for height, width in sizes:
        key = f"{height}x{width}.png"
        paths[key] = make_image(folder / key, height, width)
    return paths


def extract(tower_folder, inputs, out, **options):
    options.setdefault("preprocess", "checkpoint")
    config = ExtractConfig(
        inputs=(str(inputs),), out=str(out), tower=str(tower_folder), device="cpu", dtype="fp32", workers=0, **options
    )
    return run_extract(config)


def hidden(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


def compare(out, expected: dict):
    """expected: key -> (processor grid, grid used, reference merged tokens)."""
    with open_features(out) as features:
        assert sorted(features.keys()) == sorted(expected)
        assert features.attrs["preprocess"] == "checkpoint"
        for key, (processor_grid, grid, want) in expected.items():
            sample = features[key]
            assert tuple(sample.grid_thw[1:]) == grid, key
            assert sample.processor_grid == processor_grid, key
            assert sample.tokens.shape == want.shape, key
            error = relative_error(sample.tokens, want)
            assert error <= MAX_RELATIVE_ERROR, f"{key}: relative error {error:.2e}"


def pil(path) -> Image.Image:
    return Image.open(path).convert("RGB")


# ---------------------------------------------------------------------------------------------


def test_siglip_fixed_size_with_remainder_and_a_grid_made_even(tmp_path):
    # Native size 60x60 at patch 14: a 4x4 grid plus 4 remainder pixels the convolution drops.
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_VIT, image_size=56)).eval()
    folder = save_hf(model, tmp_path / "siglip")
    processor = transformers.SiglipImageProcessorPil(size={"height": 60, "width": 60})
    processor.save_pretrained(str(folder))
    paths = images(tmp_path / "media")
    summary = extract(folder, tmp_path / "media", tmp_path / "a.h5")
    assert summary.preprocess == "checkpoint" and summary.made_even == 0
    expected = {}
    for key, path in paths.items():
        pixels = processor(images=pil(path), return_tensors="pt").pixel_values
        tokens = hidden(model, pixel_values=pixels, interpolate_pos_encoding=True)[0]
        expected[key] = ((4, 4), (4, 4), merged(tokens, 4, 4))
    compare(tmp_path / "a.h5", expected)

    # 42x42 is a 3x3 grid: merge-cli runs the processor at 56x56 (4x4), positions interpolated.
    odd = transformers.SiglipImageProcessorPil(size={"height": 42, "width": 42})
    odd.save_pretrained(str(folder))
    summary = extract(folder, tmp_path / "media", tmp_path / "b.h5")
    assert summary.made_even == len(paths)
    even = transformers.SiglipImageProcessorPil(size={"height": 56, "width": 56})
    expected = {}
    for key, path in paths.items():
        tokens = hidden(model, pixel_values=even(images=pil(path), return_tensors="pt").pixel_values, interpolate_pos_encoding=True)[0]
        expected[key] = ((3, 3), (4, 4), merged(tokens, 4, 4))
    compare(tmp_path / "b.h5", expected)


def test_siglip2_naflex_follows_max_num_patches_and_bilinear(tmp_path):
    from transformers.image_transforms import resize
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        get_image_size_for_max_num_patches,
    )

    model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**TINY_VIT, num_patches=16)).eval()
    folder = save_hf(model, tmp_path / "siglip2")
    processor = transformers.Siglip2ImageProcessorPil(patch_size=14, max_num_patches=48)
    processor.save_pretrained(str(folder))
    paths = images(tmp_path / "media")
    summary = extract(folder, tmp_path / "media", tmp_path / "a.h5")  # checkpoint is also the default here
    expected, odd = {}, 0
    for key, path in paths.items():
        image = pil(path)
        height, width = get_image_size_for_max_num_patches(image.height, image.width, 14, 48)
        grid = (height // 14, width // 14)
        used = tuple(n + n % 2 for n in grid)
        if used[0] * used[1] > 48:  # the budget holds: odd sides go down instead
            used = tuple(max(2, n - n % 2) for n in grid)
        if used == grid:
            inputs = processor(images=image, return_tensors="pt")
        else:  # the processor's own resize at the even size, then the processor without resizing
            odd += 1
            array = resize(np.asarray(image), (used[0] * 14, used[1] * 14), resample=Image.Resampling.BILINEAR)
            # A side of 1 patch becomes 2 even past the budget: pad to what the sample holds.
            budget = max(48, used[0] * used[1])
            inputs = processor(images=array, do_resize=False, max_num_patches=budget, return_tensors="pt")
        tokens = hidden(model, **inputs)[0][: used[0] * used[1]]  # the processor pads to max_num_patches
        expected[key] = (grid, used, merged(tokens, *used))
    assert summary.made_even == odd
    compare(tmp_path / "a.h5", expected)


def test_clip_resizes_the_shortest_edge_and_center_crops(tmp_path):
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VIT, image_size=56)).eval()
    folder = save_hf(model, tmp_path / "clip")
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 61}, crop_size={"height": 56, "width": 58})
    processor.save_pretrained(str(folder))
    paths = images(tmp_path / "media")
    summary = extract(folder, tmp_path / "media", tmp_path / "a.h5", preprocess=None)
    assert summary.preprocess == "native"  # CLIP's default: merge-cli's own policy
    extract(folder, tmp_path / "media", tmp_path / "b.h5")
    expected = {}
    for key, path in paths.items():
        pixels = processor(images=pil(path), return_tensors="pt").pixel_values  # 56x58: 2 remainder columns
        tokens = hidden(model, pixel_values=pixels, interpolate_pos_encoding=True)[0, 1:]
        expected[key] = ((4, 4), (4, 4), merged(tokens, 4, 4))
    compare(tmp_path / "b.h5", expected)


def test_dinov2_crop_made_even_scales_the_shortest_edge_alike(tmp_path):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY_VIT, image_size=56)).eval()
    folder = save_hf(model, tmp_path / "dinov2")
    processor = transformers.BitImageProcessorPil(
        size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, image_mean=mean, image_std=std
    )
    processor.save_pretrained(str(folder))
    paths = images(tmp_path / "media")
    extract(folder, tmp_path / "media", tmp_path / "a.h5")
    expected = {}
    for key, path in paths.items():
        tokens = hidden(model, pixel_values=processor(images=pil(path), return_tensors="pt").pixel_values)[0, 1:]
        expected[key] = ((4, 4), (4, 4), merged(tokens, 4, 4))
    compare(tmp_path / "a.h5", expected)

    # crop 42 (3x3, as 518 gives DINOv2 37x37): crop 56 and shortest edge ceil(48 * 56 / 42) = 64
    odd = transformers.BitImageProcessorPil(
        size={"shortest_edge": 48}, crop_size={"height": 42, "width": 42}, image_mean=mean, image_std=std
    )
    odd.save_pretrained(str(folder))
    summary = extract(folder, tmp_path / "media", tmp_path / "b.h5")
    assert summary.made_even == len(paths)
    expected = {}
    for key, path in paths.items():
        tokens = hidden(model, pixel_values=processor(images=pil(path), return_tensors="pt").pixel_values)[0, 1:]
        expected[key] = ((3, 3), (4, 4), merged(tokens, 4, 4))
    compare(tmp_path / "b.h5", expected)


QWEN_VISION = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, patch_size=14, spatial_merge_size=2)
QWEN25_VISION = dict(
    depth=2, hidden_size=32, out_hidden_size=48, intermediate_size=64, num_heads=2, patch_size=14,
    window_size=56, fullatt_block_indexes=[1],
)


def _qwen_model(kind: str):
    if kind == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import (
            Qwen2VLVisionConfig,
        )
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
        )

        return Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**QWEN_VISION)).eval()
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLVisionConfig,
    )
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    return Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**QWEN25_VISION)).eval()


def _qwen_raster(model, kind: str, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """transformers' last hidden state (before the merger) for one sample, in raster order."""
    grid_thw = torch.tensor([grid])
    states = hidden(model, hidden_states=patches, grid_thw=grid_thw)
    if kind == "qwen2_5_vl":  # undo its window permutation (whole 2x2 units)
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(grid_thw, 2, 56, 14)
        states = states.reshape(-1, 4, states.shape[-1])[torch.argsort(index)].reshape(-1, states.shape[-1])
    return window_order_to_raster(states, grid)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_follows_min_max_pixels_and_the_video_rules(tmp_path, kind):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    model = _qwen_model(kind)
    folder = save_hf(model, tmp_path / kind)
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 48)
    processor.save_pretrained(str(folder))
    assert json.loads((folder / "config.json").read_text())["model_type"].startswith(kind.split("_vl")[0])
    paths = images(tmp_path / "media", SIZES[:3] if kind == "qwen2_5_vl" else SIZES)
    video = make_video(tmp_path / "media" / "clip.mp4", 17, 60, 80, fps=5)
    summary = extract(folder, tmp_path / "media", tmp_path / "a.h5", preprocess=None)
    assert summary.preprocess == "checkpoint" and summary.failed == 0
    expected = {}
    for key, path in paths.items():
        inputs = processor(images=pil(path), return_tensors="pt")
        grid = tuple(int(v) for v in inputs.image_grid_thw[0])
        raster = _qwen_raster(model, kind, inputs.pixel_values, grid)
        expected[key] = (grid[1:], grid[1:], merged(raster, grid[1], grid[2]))

    # The video, by qwen-vl-utils' rules: 17 frames at 5 fps, 2 fps -> 6.8 -> floored to 6 frames
    # at round(linspace(0, 16, 6)); each frame within 128..768 tokens and 0.9 x 128000 tokens in all.
    import av
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    with av.open(str(video)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    count = math.floor(min(max(len(frames) / 5 * 2, 4), 16) / 2) * 2
    assert count == 6
    indices = torch.linspace(0, len(frames) - 1, count).round().long().tolist()
    factor = 28
    low = 128 * factor**2
    ceiling = max(min(768 * factor**2, 128000 * factor**2 * 0.9 / count * 2), int(low * 1.05))
    size = smart_resize(60, 80, factor=factor, min_pixels=low, max_pixels=ceiling)
    assert size == (280, 392)  # up from 60x80 to the 128-token floor
    # qwen-vl-utils' fetch_video resizes the uint8 (T, C, H, W) frames with torchvision's
    # resize(BICUBIC, antialias=True), which (transforms/_functional_tensor.py) casts to float32,
    # calls torch's interpolate, clamps to 0..255, rounds and casts back; the same steps written
    # out here, without torchvision (Pillow's bicubic gave about 6e-3 relative error in the tokens).
    video_frames = torch.from_numpy(np.stack([frames[index] for index in indices])).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        video_frames.to(torch.float32), size=size, mode="bicubic", align_corners=False, antialias=True
    )
    resized = resized.clamp(0, 255).round().to(torch.uint8).numpy()
    clip = [processor.normalize(processor.rescale(chw, 1 / 255), processor.image_mean, processor.image_std) for chw in resized]
    pixels = torch.from_numpy(np.stack(clip)).float()
    grid = (count // 2, pixels.shape[2] // 14, pixels.shape[3] // 14)
    raster = _qwen_raster(model, kind, qwen_reference_patches(pixels), grid)
    want = torch.cat([merged(frame, grid[1], grid[2]) for frame in raster.reshape(grid[0], -1, raster.shape[-1])])
    expected["clip.mp4"] = (grid[1:], grid[1:], want)
    compare(tmp_path / "a.h5", expected)
    with open_features(tmp_path / "a.h5") as features:
        assert features["clip.mp4"].frame_indices == indices


def test_a_qwen_video_resume_from_before_torchvision_frames_is_refused(tmp_path, monkeypatch):
    """An output whose Qwen video frames were resized with Pillow (merge-cli before its frames
    were qwen-vl-utils' torchvision pixels) is not resumed with the new frames: the settings
    differ in `media.video.resizer`, named in the refusal."""
    from merge_cli.errors import ConfigMismatchError
    from merge_cli.media import processor

    folder = save_hf(_qwen_model("qwen2_vl"), tmp_path / "qwen2_vl")
    make_video(tmp_path / "media" / "clip.mp4", 9, 60, 80, fps=5)
    with monkeypatch.context() as before:
        before.setattr(processor, "QWEN_VIDEO_RESIZER", None)  # Pillow, and no resizer in the settings
        assert extract(folder, tmp_path / "media", tmp_path / "a.h5").written == 1
    with pytest.raises(ConfigMismatchError, match=r"media\.video\.resizer: \(not set\) -> torchvision"):
        extract(folder, tmp_path / "media", tmp_path / "a.h5")
    assert extract(folder, tmp_path / "media", tmp_path / "b.h5").written == 1
    with open_features(tmp_path / "a.h5") as old, open_features(tmp_path / "b.h5") as new:
        assert old.attrs["config_hash"] != new.attrs["config_hash"]
        assert new.attrs["video_options"]["resizer"] == "torchvision"  # JSON attributes come decoded
        assert "resizer" not in old.attrs["video_options"]
