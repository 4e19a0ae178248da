"""Rough edges a new user hits (issue 13): bad output locations, slips of the tongue, readable
refusals. Each test drives the CLI the way a user would and checks the one line they get."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from media_factory import make_image, make_video

CPU = ["--device", "cpu", "--dtype", "fp32", "--workers", "0"]


@pytest.fixture
def media(tmp_path) -> Path:
    root = tmp_path / "media"
    make_image(root / "a.jpg", 60, 80)
    make_image(root / "b.png", 90, 70)
    return root


def _one_error_line(result) -> str:
    """The whole of stderr must be one `merge-cli: error:` line (no traceback, no progress)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("merge-cli: error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


# -- item 1: the output location is checked before any model or media work ----------------------


def test_out_under_a_file_is_one_line_before_the_tower_loads(cli, media, tmp_path):
    blocker = tmp_path / "list.txt"
    blocker.write_text("not a folder\n")
    # A tower that does not exist: if the output were not checked first, this would be the error.
    result = cli("extract", "--input", str(media), "--out", str(blocker / "x.h5"), "--tower", str(tmp_path / "none"), *CPU)
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert f"{blocker} is a file, not a folder" in line


def test_shard_folder_name_taken_by_a_file(cli, media, tmp_path):
    out = tmp_path / "feats.h5"
    Path(f"{out}.d").write_text("in the way\n")
    result = cli("extract", "--input", str(media), "--out", str(out), *CPU)
    assert result.exit_code == 1
    assert "feats.h5.d exists and is not a folder" in _one_error_line(result)
    assert not out.exists()


def test_out_that_is_a_folder(cli, media, tmp_path):
    result = cli("extract", "--input", str(media), "--out", str(tmp_path), *CPU)
    assert result.exit_code == 1
    assert "is a folder; give a file name inside it" in _one_error_line(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_out_in_a_read_only_folder(cli, media, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = cli("extract", "--input", str(media), "--out", str(locked / "feats.h5"), *CPU)
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 1
    assert "cannot create files in" in _one_error_line(result)


def test_unwritable_folder_found_by_trying(media, tmp_path, monkeypatch):
    """The writability check creates a file rather than asking os.access (which lies to root)."""
    import tempfile

    from merge_cli.errors import UsageError
    from merge_cli.output.preflight import check_output_location

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(UsageError, match=r"cannot create files in .* \(Read-only file system\)"):
        check_output_location(tmp_path / "deeper" / "feats.h5")


def test_no_free_space(cli, media, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=10 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    result = cli("extract", "--input", str(media), "--out", str(tmp_path / "new" / "feats.h5"), *CPU)
    assert result.exit_code == 1
    assert "MB free in" in _one_error_line(result)
    assert not (tmp_path / "new").exists()


def test_missing_parent_folders_are_fine(cli, media, tmp_path):
    out = tmp_path / "a" / "b" / "feats.h5"
    result = cli("extract", "--input", str(media), "--out", str(out), *CPU, "--json")
    assert result.exit_code == 0, result.output
    assert out.is_file()


# -- item 8: --output is a slip for --out ----------------------------------------------------------


def test_output_with_a_file_name_suggests_out(cli, media, tmp_path):
    result = cli("extract", "--input", str(media), "--output", "feats.h5", *CPU)
    assert result.exit_code == 2
    assert "did you mean --out feats.h5?" in " ".join(result.output.split())


def test_output_kinds_still_work(cli, media, tmp_path):
    result = cli("extract", "--input", str(media), "--out", str(tmp_path / "f.h5"), "--output", "merged", *CPU, "--json")
    assert result.exit_code == 0, result.output
    result = cli("extract", "--input", str(media), "--out", str(tmp_path / "g.h5"), "--output", "bogus", *CPU)
    assert result.exit_code == 2 and "did you mean" not in result.output


# -- item 13: plurals ------------------------------------------------------------------------------


def test_counts_of_one_are_singular(cli, tmp_path):
    from feature_factory import attrs, failure, features

    from merge_cli.output.store import ShardWriter

    out = tmp_path / "feats.h5"
    with ShardWriter(out, attrs()) as writer:
        writer.add(features("clip.mp4", grid=(2, 4, 4)))
        writer.add_failure(failure("bad.jpg"))
    index = cli("index", str(out))
    assert index.exit_code == 0, index.output
    text = " ".join(index.stdout.split())
    assert "1 sample," in text and "from 1 shard " in text and "1 error" in text and "1 errors" not in text
    inspect = " ".join(cli("inspect", str(out)).stdout.split())
    assert "0 images, 1 video, 2 frames" in inspect, inspect


# -- item 4: --num-frames N is exact, and conflicting frame options are refused --------------------


@pytest.mark.parametrize("wanted", [1, 3, 7])
def test_num_frames_gives_exactly_n_frames(cli, tmp_path, wanted):
    from merge_cli.output.reader import open_features

    make_video(tmp_path / "media" / "clip.mp4", 40, 64, 96, fps=10)
    out = tmp_path / "feats.h5"
    result = cli("extract", "--input", str(tmp_path / "media"), "--out", str(out), "--num-frames", str(wanted), *CPU, "--json")
    assert result.exit_code == 0, result.output
    with open_features(out) as feats:
        sample = feats["clip.mp4"]
        assert len(sample.frame_indices) == wanted and sample.grid_thw[0] == wanted  # the demo tower: one frame per t


@pytest.mark.parametrize(
    "extra, named",
    [(["--fps", "1"], "--fps"), (["--max-frames", "8"], "--max-frames"), (["--min-frames", "2", "--fps", "3"], "--fps and --min-frames")],
)
def test_num_frames_with_another_frame_count_is_one_line(cli, media, tmp_path, extra, named):
    result = cli("extract", "--input", str(media), "--out", str(tmp_path / "f.h5"), "--num-frames", "3", *extra, *CPU)
    assert result.exit_code == 1
    assert f"--num-frames samples exactly 3 frames; {named} " in _one_error_line(result)
    assert not (tmp_path / "f.h5").exists()


def _help_text(cli, *command: str) -> str:
    """--help as one line of words, without rich's box borders."""
    import re

    return " ".join(re.sub("[\u2500-\u257f]", " ", cli(*command, "--help").stdout).split())


def test_help_says_num_frames_is_exact(cli):
    text = _help_text(cli, "extract")
    assert "Sample exactly N frames per video" in text and "not with --fps, --min-frames or --max-frames" in text


# -- item 7: a manifest resolved against the wrong folder stops before any work ----------------------


def _llava(path: Path, image_paths: list[str]) -> Path:
    records = [{"id": str(i), "image": image, "conversations": []} for i, image in enumerate(image_paths)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def _random_names(count: int) -> list[str]:
    rng = np.random.default_rng(np.random.randint(2**31))
    return [f"coco/{rng.integers(10**8):08d}_{i}.jpg" for i in range(count)]


def test_llava_json_without_media_root_is_one_line_naming_it(cli, tmp_path):
    names = _random_names(int(np.random.randint(20, 150)))
    for name in names:
        make_image(tmp_path / "data" / "images" / name, 30, 40)
    manifest = _llava(tmp_path / "data" / "json" / "llava.json", names)
    out = tmp_path / "feats.h5"
    result = cli("extract", "--input", str(manifest), "--out", str(out), *CPU)
    assert result.exit_code == 1
    line = _one_error_line(result)
    checked = min(len(names), 100)
    assert f"{checked} of the first {checked} relative paths in {manifest}" in line
    assert f"do not exist under the manifest's folder {manifest.parent}" in line
    assert "give the folder they are relative to with --media-root" in line
    assert not out.exists() and not Path(f"{out}.d").exists()  # nothing written, no lock folder left
    # in --json runs the same refusal is the JSON error object
    refused = json.loads(cli("extract", "--input", str(manifest), "--out", str(out), *CPU, "--json").stdout)
    assert refused["exit_code"] == 1 and "--media-root" in refused["error"]


def test_the_refusal_names_a_folder_above_that_holds_them(cli, tmp_path):
    names = _random_names(12)
    for name in names:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"")  # never decoded: the run stops first
    manifest = _llava(tmp_path / "data" / "json" / "llava.json", names)
    result = cli("extract", "--input", str(manifest), "--out", str(tmp_path / "f.h5"), *CPU)
    assert result.exit_code == 1
    assert f"they are under {tmp_path / 'data'}: --media-root {tmp_path / 'data'}" in _one_error_line(result)
    wrong = cli("extract", "--input", str(manifest), "--media-root", str(tmp_path), "--out", str(tmp_path / "f.h5"), *CPU)
    assert wrong.exit_code == 1
    assert f"do not exist under --media-root {tmp_path} (e.g. {names[0]!r}): is it the folder" in _one_error_line(wrong)


def test_with_media_root_or_a_few_missing_the_run_goes_on(cli, tmp_path):
    names = _random_names(10)
    for name in names:
        make_image(tmp_path / "images" / name, 30, 40)
    missing = ["coco/gone_1.jpg", "coco/gone_2.jpg"]
    manifest = _llava(tmp_path / "json" / "llava.json", names[:5] + missing + names[5:])
    result = cli("extract", "--input", str(manifest), "--media-root", str(tmp_path / "images"),
                 "--out", str(tmp_path / "f.h5"), *CPU, "--json")
    assert result.exit_code == 3, result.output  # the missing ones are error records, as before
    summary = json.loads(result.stdout)
    assert (summary["written"], summary["failed"]) == (10, 2)
    assert {f["key"] for f in summary["failures"]} == set(missing)


def test_only_the_head_of_a_manifest_is_checked(tmp_path, monkeypatch):
    from merge_cli.errors import UsageError
    from merge_cli.inputs import sources

    present = _random_names(sources.ROOT_CHECK_PATHS)
    for name in present:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    later = [f"late/{i}.jpg" for i in range(5000)]  # missing, but past the checked head
    for suffix in (".json", ".txt", ".jsonl"):
        manifest = tmp_path / f"m{suffix}"
        if suffix == ".json":
            _llava(manifest, present + later)
        elif suffix == ".txt":
            manifest.write_text("\n".join(present + later) + "\n")
        else:
            manifest.write_text("".join(json.dumps({"image": name}) + "\n" for name in present + later))
        calls = []
        real = os.path.lexists
        monkeypatch.setattr(os.path, "lexists", lambda path: calls.append(path) or real(path))
        sources.check_manifest_root(manifest, tmp_path, media_root_given=False)  # no refusal
        monkeypatch.undo()
        assert len(calls) == sources.ROOT_CHECK_PATHS, suffix
    with pytest.raises(UsageError, match="100 of the first 100 relative paths"):
        manifest.write_text("".join(json.dumps({"image": name}) + "\n" for name in later + present))
        sources.check_manifest_root(manifest, tmp_path, media_root_given=False)


def test_overwrite_with_a_bad_input_keeps_the_existing_output(cli, media, tmp_path):
    out = tmp_path / "feats.h5"
    assert cli("extract", "--input", str(media), "--out", str(out), *CPU, "--json").exit_code == 0
    before = sorted(p.name for p in Path(f"{out}.d").iterdir())
    result = cli("extract", "--input", str(tmp_path / "nowhere"), "--out", str(out), "--overwrite", *CPU)
    assert result.exit_code == 1 and "no such file or directory" in _one_error_line(result)
    assert out.exists() and sorted(p.name for p in Path(f"{out}.d").iterdir()) == before


# -- item 9: native decoder noise stays off stderr -------------------------------------------------


@pytest.fixture
def broken_videos(tmp_path) -> Path:
    """A good clip and image, and videos both decoders refuse, each of which makes FFmpeg or decord
    print (moov atom not found, video_reader.cc: ERROR opening, Invalid NAL unit size, ...)."""
    from media_factory import truncate, zero_video_data

    root = tmp_path / "media"
    height, width = (int(v) * 2 for v in np.random.randint(16, 40, size=2))
    good = make_video(root / "good.mp4", int(np.random.randint(8, 20)), height, width)
    make_image(root / "photo.jpg", 60, 80)
    truncate(good, float(np.random.uniform(0.3, 0.8)), root / "cut.mp4")  # its index (moov) is at the end: cut off
    (root / "junk.mp4").write_bytes(np.random.bytes(int(np.random.randint(1000, 5000))))
    zero_video_data(make_video(tmp_path / "z.mp4", 12, height, width)).rename(root / "zeroed.mp4")
    return root


DECODER_NOISE = ("moov atom", "video_reader.cc", " @ 0x", "ERROR opening", "NAL unit", "Stack trace")


def _run_cli(*args: str):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "merge_cli", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_broken_videos_with_json_print_only_the_json(broken_videos, tmp_path, workers):
    result = _run_cli("extract", "--input", str(broken_videos), "--out", str(tmp_path / "f.h5"),
                      "--device", "cpu", "--workers", workers, "--json")
    assert result.returncode == 3, result.stderr
    assert result.stderr == ""  # not one decoder line (the demo warning is in the JSON)
    summary = json.loads(result.stdout)  # stdout is the JSON and nothing else
    assert (summary["written"], summary["failed"]) == (2, 3)
    assert {f["key"] for f in summary["failures"]} == {"cut.mp4", "junk.mp4", "zeroed.mp4"}
    assert all(f["message"] for f in summary["failures"])  # the record says what went wrong


def test_broken_videos_in_a_logged_run_leave_only_merge_cli_lines(broken_videos, tmp_path):
    result = _run_cli("extract", "--input", str(broken_videos), "--out", str(tmp_path / "f.h5"), "--device", "cpu", "--workers", "1")
    assert result.returncode == 3
    assert not [line for line in result.stderr.splitlines() if any(noise in line for noise in DECODER_NOISE)], result.stderr
    assert all(line.startswith("merge-cli") for line in result.stderr.splitlines() if line.strip()), result.stderr


def test_other_writes_to_stderr_during_a_decode_are_kept(capfd):
    from merge_cli.media.native_stderr import captured

    word = f"progress {np.random.randint(10**6)}"
    with captured():
        os.write(2, b"[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0c0ffee00] moov atom not found\n")
        os.write(2, f"{word}\n".encode())
        os.write(2, b"[18:05:20] /src/video/video_reader.cc:83: ERROR opening: x.mp4, Invalid data\n")
        os.write(2, b"    Last message repeated 3 times\n")
    assert capfd.readouterr().err == f"{word}\n"


# -- item 10: progress without a terminal ----------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = float(np.random.uniform(0, 1e6))

    def __call__(self) -> float:
        return self.now


def test_log_line_has_percent_rate_elapsed_and_eta_once_the_total_is_final(capsys):
    from merge_cli.run.progress import LogReporter

    clock = _Clock()
    reporter = LogReporter(clock=clock, interval=float("inf"))
    reporter.start(0)
    listed, done, failed, seconds = (int(x) for x in np.random.randint([5000, 100, 1, 200], [9000, 2000, 50, 3000]))
    reporter.set_total(listed, final=False)
    clock.now += seconds
    reporter.advance(samples=done - failed, tokens=done * 64)
    reporter.advance(failures=failed)
    reporter._line()
    growing = capsys.readouterr().err.strip().splitlines()[-1]
    elapsed = f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    assert growing == (
        f"merge-cli: {done:,}/{listed:,}+ samples (listing), {failed:,} failed, {done / seconds:,.1f} samples/s, "
        f"{done * 64 / seconds:,.0f} tokens/s, {elapsed} elapsed"
    )
    total = listed + int(np.random.randint(0, 5000))
    reporter.set_total(total, final=True)
    reporter._line()
    final = capsys.readouterr().err.strip()
    left = round((total - done) / (done / seconds))
    assert f"{done:,}/{total:,} samples ({100 * done / total:.0f}%)" in final
    assert final.endswith(f"{elapsed} elapsed, ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}")


@pytest.mark.parametrize("last_unit", [1, 2, 3])  # 3: the listing ends exactly on a full unit
def test_the_feed_says_when_the_total_is_final(tmp_path, last_unit):
    from merge_cli.inputs.sources import ListingStats, stream_units
    from merge_cli.run.feed import UnitPlan, WorkFeed

    count = 3 * int(np.random.randint(1, 4)) + last_unit
    for i in range(count):
        (tmp_path / "d" / f"{i:03d}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "d" / f"{i:03d}.jpg").write_bytes(b"")
    stats, totals = ListingStats(), []
    units = stream_units([tmp_path / "d"], unit_size=3, stats=stats)
    plan = UnitPlan(None, tmp_path / "f.h5", retry_failed=False, warn=print)
    feed = WorkFeed(units, iter(range(10**6)), plan, on_total=lambda total, final: totals.append((total, final)),
                    listing_ended=lambda: stats.ended)
    assert len(list(feed)) == count
    # growing units of 3, final from the moment the last unit is listed (not only at the end)
    cuts = list(range(3, count, 3)) + [count]
    assert totals[: len(cuts)] == [(n, n == count) for n in cuts]


def test_rich_bar_shows_samples_and_tokens_per_second_and_pulses_while_listing():
    import io

    from rich.console import Console

    from merge_cli.run.progress import RichReporter

    out = io.StringIO()
    clock = _Clock()
    reporter = RichReporter(clock=clock, console=Console(file=out, force_terminal=True, width=160))
    reporter.start(0)
    reporter.set_total(500, final=False)
    assert reporter._progress.tasks[0].total is None  # no percent or ETA from a partial total
    clock.now += 4
    reporter.advance(samples=10, tokens=2560)
    reporter.set_total(800, final=True)
    assert reporter._progress.tasks[0].total == 800
    reporter.finish()
    text = out.getvalue()
    assert "2.5 samples/s" in text and "640 tok/s" in text


def test_a_run_without_a_terminal_ends_with_the_full_progress_line(cli, media, tmp_path):
    import re

    result = cli("extract", "--input", str(media), "--out", str(tmp_path / "f.h5"), *CPU)
    assert result.exit_code == 0, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"merge-cli: 2/2 samples \(100%\), 0 failed, [\d,.]+ samples/s, [\d,]+ tokens/s, \d+:\d\d:\d\d elapsed", last
    ), last


def _random_summary() -> dict:
    from merge_cli.run.pipeline import RunSummary, Timings

    rng = np.random.default_rng(np.random.randint(2**31))
    big = lambda: int(10 ** rng.uniform(0, 9))  # noqa: E731
    timings = Timings(*(float(10 ** rng.uniform(-1, 5)) for _ in range(5)))
    summary = RunSummary(
        out=f"/data/run-{big()}/feats.h5", samples=big(), written=big(), skipped=big(), failed=big(), ignored_files=big(),
        tokens=big(), patch_tokens=big(), bytes=big() * 1000, seconds=float(10 ** rng.uniform(0, 5)), batches=big(),
        batch_fill=float(rng.uniform()), tower="demo", tower_is_demo=bool(rng.integers(2)), output="merged",
        device=str(rng.choice(["cpu", "cuda:0"])), compute_dtype="bf16", store_dtype="bf16", made_even=big(),
        timings=timings,
    )
    return summary.to_dict()


def test_the_summary_never_breaks_a_value_across_lines():
    import io
    import re

    from rich.console import Console

    from merge_cli.report import render_extract_summary

    value = re.compile(r"\d[\d,.]*%? (?:s|samples/s|patch tokens/s|patch tokens|[KMGT]?B|written|already done|failed|stored)\b")
    for _ in range(40):
        summary = _random_summary()
        wide, narrow = io.StringIO(), io.StringIO()
        render_extract_summary(summary, Console(file=wide, width=1000, no_color=True))
        width = int(np.random.choice([80, 80, 72, 100]))
        render_extract_summary(summary, Console(file=narrow, width=width, no_color=True))
        values = value.findall(wide.getvalue())
        assert len(values) >= 12
        lines = narrow.getvalue().splitlines()
        assert all(len(line) <= width for line in lines)
        for found in values:
            assert any(found in line for line in lines), (width, found, narrow.getvalue())


# -- landed items without a test of their own -------------------------------------------------------


def test_extract_summary_says_how_many_failures_it_leaves_out(cli, media, tmp_path):
    broken = int(np.random.randint(6, 12))
    for index in range(broken):
        (media / f"broken-{index:02d}.jpg").write_bytes(np.random.bytes(int(np.random.randint(10, 400))))
    out = tmp_path / "f.h5"
    summary = json.loads(cli("extract", "--input", str(media), "--out", str(out), *CPU, "--json").stdout)
    assert summary["failed"] == broken and len(summary["failures"]) == 5
    assert summary["failures_left_out"] == broken - 5
    human = cli("extract", "--input", str(media), "--out", str(tmp_path / "g.h5"), *CPU)
    assert human.exit_code == 3
    text = " ".join(human.stdout.split())
    assert f"first 5 of {broken} failures (all: merge-cli inspect {tmp_path / 'g.h5'} --failures)" in text


@pytest.mark.parametrize("torchrun, strict, failed, code", [
    (False, False, 0, 0), (False, False, 2, 3), (True, False, 2, 0), (True, True, 2, 3), (True, False, 0, 0),
])
def test_exit_code_of_a_run_with_failed_inputs(torchrun, strict, failed, code):
    """torchrun reads a non-zero exit as a crashed worker: failed inputs exit 0 there unless --strict."""
    from merge_cli.run.pipeline import RunSummary

    summary = RunSummary(out="f.h5", failed=failed, torchrun=torchrun, strict=strict)
    assert summary.exit_code == summary.to_dict()["exit_code"] == code
