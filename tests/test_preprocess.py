"""--preprocess without transformers: the checkpoint's processor rules read from its JSON files,
check-grid and extract agreeing (small sides included), and OneVision's temporal positions."""

from __future__ import annotations

import json

import pytest
import torch
from media_factory import make_image, make_video

from merge_cli.media.grid import ResizePolicy, even_grid
from merge_cli.media.processor import read_checkpoint_vision, resize_policy

CPU = ["--device", "cpu", "--dtype", "fp32", "--workers", "0"]


def checkpoint(folder, model_type, preprocessor=None, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, **config}))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.mark.parametrize("size", ["27x27", "300x5", "5x300", "28x28", "333x517"])
def test_check_grid_and_extract_never_disagree(cli, tmp_path, size):
    height, width = (int(v) for v in size.split("x"))
    media = tmp_path / "media"
    make_image(media / "a.png", height, width)
    for number, args in enumerate(([size], ["--tower", "demo", size], ["--tower", "demo", str(media / "a.png")])):
        report = json.loads(cli("check-grid", *args, "--json").stdout)
        out = tmp_path / f"{number}.h5"  # a fresh output each time: a resume keeps an error record
        result = cli("extract", "--input", str(media), "--out", str(out), *CPU, "--json")
        summary = json.loads(result.stdout)
        refused = report["resized"] is None
        assert (summary["failed"] == 1) == refused, (args, report, summary)
        if refused:
            assert "smaller than one 28x28 merge window" in report["resize_error"]
            assert summary["failures"][0]["error_type"] == "TooSmall"
        else:
            from merge_cli.output.reader import open_features

            with open_features(out) as features:
                assert list(features["a.png"].resized_hw) == report["resized"]["size"]


def test_check_grid_tower_uses_the_checkpoint_processor(cli, tmp_path):
    # SigLIP so400m at 384 px, patch 14: its processor gives 27x27, made even to 28x28.
    folder = checkpoint(tmp_path / "siglip", "siglip_vision_model", {"size": {"height": 384, "width": 384}, "resample": 2}, patch_size=14)
    native = json.loads(cli("check-grid", "--tower", str(folder), "600x800", "--json").stdout)
    assert native["preprocess"] == "native" and native["policy"]["resample"] == "bilinear"  # the filter always follows
    report = json.loads(cli("check-grid", "--tower", str(folder), "--preprocess", "checkpoint", "600x800", "--json").stdout)
    assert report["preprocess"] == "checkpoint"
    resized = report["resized"]
    assert resized["processor_grid"] == [27, 27] and resized["patch_grid"] == [28, 28] and resized["made_even"]
    assert resized["size"] == [392, 392]
    human = cli("check-grid", "--tower", str(folder), "--preprocess", "checkpoint", "600x800")
    assert "27x27" in human.stdout and "made even" in human.stdout
    # NaFlex defaults to checkpoint; Qwen's min/max pixels are followed, --max-pixels overrides.
    qwen = checkpoint(tmp_path / "qwen", "qwen2_vl", {"min_pixels": 3136, "max_pixels": 12845056}, vision_config={"patch_size": 14})
    report = json.loads(cli("check-grid", "--tower", str(qwen), "1080x1920", "--json").stdout)
    assert report["preprocess"] == "checkpoint" and report["resized"]["patch_grid"] == [78, 138]
    report = json.loads(cli("check-grid", "--tower", str(qwen), "1080x1920", "--max-pixels", str(448 * 448), "--json").stdout)
    assert report["resized"]["patch_grid"][0] * report["resized"]["patch_grid"][1] * 196 <= 448 * 448
    result = cli("check-grid", "--tower", str(folder), "--preprocess", "checkpoint", "600x800", "--max-pixels", "9999")
    assert result.exit_code == 2 and "does not apply" in result.stderr


