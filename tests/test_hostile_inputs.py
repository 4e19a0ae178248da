"""Hostile inputs (issue 16): arguments, files and checkpoints built to hang, exhaust memory or
garble the terminal. Each gives one clear line or a bounded answer, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from media_factory import make_image, make_video, png_header, with_trailing_exif

CPU = ["--device", "cpu", "--dtype", "fp32", "--workers", "0"]
MERGE_CLI = [sys.executable, "-m", "merge_cli"]


def _one_error_line(result) -> str:
    """The whole of stderr is one `merge-cli: error:` line: no traceback, no progress."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("merge-cli: error: "), lines[0][:500]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def _last_error_line(result) -> str:
    """A run that had started (progress lines printed) and then stopped: one error line, last."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("merge-cli: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


def _limited(megabytes: int):
    """A preexec_fn capping the child's data segment (heap and anonymous maps): a case that
    allocates what it should not fails in the child instead of taking the machine down."""

    def limit() -> None:
        import resource

        cap = megabytes * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    return limit


# -- options that cannot mean anything --------------------------------------------------------------


@pytest.fixture
def clip(tmp_path) -> Path:
    return make_video(tmp_path / "media" / "clip.mp4", 12, 56, 84, fps=6)


@pytest.mark.parametrize("option", ["--fps", "--video-start", "--video-end"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_video_options_refuse_the_run(cli, clip, tmp_path, option, value):
    # NaN passes every `<= 0` check; before, each video became an error record and the run exit 3
    out = tmp_path / "feats.h5"
    result = cli("extract", "--input", str(clip), "--out", str(out), option, value, *CPU)
    assert result.exit_code == 1, result.output
    assert f"{option} must be a finite number" in _one_error_line(result)
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1e-6"])
def test_projector_eps_must_be_a_positive_finite_number(cli, clip, tmp_path, value):
    result = cli("extract", "--input", str(clip), "--out", str(tmp_path / "f.h5"), "--random-projector",
                 "--projector-eps", value, *CPU)
    assert result.exit_code == 1, result.output
    assert "--projector-eps must be" in _one_error_line(result)


def test_video_options_refuse_non_finite_values_in_the_api():
    from merge_cli.config import VideoOptions
    from merge_cli.errors import UsageError

    for field in ("fps", "start", "end"):
        with pytest.raises(UsageError, match="finite"):
            VideoOptions(**{field: float("nan")})


def test_a_shard_size_of_hundreds_of_digits_is_one_line(cli, clip, tmp_path):
    result = cli("extract", "--input", str(clip), "--out", str(tmp_path / "f.h5"), "--shard-size", "9" * 400 + "GB", *CPU)
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "a size must be below 8 EiB" in line and len(line) < 300


def test_absurd_video_pixel_budgets_refuse_the_run_not_each_video(cli, clip, tmp_path):
    huge = str(10**30)
    result = cli("extract", "--input", str(clip), "--out", str(tmp_path / "f.h5"), "--video-max-pixels", huge,
                 "--video-total-pixels", huge, *CPU)
    assert result.exit_code == 1, result.output[-2000:]
    assert "video max_pixels must be at most 1,099,511,627,776" in _one_error_line(result)
    at_the_limit = cli("extract", "--input", str(clip), "--out", str(tmp_path / "g.h5"), "--video-max-pixels",
                       str(2**40), "--video-total-pixels", str(2**40), "--json", *CPU)
    assert at_the_limit.exit_code == 0, at_the_limit.output[-2000:]
    assert json.loads(at_the_limit.stdout)["written"] == 1


def test_an_absurd_llm_dim_is_refused_before_allocating(cli, clip, tmp_path):
    result = cli("extract", "--input", str(clip), "--out", str(tmp_path / "f.h5"), "--random-projector",
                 "--llm-dim", str(10**30), *CPU)
    assert result.exit_code == 1
    assert "--llm-dim must be in 1..65,536" in _one_error_line(result)


# -- header probes read headers only ----------------------------------------------------------------


def test_check_grid_of_a_huge_png_reads_its_exif_without_decoding(tmp_path):
    """EXIF after the image data: Pillow's getexif() decoded all 600 million pixels to find it.
    The child may use 300 MB of heap; decoding this image would take 600 MB."""
    path = with_trailing_exif(png_header(tmp_path / "huge.png", 20_000, 30_000), 6)
    done = subprocess.run([*MERGE_CLI, "check-grid", str(path), "--json"], capture_output=True, text=True,
                          timeout=120, preexec_fn=_limited(300))
    assert done.returncode == 1, done.stderr[-2000:]  # answered: 30000x20000 is not a valid grid
    report = json.loads(done.stdout)
    assert report["source"] == "image" and report["size"] == [30_000, 20_000]  # orientation 6: turned


def test_exif_after_the_image_data_still_turns_the_decoded_image(tmp_path):
    """The header walk finds what decoding finds: probe, plan and decoded pixels agree."""
    import numpy as np
    from PIL import Image

    from merge_cli.config import MediaOptions
    from merge_cli.media.images import decode_sample, plan_sample
    from merge_cli.media.probe import probe_media
    from merge_cli.records import Sample

    path = with_trailing_exif(make_image(tmp_path / "a.png", 56, 112), 6)
    info = probe_media(path)
    assert (info.height, info.width) == (112, 56)
    sample = Sample("a.png", path, "image")
    item = decode_sample(sample, MediaOptions())
    assert item.orig_hw == (112, 56) == item.resized_hw
    assert plan_sample(sample, MediaOptions()) == (1, 8, 4)
    with Image.open(path) as image:
        upright = np.asarray(image.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(item.pixels[0].permute(1, 2, 0).numpy(), upright)


# -- numbers too large to mean anything, arguments too long to echo --------------------------------


def test_check_grid_of_an_astronomical_token_count_answers_at_once():
    # the factor search took sqrt(N) steps: 10**15 of them
    done = subprocess.run([*MERGE_CLI, "check-grid", "--tokens", str(10**30)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--tokens must be at most 1,099,511,627,776; got a number of 31 digits" in _one_error_line(done)


@pytest.mark.parametrize(
    "args, message",
    [
        (["1x" + "7" * 5000], "is too large: each side is at most 1,048,576 pixels"),
        (["2000000x28"], "size 2000000x28 is too large"),
        (["28x28", "--max-pixels", str(10**400)], "max_pixels must be at most 1,099,511,627,776"),
        (["28x28", "--min-pixels", str(10**30)], "min_pixels must be at most"),
        (["28x28", "--patch-size", str(10**30)], "the patch size must be at most 1,048,576"),
        (["28x28", "--merge-size", str(10**30)], "the merge size must be at most 1,048,576"),
        (["--tokens", "64", "--merge-size", str(10**30)], "--merge-size must be at most 1,048,576"),
        (["9" * 100_000], "(100,000 characters)' is neither a size HxW"),
        ([str(10**400) + "x28"], "is too large"),  # a file name too long for the system to look up
    ],
)
@pytest.mark.parametrize("json_output", [False, True])
def test_check_grid_refuses_absurd_numbers_in_one_short_line(cli, args, message, json_output):
    result = cli("check-grid", *args, *(["--json"] if json_output else []))
    assert result.exit_code == 2, result.output[-2000:]
    if json_output:
        error = json.loads(result.stdout)
        assert error["exit_code"] == 2 and message in error["error"] and len(error["error"]) < 300
    else:
        line = _one_error_line(result)
        assert message in line and len(line) < 300


def test_the_largest_accepted_side_still_gets_an_answer(cli):
    result = cli("check-grid", "1048576x28", "--json")
    assert result.exit_code == 1  # not a whole number of patches: answered, not refused
    assert json.loads(result.stdout)["size"] == [1_048_576, 28]


def test_an_empty_out_is_one_line(cli, clip):
    result = cli("extract", "--input", str(clip), "--out", "", *CPU)
    assert result.exit_code == 1
    assert "--out must name a file, e.g. feats.h5; got an empty name" in _one_error_line(result)


def test_index_of_an_empty_path_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("index", "")
    assert result.exit_code == 2
    assert "is a folder, not a merge-cli output" in _one_error_line(result)


# -- checkpoints that are not checkpoints -----------------------------------------------------------


def _random_text(rng, lines: int = 5) -> str:
    words = ["".join(chr(rng.integers(97, 123)) for _ in range(rng.integers(2, 9))) for _ in range(40)]
    return "\n".join(" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(lines)) + "\n"


@pytest.mark.parametrize("name", ["mm_projector.bin", "projector.pt", "weights.pth", "folder/pytorch_model.bin"])
def test_a_text_file_as_projector_is_one_line_naming_it(cli, clip, tmp_path, name):
    import numpy as np

    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_random_text(np.random.default_rng(np.random.randint(2**31))))
    given = path.parent if name.startswith("folder/") else path
    result = cli("extract", "--input", str(clip), "--out", str(tmp_path / "f.h5"), "--projector", str(given), *CPU)
    assert result.exit_code == 1, result.output[-2000:]
    line = _one_error_line(result)
    assert f"cannot read {path}: not a PyTorch checkpoint" in line and "torch.save" in line


def test_random_bytes_as_safetensors_are_one_line_naming_the_file(cli, clip, tmp_path):
    import numpy as np

    path = tmp_path / "projector.safetensors"
    path.write_bytes(np.random.default_rng(np.random.randint(2**31)).bytes(300))
    result = cli("extract", "--input", str(clip), "--out", str(tmp_path / "f.h5"), "--projector", str(path), *CPU)
    assert result.exit_code == 1
    assert f"cannot read {path}: not a readable .safetensors file" in _one_error_line(result)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_truncated_torch_save_is_one_line(cli, clip, tmp_path, legacy):
    import torch
    from media_factory import truncate

    state = {"ln_q.weight": torch.randn(64), "ln_q.bias": torch.randn(64), "mlp.0.weight": torch.randn(256, 256),
             "mlp.0.bias": torch.randn(256), "mlp.2.weight": torch.randn(32, 256), "mlp.2.bias": torch.randn(32)}
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    truncate(path, 0.5)
    result = cli("extract", "--input", str(clip), "--out", str(tmp_path / "f.h5"), "--projector", str(path), *CPU)
    assert result.exit_code == 1
    assert f"cannot read {path}" in _one_error_line(result)


# -- manifests built to break the parser ------------------------------------------------------------


def _images(folder: Path, count: int) -> list[str]:
    import numpy as np

    sizes = np.random.randint(28, 80, size=(count, 2))
    return [make_image(folder / f"{i}.png", int(h), int(w)).name for i, (h, w) in enumerate(sizes)]


HOSTILE_VALUES = {
    "nested": ("[" * 200_000, "JSON nested more deeply than can be read"),
    "long number": ("7" * 5_000, "holds a number of 5,000 digits (at most 100 are read)"),
}


@pytest.mark.parametrize("hostile", sorted(HOSTILE_VALUES))
@pytest.mark.parametrize("bad_line_after", [0, 3, 150])  # 150: past the root check's head of 100 paths
def test_a_hostile_jsonl_line_is_one_line_naming_it(cli, tmp_path, hostile, bad_line_after):
    import random

    names = _images(tmp_path / "media", 4)
    value, message = HOSTILE_VALUES[hostile]
    lines = [json.dumps({"image": random.choice(names)}) for _ in range(bad_line_after)]
    lines.append('{"image": "%s", "id": %s}' % (names[0], value) if hostile == "long number" else value)
    manifest = tmp_path / "media" / "list.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    result = cli("extract", "--input", str(manifest), "--out", str(tmp_path / "f.h5"), *CPU)
    assert result.exit_code == 1, result.output[-2000:]
    line = _last_error_line(result)  # a line past the first unit's head is met once the run started
    assert f"list.jsonl line {bad_line_after + 1}: {message}" in line and len(line) < 300


@pytest.mark.parametrize("hostile", sorted(HOSTILE_VALUES))
def test_a_hostile_llava_json_is_one_line(cli, tmp_path, hostile):
    names = _images(tmp_path / "media", 3)
    value, message = HOSTILE_VALUES[hostile]
    records = ", ".join(json.dumps({"id": str(i), "image": name}) for i, name in enumerate(names))
    manifest = tmp_path / "media" / "llava.json"
    manifest.write_text(f'[{records}, {{"id": {value}, "image": "{names[0]}"}}]' if hostile == "long number" else value)
    result = cli("extract", "--input", str(manifest), "--out", str(tmp_path / "f.h5"), *CPU)
    assert result.exit_code == 1, result.output[-2000:]
    assert f"manifest {manifest}: {message}" in _last_error_line(result)


def test_a_deep_value_in_a_path_field_is_named_briefly(tmp_path):
    from merge_cli.errors import UsageError
    from merge_cli.inputs.sources import collect_samples

    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"image": "a.png"}) + "\n" + '{"video": ' + "[" * 500 + "]" * 500 + "}\n")
    with pytest.raises(UsageError, match=r"list.jsonl line 2: 'video' must be a path or a list of paths; got \[\[\[") as error:
        collect_samples([manifest])
    assert len(str(error.value)) < 200


def test_ordinary_numbers_in_manifests_still_read(tmp_path):
    from merge_cli.inputs.sources import collect_samples

    names = _images(tmp_path, 2)
    manifest = tmp_path / "llava.json"
    manifest.write_text(json.dumps([{"id": 10**40, "image": names[0], "score": -1.5e300},
                                    {"id": -(10**99), "image": names[1]}]))
    assert [s.key for s in collect_samples([manifest]).samples] == names


# -- text from files is shown, never obeyed ---------------------------------------------------------

# An OSC sequence that retitles the terminal, one that clears the screen, a bidi override that
# reverses what follows, and rich markup that would be taken as a style.
HOSTILE_NAMES = ["\x1b]0;pwned\x07title.png", "\x1b[2Jwipe.jpg", "evil\u202egnp.jpg", "[bold]markup.png"]


def _assert_shown_not_obeyed(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, repr(text[:2000])
    assert "Traceback" not in text


def test_extract_summary_escapes_failed_file_names(cli, tmp_path):
    import numpy as np

    folder = tmp_path / "media"
    make_image(folder / "good.png", 56, 56)
    rng = np.random.default_rng(np.random.randint(2**31))
    for name in HOSTILE_NAMES:
        (folder / name).write_bytes(rng.bytes(200))  # not an image: each becomes an error record
    result = cli("extract", "--input", str(folder), "--out", str(tmp_path / "f.h5"), *CPU)
    assert result.exit_code == 3, result.output[-3000:]
    _assert_shown_not_obeyed(result.stdout + result.stderr)
    flat = "".join(result.stdout.split())  # the failures table may fold a long key across lines
    for shown in ("\\x1b]0;pwned\\x07title.png", "\\x1b[2Jwipe.jpg", "evil\\u202egnp.jpg", "[bold]markup.png"):
        assert shown in flat, shown


def test_error_lines_and_warnings_escape_what_the_user_gave(cli, tmp_path):
    missing = tmp_path / "\x1b]0;pwned\x07[/red]gone.png"  # markup after a bracket: taken as a glob
    result = cli("extract", "--input", str(missing), "--out", str(tmp_path / "f.h5"), *CPU)
    assert result.exit_code == 1
    assert "\\x1b]0;pwned\\x07[/red]gone.png: the pattern matches no file" in _one_error_line(result)
    _assert_shown_not_obeyed(result.stderr)

    empty = tmp_path / "\x1b]0;pwned\x07empty"
    empty.mkdir()
    result = cli("extract", "--input", str(empty), "--out", str(tmp_path / "g.h5"), *CPU)
    assert "no images or videos found in" in result.stderr
    _assert_shown_not_obeyed(result.stdout + result.stderr)


def test_progress_reporters_escape_warnings_and_failures(capsys):
    from merge_cli.records import Failure
    from merge_cli.run.progress import ErrorLogReporter, LogReporter, RichReporter

    message = "found \x1b]0;pwned\x07 in [/bold] folder"
    LogReporter().warn(message)
    RichReporter().warn(message)
    ErrorLogReporter(rank=1).failed(Failure("\x1b[2Jkey", "decode", "OSError", "bad \x1b[31m data"))
    err = capsys.readouterr().err
    _assert_shown_not_obeyed(err)
    assert err.count("\\x1b]0;pwned\\x07 in [/bold] folder") == 2 and "\\x1b[2Jkey" in err


@pytest.fixture
def hostile_output(tmp_path):
    """An output whose attribute is 2 MB and whose error records have hostile keys and a long message."""
    from feature_factory import attrs, failure, features

    from merge_cli.output.index import build_index
    from merge_cli.output.store import ShardWriter

    out = tmp_path / "feats.h5"
    with ShardWriter(out, attrs(tower="t" * 2_000_000), shard_bytes=20_000) as writer:
        writer.add(features("\x1b]0;pwned\x07sample", grid=(1, 2, 2)))
        for i, name in enumerate(HOSTILE_NAMES):
            writer.add_failure(failure(name, ("m" * 1_000_000) if i == 0 else f"bad \x1b[31m{i}"))
    build_index(out)
    return out


def test_inspect_cuts_long_values_and_escapes_file_text(cli, hostile_output):
    result = cli("inspect", str(hostile_output))
    assert result.exit_code == 0, result.output[-3000:]
    _assert_shown_not_obeyed(result.stdout)
    assert len(result.stdout) < 30_000  # the 2 MB attribute and the 1 MB message were laid out whole
    flat = "".join(result.stdout.split())
    stored = json.loads(cli("inspect", str(hostile_output), "--json").stdout)  # the writer may cap messages
    longest = max(len(error["message"]) for error in stored["errors"])
    assert longest > 500 and f"({longest:,}characters)" in flat
    assert "(2,000,000characters)" in flat
    assert "\\x1b[2Jwipe.jpg" in flat and "[bold]markup.png" in flat and "bad\\x1b[31m2" in flat


def test_inspect_key_and_failures_escape_but_json_stays_exact(cli, hostile_output):
    key = "\x1b]0;pwned\x07sample"
    one = cli("inspect", str(hostile_output), "--key", key)
    assert one.exit_code == 0, one.output[-3000:]
    _assert_shown_not_obeyed(one.stdout)
    assert "\\x1b]0;pwned\\x07sample" in one.stdout
    assert json.loads(cli("inspect", str(hostile_output), "--key", key, "--json").stdout)["key"] == key

    listed = cli("inspect", str(hostile_output), "--failures")
    _assert_shown_not_obeyed(listed.stdout)
    assert "\\x1b[2Jwipe.jpg\tdecode\t" in listed.stdout
    records = [json.loads(line) for line in cli("inspect", str(hostile_output), "--failures", "--json").stdout.splitlines()]
    assert sorted(r["key"] for r in records) == sorted(HOSTILE_NAMES)


# -- tower configs that describe more than their weights --------------------------------------------


def _extract_with_tower(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """extract in a child with 1 GB of heap (a real run of a tiny tower needs well under half):
    a config that allocates what its files cannot hold fails there, not on the machine."""
    image = make_image(tmp_path / "media" / "a.png", 56, 84)
    return subprocess.run(
        [*MERGE_CLI, "extract", "--input", str(image), "--out", str(tmp_path / "f.h5"), "--tower", str(folder), *CPU],
        capture_output=True, text=True, timeout=180, preexec_fn=_limited(1000),
    )


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    target = config["vision_config"] if "vision_config" in config else config
    target.update(changes)
    path.write_text(json.dumps(config))


def test_a_million_layer_onevision_config_is_refused_before_building(tmp_path):
    from tower_factory import save_onevision

    folder = save_onevision(tmp_path / "tower")
    _edit_config(folder, num_hidden_layers=1_000_000)
    done = _extract_with_tower(folder, tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    line = _one_error_line(done)
    assert "describes a tower of at least" in line and "(layers 1,000,000, width 64" in line
    assert "refused before building it" in line


@pytest.mark.parametrize(
    "changes, described",
    [({"num_hidden_layers": 100_000}, "layers 100,000"), ({"image_size": 10**6}, "image_size 1,000,000")],
)
def test_an_absurd_hugging_face_tower_config_is_refused_before_building(tmp_path, changes, described):
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from tower_factory import save_hf

    config = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, patch_size=14, image_size=56)
    folder = save_hf(transformers.SiglipVisionModel(config), tmp_path / "siglip")
    _edit_config(folder, **changes)
    done = _extract_with_tower(folder, tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    line = _one_error_line(done)
    assert "describes a tower of at least" in line and described in line


def test_the_parameter_floor_never_refuses_a_real_tower(tmp_path):
    """A tower whose real count is close to the floor (thin, many layers, a wide MLP: about 2x
    the floor; published towers are 3x or more) still loads."""
    import torch
    from tower_factory import onevision_config, save_onevision

    from merge_cli.models.towers import load_tower

    config = onevision_config(num_hidden_layers=12, intermediate_size=1024)
    folder = save_onevision(tmp_path / "tower", config, dtype=torch.bfloat16)
    assert load_tower(str(folder)).num_layers == 12
