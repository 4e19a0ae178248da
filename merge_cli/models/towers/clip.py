"""CLIP vision tower (model_type "clip" or "clip_vision_model").

Runs `CLIPVisionModel` with `interpolate_pos_encoding=True` (bicubic position embeddings at sizes
other than the native one) and drops the CLS token, so the output is the h*w patch grid. The
hidden state is the one `--layer` selects; CLIP's `post_layernorm` only ever touches the CLS token.
Frames of a video are encoded independently.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge_cli.models.towers._common import CLIP_MEAN, CLIP_STD, resolve_layer
from merge_cli.models.towers._hf import (
    ImageTower,
    keep_blocks,
    load_pretrained,
    read_hf_config,
    sub_config,
    transformers_classes,
)

# Tensors of a full CLIP checkpoint that are not the vision tower's.
FOREIGN = ("text_model.", "logit_scale", "visual_projection.", "text_projection.")


class ClipTower(ImageTower):
    kind = "clip"
    prefix_tokens = 1  # CLS

    def __init__(self, model, config, folder: Path, layer: int, raw_config: dict, state):
        super().__init__()
        blocks = self._take_model(model, config, folder, layer, raw_config, state, (CLIP_MEAN, CLIP_STD))
        vision = getattr(model, "vision_model", model)  # transformers 4.x nests it one level deeper
        keep_blocks(vision.encoder.layers, blocks)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=frames, interpolate_pos_encoding=True).last_hidden_state


def load(folder: Path, config: dict, *, layer: int = -1, trust_remote_code: bool = False) -> ClipTower:
    config_class, model_class = transformers_classes(
        folder, config["model_type"], "CLIPVisionConfig", "CLIPVisionModel"
    )
    vision_config = sub_config(read_hf_config(folder, config["model_type"]), config_class, folder)
    resolve_layer(layer, vision_config.num_hidden_layers)
    model = load_pretrained(model_class, folder, foreign=FOREIGN)
    return ClipTower(model, model.config, folder, layer, config, model.state_dict()).eval()
