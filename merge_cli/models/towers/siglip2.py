"""SigLIP2 NaFlex vision tower (model_type "siglip2" or "siglip2_vision_model").

NaFlex takes each image at its own resolution: pixels are cut into patches flattened in the
order its image processor uses, `(h, w, p, p, C)`, and its position embeddings are resized to
every (h, w) grid by the model. Patch tokens come out in raster order, no CLS token; the hidden
state is the one `--layer` selects, before `post_layernorm`. Frames of a video are encoded
independently. (Fixed-resolution SigLIP2 checkpoints have model_type "siglip": see siglip.py.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge_cli.models.towers._common import resolve_layer
from merge_cli.models.towers._hf import (
    load_pretrained,
    read_hf_config,
    sub_config,
    transformers_classes,
)
from merge_cli.models.towers.siglip import FOREIGN, SiglipTower


def naflex_patches(frames: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(F, C, H, W) -> (F, h*w, p*p*C): patches in raster order, each flattened as (p, p, C)."""
    count, channels, height, width = frames.shape
    p = patch_size
    patches = frames.reshape(count, channels, height // p, p, width // p, p)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(count, (height // p) * (width // p), p * p * channels)


class Siglip2Tower(SiglipTower):
    """SigLIP's structure (same trimming), fed NaFlex patches with their spatial shapes."""

    kind = "siglip2"

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        count, _, height, width = frames.shape
        patches = naflex_patches(frames, self.patch_size)  # (F, h*w, p*p*3)
        shapes = torch.tensor([[height // self.patch_size, width // self.patch_size]] * count, device=frames.device)
        mask = torch.ones(patches.shape[:2], dtype=torch.int32, device=frames.device)  # no padding
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state


def load(folder: Path, config: dict, *, layer: int = -1, trust_remote_code: bool = False) -> Siglip2Tower:
    config_class, model_class = transformers_classes(
        folder, config["model_type"], "Siglip2VisionConfig", "Siglip2VisionModel"
    )
    vision_config = sub_config(read_hf_config(folder, config["model_type"]), config_class, folder)
    resolve_layer(layer, vision_config.num_hidden_layers)
    model = load_pretrained(model_class, folder, foreign=FOREIGN)
    return Siglip2Tower(model, model.config, folder, layer, config, model.state_dict()).eval()