@pytest.mark.parametrize(
    ("preprocessor", "model_type", "source", "final", "grid", "processor_grid"),
    [
        ({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}, "dinov2", (480, 640), (224, 224), (16, 16), (16, 16)),
        ({"size": {"shortest_edge": 518}, "crop_size": {"height": 518, "width": 518}}, "dinov2", (480, 640), (532, 532), (38, 38), (37, 37)),
        ({"max_num_patches": 256}, "siglip2_vision_model", (1080, 1920), (192, 320), (12, 20), (12, 21)),
        ({"size": {"shortest_edge": 224}, "crop_size": 224}, "clip", (333, 517), (224, 224), (16, 16), (16, 16)),
    ],
)
def test_processor_rules(tmp_path, preprocessor, model_type, source, final, grid, processor_grid):
    patch = 16 if model_type.startswith("siglip2") else 14
    vision = read_checkpoint_vision(str(checkpoint(tmp_path / "m", model_type, preprocessor, patch_size=patch)))
    plan = resize_policy(vision, "checkpoint").plan(*source)
    assert (plan.final_hw, plan.grid, plan.processor_grid) == (final, grid, processor_grid)


def test_even_grid_is_the_smallest_change():
    assert even_grid((27, 27), 2) == (28, 28)
    assert even_grid((12, 21), 2, budget=256) == (12, 20)  # 12x22 would pass the budget
    assert even_grid((1, 35), 2, budget=48) == (2, 34)  # one patch still becomes two
    assert even_grid((16, 16), 2) == (16, 16)


def test_resize_with_crop_takes_the_centre(tmp_path):
    policy = ResizePolicy(rule="shortest_edge", shortest_edge=61, crop=(56, 58))
    plan = policy.plan(150, 200)
    assert plan.resize_hw == (61, 81) and plan.crop == ((61 - 56) // 2, (81 - 58) // 2, 56, 56)


def test_spread_temporal_positions_follow_the_model_card(tmp_path):
    from merge_cli.models.towers.onevision import (
        RotaryTables,
        rotary_angles,
        spread_positions,
    )

    for frames in (1, 3, 16, 64, 100):
        reference = torch.linspace(0, 64 - 1, frames).long()  # the model card's frame_pos
        assert torch.equal(spread_positions(frames, 64), reference)
    # Spread tables are the rows of the full 64-frame table at those frames.
    grid = (5, 2, 4)
    spread = RotaryTables(32, 10000.0, spread_over=64)(grid, torch.device("cpu"))[0]
    full = torch.cat([rotary_angles((64, 2, 4), 32, 10000.0)] * 2, dim=-1).cos().reshape(64, 8, 32)
    assert torch.equal(spread.reshape(5, 8, 32), full[torch.linspace(0, 63, 5).long()])


def test_temporal_positions_are_stored_and_change_video_features(cli, tmp_path):
    from merge_cli.output.reader import open_features

    media = tmp_path / "media"
    make_video(media / "v.mp4", 8, 56, 56, fps=4)
    for mode in ("index", "spread"):
        result = cli("extract", "--input", str(media), "--out", str(tmp_path / f"{mode}.h5"), *CPU, "--temporal-positions", mode)
        assert result.exit_code == 0, result.output
    with open_features(tmp_path / "index.h5") as index, open_features(tmp_path / "spread.h5") as spread:
        assert (index.attrs["temporal_positions"], spread.attrs["temporal_positions"]) == ("index", "spread")
        assert index.attrs["config_hash"] != spread.attrs["config_hash"]
        assert not torch.allclose(index["v.mp4"].tokens[1:], spread["v.mp4"].tokens[1:])
        torch.testing.assert_close(index["v.mp4"].tokens.shape, spread["v.mp4"].tokens.shape)
    # A resume with other preprocessing is refused.
    result = cli("extract", "--input", str(media), "--out", str(tmp_path / "index.h5"), *CPU, "--temporal-positions", "spread")
    assert result.exit_code == 1 and "other settings" in result.stderr


def _features(key, grid, processor_grid):
    from merge_cli.records import Features

    t, h, w = grid
    return Features(
        key, "image", torch.randn(t, h * w // 4, 8), grid, (h * 14, w * 14), (h * 14, w * 14), "pillow",
        processor_grid=processor_grid,
    )


def test_both_grids_are_stored_counted_and_read_from_older_files(cli, tmp_path):
    import h5py

    from merge_cli.output.index import build_index
    from merge_cli.output.reader import open_features
    from merge_cli.output.store import ShardWriter

    out = tmp_path / "feats.h5"
    attrs = {"merge_size": 2, "config_hash": "x", "preprocess": "checkpoint"}
    with ShardWriter(out, attrs, store_dtype="fp32") as writer:
        writer.add(_features("odd.png", (1, 28, 28), (27, 27)))
        writer.add(_features("even.png", (1, 4, 6), None))  # unknown: the grid used
    build_index(out, attrs=attrs)
    with open_features(out) as features:
        assert features["odd.png"].processor_grid == (27, 27) and features["odd.png"].grid_thw == (1, 28, 28)
        assert features["even.png"].processor_grid == (4, 6)
    report = json.loads(cli("inspect", str(out), "--json").stdout)
    assert report["counts"]["made_even"] == 1 and report["attrs"]["preprocess"] == "checkpoint"
    assert "1 grid made even" in cli("inspect", str(out)).stdout
    sample = json.loads(cli("inspect", str(out), "--key", "odd.png", "--json").stdout)
    assert sample["processor_grid"] == [27, 27]
    # A shard written before the column: processor_grid reads as the grid used.
    shard = next((tmp_path / "feats.h5.d").glob("*.h5"))
    with h5py.File(shard, "a") as handle:
        del handle["processor_grid"]
    build_index(out, attrs=attrs)
    with open_features(out) as features, open_features(shard) as alone:
        for opened in (features, alone):
            assert opened["odd.png"].processor_grid == (28, 28)


def test_video_preprocessor_config_sets_qwen_video_rules(tmp_path):
    from merge_cli.media.processor import video_defaults

    folder = checkpoint(tmp_path / "q", "qwen2_vl", {"min_pixels": 3136, "max_pixels": 1003520}, vision_config={"patch_size": 14})
    vision = read_checkpoint_vision(str(folder))
    rules = video_defaults(vision, "checkpoint", 28)
    assert (rules["rule"], rules["fps"], rules["min_frames"], rules["max_frames"], rules["frame_multiple"]) == ("qwen", 2.0, 4, 768, 2)
    assert (rules["min_pixels"], rules["max_pixels"], rules["total_pixels"]) == (128 * 784, 768 * 784, int(128000 * 784 * 0.9))
    assert rules["resizer"] == "torchvision"  # qwen-vl-utils' frames: torchvision's bicubic, not Pillow's
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 3136, "longest_edge": 50176}, "fps": 1.0, "max_frames": 64, "resample": 2}
    ))
    rules = video_defaults(read_checkpoint_vision(str(folder)), "checkpoint", 28)
    assert (rules["fps"], rules["max_frames"], rules["min_pixels"], rules["max_pixels"], rules["resample"]) == (1.0, 64, 3136, 50176, "bilinear")
    assert rules["resizer"] is None  # another filter than bicubic: Pillow with it
    assert video_defaults(vision, "native", 28)["rule"] == "native"
    assert video_defaults(vision, "native", 28)["resizer"] is None


