"""Tiny tower checkpoints for tests: written to a folder exactly as a published one is laid out.

The OneVision weight names are spelled out here from the checkpoint format (not taken from
merge-cli's modules), so that a renamed module in merge-cli fails the tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

TINY_ONEVISION = {
    "model_type": "onevision_encoder",
    "architectures": ["OneVisionEncoderModel"],
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 32: rotary frequencies 16 = 4 + 6 + 6
    "num_channels": 3,
    "image_size": 448,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "layer_norm_type": "layer_norm",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
    "rope_temporal_size": 64,
    "use_head": False,
    "torch_dtype": "float32",
}


def onevision_config(**overrides) -> dict:
    return {**TINY_ONEVISION, **overrides}


def onevision_shapes(config: dict, with_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a OneVision encoder checkpoint with this config."""
    c, inner, p = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    rms = config.get("layer_norm_type") == "rms_norm"

    def norm(name: str) -> dict:
        return {f"{name}.weight": (c,)} if rms else {f"{name}.weight": (c,), f"{name}.bias": (c,)}

    shapes = {"embeddings.patch_embedding.weight": (c, config["num_channels"], p, p), **norm("layernorm_pre")}
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layers.{i}"
        shapes.update(norm(f"{layer}.layer_norm1"))
        shapes.update(norm(f"{layer}.layer_norm2"))
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (c, c)
            shapes[f"{layer}.self_attn.{proj}.bias"] = (c,)
        shapes.update(
            {
                f"{layer}.mlp.fc1.weight": (inner, c),
                f"{layer}.mlp.fc1.bias": (inner,),
                f"{layer}.mlp.fc2.weight": (c, inner),
                f"{layer}.mlp.fc2.bias": (c,),
            }
        )
    if with_head:  # the pooling head of use_head checkpoints; feature extraction ignores it
        shapes.update(norm("layernorm_post"))
        shapes.update(
            {
                "head.probe": (1, 1, c),
                "head.attention.in_proj_weight": (3 * c, c),
                "head.attention.in_proj_bias": (3 * c,),
                "head.attention.out_proj.weight": (c, c),
                "head.attention.out_proj.bias": (c,),
                "head.norm.weight": (c,),
                "head.mlp.fc1.weight": (inner, c),
                "head.mlp.fc1.bias": (inner,),
                "head.mlp.fc2.weight": (c, inner),
                "head.mlp.fc2.bias": (c,),
            }
        )
    return shapes


def random_onevision_state(config: dict, with_head: bool = False) -> dict[str, torch.Tensor]:
    """Random weights from the global (per-test) seed, at scales that keep activations O(1).

    Norm weights are 1 + noise and biases noise, so that a wrong norm or a dropped bias shows.
    """
    state = {}
    for name, shape in onevision_shapes(config, with_head).items():
        if len(shape) == 1 and ("norm" in name) and name.endswith(".weight"):
            state[name] = 1.0 + 0.2 * torch.randn(shape)
        elif name.endswith("bias") or len(shape) == 1:
            state[name] = 0.1 * torch.randn(shape)
        else:
            fan_in = math.prod(shape[1:])
            state[name] = torch.randn(shape) / math.sqrt(fan_in)
    return state


def save_onevision(
    folder: Path,
    config: dict | None = None,
    state: dict[str, torch.Tensor] | None = None,
    *,
    preprocessor: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write config.json + model.safetensors (+ preprocessor_config.json) like a published folder."""
    from safetensors.torch import save_file

    config = onevision_config() if config is None else config
    state = random_onevision_state(config) if state is None else state
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return folder


def save_hf(model, folder: Path) -> Path:
    """`model.save_pretrained(folder)`, quietly."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder))
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    return folder


def pixels(frames: int, height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random normalized pixels (T, 3, H, W), roughly the range CLIP normalization gives."""
    return torch.randn(frames, 3, height, width, dtype=dtype)
