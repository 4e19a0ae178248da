"""DINOv2 tower, with or without registers (model_type "dinov2" or "dinov2_with_registers").

The CLS token and any register tokens are dropped, so the output is the h*w patch grid; the
hidden state is the one `--layer` selects, before the final `layernorm`. DINOv2 interpolates its
position embeddings for every input size (bicubic, in fp32). Frames of a video are encoded
independently.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge_cli.models.towers._common import IMAGENET_MEAN, IMAGENET_STD, resolve_layer
from merge_cli.models.towers._hf import (
    ImageTower,
    keep_blocks,
    load_pretrained,
    read_hf_config,
    transformers_classes,
)

# Tensors of a classification checkpoint that are not the backbone's.
FOREIGN = ("classifier.",)


class Dinov2Tower(ImageTower):
    kind = "dinov2"

    def __init__(self, model, config, folder: Path, layer: int, raw_config: dict, state):
        super().__init__()
        self.prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0))  # CLS + registers
        blocks = self._take_model(model, config, folder, layer, raw_config, state, (IMAGENET_MEAN, IMAGENET_STD))
        keep_blocks(model.encoder.layer, blocks)
        model.layernorm = torch.nn.Identity()  # features are taken before the final norm

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=frames).last_hidden_state


def load(folder: Path, config: dict, *, layer: int = -1, trust_remote_code: bool = False) -> Dinov2Tower:
    registers = config["model_type"] == "dinov2_with_registers"
    name = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
    (model_class,) = transformers_classes(folder, config["model_type"], name)
    hf_config = read_hf_config(folder, config["model_type"])
    resolve_layer(layer, hf_config.num_hidden_layers)
    model = load_pretrained(model_class, folder, foreign=FOREIGN)
    return Dinov2Tower(model, model.config, folder, layer, config, model.state_dict()).eval()
