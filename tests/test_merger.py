"""SpatialMergeProjector: window order, reference agreement, errors, and checkpoint loading."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from merge_cli.errors import CheckpointError, GridError
from merge_cli.models.merger import (
    PROJECTOR_KEYS,
    SpatialMergeProjector,
    load_projector,
    merge_windows,
)

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fp32 against a plain-loop reference


def test_window_order_on_a_hand_computed_example():
    # A 2x4 grid of one-channel tokens numbered in raster order:
    #   0 1 2 3
    #   4 5 6 7
    tokens = torch.arange(8.0).reshape(1, 8, 1)
    merged = merge_windows(tokens, height=2, width=4)
    assert merged.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7]]]
    # The tempting shortcut merges 1x4 strips, which is wrong:
    assert tokens.view(1, -1, 4).tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7]]]
    assert not torch.equal(merged, tokens.view(1, -1, 4))


def test_window_order_keeps_channels_together():
    # Token i carries channels (i, 100 + i): each merged vector is TL, TR, BL, BR, channel-major per token.
    index = torch.arange(16.0)
    tokens = torch.stack([index, 100 + index], dim=-1).reshape(1, 16, 2)  # 4x4 grid, C = 2
    merged = merge_windows(tokens, 4, 4)
    assert merged.shape == (1, 4, 8)
    assert merged[0, 1].tolist() == [2, 102, 3, 103, 6, 106, 7, 107]  # window at row 0, column 1
    assert merged[0, 2].tolist() == [8, 108, 9, 109, 12, 112, 13, 113]  # window at row 1, column 0


def _reference_projection(module: SpatialMergeProjector, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Slow, obvious projector: loop over windows, LayerNorm and MLP written out by hand."""
    ln_w, ln_b = module.ln_q.weight, module.ln_q.bias
    w0, b0 = module.mlp[0].weight, module.mlp[0].bias
    w2, b2 = module.mlp[2].weight, module.mlp[2].bias
    eps = module.ln_q.eps
    batch, _, channels = x.shape
    out = []
    for b in range(batch):
        grid = x[b].reshape(height, width, channels)
        rows = []
        for i in range(0, height, 2):
            for j in range(0, width, 2):
                parts = []
                for token in (grid[i, j], grid[i, j + 1], grid[i + 1, j], grid[i + 1, j + 1]):
                    mean = token.mean()
                    var = ((token - mean) ** 2).mean()
                    parts.append((token - mean) / torch.sqrt(var + eps) * ln_w + ln_b)
                hidden = torch.cat(parts) @ w0.T + b0
                hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
                rows.append(hidden @ w2.T + b2)
        out.append(torch.stack(rows))
    return torch.stack(out)


def _randomized(module: SpatialMergeProjector) -> SpatialMergeProjector:
    # LayerNorm starts as the identity: give it random affine parameters so they are tested.
    with torch.no_grad():
        module.ln_q.weight.normal_(1.0, 0.3)
        module.ln_q.bias.normal_(0.0, 0.3)
    return module.eval()


