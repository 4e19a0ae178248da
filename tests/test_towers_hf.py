"""Hugging Face towers: tiny random models saved with save_pretrained load through load_tower and
return what transformers itself returns for the same pixels (patch grid only, raster order)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")

from tower_factory import pixels, save_hf  # noqa: E402

from merge_cli.errors import CheckpointError, GridError  # noqa: E402
from merge_cli.models.merger import SpatialMergeProjector  # noqa: E402
from merge_cli.models.towers import load_tower  # noqa: E402

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14)
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)


def hidden_states(model, layer, **inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[layer]


def features(tower, samples):
    with torch.no_grad():
        return tower(samples)


def assert_same(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SigLIP, SigLIP2, CLIP, DINOv2: image towers, video frames encoded one by one


@pytest.mark.parametrize("layer", [-1, -2])
def test_siglip_equals_transformers_at_native_and_other_sizes(tmp_path, layer):
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_VIT, image_size=56)).eval()
    tower = load_tower(str(save_hf(model, tmp_path / "siglip-tiny")), layer=layer)
    assert (tower.kind, tower.name, tower.patch_size, tower.hidden_size) == ("siglip", "siglip:siglip-tiny", 14, 32)
    assert (tower.image_mean, tower.image_std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    native, wide, video = pixels(1, 56, 56), pixels(1, 42, 70), pixels(3, 28, 42)  # 4x4 is native
    got = features(tower, [native, wide, video])
    for sample, out in zip([native, wide, video], got):
        want = hidden_states(model, layer, pixel_values=sample, interpolate_pos_encoding=True)
        assert_same(out, want.reshape(-1, 32))  # frames concatenated in (t, h, w) order
    if layer == -1:  # the features are taken before post_layernorm
        with torch.no_grad():
            last = model(pixel_values=wide, interpolate_pos_encoding=True).last_hidden_state[0]
            assert_same(model.post_layernorm(got[1]), last)


def test_siglip_full_checkpoint_loads_its_vision_tower(tmp_path):
    config = transformers.SiglipConfig(vision_config={**TINY_VIT, "image_size": 56}, text_config=TINY_TEXT)
    model = transformers.SiglipModel(config).eval()
    tower = load_tower(str(save_hf(model, tmp_path / "siglip-full")))
    sample = pixels(1, 28, 56)
    want = hidden_states(model.vision_model, -1, pixel_values=sample, interpolate_pos_encoding=True)
    assert_same(features(tower, [sample])[0], want[0])


def test_siglip2_naflex_equals_transformers_with_processor_patches(tmp_path):
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        convert_image_to_patches,
    )

    config = transformers.Siglip2VisionConfig(**TINY_VIT, num_patches=16)
    model = transformers.Siglip2VisionModel(config).eval()
    tower = load_tower(str(save_hf(model, tmp_path / "siglip2-tiny")), layer=-2)
    assert tower.kind == "siglip2"
    samples = [pixels(1, 42, 70), pixels(2, 56, 28), pixels(1, 42, 70)]
    got = features(tower, samples)
    for sample, out in zip(samples, got):
        frames = []
        for frame in sample:
            patches = torch.from_numpy(convert_image_to_patches(frame.numpy(), 14))[None]  # the processor's layout
            shapes = torch.tensor([[frame.shape[1] // 14, frame.shape[2] // 14]])
            mask = torch.ones(patches.shape[:2], dtype=torch.int32)
            frames.append(hidden_states(model, -2, pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)[0])
        assert_same(out, torch.cat(frames))


@pytest.mark.parametrize("layer", [-1, -2])
def test_clip_drops_cls_and_equals_transformers(tmp_path, layer):
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VIT, image_size=56)).eval()
    tower = load_tower(str(save_hf(model, tmp_path / "clip-tiny")), layer=layer)
    assert (tower.kind, tower.image_mean) == ("clip", (0.48145466, 0.4578275, 0.40821073))
    samples = [pixels(1, 56, 56), pixels(2, 28, 70)]
    for sample, out in zip(samples, features(tower, samples)):
        want = hidden_states(model, layer, pixel_values=sample, interpolate_pos_encoding=True)[:, 1:]
        assert_same(out, want.reshape(-1, 32))


def test_clip_full_checkpoint_loads_its_vision_tower(tmp_path):
    config = transformers.CLIPConfig(vision_config={**TINY_VIT, "image_size": 56}, text_config=TINY_TEXT)
    model = transformers.CLIPModel(config).eval()
    tower = load_tower(str(save_hf(model, tmp_path / "clip-full")))
    sample = pixels(1, 42, 42)
    want = hidden_states(model.vision_model, -1, pixel_values=sample, interpolate_pos_encoding=True)[0, 1:]
    assert_same(features(tower, [sample])[0], want)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_drops_cls_and_registers(tmp_path, registers):
    if registers:
        config = transformers.Dinov2WithRegistersConfig(**TINY_VIT, image_size=56, num_register_tokens=registers)
        model = transformers.Dinov2WithRegistersModel(config).eval()
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY_VIT, image_size=56)).eval()
    tower = load_tower(str(save_hf(model, tmp_path / "dinov2-tiny")))
    assert (tower.kind, tower.image_mean) == ("dinov2", (0.485, 0.456, 0.406))
    samples = [pixels(1, 42, 70), pixels(1, 56, 56)]
    for sample, out in zip(samples, features(tower, samples)):
        want = hidden_states(model, -1, pixel_values=sample)[0, 1 + registers:]
        assert out.shape == want.shape == ((sample.shape[2] // 14) * (sample.shape[3] // 14), 32)
        assert_same(out, want)


def test_image_tower_batches_equal_each_sample_alone(tmp_path):
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_VIT, image_size=56)).eval()
    tower = load_tower(str(save_hf(model, tmp_path / "siglip-tiny")))
    samples = [pixels(1, 28, 56), pixels(2, 42, 42), pixels(1, 28, 56)]
    together = features(tower, samples)
    for sample, out in zip(samples, together):
        assert_same(out, features(tower, [sample])[0])


def test_missing_or_misshaped_tower_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VIT, image_size=56))
    folder = save_hf(model, tmp_path / "clip-broken")
    state = load_file(str(folder / "model.safetensors"))
    name = next(k for k in sorted(state) if "layers.1.mlp.fc2.weight" in k)
    del state[name]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"weights do not match the config: missing .*layers\.1\.mlp\.fc2\.weight"):
        load_tower(str(folder))
    state[name] = torch.zeros(32, 63)  # back, but mis-shaped
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"mis-shaped .*layers\.1\.mlp\.fc2\.weight \(32, 63\) \(expected \(32, 64\)\)"):
        load_tower(str(folder))


def test_layer_out_of_range_is_refused_before_loading(tmp_path):
    model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY_VIT, image_size=56))
    from merge_cli.errors import UsageError

    with pytest.raises(UsageError, match="out of range for a tower with 2 layers"):
        load_tower(str(save_hf(model, tmp_path / "dinov2-tiny")), layer=-4)


# ---------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL: 2x2-window patch order in, raster order out

QWEN_VISION = dict(depth=2, embed_dim=64, hidden_size=48, num_heads=2, patch_size=14, spatial_merge_size=2)
QWEN25_VISION = dict(
    depth=2, hidden_size=64, out_hidden_size=48, intermediate_size=96, num_heads=2, patch_size=14,
    window_size=56, fullatt_block_indexes=[1],
)


def qwen_reference_patches(sample: torch.Tensor, p: int = 14, m: int = 2, tps: int = 2) -> torch.Tensor:
    """Qwen's input layout written out patch by patch: windows, then (C, tps, p, p) per patch."""
    frames = list(sample)
    while len(frames) % tps:
        frames.append(frames[-1])  # Qwen repeats the last frame
    h, w = sample.shape[2] // p, sample.shape[3] // p
    rows = []
    for t in range(len(frames) // tps):
        clip = torch.stack(frames[t * tps:(t + 1) * tps], dim=1)  # (C, tps, H, W)
        for bh in range(h // m):
            for bw in range(w // m):
                for r in range(m):
                    for c in range(m):
                        y, x = (bh * m + r) * p, (bw * m + c) * p
                        rows.append(clip[:, :, y:y + p, x:x + p].reshape(-1))
    return torch.stack(rows)


def window_order_to_raster(tokens: torch.Tensor, grid, m: int = 2) -> torch.Tensor:
    t, h, w = grid
    out = torch.empty_like(tokens)
    index = 0
    for ti in range(t):
        for bh in range(h // m):
            for bw in range(w // m):
                for r in range(m):
                    for c in range(m):
                        out[ti * h * w + (bh * m + r) * w + bw * m + c] = tokens[index]
                        index += 1
    return out


def qwen_grid(sample, p: int = 14, tps: int = 2):
    return (math.ceil(sample.shape[0] / tps), sample.shape[2] // p, sample.shape[3] // p)


def test_qwen_patch_layout_is_the_image_processors(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image = pixels(1, 56, 84)
    want, grid_h, grid_w = Qwen2VLImageProcessorPil().patchify(image[0].numpy(), 14, 2, 2)
    assert (grid_h, grid_w) == (4, 6)
    from merge_cli.models.towers.qwen2_vl import qwen_patches

    assert torch.equal(qwen_patches(image, 14, 2, 2), torch.from_numpy(want))
    assert torch.equal(qwen_patches(image, 14, 2, 2), qwen_reference_patches(image))
    video = pixels(3, 28, 56)
    assert torch.equal(qwen_patches(video, 14, 2, 2), qwen_reference_patches(video))


@pytest.mark.parametrize("layer", [-1, -2])
def test_qwen2_vl_returns_raster_tokens_equal_to_transformers(tmp_path, layer):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
    )

    model = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**QWEN_VISION)).eval()
    tower = load_tower(str(save_hf(model, tmp_path / "qwen2-vl-vision")), layer=layer)
    assert (tower.kind, tower.hidden_size, tower.temporal_patch_size, tower.patch_size) == ("qwen2_vl", 64, 2, 14)
    samples = [pixels(1, 56, 84), pixels(3, 28, 56), pixels(4, 56, 28)]  # an image, odd and even videos
    assert [tower.feature_grid(s.shape[0], *s.shape[2:]) for s in samples] == [(1, 4, 6), (2, 2, 4), (2, 4, 2)]
    got = features(tower, samples)
    grids = [qwen_grid(s) for s in samples]
    with torch.no_grad():
        out = model(
            torch.cat([qwen_reference_patches(s) for s in samples]),
            grid_thw=torch.tensor(grids),
            output_hidden_states=True,
        )
    wants = out.hidden_states[layer].split([math.prod(g) for g in grids])
    for grid, mine, want in zip(grids, got, wants):
        assert mine.shape == (math.prod(grid), 64)
        assert_same(mine, window_order_to_raster(want, grid))
    if layer == -1:
        # Qwen's own merger on its own order == merge-cli's 2x2 merger (same weights) on raster tokens.
        projector = SpatialMergeProjector(llm_dim=48, vit_dim=64).eval()
        projector.load_state_dict(model.merger.state_dict())
        with torch.no_grad():
            merged = [projector(f.reshape(g[0], g[1] * g[2], 64), height=g[1], width=g[2]).reshape(-1, 48) for f, g in zip(got, grids)]
        assert_same(torch.cat(merged), out.pooler_output)


def test_qwen2_vl_full_checkpoint_reads_the_visual_tower(tmp_path):
    text = dict(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, vocab_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    config = transformers.Qwen2VLConfig(vision_config=QWEN_VISION, text_config=text)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    folder = save_hf(model, tmp_path / "qwen2-vl-full")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2_vl"
    tower = load_tower(str(folder))
    sample = pixels(2, 28, 56)
    with torch.no_grad():
        want = model.model.visual(qwen_reference_patches(sample), grid_thw=torch.tensor([qwen_grid(sample)])).last_hidden_state
    assert_same(features(tower, [sample])[0], window_order_to_raster(want, qwen_grid(sample)))


@pytest.mark.parametrize("layer", [-1, 1, 0])
def test_qwen2_5_vl_undoes_its_window_permutation(tmp_path, layer):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLVisionConfig,
    )
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    model = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**QWEN25_VISION)).eval()
    tower = load_tower(str(save_hf(model, tmp_path / "qwen25-vision")), layer=layer)
    assert tower.kind == "qwen2_5_vl" and tower.hidden_size == 64
    samples = [pixels(1, 112, 168), pixels(3, 56, 112)]  # 2x3 and 1x2 attention windows of 2x2 merge units
    got = features(tower, samples)
    grids = [qwen_grid(s) for s in samples]
    with torch.no_grad():
        out = model(torch.cat([qwen_reference_patches(s) for s in samples]), grid_thw=torch.tensor(grids), output_hidden_states=True)
    # Qwen's merger output is in window order (its permutation undone): compare through the merger.
    mine_in_window_order = torch.cat(
        [f.reshape(g[0], g[1] // 2, 2, g[2] // 2, 2, 64).permute(0, 1, 3, 2, 4, 5).reshape(-1, 64) for f, g in zip(got, grids)]
    )
    if layer == -1:
        with torch.no_grad():
            assert_same(model.merger(mine_in_window_order), out.pooler_output)
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(torch.tensor(grids), 2, 56, 14)
    permuted = mine_in_window_order.reshape(-1, 4, 64)[window_index].reshape(-1, 64)
    assert_same(permuted, out.hidden_states[layer])


def test_qwen_needs_whole_merge_windows(tmp_path):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
    )

    model = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**QWEN_VISION))
    tower = load_tower(str(save_hf(model, tmp_path / "qwen2-vl-vision")))
    with pytest.raises(GridError, match="multiples of 28"):
        tower.feature_grid(1, 42, 56)


def test_qwen_missing_visual_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
    )

    folder = save_hf(Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**QWEN_VISION)), tmp_path / "q")
    state = load_file(str(folder / "model.safetensors"))
    del state["blocks.1.attn.qkv.weight"]
    state["blocks.1.attn.proj.weight"] = torch.zeros(64, 63)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing blocks\.1\.attn\.qkv\.weight; mis-shaped blocks\.1\.attn\.proj\.weight"):
        load_tower(str(folder))