def test_qwen_checkpoint_rules_take_num_frames_in_frame_pairs(tmp_path):
    from merge_cli.config import ExtractConfig, VideoOptions
    from merge_cli.errors import UsageError

    folder = checkpoint(tmp_path / "q", "qwen2_vl", {"min_pixels": 3136, "max_pixels": 1003520}, vision_config={"patch_size": 14})
    vision = read_checkpoint_vision(str(folder))

    def media(num_frames, preprocess=None):
        config = ExtractConfig(("x",), "o.h5", tower=str(folder), preprocess=preprocess, video=VideoOptions(num_frames=num_frames))
        return config.media_options(vision)

    with pytest.raises(UsageError, match="--num-frames 5 is not a multiple of 2: .* give 4 or 6"):
        media(5)
    assert media(6).video.num_frames == 6 and media(6).video.rule == "qwen"
    assert media(5, "native").video.num_frames == 5  # native: the tower repeats the odd last frame


def test_a_resume_with_other_preprocessing_is_refused(cli, tmp_path):
    media = tmp_path / "media"
    make_image(media / "a.png", 100, 150)
    out = str(tmp_path / "feats.h5")
    assert cli("extract", "--input", str(media), "--out", out, *CPU, "--preprocess", "native").exit_code == 0
    result = cli("extract", "--input", str(media), "--out", out, *CPU, "--preprocess", "checkpoint")
    assert result.exit_code == 1 and "media.preprocess" in result.stderr, result.stderr
    summary = json.loads(cli("extract", "--input", str(media), "--out", out, *CPU, "--preprocess", "native", "--json").stdout)
    assert summary["preprocess"] == "native" and summary["skipped"] == 1
