"""Qwen2-VL and Qwen2.5-VL vision encoder (model_type "qwen2_vl" / "qwen2_5_vl" or their "_vision" configs).

The encoder takes flattened patches plus their grids and orders its patches in 2x2-window order
(t, block_row, block_col, r, c); Qwen2.5-VL additionally permutes windows for its windowed
attention. This tower feeds patches exactly as Qwen's processors lay them out, takes the hidden
state `--layer` selects *before* Qwen's own merger, undoes Qwen2.5-VL's window permutation and
returns the tokens in raster order (t, h, w), so merge-cli's 2x2 merger and stored layout work
unchanged (merging 2x2 raster windows regroups exactly the four tokens Qwen's merger would).

Temporal patches: two consecutive frames form one token (temporal_patch_size 2), so T frames give
t = ceil(T / 2); an odd last frame is repeated, as Qwen's video processor does, and an image is
its own frame twice, as Qwen's image processor does.

A full VLM checkpoint is read for its `visual.` (or `model.visual.`) tensors only.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from merge_cli.errors import CheckpointError
from merge_cli.models.towers import Tower
from merge_cli.models.towers._common import (
    CLIP_MEAN,
    CLIP_STD,
    read_normalization,
    read_prefixed_tensors,
    resolve_layer,
)
from merge_cli.models.towers._hf import (
    hf_tower_hash,
    keep_blocks,
    load_pretrained,
    read_hf_config,
    require_transformers,
    sub_config,
)


def qwen_patches(frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """(T, C, H, W) -> (t*h*w, C*tps*p*p) in Qwen's order: 2x2 windows, each patch (C, tps, p, p).

    T is padded to a multiple of `temporal_patch_size` by repeating the last frame.
    """
    pad = -frames.shape[0] % temporal_patch_size
    if pad:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    count, channels, height, width = frames.shape
    t, h, w, p, m = count // temporal_patch_size, height // patch_size, width // patch_size, patch_size, merge_size
    patches = frames.reshape(t, temporal_patch_size, channels, h // m, m, p, w // m, m, p)
    # (t, h/m, w/m, m, m, C, tps, p, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(t * h * w, channels * temporal_patch_size * p * p)


def windows_to_raster(tokens: torch.Tensor, grid: tuple[int, int, int], merge_size: int) -> torch.Tensor:
    """(t*h*w, C) in 2x2-window order (t, h/m, w/m, m, m) -> raster order (t, h, w)."""
    t, h, w = grid
    m = merge_size
    windows = tokens.reshape(t, h // m, w // m, m, m, tokens.shape[-1])
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(t * h * w, tokens.shape[-1])


class Qwen2VLTower(Tower):
    def __init__(self, model, config, folder: Path, layer: int, raw_config: dict, state, kind: str):
        super().__init__()
        self.kind = kind
        self.name = f"{kind}:{folder.name}"
        self.patch_size = int(config.patch_size)
        self.merge_size = int(config.spatial_merge_size)
        self.temporal_patch_size = int(config.temporal_patch_size)
        # Qwen2-VL calls the tower width embed_dim (hidden_size is the merger's output); Qwen2.5-VL hidden_size.
        self.hidden_size = int(model.patch_embed.embed_dim)
        self.image_mean, self.image_std = read_normalization(folder, (CLIP_MEAN, CLIP_STD))
        self.layer = layer
        self.num_layers = int(config.depth)
        blocks = resolve_layer(layer, self.num_layers)
        self.content_hash = hf_tower_hash(kind, state, raw_config, self, blocks)
        keep_blocks(model.blocks, blocks)
        self.model = model
        self.windowed = kind == "qwen2_5_vl"

    def feature_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(ceil(T / temporal_patch_size), H/p, W/p); H and W must be multiples of patch x merge size."""
        h, w = self._patch_grid(height, width, multiple=self.merge_size)
        return math.ceil(num_frames / self.temporal_patch_size), h, w

    def forward(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        grids = self._check_pixels(pixels)
        if not grids:
            return []
        patches = torch.cat(
            [qwen_patches(p, self.patch_size, self.merge_size, self.temporal_patch_size) for p in pixels]
        )
        grid_thw = torch.tensor(grids, dtype=torch.long, device=patches.device)
        hidden = self._pre_merger_states(patches, grid_thw)  # (N, C), 2x2-window order
        pieces = hidden.split([math.prod(grid) for grid in grids])
        return [windows_to_raster(piece, grid, self.merge_size) for piece, grid in zip(pieces, grids)]

    def _pre_merger_states(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The last kept block's output, as the merger receives it, with windows put back in order."""
        captured: list[torch.Tensor] = []
        hook = self.model.merger.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.model(patches, grid_thw=grid_thw)
        finally:
            hook.remove()
        hidden = captured[0]
        if self.windowed:  # Qwen2.5-VL permutes whole merge windows (4 tokens) for windowed attention
            window_index = self._window_index(grid_thw).to(hidden.device)
            unit = self.merge_size**2
            windows = hidden.reshape(-1, unit, hidden.shape[-1])
            hidden = windows[torch.argsort(window_index)].reshape(-1, hidden.shape[-1])
        return hidden

    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's own window permutation (a model method in transformers 4.x, a function in 5.x)."""
        method = getattr(self.model, "get_window_index", None)
        if method is not None:
            return method(grid_thw)[0]
        from transformers.vision_utils import get_vision_window_index

        config = self.model.config
        return get_vision_window_index(
            grid_thw,
            spatial_merge_size=config.spatial_merge_size,
            window_size=config.window_size,
            patch_size=config.patch_size,
        )[0]


_CLASSES = {
    # model_type -> (kind, module, vision config class, vision model class)
    "qwen2_vl": ("qwen2_vl", "qwen2_vl", "Qwen2VLVisionConfig", "Qwen2VisionTransformerPretrainedModel"),
    "qwen2_vl_vision": ("qwen2_vl", "qwen2_vl", "Qwen2VLVisionConfig", "Qwen2VisionTransformerPretrainedModel"),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLVisionConfig", "Qwen2_5_VisionTransformerPretrainedModel"),
    "qwen2_5_vl_vision": (
        "qwen2_5_vl",
        "qwen2_5_vl",
        "Qwen2_5_VLVisionConfig",
        "Qwen2_5_VisionTransformerPretrainedModel",
    ),
}


def load(folder: Path, config: dict, *, layer: int = -1, trust_remote_code: bool = False) -> Qwen2VLTower:
    import importlib

    kind, module_name, config_name, model_name = _CLASSES[config["model_type"]]
    require_transformers(folder, config["model_type"])
    full_config = read_hf_config(folder, config["model_type"])
    try:
        module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        config_module = importlib.import_module(f"transformers.models.{module_name}.configuration_{module_name}")
        model_class, config_class = getattr(module, model_name), getattr(config_module, config_name)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(f"{folder}: this transformers has no {model_name}: {error}") from error
    vision_config = sub_config(full_config, config_class, folder)
    resolve_layer(layer, vision_config.depth)
    # A full VLM checkpoint keeps the tower under `visual.` (published checkpoints, save_pretrained)
    # or `model.visual.` (a state dict taken from transformers 5's module layout).
    prefixes = ("model.visual.", "visual.") if full_config is not vision_config else ("visual.", "")
    state = read_prefixed_tensors(folder, prefixes, wanted=("patch_embed.proj.weight",))
    model = load_pretrained(model_class, folder, config=vision_config, state_dict=state)
    return Qwen2VLTower(model, model.config, folder, layer, config, model.state_dict(), kind).eval()
