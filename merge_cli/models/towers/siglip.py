"""SigLIP vision tower (fixed-resolution SigLIP and SigLIP2 checkpoints of model_type "siglip").

Runs `SiglipVisionModel` with `interpolate_pos_encoding=True`, so sizes other than the native
one get bicubically interpolated position embeddings (the native size gets them unchanged). The
features are the selected hidden state before `post_layernorm`; no CLS token. Frames of a video
are encoded independently.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge_cli.models.towers._common import SIGLIP_MEAN, SIGLIP_STD, resolve_layer
from merge_cli.models.towers._hf import (
    ImageTower,
    keep_blocks,
    load_pretrained,
    read_hf_config,
    sub_config,
    transformers_classes,
)

# Tensors of a full SigLIP checkpoint that are not the vision tower's.
FOREIGN = ("text_model.", "logit_scale", "logit_bias")


class SiglipTower(ImageTower):
    kind = "siglip"
    prefix_tokens = 0

    def __init__(self, model, config, folder: Path, layer: int, raw_config: dict, state):
        super().__init__()
        blocks = self._take_model(model, config, folder, layer, raw_config, state, (SIGLIP_MEAN, SIGLIP_STD))
        vision = getattr(model, "vision_model", model)  # transformers 4.x nests it one level deeper
        keep_blocks(vision.encoder.layers, blocks)
        vision.post_layernorm = torch.nn.Identity()  # features are taken before the post-norm
        vision.use_head = False
        del vision.head

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=frames, interpolate_pos_encoding=True).last_hidden_state


def load(folder: Path, config: dict, *, layer: int = -1, trust_remote_code: bool = False) -> SiglipTower:
    config_class, model_class = transformers_classes(
        folder, config["model_type"], "SiglipVisionConfig", "SiglipVisionModel"
    )
    vision_config = sub_config(read_hf_config(folder, config["model_type"]), config_class, folder)
    resolve_layer(layer, vision_config.num_hidden_layers)  # refuse a bad --layer before reading weights
    model = load_pretrained(model_class, folder, foreign=FOREIGN)
    return SiglipTower(model, model.config, folder, layer, config, model.state_dict()).eval()
