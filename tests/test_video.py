"""Frame sampling (a pure function, property-tested) and video decoding with decord and PyAV."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from media_factory import frame_level, make_gif, make_video

from merge_cli.config import MediaOptions, VideoOptions
from merge_cli.media import video
from merge_cli.media.grid import ResizePolicy
from merge_cli.media.images import decode_sample, plan_sample, video_frame_policy
from merge_cli.media.video import sample_frame_indices
from merge_cli.records import Failure, Item, Sample

# --- sample_frame_indices: examples ---------------------------------------------------------------


def test_fps_sampling_of_a_ten_second_video():
    # 10 s at 30 fps, 2 frames per second -> 20 frames spread from the first to the last frame
    indices = sample_frame_indices(300, 30.0, VideoOptions(fps=2.0))
    assert len(indices) == 20
    assert indices[0] == 0 and indices[-1] == 299
    assert indices == [round(i * 299 / 19) for i in range(20)]


def test_max_frames_caps_a_long_video():
    indices = sample_frame_indices(30 * 600, 30.0, VideoOptions(fps=2.0, max_frames=32))
    assert len(indices) == 32 and indices[0] == 0 and indices[-1] == 30 * 600 - 1


def test_min_frames_raises_a_short_video():
    # 1 s at 2 fps would be 2 frames; min_frames 4 asks for 4
    assert sample_frame_indices(25, 25.0, VideoOptions(fps=2.0, min_frames=4)) == [0, 8, 16, 24]


def test_short_video_gets_all_its_frames_never_an_error():
    assert sample_frame_indices(3, 10.0, VideoOptions(fps=2.0, min_frames=4)) == [0, 1, 2]
    assert sample_frame_indices(1, 30.0, VideoOptions(num_frames=16)) == [0]


def test_num_frames_is_exact_whatever_the_fps_rule_bounds_would_say():
    # the fps rule's defaults are 4..32 frames; an explicit count is neither raised nor capped by them
    for wanted in (1, 2, 3, 33, 64):
        assert len(sample_frame_indices(1000, 25.0, VideoOptions(num_frames=wanted))) == wanted
    assert len(sample_frame_indices(1000, 25.0, VideoOptions(num_frames=3).resolved(28))) == 3
    assert sample_frame_indices(5, 25.0, VideoOptions(num_frames=8)) == [0, 1, 2, 3, 4]  # all the video has


@pytest.mark.parametrize(
    "given, named",
    [
        (dict(fps=1.0), "--fps"),
        (dict(min_frames=2), "--min-frames"),
        (dict(max_frames=8), "--max-frames"),
        (dict(fps=1.0, max_frames=8), "--fps and --max-frames"),
    ],
)
def test_num_frames_with_the_fps_rule_settings_is_refused(given, named):
    from merge_cli.errors import UsageError

    with pytest.raises(UsageError, match=f"--num-frames samples exactly 3 frames; {named} "):
        VideoOptions(num_frames=3, **given)


def test_qwen_rule_takes_num_frames_in_whole_temporal_patches():
    from merge_cli.errors import UsageError

    qwen = {"rule": "qwen", "frame_multiple": 2, "fps": 2.0, "min_frames": 4, "max_frames": 768, "max_pixels": 1,
            "total_pixels": 1, "min_pixels": 1}
    with pytest.raises(UsageError, match=r"--num-frames 3 is not a multiple of 2: .* give 2 or 4"):
        VideoOptions(num_frames=3).resolved(28, qwen)
    with pytest.raises(UsageError, match=r"give 2 \(or"):
        VideoOptions(num_frames=1).resolved(28, qwen)
    six = VideoOptions(num_frames=6).resolved(28, qwen)
    assert (six.fps, six.min_frames, six.max_frames) == (None, None, None)  # not used, not hashed
    assert len(sample_frame_indices(1000, 25.0, six)) == 6  # not bounded by qwen's 4..768 either
    assert len(sample_frame_indices(5, 25.0, six)) == 4  # a shorter video: floored to whole patches
    assert len(sample_frame_indices(1, 25.0, six)) == 1  # shorter than one patch: all it has


def test_start_and_end_limit_the_range():
    # 20 s at 10 fps; [5 s, 10 s] covers frames 50..100, 5.0 s at 2 fps -> round(5.1 * 2) = 10 frames
    indices = sample_frame_indices(200, 10.0, VideoOptions(fps=2.0, start=5.0, end=10.0))
    assert indices[0] == 50 and indices[-1] == 100 and len(indices) == 10


def test_start_past_the_end_gives_no_frames():
    assert sample_frame_indices(50, 10.0, VideoOptions(start=30.0)) == []


def test_empty_or_rateless_video_gives_no_frames():
    assert sample_frame_indices(0, 30.0, VideoOptions()) == []
    assert sample_frame_indices(10, 0.0, VideoOptions()) == []


# --- sample_frame_indices: properties -------------------------------------------------------------

frame_counts = st.integers(min_value=1, max_value=20_000)
rates = st.sampled_from([1.0, 6.0, 10.0, 23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 60.0])


@st.composite
def video_options(draw):
    if draw(st.booleans()):
        return VideoOptions(num_frames=draw(st.integers(1, 100)))
    min_frames = draw(st.integers(1, 16))
    max_frames = draw(st.integers(min_frames, 64))
    fps = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]))
    return VideoOptions(fps=fps, min_frames=min_frames, max_frames=max_frames)


@settings(max_examples=300, deadline=None)
@given(total=frame_counts, rate=rates, options=video_options())
def test_indices_are_sorted_unique_in_range_and_counted(total, rate, options):
    indices = sample_frame_indices(total, rate, options)
    if options.num_frames is not None:
        expected = min(options.num_frames, total)
    else:
        expected = min(max(round(total / rate * options.fps), options.min_frames), options.max_frames, total)
    assert len(indices) == max(1, expected)
    assert indices == sorted(set(indices))
    assert 0 <= indices[0] and indices[-1] <= total - 1
    if len(indices) >= 2:  # the range's first and last frames are always sampled
        assert indices[0] == 0 and indices[-1] == total - 1


@settings(max_examples=300, deadline=None)
@given(total=frame_counts, rate=rates, options=video_options())
def test_indices_are_evenly_spread(total, rate, options):
    indices = sample_frame_indices(total, rate, options)
    gaps = np.diff(indices)
    if len(gaps):
        assert gaps.max() - gaps.min() <= 1


@settings(max_examples=200, deadline=None)
@given(
    total=frame_counts,
    rate=rates,
    start=st.floats(0, 100, allow_nan=False),
    length=st.floats(0.01, 100, allow_nan=False),
)
def test_indices_stay_inside_the_start_end_range(total, rate, start, length):
    options = VideoOptions(fps=2.0, start=start, end=start + length)
    indices = sample_frame_indices(total, rate, options)
    first, last = math.ceil(start * rate - 1e-6), min(total - 1, math.floor((start + length) * rate + 1e-6))
    if first > last:
        assert indices == []
    else:
        assert indices and first <= indices[0] and indices[-1] <= last


# --- decoding -------------------------------------------------------------------------------------


def _levels(item: Item) -> list[float]:
    return item.pixels.float().mean(dim=(1, 2, 3)).tolist()


@pytest.fixture
def clip(tmp_path):
    """4 s at 10 fps, 64x96: 8 frames at 2 fps."""
    return make_video(tmp_path / "clip.mp4", 40, 64, 96, fps=10)


def test_the_chosen_decoder_decodes_the_sampled_frames(clip):
    item = decode_sample(Sample("clip.mp4", clip, "video"), MediaOptions())
    assert isinstance(item, Item), item
    assert item.decoder == video.decoder_order("exact")[0].name == "pyav"
    assert item.frame_indices == sample_frame_indices(40, 10.0, VideoOptions()) == [0, 6, 11, 17, 22, 28, 33, 39]
    assert item.frame_times == pytest.approx([i / 10 for i in item.frame_indices])
    assert item.pixels.dtype == torch.uint8 and tuple(item.pixels.shape) == (8, 3, 56, 84)
    assert item.orig_hw == (64, 96) and item.resized_hw == (56, 84)
    # each frame's mean level identifies its source frame (compression moves it by a few levels)
    assert _levels(item) == pytest.approx([frame_level(i) for i in item.frame_indices], abs=4)


def _refuse(name):
    def refuse(self, source, *args, **kwargs):
        raise video.DecoderError(name, "open", RuntimeError(f"{name} refuses this file"))

    return refuse


def test_decord_fallback_reads_the_same_frames(clip, monkeypatch):
    expected = decode_sample(Sample("clip.mp4", clip, "video"), MediaOptions())
    monkeypatch.setattr(video.PyAVSource, "__init__", _refuse("pyav"))
    item = decode_sample(Sample("clip.mp4", clip, "video"), MediaOptions())
    assert isinstance(item, Item), item
    assert item.decoder == "decord"
    assert item.frame_indices == expected.frame_indices and item.frame_times == expected.frame_times
    # both scale with swscale bicubic; their scaler setups differ by a few levels at most
    assert (item.pixels.int() - expected.pixels.int()).abs().float().mean() < 2.0


def test_decord_fallback_when_pyav_fails_to_read(clip, monkeypatch):
    def broken_read(self, indices, size, *args, **kwargs):
        raise video.DecoderError("pyav", "decode", RuntimeError("seek failed"))

    monkeypatch.setattr(video.PyAVSource, "read", broken_read)
    item = decode_sample(Sample("clip.mp4", clip, "video"), MediaOptions())
    assert isinstance(item, Item) and item.decoder == "decord"


def test_pyav_seeks_in_a_long_video(tmp_path, monkeypatch):
    # 30 s at 4 fps: frames far apart are reached by seeking, then decoding forward
    path = make_video(tmp_path / "long.mp4", 120, 32, 48, fps=4)
    options = MediaOptions(video=VideoOptions(num_frames=5))
    with video.PyAVSource(path) as source:
        frames = source.read([0, 30, 59, 90, 119], (32, 48)).pixels
    assert frames.reshape(5, -1).mean(axis=1) == pytest.approx([frame_level(i) for i in (0, 30, 59, 90, 119)], abs=4)
    monkeypatch.setattr(video, "DECODERS", (video.PyAVSource,))
    item = decode_sample(Sample("long.mp4", path, "video"), options)
    assert item.frame_indices == [0, 30, 60, 89, 119] and item.decoder == "pyav"


# --- exact and keyframe seeking against decoding every frame ----------------------------------------


def _every_frame(path, size):
    """Reference: decode every frame in order (no seeking, no frame skipped), each scaled like the
    decoders scale; plus the display indices of the keyframes."""
    import av
    from av.video.reformatter import VideoReformatter

    scaler, frames, keyframes = VideoReformatter(), [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for frame in container.decode(stream):
            if frame.key_frame:
                keyframes.append(len(frames))
            rgb = scaler.reformat(
                frame, width=size[1], height=size[0], format="rgb24", interpolation=video.SCALE_INTERPOLATION, threads=1
            )
            frames.append(rgb.to_ndarray())
    return np.stack(frames), keyframes


@pytest.fixture
def gop_clip(tmp_path):
    """90 frames at 10 fps, a keyframe every 12 frames, B-frames (reference and not) between."""
    return make_video(tmp_path / "gop.mp4", 90, 64, 96, fps=10, keyint=12)


@pytest.mark.parametrize("num_frames", [1, 3, 8, 16, 40, 90])
def test_exact_yields_the_named_frames_bit_for_bit(gop_clip, num_frames, monkeypatch):
    # sparse (one sample per GOP or fewer) to dense (several per GOP: one forward pass each GOP)
    options = MediaOptions(video=VideoOptions(num_frames=num_frames))
    monkeypatch.setattr(video, "DECODERS", (video.PyAVSource,))
    item = decode_sample(Sample("gop.mp4", gop_clip, "video"), options)
    assert isinstance(item, Item), item
    assert item.frame_indices == sample_frame_indices(90, 10.0, options.video)
    reference, _ = _every_frame(gop_clip, item.resized_hw)
    expected = torch.from_numpy(reference[item.frame_indices]).permute(0, 3, 1, 2)
    assert torch.equal(item.pixels, expected)


def test_exact_in_open_gops_reads_the_frames_before_a_keyframe(tmp_path):
    # x265's open GOPs: the frames shown just before a keyframe are decoded after it and refer
    # back; a seek to them lands on that keyframe, which cannot give them: merge-cli seeks again.
    path = make_video(tmp_path / "open.mp4", 60, 64, 96, fps=10, codec="libx265", keyint=12)
    wanted = [11, 23, 30, 47, 59]
    with video.PyAVSource(path) as source:
        pixels = source.read(wanted, (56, 84)).pixels
    reference, _ = _every_frame(path, (56, 84))
    assert np.array_equal(pixels, reference[wanted])


def test_exact_with_codec_threads_gives_the_same_pixels(gop_clip):
    indices = sample_frame_indices(90, 10.0, VideoOptions(num_frames=11))
    with video.PyAVSource(gop_clip, threads=1) as one, video.PyAVSource(gop_clip, threads=3) as three:
        assert np.array_equal(one.read(indices, (56, 84)).pixels, three.read(indices, (56, 84)).pixels)


def test_exact_decodes_only_what_the_kept_frames_need(gop_clip):
    _, keyframes = _every_frame(gop_clip, (56, 84))
    assert keyframes == list(range(0, 90, 12))
    # one frame late in a GOP: fewer decoded than all frames from its keyframe (non-reference B-frames skipped)
    with video.PyAVSource(gop_clip) as source:
        source.read([35], (56, 84))
        assert source.frames_decoded < 35 - 24 + 1
    # three frames in one GOP cost one forward pass from its keyframe, not a seek and a pass each
    with video.PyAVSource(gop_clip) as source:
        source.read([26, 30, 34], (56, 84))
        assert source.frames_decoded <= 34 - 24 + 1


def test_keyframe_mode_stores_the_keyframes_it_used(gop_clip):
    options = MediaOptions(video=VideoOptions(num_frames=7, seek="keyframe"))
    requested = sample_frame_indices(90, 10.0, options.video)
    item = decode_sample(Sample("gop.mp4", gop_clip, "video"), options)
    assert isinstance(item, Item), item
    reference, keyframes = _every_frame(gop_clip, item.resized_hw)
    nearest = [min(keyframes, key=lambda k: (abs(k - index), k)) for index in requested]
    assert item.frame_indices == nearest != requested
    assert set(item.frame_indices) <= set(keyframes)
    assert item.frame_times == pytest.approx([index / 10.0 for index in nearest])
    expected = torch.from_numpy(reference[item.frame_indices]).permute(0, 3, 1, 2)
    assert torch.equal(item.pixels, expected)  # the pixels are those keyframes'
    with video.PyAVSource(gop_clip) as source:  # and each cost one decoded frame
        source.read(requested, item.resized_hw, seek="keyframe")
        assert source.frames_decoded == len(set(nearest))


def test_keyframe_mode_with_decord_uses_the_same_keyframes(gop_clip, monkeypatch):
    options = MediaOptions(video=VideoOptions(num_frames=7, seek="keyframe"))
    expected = decode_sample(Sample("gop.mp4", gop_clip, "video"), options)
    monkeypatch.setattr(video, "DECODERS", (video.DecordSource,))
    item = decode_sample(Sample("gop.mp4", gop_clip, "video"), options)
    assert item.decoder == "decord" and item.frame_indices == expected.frame_indices
    assert _levels(item) == pytest.approx([frame_level(i) for i in item.frame_indices], abs=4)


def test_decord_exact_matches_decord_reading_every_frame(gop_clip, monkeypatch):
    import decord

    options = MediaOptions(video=VideoOptions(num_frames=9))
    monkeypatch.setattr(video, "DECODERS", (video.DecordSource,))
    item = decode_sample(Sample("gop.mp4", gop_clip, "video"), options)
    height, width = item.resized_hw
    reader = decord.VideoReader(str(gop_clip), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    every = np.stack([reader.next().asnumpy() for _ in range(len(reader))])
    assert torch.equal(item.pixels, torch.from_numpy(every[item.frame_indices]).permute(0, 3, 1, 2))


@pytest.mark.parametrize("seek", ["exact", "keyframe"])
def test_a_video_in_memory_decodes_like_the_file(gop_clip, seek):
    import io

    from merge_cli.media.images import decode_video

    options = MediaOptions(video=VideoOptions(num_frames=6, seek=seek))
    from_file = decode_sample(Sample("gop.mp4", gop_clip, "video"), options)
    data = gop_clip.read_bytes()
    for source in (data, io.BytesIO(data)):
        item = decode_video("gop.mp4", source, options)
        assert item.decoder == from_file.decoder and item.frame_indices == from_file.frame_indices
        assert torch.equal(item.pixels, from_file.pixels)


def test_snap_to_keyframes():
    assert video.snap_to_keyframes([0, 5, 6, 7, 20], [0, 12, 24]) == [0, 0, 0, 12, 12]  # 6: a tie, the earlier
    # only keyframes inside the sampled range when there are any
    assert video.snap_to_keyframes([13, 30], [0, 12, 24, 36]) == [24, 24]
    assert video.snap_to_keyframes([3, 9], [0, 12]) == [0, 12]
    assert video.snap_to_keyframes([], [0, 12]) == []


@settings(max_examples=200, deadline=None)
@given(
    indices=st.lists(st.integers(0, 5000), min_size=1, max_size=40, unique=True).map(sorted),
    keyframes=st.lists(st.integers(0, 5000), min_size=1, max_size=40, unique=True).map(sorted),
)
def test_snapped_indices_are_the_nearest_keyframes(indices, keyframes):
    snapped = video.snap_to_keyframes(indices, keyframes)
    inside = [k for k in keyframes if indices[0] <= k <= indices[-1]] or keyframes
    assert len(snapped) == len(indices) and set(snapped) <= set(inside)
    for index, k in zip(indices, snapped):
        assert abs(k - index) == min(abs(c - index) for c in inside)
    assert snapped == sorted(snapped)


def test_video_seek_must_be_known():
    from merge_cli.errors import UsageError

    with pytest.raises(UsageError, match="--video-seek must be one of exact, keyframe"):
        VideoOptions(seek="nearest")


@pytest.mark.parametrize("suffix, codec", [(".mkv", "libx264"), (".webm", "libvpx-vp9")])
def test_containers_without_a_frame_count(tmp_path, suffix, codec, monkeypatch):
    path = make_video(tmp_path / f"clip{suffix}", 20, 64, 96, fps=10, codec=codec)
    sample = Sample(path.name, path, "video")
    item = decode_sample(sample, MediaOptions())
    assert isinstance(item, Item) and item.decoder == "pyav"
    assert plan_sample(sample, MediaOptions()) == (item.num_frames, 4, 6)
    monkeypatch.setattr(video, "DECODERS", (video.DecordSource,))
    fallback = decode_sample(sample, MediaOptions())
    assert isinstance(fallback, Item) and fallback.frame_indices == item.frame_indices


def test_non_utf8_video_name_is_read_by_pyav(tmp_path):
    good = make_video(tmp_path / "clip.mp4", 20, 64, 96)
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.mp4")
    os.rename(good, odd)
    from pathlib import Path

    item = decode_sample(Sample("caf\\xe9.mp4", Path(odd), "video"), MediaOptions())
    assert isinstance(item, Item) and item.decoder == "pyav"  # decord cannot take such a path


def test_frame_size_respects_the_total_pixel_budget(tmp_path):
    path = make_video(tmp_path / "wide.mp4", 40, 240, 320, fps=10)
    factor = 28
    # 8 frames; a budget of 8 * 40 tokens -> each frame at most 40 tokens (not the 64-token default)
    options = MediaOptions(video=VideoOptions(total_pixels=8 * 40 * factor**2))
    item = decode_sample(Sample("wide.mp4", path, "video"), options)
    height, width = item.resized_hw
    assert item.num_frames == 8
    assert height % factor == 0 and width % factor == 0
    assert height * width <= 40 * factor**2
    assert (height, width) == video_frame_policy(options, 8).target_size(240, 320)
    assert plan_sample(Sample("wide.mp4", path, "video"), options) == (8, height // 14, width // 14)


def test_frames_scaled_in_the_decoder_stay_close_to_pillow(tmp_path):
    """Scaling in the decoder replaces full-size RGB + Pillow bicubic (merge-cli before issue 14):
    the documented tolerance is a PSNR of at least 40 dB (the benchmark measures about 47 dB)."""
    from PIL import Image

    path = make_video(tmp_path / "clip.mp4", 10, 120, 160, fps=10)
    options = MediaOptions(video=VideoOptions(num_frames=4))
    item = decode_sample(Sample("clip.mp4", path, "video"), options)
    height, width = item.resized_hw
    with video.PyAVSource(path) as source:
        full = source.read(item.frame_indices, (120, 160)).pixels  # no scaling: RGB at full size
    pillow = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)) for f in full])
    ours = item.pixels.permute(0, 2, 3, 1).numpy()
    mse = ((ours.astype(np.float64) - pillow) ** 2).mean()
    assert mse > 0  # not the same filter: the test would not notice a change of path otherwise
    assert 10 * math.log10(255**2 / mse) >= 40.0


def test_fixed_size_policy_applies_to_video_frames(clip):
    options = MediaOptions(policy=ResizePolicy(size=(112, 112)))
    item = decode_sample(Sample("clip.mp4", clip, "video"), options)
    assert item.resized_hw == (112, 112) and tuple(item.pixels.shape[1:]) == (3, 112, 112)


def test_start_end_seconds(clip):
    options = MediaOptions(video=VideoOptions(start=1.0, end=2.0, min_frames=1))
    item = decode_sample(Sample("clip.mp4", clip, "video"), options)
    assert item.frame_indices == [10, 20] and item.frame_times == pytest.approx([1.0, 2.0])


def test_start_past_the_end_is_an_error_record(clip):
    options = MediaOptions(video=VideoOptions(start=60.0))
    failure = decode_sample(Sample("clip.mp4", clip, "video"), options)
    assert failure == Failure(
        "clip.mp4", "sample", "EmptyFrameRange",
        "no frame between --video-start 60 s and --video-end the end: the video lasts 4.00 s",
    )


def test_gif_as_video(tmp_path):
    path = make_gif(tmp_path / "anim.gif", [20, 60, 100, 140, 180, 220], durations=[100, 100, 200, 200, 100, 100])
    options = MediaOptions(video=VideoOptions(num_frames=6))
    item = decode_sample(Sample("anim.gif", path, "video"), options)
    assert isinstance(item, Item), item
    assert item.decoder == "pillow" and item.kind == "video"
    assert item.frame_indices == [0, 1, 2, 3, 4, 5]
    assert item.frame_times == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.6, 0.7])
    assert _levels(item) == pytest.approx([20, 60, 100, 140, 180, 220], abs=1)
    assert plan_sample(Sample("anim.gif", path, "video"), options) == (6, 4, 4)


def test_plan_matches_decoding(clip):
    for options in (MediaOptions(), MediaOptions(video=VideoOptions(num_frames=5))):
        item = decode_sample(Sample("clip.mp4", clip, "video"), options)
        height, width = item.resized_hw
        assert plan_sample(Sample("clip.mp4", clip, "video"), options) == (item.num_frames, height // 14, width // 14)


def test_unset_video_options_take_the_mode_defaults():
    native = VideoOptions().resolved(28)
    assert (native.fps, native.min_frames, native.max_frames, native.rule) == (2.0, 4, 32, "native")
    assert VideoOptions(fps=None, num_frames=8).resolved(28).num_frames == 8
    assert VideoOptions(max_frames=2).resolved(28).min_frames == 2  # an explicit bound moves the default one


def test_decode_threads_are_the_spare_cores_of_a_worker(monkeypatch):
    from merge_cli.config import ExtractConfig, spare_decode_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert spare_decode_threads(2) == 8 and spare_decode_threads(16) == 1 and spare_decode_threads(40) == 1
    assert spare_decode_threads(0) == 1  # decoding beside the compute in the main process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on this node share its cores
    assert spare_decode_threads(2) == 2
    config = ExtractConfig(inputs=("x",), out="o.h5", workers=4)
    media = config.media_options(14)
    assert media.decode_threads == 1 and "decode_threads" not in media.to_dict()  # speed only: not hashed
