"""End-to-end `merge-cli extract` on generated media with the demo tower.

Each stored tensor is compared with calling the pieces directly (decode -> normalize -> tower ->
merge [-> projector]) on that one sample, in fp32 with tolerance 1e-5: this checks what the
pipeline adds (packing mixed shapes into one pass, ordering, sharding, storage).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from media_factory import make_image, make_video

from merge_cli.config import ExtractConfig
from merge_cli.inputs.sources import collect_samples
from merge_cli.media.images import decode_sample, normalize
from merge_cli.models.merger import merge_windows
from merge_cli.models.towers import load_tower
from merge_cli.output.reader import open_features

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
CPU_FP32 = ["--device", "cpu", "--dtype", "fp32", "--workers", "0"]

IMAGES = {  # key -> (height, width)
    "street.jpg": (300, 500),
    "square.png": (224, 224),
    "nested/thin.png": (150, 400),
    "nested/deeper/tall.jpg": (480, 270),
}
VIDEOS = {"clips/a.mp4": (12, 96, 128), "clips/b.mp4": (9, 120, 160)}  # frames, height, width


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "media"
    for key, (height, width) in IMAGES.items():
        make_image(root / key, height, width)
    for key, (frames, height, width) in VIDEOS.items():
        make_video(root / key, frames, height, width, fps=10)
    return root


def _extract(cli, corpus: Path, out: Path, *extra: str):
    return cli("extract", "--input", str(corpus), "--out", str(out), *CPU_FP32, *extra)


def _expected(corpus: Path, key: str, projector=None, **config) -> torch.Tensor:
    """What extract should store for `key`, computed directly, one sample alone."""
    tower = load_tower("demo")
    media = ExtractConfig(inputs=(str(corpus),), out="unused", **config).media_options(tower.patch_size)
    sample = next(s for s in collect_samples([corpus]).samples if s.key == key)
    item = decode_sample(sample, media)
    with torch.no_grad():
        features = tower([normalize(item.pixels, tower.image_mean, tower.image_std)])[0]
        t, h, w = tower.feature_grid(*item.pixels.shape[:1], *item.pixels.shape[2:])
        frames = features.reshape(t, h * w, -1)
        if projector is None:
            return merge_windows(frames, h, w)
        return projector(frames, height=h, width=w)


def test_merged_output_matches_direct_computation(cli, corpus, tmp_path):
    out = tmp_path / "feats.h5"
    result = _extract(cli, corpus, out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["written"] == len(IMAGES) + len(VIDEOS) and summary["failed"] == 0
    assert summary["tower_is_demo"] is True and summary["output"] == "merged"

    tower = load_tower("demo")
    with open_features(out) as features:
        assert sorted(features.keys()) == sorted([*IMAGES, *VIDEOS])
        for key in IMAGES:
            sample = features[key]
            t, h, w = sample.grid_thw
            assert t == 1 and h % 2 == 0 and w % 2 == 0
            assert tuple(sample.tokens.shape) == (1, h * w // 4, 4 * tower.hidden_size)
            assert tuple(sample.orig_hw) == IMAGES[key]
            assert tuple(sample.resized_hw) == (h * 14, w * 14)
            assert sample.kind == "image"
            torch.testing.assert_close(sample.tokens, _expected(corpus, key), **TOLERANCE)
        for key, (frames, height, width) in VIDEOS.items():
            sample = features[key]
            t, h, w = sample.grid_thw
            assert sample.kind == "video" and t == len(sample.frame_indices) == len(sample.frame_times) >= 4
            assert max(sample.frame_indices) < frames
            assert tuple(sample.orig_hw) == (height, width)
            torch.testing.assert_close(sample.tokens, _expected(corpus, key), **TOLERANCE)
        assert features.attrs["tower"] == "demo" and features.attrs["output"] == "merged"


def test_projected_output_matches_direct_computation(cli, corpus, tmp_path):
    from merge_cli.run.pipeline import random_projector

    out = tmp_path / "feats.h5"
    result = _extract(cli, corpus, out, "--random-projector", "--llm-dim", "48")
    assert result.exit_code == 0, result.output
    tower = load_tower("demo")
    config = ExtractConfig(inputs=(str(corpus),), out="unused", random_projector=True, llm_dim=48)
    projector = random_projector(tower.hidden_size, 48, config)
    with open_features(out) as features:
        assert features.attrs["output"] == "projected"
        for key in [*IMAGES, *VIDEOS]:
            stored = features[key].tokens
            assert stored.shape[-1] == 48
            torch.testing.assert_close(stored, _expected(corpus, key, projector), **TOLERANCE)


def test_projector_checkpoint_and_refusals(cli, corpus, tmp_path):
    from safetensors.torch import save_file

    from merge_cli.models.merger import SpatialMergeProjector

    tower = load_tower("demo")
    projector = SpatialMergeProjector(llm_dim=24, vit_dim=tower.hidden_size)
    with torch.no_grad():
        projector.ln_q.weight.normal_(1, 0.2)
    path = tmp_path / "projector.safetensors"
    save_file({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}, str(path))
    out = tmp_path / "feats.h5"
    assert _extract(cli, corpus, out, "--projector", str(path)).exit_code == 0
    with open_features(out) as features:
        key = "street.jpg"
        torch.testing.assert_close(features[key].tokens, _expected(corpus, key, projector.eval()), **TOLERANCE)
    # Projecting without trained weights is refused unless asked for explicitly.
    refused = _extract(cli, corpus, tmp_path / "other.h5", "--output", "projected")
    assert refused.exit_code == 1 and "--random-projector" in refused.stderr


def test_bf16_storage(cli, corpus, tmp_path):
    out = tmp_path / "feats.h5"
    assert _extract(cli, corpus, out, "--store-dtype", "bf16").exit_code == 0
    with h5py.File(out) as handle:
        assert handle["tokens"].dtype == np.uint16
    with open_features(out) as features:
        sample = features["square.png"]
        assert sample.tokens.dtype == torch.bfloat16
        expected = _expected(corpus, "square.png")
        torch.testing.assert_close(sample.tokens.float(), expected, rtol=1e-2, atol=1e-2)


def test_small_shards_read_back_as_one(cli, corpus, tmp_path):
    one, many = tmp_path / "one.h5", tmp_path / "many.h5"
    assert _extract(cli, corpus, one).exit_code == 0
    assert _extract(cli, corpus, many, "--shard-size", "20kB").exit_code == 0
    with h5py.File(one) as a, h5py.File(many) as b:
        assert b["tokens"].is_virtual
        assert len(b["tokens"].virtual_sources()) > 2
        order_a = {k.decode() if isinstance(k, bytes) else k: i for i, k in enumerate(a["keys"][:])}
        for j, key in enumerate(b["keys"][:]):
            key = key.decode() if isinstance(key, bytes) else key
            i = order_a[key]
            rows_a = a["tokens"][a["offsets"][i] : a["offsets"][i] + a["lengths"][i]]
            rows_b = b["tokens"][b["offsets"][j] : b["offsets"][j] + b["lengths"][j]]
            np.testing.assert_allclose(rows_b, rows_a, rtol=1e-5, atol=1e-5)
    with open_features(many) as features:
        assert len(features) == len(IMAGES) + len(VIDEOS)


def test_exit_codes_and_error_records(cli, corpus, tmp_path):
    (corpus / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (corpus / "notes.txt").write_text("ignored: not media")
    out = tmp_path / "feats.h5"
    result = _extract(cli, corpus, out, "--json")
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["failed"] == 1 and summary["written"] == len(IMAGES) + len(VIDEOS)
    assert summary["ignored_files"] == 1
    assert summary["failures"][0]["key"] == "broken.jpg"
    with h5py.File(out) as handle:
        assert "errors" in handle
    missing_tower = _extract(cli, corpus, tmp_path / "x.h5", "--tower", str(tmp_path / "no-such-tower"))
    assert missing_tower.exit_code == 1
    assert missing_tower.stderr.strip().startswith("merge-cli: error:")
    assert "Traceback" not in missing_tower.output
    assert _extract(cli, corpus, tmp_path / "y.h5", "--size", "450x448").exit_code == 1


def test_strict_stops_at_first_failure(cli, corpus, tmp_path):
    (corpus / "aaa-broken.png").write_bytes(b"")
    result = _extract(cli, corpus, tmp_path / "feats.h5", "--strict", "--json")
    assert result.exit_code == 3
    summary = json.loads(result.stdout)
    assert summary["stopped_early"] is True and summary["failed"] == 1
    assert summary["written"] < len(IMAGES) + len(VIDEOS)


def test_resume_skips_done_and_refuses_other_settings(cli, corpus, tmp_path):
    out = tmp_path / "feats.h5"
    assert _extract(cli, corpus, out).exit_code == 0
    again = _extract(cli, corpus, out, "--json")
    summary = json.loads(again.stdout)
    assert again.exit_code == 0 and summary["skipped"] == len(IMAGES) + len(VIDEOS) and summary["written"] == 0
    refused = _extract(cli, corpus, out, "--layer", "-2")
    assert refused.exit_code == 1
    lines = refused.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("merge-cli: error:"))
    assert "other settings" in lines[start] and "--overwrite" in lines[start]
    assert lines[start + 1 :] == ["  layer: -1 -> -2"]  # not also tower_hash, which covers the layer
    refused = _extract(cli, corpus, out, "--fps", "1", "--max-pixels", "200000")
    assert refused.exit_code == 1
    assert refused.stderr.splitlines()[-2:] == ["  media.policy.max_pixels: 1003520 -> 200000", "  media.video.fps: 2.0 -> 1.0"]
    fresh = _extract(cli, corpus, out, "--layer", "-2", "--overwrite", "--json")
    assert fresh.exit_code == 0 and json.loads(fresh.stdout)["written"] == len(IMAGES) + len(VIDEOS)


def test_failed_keys_stand_on_resume_unless_retry_failed(cli, corpus, tmp_path):
    bad = corpus / "late.png"
    bad.write_bytes(b"garbage")
    out = tmp_path / "feats.h5"
    assert _extract(cli, corpus, out).exit_code == 3
    shards = sorted(p.name for p in (tmp_path / "feats.h5.d").glob("*.h5"))
    make_image(bad, 100, 100)  # fixed now
    again = _extract(cli, corpus, out, "--json")  # an error record is permanent by default...
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["written"] == 0 and summary["skipped"] == len(IMAGES) + len(VIDEOS) + 1
    assert sorted(p.name for p in (tmp_path / "feats.h5.d").glob("*.h5")) == shards  # nothing new written
    with open_features(out) as features:
        assert "late.png" not in features and [f.key for f in features.failures()] == ["late.png"]
    result = _extract(cli, corpus, out, "--retry-failed", "--json")  # ...until asked for
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] == 1
    with open_features(out) as features:
        assert "late.png" in features
        torch.testing.assert_close(features["late.png"].tokens.shape[0], 1)
    report = json.loads(cli("inspect", str(out), "--json").stdout)
    assert report["counts"]["errors"] == 0  # the earlier failure is superseded by the success
    third = _extract(cli, corpus, out, "--retry-failed", "--json")  # nothing failed any more
    assert json.loads(third.stdout)["written"] == 0


def test_json_prints_only_json(cli, corpus, tmp_path):
    result = _extract(cli, corpus, tmp_path / "feats.h5", "--json")
    json.loads(result.stdout)  # nothing else on stdout
    assert result.stderr == ""


@pytest.mark.slow
def test_resume_after_kill_9_matches_a_clean_run(tmp_path):
    root = tmp_path / "many"
    for index in range(120):
        make_image(root / f"img{index:03d}.png", 112 + 28 * (index % 5), 140 + 14 * (index % 7))
    clean, killed = tmp_path / "clean.h5", tmp_path / "killed.h5"
    command = [sys.executable, "-m", "merge_cli", "extract", "--input", str(root), *CPU_FP32, "--batch-tokens", "64"]
    done = subprocess.run([*command, "--out", str(clean)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    # Tiny shards so that several complete while the run goes on; kill as soon as one exists.
    process = subprocess.Popen([*command, "--out", str(killed), "--shard-size", "30kB"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = killed.parent / (killed.name + ".d")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if shards.is_dir() and len(list(shards.glob("*.h5"))) >= 2:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed; make the corpus larger"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    resumed = subprocess.run([*command, "--out", str(killed), "--shard-size", "30kB", "--json"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["skipped"] > 0 and summary["written"] + summary["skipped"] == 120
    with open_features(clean) as a, open_features(killed) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            torch.testing.assert_close(b[key].tokens, a[key].tokens, rtol=1e-6, atol=1e-6)


def test_training_example_reads_the_output(cli, corpus, tmp_path):
    out = tmp_path / "feats.h5"
    assert _extract(cli, corpus, out).exit_code == 0
    example = Path(__file__).parent.parent / "examples" / "train_step.py"
    done = subprocess.run(
        [sys.executable, str(example), str(out), "--workers", "2", "--batch-size", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "output merged" in done.stdout and "step 1:" in done.stdout
