"""Towers without transformers: the native OneVision encoder, the demo tower, loading and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tower_factory import (
    onevision_config,
    onevision_shapes,
    pixels,
    random_onevision_state,
    save_onevision,
)

from merge_cli.errors import CheckpointError, GridError, UsageError
from merge_cli.hashing import hash_state_dict
from merge_cli.models.towers import Tower, load_tower
from merge_cli.models.towers.demo import DEMO_CONFIG, demo_state_dict
from merge_cli.models.towers.onevision import (
    AttentionGroup,
    OneVisionConfig,
    OneVisionLayer,
    RotaryTables,
    apply_rotary,
    rotary_angles,
    rotate_pairs,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# A slow reference written from the architecture description: plain matmuls, explicit softmax,
# explicit rotary from the formula, one sample at a time.


def ref_norm(x, state, name, config):
    eps = config["layer_norm_eps"]
    if config["layer_norm_type"] == "rms_norm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * state[f"{name}.weight"]
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * state[f"{name}.weight"] + state[f"{name}.bias"]


def ref_gelu(x, name):
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    assert name == "gelu_pytorch_tanh"
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_angles(grid, head_dim, theta):
    """(L, head_dim) angles: per token [t * f_t, h * f_h, w * f_w] duplicated by concatenation."""
    t_n, h_n, w_n = grid
    unit = head_dim // 2 // 16
    sizes = (4 * unit, 6 * unit, 6 * unit)
    inv = [[1.0 / theta ** (j / n) for j in range(n)] for n in sizes]
    rows = []
    for t in range(t_n):
        for h in range(h_n):
            for w in range(w_n):
                half = [t * f for f in inv[0]] + [h * f for f in inv[1]] + [w * f for f in inv[2]]
                rows.append(half + half)
    return torch.tensor(rows, dtype=torch.float64)


def ref_rotate(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...), written out pair by pair."""
    out = torch.empty_like(x)
    for i in range(0, x.shape[-1], 2):
        out[..., i] = -x[..., i + 1]
        out[..., i + 1] = x[..., i]
    return out


def ref_block(x, state, i, config, angles):
    """One pre-norm block on one sample's tokens x (L, C)."""
    layer = f"encoder.layers.{i}"
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    length = x.shape[0]

    def linear(v, name):
        return v @ state[f"{layer}.{name}.weight"].T + state[f"{layer}.{name}.bias"]

    y = ref_norm(x, state, f"{layer}.layer_norm1", config)
    q, k, v = (linear(y, f"self_attn.{p}").reshape(length, heads, head_dim) for p in ("q_proj", "k_proj", "v_proj"))
    cos, sin = angles.cos().to(x.dtype)[:, None, :], angles.sin().to(x.dtype)[:, None, :]
    q = q * cos + ref_rotate(q) * sin
    k = k * cos + ref_rotate(k) * sin
    outs = []
    for head in range(heads):
        scores = q[:, head] @ k[:, head].T / math.sqrt(head_dim)
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        weights = weights / weights.sum(-1, keepdim=True)
        outs.append(weights @ v[:, head])
    x = x + linear(torch.cat(outs, dim=-1), "self_attn.out_proj")
    y = ref_norm(x, state, f"{layer}.layer_norm2", config)
    return x + linear(ref_gelu(linear(y, "mlp.fc1"), config["hidden_act"]), "mlp.fc2")


