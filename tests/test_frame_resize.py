"""Qwen video frames are the pixels qwen-vl-utils makes: torchvision's tensor resize (bicubic,
antialias) of uint8 frames, reproduced by `images.torchvision_resize` with torch alone.

An independent reference, written out in numpy from PyTorch's definitions of its antialiased
bicubic (aten/src/ATen/native/cpu/UpSampleKernel.cpp, `_compute_indices_min_size_weights_aa` and
`HelperInterpCubic::aa_filter`): for output pixel i of a side scaled by s = in / out, the center
is s * (i + 0.5), the support 2 * max(s, 1), the inputs xmin = max(int(center - support + 0.5), 0)
up to min(int(center + support + 0.5), in), each weighted by the cubic convolution kernel at
(x - center + 0.5) / max(s, 1) and normalized by their sum. The kernel is Keys' with a = -0.5:
PyTorch uses -0.5 with antialias=True ("compatibility with PIL") and -0.75 only without it. The
width is resized first, then the height, with nothing rounded in between; torchvision then
clamps to 0..255 and rounds half to even.

The reference runs in float64 and torch in float32, so a value within float32 error of a
rounding boundary (k + 0.5) may round either way: the test asks for equality everywhere else
and at most one level there (in practice a handful of pixels among millions, or none). The
weights themselves are computed in float32, as PyTorch computes them for float32 input: in
float64 the centers alone would move results by up to 0.01 levels.

With torchvision installed (not in CI), the frames are also compared bit for bit with
torchvision itself, called as qwen-vl-utils calls it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_cli.media.images import torchvision_resize

BOUNDARY = 1e-3
"""Distance from k + 0.5 within which torch's float32 sums and the float64 reference may round
differently: they differ by at most about 3e-4 levels (a few float32 ulps of values near 256)."""

SIZES = [  # (H, W) -> (h, w): odd sides, up, down, both at once, one side unchanged
    ((60, 80), (280, 392)),  # Qwen's 128-token floor: up 4.7x
    ((333, 517), (336, 504)),  # nearly the same size
    ((1079, 1921), (560, 1008)),  # down 1.9x
    ((97, 41), (476, 224)),  # thin, up 5x
    ((45, 301), (56, 112)),  # up one side, down 2.7x the other
    ((301, 45), (301, 84)),  # height unchanged: one pass only
    ((7, 5), (28, 28)),  # tiny
    ((513, 257), (28, 56)),  # down 18x and 4.6x
]


def keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel, in the dtype of `x`."""
    x = np.abs(x)
    a = x.dtype.type(a)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(x.dtype)


def aa_weights(size_in: int, size_out: int, a: float = -0.5) -> np.ndarray:
    """(size_out, size_in) matrix of PyTorch's antialiased bicubic weights along one side.

    For float32 input PyTorch computes the scale, centers and weights in float32 (scalar_t); the
    center's rounding alone moves results by up to 0.01 levels, so it is done so here too.
    """
    f32 = np.float32
    scale = f32(f32(size_in) / f32(size_out))
    support = f32(2.0 * scale) if scale >= 1 else f32(2.0)
    inverse = f32(1.0 / float(scale)) if scale >= 1 else f32(1.0)
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        center = f32(float(scale) * (i + 0.5))
        low = max(int(float(center - support) + 0.5), 0)
        high = min(int(float(center + support) + 0.5), size_in)
        x = np.arange(low, high)
        # (x - center) in float32, then + 0.5 and * inverse in double, the kernel in float32
        offsets = ((x.astype(f32) - center).astype(np.float64) + 0.5) * float(inverse)
        weights = keys_cubic(offsets.astype(f32), a)
        total = f32(0)
        for weight in weights:
            total = f32(total + weight)
        matrix[i, low:high] = weights / total
    return matrix


def reference_float(frame: np.ndarray, size: tuple[int, int], a: float = -0.5) -> np.ndarray:
    """uint8 (H, W, 3) -> float64 (h, w, 3) before clamping and rounding: width, then height."""
    height, width = size
    values = frame.astype(np.float64)
    if width != frame.shape[1]:
        values = np.einsum("ow,hwc->hoc", aa_weights(frame.shape[1], width, a), values, optimize=True)
    if height != frame.shape[0]:
        values = np.einsum("oh,hwc->owc", aa_weights(frame.shape[0], height, a), values, optimize=True)
    return values