@pytest.mark.parametrize(("height", "width"), [(4, 4), (2, 6), (6, 4)])
def test_projector_matches_reference(height, width):
    module = _randomized(SpatialMergeProjector(llm_dim=12, vit_dim=8))
    x = torch.randn(2, height * width, 8)
    with torch.no_grad():
        got = module(x, height=height, width=width)
        expected = _reference_projection(module, x, height, width)
    assert got.shape == (2, height * width // 4, 12)
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_guide_shapes():
    module = SpatialMergeProjector(llm_dim=16, vit_dim=8)
    with torch.no_grad():
        assert module(torch.randn(1, 18 * 32, 8), height=18, width=32).shape == (1, 144, 16)
        assert module(torch.randn(1, 14 * 28, 8), height=14, width=28).shape == (1, 98, 16)
        assert module(torch.randn(1, 32 * 32, 8)).shape == (1, 256, 16)


def test_explicit_and_inferred_grids():
    module = _randomized(SpatialMergeProjector(llm_dim=6, vit_dim=4))
    x = torch.randn(1, 16 * 16, 4)
    with torch.no_grad():
        torch.testing.assert_close(module(x), module(x, height=16, width=16), rtol=0, atol=0)
        # Inference guesses the squarest grid: for an 8x32 feature map it guesses 16x16, so the
        # windows (and the output) differ. This is why explicit sizes are recommended.
        x_wide = torch.randn(1, 8 * 32, 4)
        assert not torch.allclose(module(x_wide), module(x_wide, height=8, width=32))


def test_error_messages():
    module = SpatialMergeProjector(llm_dim=6, vit_dim=4)
    with pytest.raises(GridError, match=r"Height 4 \* Width 5 != N 24"):
        module(torch.randn(1, 24, 4), height=4, width=5)
    with pytest.raises(GridError, match=r"Grid size \(3, 8\) not divisible by merge_size 2"):
        module(torch.randn(1, 24, 4), height=3, width=8)
    with pytest.raises(GridError, match="Cannot find valid H, W factors for N=14 divisible by merge_size=2"):
        module(torch.randn(1, 14, 4))
    with pytest.raises(GridError, match="both height and width"):
        module(torch.randn(1, 16, 4), height=4)


def test_state_dict_keys():
    assert tuple(SpatialMergeProjector(llm_dim=6, vit_dim=4).state_dict()) == PROJECTOR_KEYS
    assert PROJECTOR_KEYS == ("ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")


def test_merged_only_is_pre_layernorm_and_projects_back():
    module = _randomized(SpatialMergeProjector(llm_dim=10, vit_dim=4))
    x = torch.randn(3, 4 * 6, 4)
    with torch.no_grad():
        merged = module(x, height=4, width=6, merged_only=True)
        assert merged.shape == (3, 6, 16)
        torch.testing.assert_close(merged, merge_windows(x, 4, 6), rtol=0, atol=0)
        torch.testing.assert_close(module.project_merged(merged), module(x, height=4, width=6), **TOLERANCE)


def _trained(vit_dim=4, llm_dim=10) -> SpatialMergeProjector:
    module = _randomized(SpatialMergeProjector(llm_dim=llm_dim, vit_dim=vit_dim))
    return module


def _assert_same_function(a: SpatialMergeProjector, b: SpatialMergeProjector):
    x = torch.randn(2, 36, a.vit_dim)
    with torch.no_grad():
        torch.testing.assert_close(a(x, height=6, width=6), b(x, height=6, width=6), rtol=0, atol=0)


def test_load_llava_bin_with_prefix_and_other_weights(tmp_path):
    module = _trained()
    state = {f"model.mm_projector.{k}": v for k, v in module.state_dict().items()}
    state["model.layers.0.self_attn.q_proj.weight"] = torch.randn(4, 4)  # the rest of the LLM
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)
    loaded = load_projector(path)
    assert (loaded.vit_dim, loaded.llm_dim, loaded.spatial_merge_size) == (4, 10, 2)
    _assert_same_function(module, loaded)


@pytest.mark.parametrize("prefix", ["", "mm_projector.", "model.visual.merger.", "visual.merger."])
def test_load_safetensors(tmp_path, prefix):
    module = _trained(vit_dim=6, llm_dim=7)
    path = tmp_path / "projector.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    _assert_same_function(module, load_projector(path))


def test_load_from_checkpoint_folder(tmp_path):
    module = _trained()
    state = {f"model.mm_projector.{k}": v.to(torch.bfloat16) for k, v in module.state_dict().items()}
    save_file(dict(list(state.items())[:3]), str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(dict(list(state.items())[3:]), str(tmp_path / "model-00002-of-00002.safetensors"))
    loaded = load_projector(tmp_path)
    assert loaded.mlp[0].weight.dtype == torch.float32
    torch.testing.assert_close(loaded.mlp[0].weight, module.mlp[0].weight.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    state = {f"mm_projector.{k}": v for k, v in _trained().state_dict().items()}
    del state["mm_projector.mlp.2.bias"]
    state["mm_projector.mlp.4.weight"] = torch.randn(2, 2)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing mm_projector\.mlp\.2\.bias; unexpected mm_projector\.mlp\.4\.weight"):
        load_projector(path)

    state = {k: v for k, v in _trained().state_dict().items()}
    state["mlp.0.bias"] = torch.randn(5)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"mlp\.0\.bias \(5,\) \(expected \(16,\)\)"):
        load_projector(path)

    save_file({"something.else": torch.randn(3)}, str(path))
    with pytest.raises(CheckpointError, match="missing ln_q.weight"):
        load_projector(path)


class _Exploit:
    """Unpickling this object would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mm_projector.bin"
    state = {f"model.mm_projector.{k}": v for k, v in _trained().state_dict().items()}
    state["payload"] = _Exploit(marker)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="never executes pickled code"):
        load_projector(path)
    assert not marker.exists()
    # Sanity check that the payload is real: an unsafe load would have run it.
    with open(path, "rb") as handle:
        assert b"system" in handle.read()


def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "projector.pt"
    with open(path, "wb") as handle:
        pickle.dump({"ln_q.weight": [1.0, 2.0]}, handle)
    with pytest.raises(CheckpointError):
        load_projector(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_projector(tmp_path / "nope.safetensors")
