"""Vision towers behind one small interface, and `load_tower`, which picks one from `--tower`.

A tower maps normalized pixels, one `(T, 3, H, W)` tensor per sample, to patch features in raster
order `(t, h, w)`, one `(t*h*w, C)` tensor per sample. Each kind lives in its own module with a
`load(folder, config, *, layer, trust_remote_code)` function; `_MODULES` maps the `model_type` of
a checkpoint's `config.json` to that module. Adding a tower is one file plus one line there.

  demo         the OneVision architecture at a tiny size with fixed pseudo-random weights
  onevision    OneVision encoder, native implementation (no transformers needed)
  siglip       SigLIP vision (fixed resolution; position embeddings interpolated)    [hf]
  siglip2      SigLIP2 NaFlex vision (variable resolution)                           [hf]
  clip         CLIP vision (CLS token dropped)                                       [hf]
  dinov2       DINOv2, with or without registers (CLS and registers dropped)         [hf]
  qwen2_vl     Qwen2-VL / Qwen2.5-VL vision encoder, tokens returned in raster order [hf]
  remote       a model folder with its own code (auto_map), only with trust_remote_code [hf]

[hf]: needs the optional `transformers` dependency (`pip install 'merge-cli[hf]'`), imported only
when such a tower is loaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from merge_cli.errors import CheckpointError, GridError
from merge_cli.media.processor import FAMILIES

DEMO_SPEC = "demo"

# config.json "model_type" -> the module (in this package) that builds the tower: the processor's
# family table, so that the two never disagree on which model types exist.
_FAMILY_MODULES = {"qwen": "qwen2_vl"}
_MODULES = {model_type: _FAMILY_MODULES.get(family, family) for model_type, family in FAMILIES.items()}

SUPPORTED_MODEL_TYPES = tuple(_MODULES)


class Tower(torch.nn.Module):
    """A vision encoder that returns patch features in raster order `(t, h, w)`.

    Subclasses set the attributes below in `__init__` and implement `forward`; `feature_grid`
    is right for every tower without temporal patching.
    """

    name: str
    """What the output records as the tower: "demo", "onevision_encoder:<folder>", "siglip:<folder>", ..."""
    kind: str
    """"demo", "onevision", "siglip", "siglip2", "clip", "dinov2", "qwen2_vl", "qwen2_5_vl", "remote"."""
    patch_size: int
    hidden_size: int
    """Width C of the returned features."""
    temporal_patch_size: int = 1
    """Frames per temporal patch: 1 except Qwen2-VL (2)."""
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    content_hash: str
    """Hash of the weights and of every setting that changes the features (the layer included)."""
    is_demo: bool = False
    layer: int
    """The `--layer` asked for: index into hidden_states, transformers convention (-1: last block)."""
    num_layers: int
    """Blocks in the checkpoint; `layer % (num_layers + 1)` blocks run."""

    def feature_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) token grid for `num_frames` frames of `height x width` pixels: (T, H/p, W/p)."""
        return (num_frames, *self._patch_grid(height, width))

    def forward(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """pixels: one normalized (T, 3, H, W) tensor per sample, shapes may differ between samples.

        Returns one (t*h*w, C) tensor per sample, tokens in raster order (t, h, w).
        """
        raise NotImplementedError

    def describe(self) -> dict:
        """The tower's provenance, JSON-able: what an output file records about it."""
        return {
            "name": self.name,
            "kind": self.kind,
            "content_hash": self.content_hash,
            "is_demo": bool(self.is_demo),
            "layer": self.layer,
            "num_layers": self.num_layers,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "hidden_size": self.hidden_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    def _patch_grid(self, height: int, width: int, multiple: int = 1) -> tuple[int, int]:
        """(H/p, W/p), refusing sides that are not whole multiples of `patch_size * multiple` pixels."""
        step = self.patch_size * multiple
        if height <= 0 or width <= 0 or height % step or width % step:
            raise GridError(
                f"{self.name} needs height and width that are multiples of {step} pixels; got {height}x{width}"
            )
        return height // self.patch_size, width // self.patch_size

    def _check_pixels(self, pixels: list[torch.Tensor]) -> list[tuple[int, int, int]]:
        """The (t, h, w) grid of every sample, after checking that it is a (T, 3, H, W) float tensor."""
        if isinstance(pixels, torch.Tensor):
            raise TypeError("a tower takes a list of (T, 3, H, W) tensors, one per sample")
        grids = []
        for sample in pixels:
            if sample.dim() != 4 or sample.shape[1] != 3 or sample.shape[0] < 1:
                raise GridError(f"{self.name} takes (T, 3, H, W) pixels per sample; got {tuple(sample.shape)}")
            if not sample.is_floating_point():
                raise TypeError(f"{self.name} takes normalized float pixels; got {sample.dtype}")
            grids.append(self.feature_grid(*(int(s) for s in (sample.shape[0], sample.shape[2], sample.shape[3]))))
        return grids


def load_tower(spec: str = DEMO_SPEC, *, layer: int = -1, trust_remote_code: bool = False) -> Tower:
    """'demo' or a local folder; model built on CPU in fp32 (the caller moves/casts it).

    Raises CheckpointError with one clear message for a missing/incomplete folder, unknown
    model_type, or tensors that do not match the config, before any media is read; UsageError
    for a `layer` the tower does not have.
    """
    if spec == DEMO_SPEC:
        from merge_cli.models.towers.demo import load_demo

        return load_demo(layer=layer)
    folder = Path(spec).expanduser()
    if not folder.exists():
        raise CheckpointError(f"tower checkpoint not found: {spec} (--tower takes 'demo' or a local model folder)")
    if not folder.is_dir():
        raise CheckpointError(
            f"--tower {spec} is a file; give the model folder that holds config.json and the weights"
        )
    from merge_cli.models.towers._common import (
        read_model_config,
        refuse_impossible_size,
    )

    config = read_model_config(folder)
    model_type = config["model_type"]
    module_name = _MODULES.get(model_type)
    if module_name is None:
        if trust_remote_code and "auto_map" in config:
            module_name = "remote"
        else:
            raise CheckpointError(_unknown_model_type(folder, model_type, config))
    refuse_impossible_size(folder, config, module_name)
    module = importlib.import_module(f"merge_cli.models.towers.{module_name}")
    return module.load(folder, config, layer=layer, trust_remote_code=trust_remote_code)


def _unknown_model_type(folder: Path, model_type: str, config: dict) -> str:
    message = (
        f"{folder / 'config.json'}: unsupported model_type {model_type!r}; "
        f"merge-cli supports {', '.join(sorted(set(SUPPORTED_MODEL_TYPES)))}"
    )
    if "auto_map" in config:
        message += (
            "; this folder ships its own model code (auto_map), which merge-cli runs only with "
            "--trust-remote-code"
        )
    return message


__all__ = ["DEMO_SPEC", "SUPPORTED_MODEL_TYPES", "Tower", "load_tower"]