def rounded(values: np.ndarray) -> np.ndarray:
    """torchvision's way back to uint8: clamp to 0..255, round half to even."""
    return np.round(np.clip(values, 0, 255)).astype(np.uint8)


def random_frame(height: int, width: int) -> np.ndarray:
    """Noise on a gradient, with a block pattern of 0 and 255 over its left part: edges
    everywhere, and steps that bicubic overshoots past both ends (so clamping matters)."""
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = (ys / max(height - 1, 1) + xs / max(width - 1, 1))[..., None] * np.random.uniform(-120, 120, 3)
    noisy = np.random.uniform(0, 255, 3) + ramp + np.random.normal(0, 90, (height, width, 3))
    frame = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    block = np.random.randint(6, 12)
    blocks = np.random.randint(0, 2, (height // block + 1, width // block + 1, 3)).astype(np.uint8) * 255
    steps = np.kron(blocks, np.ones((block, block, 1), np.uint8))[:height, :width]
    frame[:, : width * 2 // 5] = steps[:, : width * 2 // 5]
    return frame


@pytest.mark.parametrize(("source", "target"), SIZES)
def test_frames_equal_the_numpy_reference(source, target):
    frame = random_frame(*source)
    got = torchvision_resize(frame, target)
    assert got.dtype == np.uint8 and got.shape == (*target, 3)
    want = reference_float(frame, target)
    near_boundary = np.abs(np.abs(want - np.floor(want)) - 0.5) < BOUNDARY
    near_boundary &= (want > -0.5) & (want < 255.5)  # clamped values cannot round either way
    difference = got.astype(np.int16) - rounded(want)
    assert not difference[~near_boundary].any(), f"{int(np.count_nonzero(difference[~near_boundary]))} pixels differ"
    assert np.abs(difference).max(initial=0) <= 1
    assert np.count_nonzero(difference) <= max(3, 1e-4 * difference.size)


def test_the_reference_tells_the_filters_apart():
    """What the test above would catch: Keys' a = -0.75 (PyTorch's bicubic without antialias),
    Pillow's bicubic (rounded and clipped to uint8 after each pass), and rounding once, at the end."""
    from PIL import Image

    frame = random_frame(333, 517)
    target = (168, 224)
    ours = torchvision_resize(frame, target).astype(np.int16)
    keys_075 = rounded(reference_float(frame, target, a=-0.75))
    pillow = np.asarray(Image.fromarray(frame).resize(target[::-1], Image.Resampling.BICUBIC))
    assert np.count_nonzero(ours - keys_075) > 0.1 * ours.size
    assert np.abs(ours - pillow).max() >= 2
    # clamped: bicubic overshoots past 0 and 255 at the steps
    values = reference_float(frame, target)
    assert (values < -0.5).any() and (values > 255.5).any()


def test_a_frame_of_the_target_size_is_returned_as_is():
    frame = random_frame(56, 84)
    assert torchvision_resize(frame, (56, 84)) is frame


def test_read_only_frames_are_resized_without_a_warning():
    """Pillow's np.asarray views are read-only; torch warns on those unless the frame is copied."""
    import warnings

    from PIL import Image

    frame = np.asarray(Image.fromarray(random_frame(41, 67)))
    assert not frame.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torchvision_resize(frame, (56, 84))
    assert np.array_equal(got, torchvision_resize(frame.copy(), (56, 84)))


@pytest.mark.parametrize(("source", "target"), SIZES)
def test_frames_equal_torchvision_bit_for_bit(source, target):
    """Only where torchvision is installed (it is not a dependency): the frames of a video resized
    at once, laid out as qwen-vl-utils lays out decoded frames (`permute(0, 3, 1, 2)`), and one
    contiguous CHW frame, equal merge-cli's frame-by-frame resize exactly."""
    pytest.importorskip("torchvision")
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    video = np.stack([random_frame(*source) for _ in range(3)])
    online = F.resize(torch.from_numpy(video).permute(0, 3, 1, 2), list(target), interpolation=InterpolationMode.BICUBIC, antialias=True)
    ours = np.stack([torchvision_resize(frame, target) for frame in video])
    assert np.array_equal(online.permute(0, 2, 3, 1).numpy(), ours)
    single = F.resize(torch.from_numpy(video[0]).permute(2, 0, 1).contiguous(), list(target), interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert np.array_equal(single.permute(1, 2, 0).numpy(), ours[0])


# --- which frames get it ------------------------------------------------------------------------


def qwen_media(tmp_path, video_config: dict | None = None, **options):
    """The media options extract uses for a Qwen2-VL folder (JSON only: nothing here needs weights)."""
    import json

    from merge_cli.config import ExtractConfig
    from merge_cli.media.processor import read_checkpoint_vision

    folder = tmp_path / "qwen2_vl"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {"patch_size": 14}}))
    if video_config is not None:
        (folder / "video_preprocessor_config.json").write_text(json.dumps(video_config))
    config = ExtractConfig(("x",), "o.h5", tower=str(folder), **options)
    return config.media_options(read_checkpoint_vision(str(folder)))


def full_size_frames(path, indices) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack([frames[index] for index in indices])


def test_qwen_checkpoint_video_frames_are_torchvision_pixels(tmp_path):
    from media_factory import make_video
    from PIL import Image

    from merge_cli.media.images import decode_sample
    from merge_cli.records import Item, Sample

    path = make_video(tmp_path / "clip.mp4", 17, 60, 80, fps=5)
    media = qwen_media(tmp_path)
    assert media.mode == "checkpoint" and media.video.resizer == "torchvision"
    item = decode_sample(Sample("clip.mp4", path, "video"), media)
    assert isinstance(item, Item), item
    assert item.frame_indices == [0, 3, 6, 10, 13, 16] and item.resized_hw == (280, 392)
    full = full_size_frames(path, item.frame_indices)
    got = item.pixels.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, np.stack([torchvision_resize(frame, (280, 392)) for frame in full]))
    pillow = np.stack([np.asarray(Image.fromarray(frame).resize((392, 280), Image.Resampling.BICUBIC)) for frame in full])
    assert not np.array_equal(got, pillow)  # what merge-cli gave before