# ---------------------------------------------------------------------------------------------
# A model with its own code: only with trust_remote_code

REMOTE_CODE = textwrap.dedent(
    '''
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput


    class TinyViTConfig(PretrainedConfig):
        model_type = "tiny_vit"

        def __init__(self, hidden_size=32, patch_size=14, num_hidden_layers=2, **kwargs):
            super().__init__(**kwargs)
            self.hidden_size, self.patch_size, self.num_hidden_layers = hidden_size, patch_size, num_hidden_layers


    class TinyViTModel(PreTrainedModel):
        config_class = TinyViTConfig

        def __init__(self, config):
            super().__init__(config)
            c = config.hidden_size
            self.embed = torch.nn.Conv2d(3, c, config.patch_size, config.patch_size)
            self.cls = torch.nn.Parameter(torch.randn(1, 1, c))
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(c, c) for _ in range(config.num_hidden_layers))
            self.post_init()

        def forward(self, pixel_values, output_hidden_states=False):
            x = self.embed(pixel_values).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)
            states = [x]
            for block in self.blocks:
                x = x + torch.tanh(block(x))
                states.append(x)
            return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(states))
    '''
)


def test_remote_code_runs_only_when_asked(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "tiny-vit"
    folder.mkdir()
    (folder / "modeling_tiny_vit.py").write_text(REMOTE_CODE)
    namespace: dict = {}
    exec(compile(REMOTE_CODE, "modeling_tiny_vit", "exec"), namespace)  # the same model, built here
    model = namespace["TinyViTModel"](namespace["TinyViTConfig"]()).eval()
    model.config.auto_map = {"AutoConfig": "modeling_tiny_vit.TinyViTConfig", "AutoModel": "modeling_tiny_vit.TinyViTModel"}
    save_hf(model, folder)
    with pytest.raises(CheckpointError, match="runs only with --trust-remote-code"):
        load_tower(str(folder))
    tower = load_tower(str(folder), layer=-2, trust_remote_code=True)
    assert (tower.kind, tower.patch_size, tower.hidden_size) == ("remote", 14, 32)
    sample = pixels(2, 28, 42)
    want = hidden_states(model, -2, pixel_values=sample)[:, 1:]  # CLS dropped
    assert_same(features(tower, [sample])[0], want.reshape(-1, 32))