def ref_forward(sample, state, config, num_blocks):
    """hidden_states[num_blocks] of one (T, 3, H, W) sample, tokens raster (t, h, w)."""
    weight = state["embeddings.patch_embedding.weight"]
    p = config["patch_size"]
    embedded = torch.nn.functional.conv2d(sample, weight, stride=p)  # (T, C, h, w), frame by frame
    t, c, h, w = embedded.shape
    x = embedded.permute(0, 2, 3, 1).reshape(t * h * w, c)
    x = ref_norm(x, state, "layernorm_pre", config)
    angles = ref_angles((t, h, w), c // config["num_attention_heads"], config["rope_theta"])
    for i in range(num_blocks):
        x = ref_block(x, state, i, config, angles)
    return x


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny OneVision folder and its weights."""
    config = onevision_config()
    state = random_onevision_state(config)
    return save_onevision(tmp_path / "ov-tiny", config, state), config, state


# ---------------------------------------------------------------------------------------------
# Rotary embedding


def test_rotary_angles_match_a_hand_computed_case():
    # head_dim 32 -> 16 frequencies: t gets 4, h and w 6 each. theta 100 keeps the numbers short.
    angles = rotary_angles((2, 2, 3), head_dim=32, theta=100.0)
    assert angles.shape == (2 * 2 * 3, 16) and angles.dtype == torch.float32
    inv_t = [1.0, 100 ** -0.25, 0.1, 100 ** -0.75]  # 1 / 100**(j/4)
    inv_h = [100 ** (-j / 6) for j in range(6)]  # 1, 0.4641589, 0.2154435, 0.1, 0.0464159, 0.0215443
    assert inv_h[1] == pytest.approx(0.46415888, rel=1e-7)
    token = 1 * (2 * 3) + 1 * 3 + 2  # (t=1, h=1, w=2) in raster order
    expected = [1 * f for f in inv_t] + [1 * f for f in inv_h] + [2 * f for f in inv_h]
    torch.testing.assert_close(angles[token], torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    assert torch.equal(angles[0], torch.zeros(16))  # the origin is not rotated
    torch.testing.assert_close(angles[3], torch.tensor([0.0] * 4 + inv_h + [0.0] * 6), rtol=1e-6, atol=0)  # (0, 1, 0)


def test_rotary_angles_equal_the_reference_for_video_grids():
    for grid in [(1, 2, 4), (3, 4, 2), (5, 1, 1)]:
        got = rotary_angles(grid, head_dim=64, theta=10000.0)
        want = ref_angles(grid, 64, 10000.0)[:, :32]
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_rotary_tables_duplicate_by_concatenation_and_are_cached():
    tables = RotaryTables(head_dim=32, theta=10000.0)
    cos, sin = tables((2, 3, 4), torch.device("cpu"))
    assert cos.shape == sin.shape == (24, 32) and cos.dtype == torch.float32
    assert torch.equal(cos[:, :16], cos[:, 16:]) and torch.equal(sin[:, :16], sin[:, 16:])
    angles = rotary_angles((2, 3, 4), 32, 10000.0)
    assert torch.equal(cos[:, :16], angles.cos()) and torch.equal(sin[:, :16], angles.sin())
    assert tables((2, 3, 4), torch.device("cpu"))[0] is cos  # computed once per grid


def test_rotation_is_interleaved_pairs():
    x = torch.arange(8.0)
    assert rotate_pairs(x).tolist() == [-1.0, 0.0, -3.0, 2.0, -5.0, 4.0, -7.0, 6.0]
    y = torch.randn(3, 5, 32)
    torch.testing.assert_close(rotate_pairs(y), ref_rotate(y), rtol=0, atol=0)
    # A pair whose two angles are equal turns like a 2D rotation by that angle.
    theta = 0.7
    cos, sin = torch.full((2,), math.cos(theta)), torch.full((2,), math.sin(theta))
    rotated = apply_rotary(torch.tensor([1.0, 0.0]), cos, sin)
    torch.testing.assert_close(rotated, torch.tensor([math.cos(theta), math.sin(theta)]))


# ---------------------------------------------------------------------------------------------
# One block against the slow reference


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_one_block_matches_slow_reference(norm, act):
    config = onevision_config(layer_norm_type=norm, hidden_act=act, num_hidden_layers=1)
    state = random_onevision_state(config)
    block = OneVisionLayer(OneVisionConfig.from_dict(config))
    prefix = "encoder.layers.0."
    block.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    grid = (2, 3, 4)
    tokens = math.prod(grid)
    x = torch.randn(2 * tokens, 64)  # two samples of the same grid, batched in one group
    tables = RotaryTables(32, config["rope_theta"])
    cos, sin = tables(grid, x.device)
    with torch.no_grad():
        got = block(x, [AttentionGroup(2, tokens, cos, sin)])
    angles = ref_angles(grid, 32, config["rope_theta"])
    for sample in range(2):
        rows = slice(sample * tokens, (sample + 1) * tokens)
        want = ref_block(x[rows], state, 0, config, angles)
        torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A checkpoint folder through load_tower


def test_loads_and_matches_reference_on_images_and_videos(checkpoint):
    folder, config, state = checkpoint
    tower = load_tower(str(folder))
    assert isinstance(tower, Tower)
    assert (tower.kind, tower.name, tower.is_demo) == ("onevision", "onevision_encoder:ov-tiny", False)
    assert (tower.patch_size, tower.hidden_size, tower.temporal_patch_size) == (14, 64, 1)
    assert (tower.image_mean, tower.image_std) == (CLIP_MEAN, CLIP_STD)
    assert not any(p.is_meta for p in tower.parameters())
    samples = [pixels(1, 28, 56), pixels(3, 42, 28), pixels(1, 56, 14), pixels(2, 28, 56), pixels(1, 28, 56)]
    with torch.no_grad():
        features = tower(samples)
    for sample, got in zip(samples, features):
        t, h, w = sample.shape[0], sample.shape[2] // 14, sample.shape[3] // 14
        assert tower.feature_grid(*sample.shape[:1], *sample.shape[2:]) == (t, h, w)
        assert got.shape == (t * h * w, 64) and got.dtype == torch.float32
        torch.testing.assert_close(got, ref_forward(sample, state, config, 2), rtol=1e-5, atol=1e-5)


def test_equal_size_samples_in_one_call_equal_each_alone(checkpoint):
    tower = load_tower(str(checkpoint[0]))
    a, b, odd = pixels(1, 42, 70), pixels(1, 42, 70), pixels(2, 28, 28)
    with torch.no_grad():
        together = tower([a, odd, b])
        alone = [tower([x])[0] for x in (a, odd, b)]
    for got, want in zip(together, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0], together[2])  # different images, different features


@settings(max_examples=15, deadline=None)
@given(grids=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=5))
def test_any_mix_of_grids_in_one_call_equals_each_alone(grids):
    tower = _demo_tower()
    samples = [pixels(t, 14 * h, 14 * w) for t, h, w in grids]
    with torch.no_grad():
        together = tower(samples)
        for (t, h, w), sample, got in zip(grids, samples, together):
            assert got.shape == (t * h * w, 64)
            torch.testing.assert_close(got, tower([sample])[0], rtol=1e-5, atol=1e-5)


_DEMO = []


def _demo_tower():
    if not _DEMO:
        _DEMO.append(load_tower("demo"))
    return _DEMO[0]


def test_video_frames_attend_to_each_other(checkpoint):
    """A video is one sequence: frame 0's features depend on frame 1 (not encoded frame by frame)."""
    tower = load_tower(str(checkpoint[0]))
    video = pixels(2, 28, 28)
    with torch.no_grad():
        joint = tower([video])[0][:4]
        first_alone = tower([video[:1]])[0]
    assert not torch.allclose(joint, first_alone, atol=1e-4)


@pytest.mark.parametrize("layer, blocks", [(-1, 2), (-2, 1), (-3, 0), (0, 0), (1, 1), (2, 2)])
def test_layer_selects_the_hidden_state(checkpoint, layer, blocks):
    folder, config, state = checkpoint
    tower = load_tower(str(folder), layer=layer)
    assert tower.layer == layer and len(tower.encoder.layers) == blocks  # only the needed blocks run
    sample = pixels(2, 28, 42)
    with torch.no_grad():
        got = tower([sample])[0]
    torch.testing.assert_close(got, ref_forward(sample, state, config, blocks), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [3, -4, 100])
def test_layer_out_of_range_is_refused(checkpoint, layer):
    with pytest.raises(UsageError, match=r"--layer .* out of range .* 2 layers"):
        load_tower(str(checkpoint[0]), layer=layer)


def test_content_hash_follows_weights_and_layer(tmp_path, checkpoint):
    folder, config, state = checkpoint
    first, again, other_layer = load_tower(str(folder)), load_tower(str(folder)), load_tower(str(folder), layer=-2)
    assert first.content_hash == again.content_hash != other_layer.content_hash
    assert load_tower(str(folder), layer=2).content_hash == first.content_hash  # 2 and -1 are the same state
    changed = dict(state)
    changed["encoder.layers.1.mlp.fc2.bias"] = state["encoder.layers.1.mlp.fc2.bias"] + 1e-3
    assert load_tower(str(save_onevision(tmp_path / "changed", config, changed))).content_hash != first.content_hash


def test_pooling_head_and_post_norm_are_loaded_without_error_and_ignored(tmp_path, checkpoint):
    folder, config, state = checkpoint
    with_head = {**random_onevision_state(onevision_config(use_head=True), with_head=True), **state}
    headed = save_onevision(tmp_path / "headed", onevision_config(use_head=True), with_head)
    sample = pixels(1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_tower(str(headed))([sample])[0], load_tower(str(folder))([sample])[0])


def test_bfloat16_weights_load_as_float32_and_compute_the_same(tmp_path, checkpoint):
    _, config, state = checkpoint
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    tower = load_tower(str(save_onevision(tmp_path / "bf16", config, bf16, dtype=torch.bfloat16)))
    assert tower.embeddings.patch_embedding.weight.dtype == torch.float32
    sample = pixels(1, 28, 42)
    rounded = {k: v.float() for k, v in bf16.items()}
    with torch.no_grad():
        torch.testing.assert_close(tower([sample])[0], ref_forward(sample, rounded, config, 2), rtol=1e-5, atol=1e-5)


def test_module_casts_to_bfloat16_and_runs_under_autocast(checkpoint):
    tower = load_tower(str(checkpoint[0]))
    samples = [pixels(1, 28, 56), pixels(2, 28, 28)]
    with torch.no_grad():
        reference = tower(samples)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = tower([s.to(torch.bfloat16) for s in samples])
        casted = tower.to(torch.bfloat16)([s.to(torch.bfloat16) for s in samples])
    for want, got_a, got_c in zip(reference, autocast, casted):
        assert got_c.dtype == torch.bfloat16
        torch.testing.assert_close(got_a.float(), want, rtol=0.1, atol=0.1)
        torch.testing.assert_close(got_c.float(), want, rtol=0.1, atol=0.1)


def test_gradients_flow_after_an_inference_mode_call(checkpoint):
    """The cached rotary tables made under inference_mode do not break a later autograd call."""
    tower = load_tower(str(checkpoint[0]))
    sample = pixels(1, 28, 28)
    with torch.inference_mode():
        tower([sample])
    sample.requires_grad_(True)
    tower([sample])[0].square().sum().backward()
    assert sample.grad is not None and torch.isfinite(sample.grad).all()


def test_preprocessor_config_sets_normalization(tmp_path):
    folder = save_onevision(tmp_path / "siglip-norm", preprocessor={"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5] * 3})
    tower = load_tower(str(folder))
    assert tower.image_mean == (0.5, 0.5, 0.5) and tower.image_std == (0.5, 0.5, 0.5)
    bad = save_onevision(tmp_path / "bad-norm", preprocessor={"image_mean": [0.5, 0.5], "image_std": [0.5] * 3})
    with pytest.raises(CheckpointError, match="image_mean must be three numbers"):
        load_tower(str(bad))


def test_grids_that_are_not_whole_patches_are_refused(checkpoint):
    tower = load_tower(str(checkpoint[0]))
    with pytest.raises(GridError, match="multiples of 14"):
        tower.feature_grid(1, 30, 28)
    with pytest.raises(GridError, match="multiples of 14"):
        tower([pixels(1, 28, 29)])
    with pytest.raises(GridError, match=r"\(T, 3, H, W\)"):
        tower([torch.randn(3, 28, 28)])
    assert tower([]) == []


# ---------------------------------------------------------------------------------------------
# Clear errors for unusable folders, before any media is read


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path, checkpoint):
    _, config, state = checkpoint
    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing encoder\.layers\.1\.self_attn\.k_proj\.weight"):
        load_tower(str(save_onevision(tmp_path / "missing", config, missing)))
    extra = {**state, "encoder.layers.2.mlp.fc1.weight": torch.randn(96, 64)}
    with pytest.raises(CheckpointError, match=r"unexpected encoder\.layers\.2\.mlp\.fc1\.weight"):
        load_tower(str(save_onevision(tmp_path / "extra", config, extra)))
    misshaped = {**state, "encoder.layers.0.mlp.fc1.weight": torch.randn(95, 64)}
    with pytest.raises(CheckpointError, match=r"mis-shaped encoder\.layers\.0\.mlp\.fc1\.weight \(95, 64\) \(expected \(96, 64\)\)"):
        load_tower(str(save_onevision(tmp_path / "misshaped", config, misshaped)))
    # A config that does not describe the tensors: every block's MLP is the wrong width.
    with pytest.raises(CheckpointError, match="weights do not match the config: mis-shaped"):
        load_tower(str(save_onevision(tmp_path / "wrong-config", onevision_config(intermediate_size=128), state)))


def test_checkpoint_names_are_the_published_ones(checkpoint):
    tower = load_tower(str(checkpoint[0]), layer=-1)
    assert set(tower.state_dict()) == set(onevision_shapes(onevision_config()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported; use one of gelu, gelu_pytorch_tanh"),
        ({"layer_norm_type": "batch_norm"}, "layer_norm_type 'batch_norm' is not supported"),
        ({"num_attention_heads": 4}, "head_dim 16 .* must be a multiple of 32"),
        ({"hidden_size": 65}, "hidden_size 65 is not divisible by num_attention_heads 2"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"num_channels": 4}, "num_channels must be 3"),
    ],
)
def test_unusable_configs_are_refused(tmp_path, overrides, message):
    folder = save_onevision(tmp_path / "bad", onevision_config(**overrides), random_onevision_state(onevision_config()))
    with pytest.raises(CheckpointError, match=message):
        load_tower(str(folder))


def test_unusable_folders_get_one_clear_error(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="tower checkpoint not found"):
        load_tower(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="is a file"):
        load_tower(str(checkpoint[0] / "config.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_tower(str(tmp_path / "empty"))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(onevision_config()))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors or \*\.bin weight files"):
        load_tower(str(no_weights))
    (no_weights / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_tower(str(no_weights))
    (no_weights / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(CheckpointError, match="no \"model_type\""):
        load_tower(str(no_weights))
    (no_weights / "model.safetensors").write_bytes(b"not a safetensors file")
    (no_weights / "config.json").write_text(json.dumps(onevision_config()))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_tower(str(no_weights))


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'; merge-cli supports .*onevision_encoder"):
        load_tower(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "my_vit", "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(CheckpointError, match="runs only with --trust-remote-code"):
        load_tower(str(folder))


def test_hf_towers_say_how_to_install_transformers(tmp_path, monkeypatch):
    folder = tmp_path / "siglip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the [hf] extra were not installed
    with pytest.raises(CheckpointError, match=r"needs transformers: pip install 'merge-cli\[hf\]'"):
        load_tower(str(folder))


# ---------------------------------------------------------------------------------------------
# The demo tower


def test_demo_tower_is_the_default_and_says_what_it_is():
    tower = load_tower()
    assert (tower.name, tower.kind, tower.is_demo) == ("demo", "demo", True)
    assert (tower.patch_size, tower.hidden_size, tower.temporal_patch_size) == (14, 64, 1)
    assert tower.describe()["is_demo"] is True
    assert OneVisionConfig.from_dict({}).patch_size == 16 != DEMO_CONFIG.patch_size  # code default vs demo


def test_demo_features_are_not_degenerate():
    tower = load_tower("demo")
    a, b = pixels(1, 56, 84), pixels(1, 56, 84)
    with torch.no_grad():
        fa, fb = tower([a, b])
    assert fa.shape == (4 * 6, 64) and torch.isfinite(fa).all()
    assert fa.std() > 0.1 and (fa - fb).abs().mean() > 0.1  # depends on the pixels
    assert (fa[0] - fa[1]).abs().mean() > 0.01  # tokens differ from each other


# Pinned: a change here means the demo weights changed (a new platform, torch or generator).
DEMO_WEIGHTS_HASH = "078ccf65aeff9155"


def test_demo_weights_are_bit_identical_across_processes():
    here = hash_state_dict(demo_state_dict())
    code = (
        "from merge_cli.hashing import hash_state_dict\n"
        "from merge_cli.models.towers.demo import demo_state_dict\n"
        "print(hash_state_dict(demo_state_dict()))\n"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert other.stdout.strip() == here
    assert here == DEMO_WEIGHTS_HASH
    state = demo_state_dict()
    weight = state["encoder.layers.0.self_attn.q_proj.weight"]
    assert weight.dtype == torch.float32 and 0.015 < weight.std() < 0.025  # std 0.02, like HF init
    assert torch.equal(state["layernorm_pre.weight"], torch.ones(64))
