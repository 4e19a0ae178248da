"""CUDA paths (pinned staging, asynchronous copies back, autocast): run only where a GPU is.

Skipped on machines without CUDA (CI has none); a session with a GPU runs them with
`python -m pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from merge_cli.models.towers import load_tower
from merge_cli.records import Item
from merge_cli.run.compute import FeatureExtractor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _items() -> list[Item]:
    shapes = [(1, 224, 224), (1, 112, 336), (3, 56, 84), (1, 224, 224)]
    return [
        Item(f"s{i}", "image" if t == 1 else "video", torch.randint(0, 256, (t, 3, h, w), dtype=torch.uint8), (h, w), (h, w), "test")
        for i, (t, h, w) in enumerate(shapes)
    ]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_matches_cpu(dtype):
    items = _items()
    cpu = FeatureExtractor(load_tower("demo"), None, merge_size=2, device=torch.device("cpu"), compute_dtype="fp32", store_dtype="fp32")
    gpu = FeatureExtractor(load_tower("demo"), None, merge_size=2, device=torch.device("cuda"), compute_dtype=dtype, store_dtype="fp32")
    expected = cpu.extract(items).wait()
    got = gpu.extract(items).wait()
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == "fp32" else dict(rtol=5e-2, atol=5e-2)
    for want, have in zip(expected, got):
        assert have.tokens.device.type == "cpu"
        torch.testing.assert_close(have.tokens, want.tokens, **tolerance)


def test_extract_on_cuda(cli, tmp_path):
    import json

    from media_factory import make_image

    for i in range(4):
        make_image(tmp_path / "in" / f"{i}.png", 200 + 28 * i, 300)
    result = cli("extract", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "f.h5"), "--device", "cuda", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["written"] == 4 and summary["compute_dtype"] == "bf16"
