"""The built-in demo tower: the OneVision architecture at a tiny size, with fixed pseudo-random weights.

It lets `merge-cli extract` run on a fresh machine with no download. Its features are meaningless
for training; every output made with it says so. The weights are the same bits in every process
and on every platform: they come from a dedicated `torch.Generator` with a fixed seed, drawn in a
fixed order (sorted tensor names) as float64 uniforms, whose generation and arithmetic are exact
IEEE operations, then rounded once to float32.
"""

from __future__ import annotations

import math

import torch

from merge_cli.models.towers._common import CLIP_MEAN, CLIP_STD
from merge_cli.models.towers.onevision import OneVisionConfig, OneVisionTower

DEMO_SEED = 20250611
DEMO_WEIGHT_STD = 0.02
DEMO_CONFIG = OneVisionConfig(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,  # head_dim 32: rotary frequencies 16 = 4 + 6 + 6
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    layer_norm_type="layer_norm",
    rope_theta=10000.0,
    use_head=False,
)
DEMO_WARNING = (
    "using the built-in demo tower: its features are meaningless for training "
    "(point --tower at a real checkpoint folder)"
)
"""The one line every run with the demo tower prints (the output also records the name "demo")."""


def demo_state_dict(config: OneVisionConfig = DEMO_CONFIG, seed: int = DEMO_SEED) -> dict[str, torch.Tensor]:
    """Weights for `config`: matrices uniform with std 0.02, norm weights 1, all biases 0.

    A uniform on [-a, a] with a = std * sqrt(3) has standard deviation `std`, like the
    normal(0, 0.02) init of Hugging Face models, but needs no transcendental function, so its
    float32 values do not depend on the platform's math library or vector width.
    """
    shapes = OneVisionTower.empty(config).expected_shapes()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bound = DEMO_WEIGHT_STD * math.sqrt(3.0)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".bias"):
            state[name] = torch.zeros(shape, dtype=torch.float32)
        elif len(shape) == 1:  # LayerNorm / RMSNorm weight
            state[name] = torch.ones(shape, dtype=torch.float32)
        else:
            uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
            state[name] = ((uniform * 2.0 - 1.0) * bound).to(torch.float32)
    return state


def load_demo(layer: int = -1) -> OneVisionTower:
    """The demo tower, named "demo"; `is_demo` is True."""
    tower = OneVisionTower.empty(
        DEMO_CONFIG, layer=layer, name="demo", kind="demo", image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    tower.is_demo = True
    tower.load_weights(demo_state_dict(), "the built-in demo tower")
    return tower.eval()