def test_qwen_checkpoint_gif_frames_are_torchvision_pixels(tmp_path):
    from PIL import Image

    from merge_cli.media.images import decode_sample, to_rgb
    from merge_cli.records import Item, Sample

    frames = [Image.fromarray(random_frame(45, 61)) for _ in range(4)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    item = decode_sample(Sample("anim.gif", path, "video"), qwen_media(tmp_path, gif_as_video=True))
    assert isinstance(item, Item), item
    assert item.frame_indices == [0, 1, 2, 3]
    with Image.open(path) as image:
        decoded = []
        for index in item.frame_indices:
            image.seek(index)
            decoded.append(np.asarray(to_rgb(image)))
    want = np.stack([torchvision_resize(frame, item.resized_hw) for frame in decoded])
    assert np.array_equal(item.pixels.permute(0, 2, 3, 1).numpy(), want)


def test_a_video_processor_with_another_filter_keeps_pillow(tmp_path):
    """qwen-vl-utils always resizes bicubic; a Qwen folder whose video processor names another
    filter is followed as before: Pillow with that filter (and nothing recorded as changed)."""
    from media_factory import make_video
    from PIL import Image

    from merge_cli.media.images import decode_sample
    from merge_cli.records import Sample

    path = make_video(tmp_path / "clip.mp4", 9, 60, 80, fps=5)
    media = qwen_media(tmp_path, {"resample": 2})
    assert media.video.resizer is None and media.video.resample == "bilinear"
    assert "resizer" not in media.to_dict()["video"]
    item = decode_sample(Sample("clip.mp4", path, "video"), media)
    height, width = item.resized_hw
    full = full_size_frames(path, item.frame_indices)
    pillow = np.stack([np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR)) for frame in full])
    assert np.array_equal(item.pixels.permute(0, 2, 3, 1).numpy(), pillow)


def test_the_resizer_is_recorded_only_where_it_changes_the_pixels(tmp_path):
    """Qwen checkpoint video records `resizer: torchvision` (in config_hash: a resume of an output
    from before it is refused); every other configuration keeps the settings it had before."""
    from merge_cli.config import MediaOptions, VideoOptions
    from merge_cli.errors import UsageError

    assert qwen_media(tmp_path).to_dict()["video"]["resizer"] == "torchvision"
    assert "resizer" not in qwen_media(tmp_path, preprocess="native").to_dict()["video"]
    assert "resizer" not in MediaOptions().to_dict()["video"]
    with pytest.raises(UsageError, match="video resizer must be one of torchvision"):
        VideoOptions(resizer="pillow")
    with pytest.raises(UsageError, match="bicubic only"):
        VideoOptions(resizer="torchvision", resample="lanczos")
