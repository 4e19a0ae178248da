"""What the Hugging Face towers share: importing transformers lazily, and loading weights strictly.

Weights go through transformers' own `from_pretrained`, which knows each model's checkpoint key
conversions (DINOv2's attention names, the `vision_model.` prefix of CLIP and SigLIP, ...), and its
loading report is checked: a missing, mis-shaped or unexpected tower weight is an error naming it,
where `from_pretrained` alone would fill it with random values after only a warning. The Qwen
towers hand it the `visual.` tensors merge-cli read itself, so that a full VLM checkpoint's
language model is never read. Remote code runs only for the remote tower, when the user asks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from merge_cli.errors import CheckpointError
from merge_cli.models.towers import Tower
from merge_cli.models.towers._common import (
    read_normalization,
    refuse_weight_problems,
    resolve_layer,
    tower_hash,
)

# config.json keys that say nothing about the function the model computes.
_NOT_FUNCTION_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "auto_map", "use_cache"}
)


def require_transformers(folder: Path, model_type: str) -> Any:
    """The `transformers` module, or a CheckpointError saying how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise CheckpointError(
            f"{folder}: model_type {model_type!r} is a Hugging Face tower and needs transformers: "
            f"pip install 'merge-cli[hf]'"
        ) from error
    return transformers


def transformers_classes(folder: Path, model_type: str, *names: str) -> tuple[Any, ...]:
    """The named transformers classes, or a CheckpointError if this transformers lacks one."""
    transformers = require_transformers(folder, model_type)
    found = []
    for name in names:
        try:
            found.append(getattr(transformers, name))
        except Exception as error:  # AttributeError, or the lazy import of that model failing
            raise CheckpointError(
                f"{folder}: model_type {model_type!r} needs transformers.{name}, which transformers "
                f"{transformers.__version__} does not provide ({type(error).__name__}); upgrade transformers"
            ) from error
    return tuple(found)


def read_hf_config(folder: Path, model_type: str, trust_remote_code: bool = False) -> Any:
    """The folder's config as a transformers config object (never running remote code here)."""
    transformers = require_transformers(folder, model_type)
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises ValueError, KeyError, OSError, ... for bad configs
        raise CheckpointError(f"{folder / 'config.json'}: transformers cannot read it: {error}") from error


def sub_config(config: Any, config_class: type, folder: Path) -> Any:
    """`config` itself if it is a `config_class`, else its `vision_config` (a full CLIP/SigLIP/VLM config)."""
    if isinstance(config, config_class):
        return config
    vision = getattr(config, "vision_config", None)
    if isinstance(vision, config_class):
        return vision
    raise CheckpointError(
        f"{folder / 'config.json'}: expected a {config_class.__name__} or a config with one as vision_config"
    )


def load_pretrained(
    model_class: type,
    folder: Path,
    *,
    config: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    foreign: tuple[str, ...] = (),
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """`model_class.from_pretrained` in fp32 on CPU, offline, refusing an incomplete tower.

    Loads `folder`, or, given `config` and `state_dict`, those (tensors merge-cli read itself).
    `foreign` names prefixes of checkpoint tensors that belong to other parts of a composite model
    (a text tower, a classifier) and may be left unused; any other unused, missing or mis-shaped
    tensor is a CheckpointError naming them. `trust_remote_code` is passed on only for the remote
    tower, where the user asked for it.
    """
    import transformers

    source = None if state_dict is not None else str(folder)
    extra = {"config": config, "state_dict": state_dict} if state_dict is not None else {"local_files_only": True}
    verbosity, progress = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the loading report is checked below, not printed
    transformers.logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(
            source,
            **extra,
            **{_dtype_argument(transformers.__version__): torch.float32},
            trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True,  # reported in `info` (with names) instead of raised
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, ImportError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{folder}: cannot load its weights into {model_class.__name__}: {first_line}") from error
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress:
            transformers.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(
        name
        for name in info.get("unexpected_keys", ())
        if not name.startswith(foreign) and not name.endswith("position_ids")  # saved buffers of old checkpoints
    )
    mismatched = [
        f"{name} {tuple(got)} (expected {tuple(want)})" for name, got, want in sorted(info.get("mismatched_keys", ()))
    ]
    refuse_weight_problems(str(folder), missing=missing, unexpected=unexpected, misshaped=mismatched)
    return model.to(torch.float32).eval()


def _dtype_argument(version: str) -> str:
    """`from_pretrained` takes `dtype` since transformers 4.56, `torch_dtype` before."""
    from packaging.version import Version

    return "dtype" if Version(version) >= Version("4.56") else "torch_dtype"


def hf_tower_hash(kind: str, state: dict[str, torch.Tensor], raw_config: dict, tower: Tower, layer_index: int) -> str:
    """Weights (all of the tower's, before unused blocks are dropped), the config's function-defining
    keys, the layer and the normalization."""
    settings = {
        "config": {k: v for k, v in raw_config.items() if k not in _NOT_FUNCTION_KEYS},
        "layer": layer_index,
        "image_mean": list(tower.image_mean),
        "image_std": list(tower.image_std),
    }
    return tower_hash(kind, state, settings)


def keep_blocks(blocks: torch.nn.ModuleList, count: int) -> None:
    """Drop the blocks after the first `count`: the selected hidden state never needs them."""
    del blocks[count:]


class ImageTower(Tower):
    """An image encoder run frame by frame: all frames of one size form one batch.

    A video's frames are encoded independently and concatenated in (t, h, w) order. Subclasses
    implement `encode_frames` (F, 3, H, W) -> (F, prefix_tokens + h*w, C), patch tokens raster.
    """

    prefix_tokens: int = 0
    """Tokens before the patch grid (CLS, registers), dropped."""

    def _take_model(
        self, model, config, folder: Path, layer: int, raw_config: dict, state, normalization
    ) -> int:
        """Set what every Hugging Face image tower records about itself; returns how many blocks
        the selected layer needs (the caller drops the rest from its model)."""
        self.name = f"{self.kind}:{folder.name}"
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        self.image_mean, self.image_std = read_normalization(folder, normalization)
        self.layer = layer
        self.num_layers = int(config.num_hidden_layers)
        blocks = resolve_layer(layer, self.num_layers)
        self.content_hash = hf_tower_hash(self.kind, state, raw_config, self, blocks)
        self.model = model
        return blocks

    def forward(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        grids = self._check_pixels(pixels)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(pixels):
            by_size.setdefault((int(sample.shape[2]), int(sample.shape[3])), []).append(index)
        features: list[torch.Tensor] = [None] * len(pixels)  # type: ignore[list-item]
        for members in by_size.values():
            frames = torch.cat([pixels[i] for i in members]) if len(members) > 1 else pixels[members[0]]
            tokens = self.encode_frames(frames)[:, self.prefix_tokens:]  # (F, h*w, C)
            pieces = tokens.split([grids[i][0] for i in members])
            for index, piece in zip(members, pieces):
                t, h, w = grids[index]
                if piece.shape[1] != h * w:
                    raise RuntimeError(f"{self.name} returned {piece.shape[1]} patch tokens for a {h}x{w} grid")
                features[index] = piece.reshape(t * h * w, piece.shape[-1])
        return features

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
