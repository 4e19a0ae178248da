"""Bad input is data: a generated corpus of broken files, each giving one exact error record,
while the good files next to them still come out."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from media_factory import (
    make_audio_only,
    make_image,
    make_video,
    png_header,
    truncate,
    zero_video_data,
)

from merge_cli.config import MediaOptions
from merge_cli.errors import MediaError
from merge_cli.inputs.sources import collect_samples
from merge_cli.media.images import decode_sample, plan_sample
from merge_cli.records import Failure, Item

GOOD = ["good.jpg", "good.png", "good.mp4", "good.mkv", "caf\\xe9.jpg"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One folder of broken files among good ones (a fixed seed: the same bytes on every run)."""
    rng = np.random.default_rng(20240601)
    folder = tmp_path_factory.mktemp("corpus")
    make_image(folder / "good.jpg", 60, 80, rng=rng)
    make_image(folder / "good.png", 90, 70, mode="RGBA", rng=rng)
    make_video(folder / "good.mp4", 20, 64, 96, rng=rng)
    make_video(folder / "good.mkv", 20, 64, 96, rng=rng)
    make_image(Path(os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.jpg")), 56, 56, rng=rng)

    (folder / "empty.jpg").write_bytes(b"")
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "text.mp4").write_text("this is a text file, not a video\n")
    truncate(make_image(folder / "truncated.jpg", 200, 300, rng=rng, quality=95))
    truncate(make_image(folder / "truncated.png", 200, 300, rng=rng))
    make_image(folder / "tiny.png", 5, 5, rng=rng)
    make_image(folder / "short.png", 20, 400, rng=rng)
    make_image(folder / "thin.png", 28, 6000, rng=rng)
    png_header(folder / "bomb.png", 20_000, 20_000)  # 400 million pixels claimed in 80 bytes
    os.symlink(folder / "nowhere.jpg", folder / "broken.jpg")
    (folder / "folder.jpg").mkdir()  # scanned as a folder (empty): no sample

    make_audio_only(folder / "audio.mp4")
    zero_video_data(make_video(folder / "blank.mp4", 20, 64, 96, rng=rng))
    truncate(make_video(folder / "cut.mkv", 40, 64, 96, rng=rng))
    truncate(make_video(folder / "cut.mp4", 40, 64, 96, rng=rng, container_options={"movflags": "+faststart"}))
    truncate(make_video(folder / "headless.mp4", 40, 64, 96, rng=rng))  # index (moov) at the end: cut off
    make_video(folder / "small.mp4", 10, 16, 16, rng=rng)
    return folder


@pytest.fixture(scope="module")
def results(corpus) -> dict:
    found = collect_samples([corpus])
    assert found.failures == [] and found.ignored == 0
    return {sample.key: decode_sample(sample, MediaOptions()) for sample in found.samples}


def _exact(folder: Path, key: str) -> Failure | None:
    """The exact record expected for `key` (None: the message comes from a library, see below)."""
    where = folder / key
    expected = {
        "empty.jpg": Failure(key, "open", "EmptyFile", f"empty file (0 bytes): {where}"),
        "empty.mp4": Failure(key, "open", "EmptyFile", f"empty file (0 bytes): {where}"),
        "text.jpg": Failure(key, "open", "UnidentifiedImageError", f"cannot identify image file '{where}'"),
        "tiny.png": Failure(key, "resize", "TooSmall", "image 5x5 is smaller than one 28x28 merge window; not upscaling it"),
        "short.png": Failure(key, "resize", "TooSmall", "image 20x400 is smaller than one 28x28 merge window; not upscaling it"),
        "thin.png": Failure(key, "resize", "GridError", "aspect ratio 214.3 of 28x6000 exceeds the limit 200"),
        "bomb.png": Failure(
            key, "open", "DecompressionBombError",
            "20000x20000 is 400,000,000 pixels, over the limit of 89,478,485 (--max-image-pixels): "
            "refusing a possible decompression bomb",
        ),
        "broken.jpg": Failure(key, "open", "BrokenSymlink", f"broken symbolic link: {where} -> {folder / 'nowhere.jpg'}"),
        "audio.mp4": Failure(key, "open", "NoVideoStream", "the file has no video stream"),
        "blank.mp4": Failure(key, "decode", "NoDecodableFrames", "no decodable video frames"),
        "cut.mkv": Failure(
            key, "decode", "TruncatedVideo",
            "the header promises 40 frames but only 17 can be read; the file looks truncated",
        ),
        "small.mp4": Failure(
            key, "resize", "TooSmall", "video frame 16x16 is smaller than one 28x28 merge window; not upscaling it"
        ),
    }
    return expected.get(key)


# Records whose message is a library's own words (the byte counts or codec details vary): stage,
# error type and a pattern for the message.
LIBRARY_WORDED = {
    "truncated.jpg": ("decode", "OSError", r"image file is truncated \(\d+ bytes not processed\)"),
    "truncated.png": ("decode", "OSError", r"image file is truncated"),
    "text.mp4": ("open", "InvalidDataError", r"Invalid data found when processing input.*\(also failed: decord: \w+\)"),
    "headless.mp4": ("open", "InvalidDataError", r"Invalid data found when processing input.*\(also failed: decord: \w+\)"),
    "cut.mp4": ("decode", "TruncatedVideo", r"frame \d+ of 40 could not be decoded: the stream ends after frame \d+"),
}

EXACT_KEYS = [
    "empty.jpg", "empty.mp4", "text.jpg", "tiny.png", "short.png", "thin.png", "bomb.png",
    "broken.jpg", "audio.mp4", "blank.mp4", "cut.mkv", "small.mp4",
]


@pytest.mark.parametrize("key", EXACT_KEYS)
def test_exact_error_record(corpus, results, key):
    assert results[key] == _exact(corpus, key)


@pytest.mark.parametrize("key", sorted(LIBRARY_WORDED))
def test_library_worded_error_record(results, key):
    stage, error_type, pattern = LIBRARY_WORDED[key]
    failure = results[key]
    assert isinstance(failure, Failure) and failure.key == key
    assert (failure.stage, failure.error_type) == (stage, error_type)
    assert re.search(pattern, failure.message), failure.message


def test_good_files_still_come_out(results):
    assert set(results) == set(GOOD) | set(EXACT_KEYS) | set(LIBRARY_WORDED)
    for key in GOOD:
        item = results[key]
        assert isinstance(item, Item), item
        assert item.pixels.shape[-1] % 28 == 0 and item.pixels.shape[-2] % 28 == 0
    assert results["good.mp4"].decoder == results["good.mkv"].decoder == "pyav"  # the faster one, per file


def test_every_message_is_valid_utf8(results):
    for result in results.values():
        text = result.message if isinstance(result, Failure) else result.key
        text.encode("utf-8")  # raises on a lone surrogate


def test_directory_named_in_a_manifest(corpus):
    manifest = corpus.parent / "dirs.txt"
    manifest.write_text(f"{corpus / 'folder.jpg'}\n{corpus / 'missing.png'}\n")
    found = collect_samples([manifest], media_root=corpus)
    assert [decode_sample(sample, MediaOptions()) for sample in found.samples] == [
        Failure("folder.jpg", "open", "IsADirectoryError", f"a directory, not a file: {corpus / 'folder.jpg'}"),
        Failure("missing.png", "open", "FileNotFoundError", f"no such file: {corpus / 'missing.png'}"),
    ]


@pytest.mark.parametrize(
    "key", ["empty.jpg", "text.jpg", "tiny.png", "short.png", "thin.png", "bomb.png", "broken.jpg", "audio.mp4", "small.mp4"]
)
def test_plan_refuses_what_decoding_refuses_from_the_header(corpus, results, key):
    sample = next(s for s in collect_samples([corpus]).samples if s.key == key)
    with pytest.raises(MediaError) as error:
        plan_sample(sample, MediaOptions())
    assert error.value.stage == results[key].stage
    assert error.value.error_type == results[key].error_type


def test_messages_hold_no_ffmpeg_errno_and_no_repeated_file_name(corpus, results):
    """PyAV's `[Errno 1094995529] ...: 'text.mp4'`: FFmpeg's internal code and the file the
    record is already about are left out of the message."""
    messages = {key: r.message for key, r in results.items() if isinstance(r, Failure)}
    assert all("[Errno" not in message for message in messages.values()), messages
    for key in ("text.mp4", "headless.mp4"):
        assert key not in messages[key], messages[key]


def test_check_grid_names_a_broken_file_once(cli, corpus):
    result = cli("check-grid", str(corpus / "text.mp4"))
    assert result.exit_code == 2
    assert result.output.count("text.mp4") == 1 and "[Errno" not in result.output, result.output
