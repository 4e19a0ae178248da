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
    assert sample_frame_indices(1, 30.0, VideoOptions(num_frames=16, max_frames=32)) == [0]


def test_num_frames_overrides_fps_and_stays_bounded():
    assert len(sample_frame_indices(1000, 25.0, VideoOptions(num_frames=8))) == 8
    assert len(sample_frame_indices(1000, 25.0, VideoOptions(num_frames=64, max_frames=32))) == 32
    assert len(sample_frame_indices(1000, 25.0, VideoOptions(num_frames=2, min_frames=4))) == 4


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
    min_frames = draw(st.integers(1, 16))
    max_frames = draw(st.integers(min_frames, 64))
    num_frames = draw(st.one_of(st.none(), st.integers(1, 100)))
    fps = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]))
    return VideoOptions(fps=fps, num_frames=num_frames, min_frames=min_frames, max_frames=max_frames)


@settings(max_examples=300, deadline=None)
@given(total=frame_counts, rate=rates, options=video_options())
def test_indices_are_sorted_unique_in_range_and_counted(total, rate, options):
    indices = sample_frame_indices(total, rate, options)
    wanted = options.num_frames if options.num_frames is not None else round(total / rate * options.fps)
    expected = min(max(wanted, options.min_frames), options.max_frames, total)
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


def test_decord_decodes_the_sampled_frames(clip):
    item = decode_sample(Sample("clip.mp4", clip, "video"), MediaOptions())
    assert isinstance(item, Item), item
    assert item.decoder == "decord"
    assert item.frame_indices == sample_frame_indices(40, 10.0, VideoOptions()) == [0, 6, 11, 17, 22, 28, 33, 39]
    assert item.frame_times == pytest.approx([i / 10 for i in item.frame_indices])
    assert item.pixels.dtype == torch.uint8 and tuple(item.pixels.shape) == (8, 3, 56, 84)
    assert item.orig_hw == (64, 96) and item.resized_hw == (56, 84)
    # each frame's mean level identifies its source frame (compression moves it by a few levels)
    assert _levels(item) == pytest.approx([frame_level(i) for i in item.frame_indices], abs=4)


def test_pyav_fallback_reads_the_same_frames(clip, monkeypatch):
    expected = decode_sample(Sample("clip.mp4", clip, "video"), MediaOptions())

    def refuse(path):
        raise video.DecoderError("decord", "open", RuntimeError("decord refuses this file"))

    monkeypatch.setattr(video.DecordSource, "__init__", lambda self, path: refuse(path))
    item = decode_sample(Sample("clip.mp4", clip, "video"), MediaOptions())
    assert isinstance(item, Item), item
    assert item.decoder == "pyav"
    assert item.frame_indices == expected.frame_indices and item.frame_times == expected.frame_times
    assert (item.pixels.int() - expected.pixels.int()).abs().float().mean() < 2.0


def test_pyav_fallback_when_decord_fails_to_read(clip, monkeypatch):
    def broken_chunks(self, indices):
        raise video.DecoderError("decord", "decode", RuntimeError("seek failed"))
        yield  # pragma: no cover

    monkeypatch.setattr(video.DecordSource, "chunks", broken_chunks)
    item = decode_sample(Sample("clip.mp4", clip, "video"), MediaOptions())
    assert isinstance(item, Item) and item.decoder == "pyav"


def test_pyav_seeks_in_a_long_video(tmp_path, monkeypatch):
    # 30 s at 4 fps: frames more than 2 s apart are reached by seeking, then decoding forward
    path = make_video(tmp_path / "long.mp4", 120, 32, 48, fps=4)
    options = MediaOptions(video=VideoOptions(num_frames=5, max_frames=5))
    with video.PyAVSource(path) as source:
        frames = np.concatenate(list(source.chunks([0, 30, 59, 90, 119])))
    assert frames.reshape(5, -1).mean(axis=1) == pytest.approx([frame_level(i) for i in (0, 30, 59, 90, 119)], abs=4)
    monkeypatch.setattr(video, "DECODERS", (video.PyAVSource,))
    item = decode_sample(Sample("long.mp4", path, "video"), options)
    assert item.frame_indices == [0, 30, 60, 89, 119] and item.decoder == "pyav"


@pytest.mark.parametrize("suffix, codec", [(".mkv", "libx264"), (".webm", "libvpx-vp9")])
def test_containers_without_a_frame_count(tmp_path, suffix, codec, monkeypatch):
    path = make_video(tmp_path / f"clip{suffix}", 20, 64, 96, fps=10, codec=codec)
    sample = Sample(path.name, path, "video")
    item = decode_sample(sample, MediaOptions())
    assert isinstance(item, Item) and item.decoder == "decord"
    assert plan_sample(sample, MediaOptions()) == (item.num_frames, 4, 6)
    monkeypatch.setattr(video, "DECODERS", (video.PyAVSource,))
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


def test_frames_are_resized_like_pillow_does(tmp_path):
    from PIL import Image

    path = make_video(tmp_path / "clip.mp4", 10, 120, 160, fps=10)
    options = MediaOptions(video=VideoOptions(num_frames=4))
    item = decode_sample(Sample("clip.mp4", path, "video"), options)
    with video.DecordSource(path) as source:
        raw = next(source.chunks(item.frame_indices))
    height, width = item.resized_hw
    for frame, pixels in zip(raw, item.pixels):
        expected = np.array(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
        assert torch.equal(pixels, torch.from_numpy(expected).permute(2, 0, 1))


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
    options = MediaOptions(video=VideoOptions(num_frames=6, max_frames=6))
    item = decode_sample(Sample("anim.gif", path, "video"), options)
    assert isinstance(item, Item), item
    assert item.decoder == "pillow" and item.kind == "video"
    assert item.frame_indices == [0, 1, 2, 3, 4, 5]
    assert item.frame_times == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.6, 0.7])
    assert _levels(item) == pytest.approx([20, 60, 100, 140, 180, 220], abs=1)
    assert plan_sample(Sample("anim.gif", path, "video"), options) == (6, 4, 4)


def test_plan_matches_decoding(clip):
    for options in (MediaOptions(), MediaOptions(video=VideoOptions(num_frames=5, max_frames=5))):
        item = decode_sample(Sample("clip.mp4", clip, "video"), options)
        height, width = item.resized_hw
        assert plan_sample(Sample("clip.mp4", clip, "video"), options) == (item.num_frames, height // 14, width // 14)


def test_unset_video_options_take_the_mode_defaults():
    native = VideoOptions().resolved(28)
    assert (native.fps, native.min_frames, native.max_frames, native.rule) == (2.0, 4, 32, "native")
    assert VideoOptions(fps=None, num_frames=8).resolved(28).num_frames == 8
    assert VideoOptions(max_frames=2).resolved(28).min_frames == 2  # an explicit bound moves the default one
