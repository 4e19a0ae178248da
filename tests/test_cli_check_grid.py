"""`merge-cli check-grid`: human and JSON output, exit codes, files, and the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from media_factory import make_image, make_video


def test_valid_size_human(cli):
    result = cli("check-grid", "252x448")
    assert result.exit_code == 0, result.output
    assert "18x32" in result.stdout
    assert "576 -> 144" in result.stdout
    assert "yes" in result.stdout


def test_valid_size_json(cli):
    result = cli("check-grid", "252x448", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["input"] == "252x448" and report["source"] == "size"
    assert report["patch_grid"] == [18, 32] and report["valid"] is True
    assert (report["tokens"], report["merged_tokens"]) == (576, 144)
    assert report["resized"] == {
        "size": [252, 448],
        "patch_grid": [18, 32],
        "merged_grid": [9, 16],
        "tokens": 576,
        "merged_tokens": 144,
        "changed": False,
        "resize": [252, 448],
        "crop": [0, 0, 252, 448],
        "processor_grid": [18, 32],
        "made_even": False,
    }


def test_invalid_size_says_what_it_becomes(cli):
    result = cli("check-grid", "250x450", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["valid"] is False
    assert "not a multiple of the patch size 14" in report["problem"]
    assert report["merged_tokens"] is None
    assert report["resized"]["size"] == [252, 448] and report["resized"]["changed"] is True

    human = cli("check-grid", "250x450")
    assert human.exit_code == 1
    assert "252x448" in human.stdout and "no" in human.stdout


@pytest.mark.parametrize("bad", ["abc", "0x448", "-5x3", "252x"])
def test_unusable_input_is_exit_2_with_one_line(cli, bad):
    result = cli("check-grid", "--", bad) if bad.startswith("-") else cli("check-grid", bad)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "merge-cli: error:" in result.stderr
    assert "Traceback" not in result.output


def test_unusable_input_json(cli):
    result = cli("check-grid", "0x448", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["exit_code"] == 2


def test_options(cli):
    report = json.loads(cli("check-grid", "448x448", "--patch-size", "16", "--json").stdout)
    assert report["factor"] == 32 and report["patch_grid"] == [28, 28] and report["merged_tokens"] == 196
    report = json.loads(cli("check-grid", "1000x1000", "--max-pixels", str(448 * 448), "--json").stdout)
    assert report["resized"]["size"] == [448, 448]
    report = json.loads(cli("check-grid", "300x500", "--size", "448x448", "--json").stdout)
    assert report["resized"]["size"] == [448, 448] and report["policy"]["kind"] == "fixed"
    assert cli("check-grid", "300x500", "--size", "450x448").exit_code == 2


def test_tokens_mode(cli):
    result = cli("check-grid", "--tokens", "576", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["patch_grid"] == [24, 24] and report["merged_tokens"] == 144
    bad = cli("check-grid", "--tokens", "7", "--json")
    assert bad.exit_code == 1
    assert json.loads(bad.stdout)["problem"] == "Cannot find valid H, W factors for N=7 divisible by merge_size=2"
    assert cli("check-grid", "--tokens", "0").exit_code == 2
    assert cli("check-grid", "252x448", "--tokens", "576").exit_code == 2


def test_image_file(cli, tmp_path):
    path = make_image(tmp_path / "photo.png", 300, 500)  # 300 rows x 500 columns
    report = json.loads(cli("check-grid", str(path), "--json").stdout)
    assert report["source"] == "image" and report["size"] == [300, 500]
    assert report["resized"]["size"] == [308, 504]


def test_exif_rotated_image_reports_displayed_size(cli, tmp_path):
    from PIL import Image

    path = make_image(tmp_path / "rotated.jpg", 280, 560)
    with Image.open(path) as image:
        exif = image.getexif()
        exif[0x0112] = 6  # rotate 90 degrees on display
        image.save(path, exif=exif)
    report = json.loads(cli("check-grid", str(path), "--json").stdout)
    assert report["size"] == [560, 280]


def test_video_file_uses_the_video_ceiling(cli, tmp_path):
    path = make_video(tmp_path / "clip.mp4", num_frames=3, height=480, width=640)
    result = cli("check-grid", str(path), "--json")
    report = json.loads(result.stdout)
    assert report["source"] == "video" and report["size"] == [480, 640]
    assert report["policy"]["max_pixels"] == 64 * 28**2
    height, width = report["resized"]["size"]
    assert height * width <= 64 * 28**2


def test_unreadable_file_is_exit_2(cli, tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_text("not a jpeg")
    result = cli("check-grid", str(path))
    assert result.exit_code == 2
    assert "cannot read the size" in result.stderr
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert cli("check-grid", str(other)).exit_code == 2


def test_installed_script_and_module():
    script = shutil.which("merge-cli")
    assert script is not None, "the merge-cli console script is not installed"
    for command in ([script], [sys.executable, "-m", "merge_cli"]):
        done = subprocess.run([*command, "check-grid", "196x392", "--json"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["merged_tokens"] == 98
        done = subprocess.run([*command, "check-grid", "abc"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().startswith("merge-cli: error:")


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from merge_cli.cli import app\n"
        "heavy = [m for m in ('torch', 'h5py', 'decord', 'av', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
