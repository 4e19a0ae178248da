"""The device step: merging per frame, and retrying in halves when the device runs out of memory."""

from __future__ import annotations

import json

import pytest
import torch
from media_factory import make_image

from merge_cli.models.merger import merge_windows
from merge_cli.models.towers import load_tower
from merge_cli.records import Failure, Features, Item
from merge_cli.run.compute import FeatureExtractor


def _item(key: str, frames: int, height: int, width: int) -> Item:
    pixels = torch.randint(0, 256, (frames, 3, height, width), dtype=torch.uint8)
    kind = "image" if frames == 1 else "video"
    return Item(key, kind, pixels, (height, width), (height, width), "test")


class MemoryLimitedTower(torch.nn.Module):
    """Wraps a tower and raises the device's out-of-memory error above a token budget."""

    def __init__(self, tower, max_tokens: int):
        super().__init__()
        self.inner = tower
        self.max_tokens = max_tokens
        self.calls: list[int] = []
        for name in ("name", "kind", "patch_size", "hidden_size", "image_mean", "image_std", "content_hash", "is_demo"):
            setattr(self, name, getattr(tower, name))
        self.temporal_patch_size = 1

    def feature_grid(self, frames, height, width):
        return self.inner.feature_grid(frames, height, width)

    def forward(self, pixels):
        tokens = sum(p.shape[0] * (p.shape[2] // 14) * (p.shape[3] // 14) for p in pixels)
        self.calls.append(len(pixels))
        if tokens > self.max_tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(pixels)


def _extractor(tower) -> FeatureExtractor:
    return FeatureExtractor(
        tower, None, merge_size=2, device=torch.device("cpu"), compute_dtype="fp32", store_dtype="fp32"
    )


def test_out_of_memory_retries_in_halves_and_isolates_the_sample_that_never_fits():
    demo = load_tower("demo")
    limited = MemoryLimitedTower(demo, max_tokens=300)
    items = [_item(f"small{i}", 1, 112, 112) for i in range(6)]  # 64 tokens each
    items.insert(3, _item("huge", 1, 280, 280))  # 400 tokens: never fits
    results = _extractor(limited).extract(items).wait()
    assert [r.key for r in results] == [i.key for i in items]  # order kept
    failures = [r for r in results if isinstance(r, Failure)]
    assert [(f.key, f.stage, f.error_type) for f in failures] == [("huge", "tower", "OutOfMemoryError")]
    assert len(limited.calls) > 3  # it really split
    reference = _extractor(demo)
    for item, result in zip(items, results):
        if isinstance(result, Features):
            expected = reference.extract([item]).wait()[0].tokens
            torch.testing.assert_close(result.tokens, expected, rtol=1e-5, atol=1e-5)


def test_other_errors_are_not_mistaken_for_out_of_memory():
    class Broken(MemoryLimitedTower):
        def forward(self, pixels):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        _extractor(Broken(load_tower("demo"), 0)).extract([_item("a", 1, 56, 56)])


def test_video_frames_are_merged_one_by_one():
    demo = load_tower("demo")
    item = _item("clip", 3, 56, 84)
    result = _extractor(demo).extract([item]).wait()[0]
    assert result.grid_thw == (3, 4, 6)
    assert tuple(result.tokens.shape) == (3, 6, 4 * demo.hidden_size)
    from merge_cli.media.images import normalize

    with torch.no_grad():
        features = demo([normalize(item.pixels, demo.image_mean, demo.image_std)])[0]
    expected = merge_windows(features.reshape(3, 24, -1), 4, 6)
    torch.testing.assert_close(result.tokens, expected, rtol=1e-5, atol=1e-5)


def test_an_input_too_large_for_memory_becomes_an_error_record(cli, tmp_path, monkeypatch):
    import merge_cli.models.towers

    real_load = merge_cli.models.towers.load_tower
    monkeypatch.setattr(merge_cli.models.towers, "load_tower", lambda *a, **k: MemoryLimitedTower(real_load(*a, **k), 500))
    make_image(tmp_path / "in" / "small.png", 112, 112)
    make_image(tmp_path / "in" / "big.png", 448, 448)  # 1,024 tokens
    result = cli("extract", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "f.h5"), "--device", "cpu", "--workers", "0", "--json")
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["written"] == 1
    assert summary["failures"][0]["key"] == "big.png" and summary["failures"][0]["error_type"] == "OutOfMemoryError"
