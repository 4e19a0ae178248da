"""A vision model that ships its own code (config.json "auto_map"): only with --trust-remote-code.

transformers then imports and runs the Python files in the model folder, which is why merge-cli
never does this unless asked. The model is loaded with `AutoModel` and used as an image encoder
of the common ViT shape: frames of one size run as a batch through
`model(pixel_values=frames, output_hidden_states=True)`, `hidden_states[layer]` is taken
(transformers convention: -1 is the last block's output), and its last h*w tokens are the patch
grid in raster order, any leading CLS or register tokens being dropped. The patch size, width and
depth come from the config (`patch_size`, `hidden_size`, `num_hidden_layers`, directly or in its
`vision_config`). A model whose output does not have at least h*w tokens per frame is refused at
its first batch. Frames of a video are encoded independently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from merge_cli.errors import CheckpointError
from merge_cli.models.towers._common import (
    CLIP_MEAN,
    CLIP_STD,
    read_normalization,
    resolve_layer,
)
from merge_cli.models.towers._hf import (
    ImageTower,
    hf_tower_hash,
    load_pretrained,
    read_hf_config,
    transformers_classes,
)


def _setting(config: Any, name: str, folder: Path) -> int:
    for source in (config, getattr(config, "vision_config", None)):
        value = getattr(source, name, None) if source is not None else None
        if isinstance(value, (list, tuple)) and len(set(value)) == 1:  # e.g. patch_size [14, 14]
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise CheckpointError(
        f"{folder / 'config.json'}: a remote-code tower needs a positive integer {name!r} in its config "
        f"(or in its vision_config)"
    )


class RemoteTower(ImageTower):
    kind = "remote"

    def __init__(self, model, config, folder: Path, layer: int, raw_config: dict, state):
        super().__init__()
        self.name = f"remote:{folder.name}"
        self.patch_size = _setting(config, "patch_size", folder)
        self.hidden_size = _setting(config, "hidden_size", folder)
        self.num_layers = _setting(config, "num_hidden_layers", folder)
        self.image_mean, self.image_std = read_normalization(folder, (CLIP_MEAN, CLIP_STD))
        self.layer = layer
        self.hidden_index = resolve_layer(layer, self.num_layers)
        self.content_hash = hf_tower_hash(self.kind, state, raw_config, self, self.hidden_index)
        self.model = model

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values=frames, output_hidden_states=True)
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is None or len(hidden_states) != self.num_layers + 1:
            raise RuntimeError(
                f"{self.name} did not return num_hidden_layers + 1 = {self.num_layers + 1} hidden states"
            )
        tokens = hidden_states[self.hidden_index]  # (F, N, C)
        grid = (frames.shape[2] // self.patch_size) * (frames.shape[3] // self.patch_size)
        if tokens.dim() != 3 or tokens.shape[1] < grid:
            raise RuntimeError(
                f"{self.name} returned hidden states {tuple(tokens.shape)}; expected (frames, >= {grid}, C) "
                f"for a {frames.shape[2]}x{frames.shape[3]} input"
            )
        return tokens[:, tokens.shape[1] - grid:]


def load(folder: Path, config: dict, *, layer: int = -1, trust_remote_code: bool = False) -> RemoteTower:
    if not trust_remote_code:  # load_tower only routes here with the flag; keep the promise locally too
        raise CheckpointError(f"{folder}: running the model's own code needs --trust-remote-code")
    (auto_model,) = transformers_classes(folder, config["model_type"], "AutoModel")
    hf_config = read_hf_config(folder, config["model_type"], trust_remote_code=True)
    resolve_layer(layer, _setting(hf_config, "num_hidden_layers", folder))
    model = load_pretrained(auto_model, folder, trust_remote_code=True)
    return RemoteTower(model, model.config, folder, layer, config, model.state_dict()).eval()
