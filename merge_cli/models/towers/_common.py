"""What every tower loader shares: the folder's JSON files, the layer index, the weight check, the hash.

Private to `merge_cli.models.towers`; no transformers here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from merge_cli.errors import CheckpointError, UsageError
from merge_cli.hashing import hash_json, hash_state_dict
from merge_cli.media.processor import read_json
from merge_cli.models.checkpoints import read_tensors

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]


def read_model_config(folder: Path) -> dict[str, Any]:
    """`config.json` of a Hugging Face-style model folder, which must name its `model_type`."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json: --tower takes 'demo' or a Hugging Face-style model folder "
            f"(config.json plus *.safetensors weights)"
        )
    config = read_json(path, "model config")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise CheckpointError(f'{path} does not say which model it is (no "model_type")')
    return config


# Learned position tables, one row per patch of the config's image_size: these towers hold them.
_LEARNED_POSITIONS = frozenset({"siglip", "clip", "dinov2"})


def refuse_impossible_size(folder: Path, config: dict[str, Any], module: str) -> None:
    """Refuse a config that describes more parameters than its weight files can hold, before any
    module is built (`num_hidden_layers: 1000000` took 4 GB and two minutes to reach the weight
    check). Both sides are bounds, never estimates: the count is a floor that every tower kind
    here exceeds (per block one width x width projection and one width x intermediate MLP matrix,
    the patch embedding, a learned position table), and the weight files' headers say how many
    values they hold (`stored_values`). No tensor is read."""
    from merge_cli.models.checkpoints import stored_values

    vision = config["vision_config"] if isinstance(config.get("vision_config"), dict) else config
    layers = _size_setting(vision, "num_hidden_layers", "depth", "num_layers")
    width = _size_setting(vision, "embed_dim", "hidden_size")  # Qwen2-VL's hidden_size is its merger's output
    inner = _size_setting(vision, "intermediate_size")
    patch = _size_setting(vision, "patch_size")
    image = _size_setting(vision, "image_size")
    if width is None:
        return
    floor = width * (width + (inner or 0)) * (layers or 1) + 3 * (patch or 1) ** 2 * width
    if module in _LEARNED_POSITIONS and image is not None and patch is not None:
        floor += (image // patch) ** 2 * width
    capacity = stored_values(folder)
    if floor > capacity:
        described = ", ".join(
            f"{name} {_count(value)}" for name, value in (
                ("layers", layers), ("width", width), ("intermediate_size", inner), ("patch_size", patch),
                ("image_size", image if module in _LEARNED_POSITIONS else None),
            ) if value is not None
        )
        raise CheckpointError(
            f"{folder / 'config.json'} describes a tower of at least {_count(floor)} parameters ({described}), "
            f"but its weight files hold {capacity:,} values: refused before building it"
        )


def _size_setting(config: dict[str, Any], *names: str) -> int | None:
    """The first of `names` that the config sets to a positive integer (anything else is left to
    the tower's own checks)."""
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _count(number: int) -> str:
    """`1,234,567`, or for a number of more than 30 digits its order (`about 10^312`)."""
    return f"{number:,}" if number.bit_length() <= 100 else f"about 10^{int((number.bit_length() - 1) * 0.30103)}"


def read_normalization(folder: Path, default: Normalization) -> Normalization:
    """Image mean and std from the folder's `preprocessor_config.json`, else the tower's default.

    A preprocessor that says `"do_normalize": false` means no normalization (mean 0, std 1).
    """
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return default
    config = read_json(path, "preprocessor config")
    if config.get("do_normalize") is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean = _three_floats(config.get("image_mean", default[0]), "image_mean", path)
    std = _three_floats(config.get("image_std", default[1]), "image_std", path)
    if min(std) <= 0:
        raise CheckpointError(f"{path}: image_std must be positive; got {list(std)}")
    return mean, std


def _three_floats(value: Any, key: str, path: Path) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3  # some processors give one value for all channels
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise CheckpointError(f"{path}: {key} must be three numbers; got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])


def resolve_layer(layer: int, num_layers: int) -> int:
    """The hidden-state index `layer` selects, counted from the embeddings (0) to the last block.

    Transformers convention: `hidden_states` has num_layers + 1 entries, so -1 is the last block's
    output and -(num_layers + 1) the embeddings.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise UsageError(f"--layer must be an integer; got {layer!r}")
    if not -(num_layers + 1) <= layer <= num_layers:
        raise UsageError(
            f"--layer {layer} is out of range for a tower with {num_layers} layers: "
            f"use 0..{num_layers} or -1..-{num_layers + 1} (-1 is the last layer, 0 the embeddings)"
        )
    return layer % (num_layers + 1)


def read_prefixed_tensors(folder: Path, prefixes: Iterable[str], wanted: Iterable[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the first of `prefixes` that holds any `wanted` name, prefix removed.

    Only tensors under `prefixes` are read (a full VLM checkpoint may hold many GB of language-model
    weights); an empty prefix stands for "the whole checkpoint".
    """
    prefixes = tuple(prefixes)
    wanted = set(wanted)
    tensors = read_tensors(folder, keep=lambda name: name.startswith(prefixes))
    for prefix in prefixes:
        chosen = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        if chosen.keys() & wanted:
            return chosen
    expected = " or ".join(repr(p) for p in prefixes if p) or "the model's own names"
    example = min(wanted) if wanted else "?"
    raise CheckpointError(
        f"{folder}: none of its weights belong to this model (looked for names like {example!r} under {expected})"
    )


def check_tensors(
    got: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
    ignorable: Iterable[str] = (),
) -> None:
    """Refuse missing, unexpected, mis-shaped or non-float tensors in one message naming them.

    `ignorable` names tensors (or name prefixes ending in '.') a checkpoint may hold that do not
    matter for feature extraction (a pooling head, a post-norm, a saved buffer).
    """
    ignorable = tuple(ignorable)

    def ignored(name: str) -> bool:
        return any(name == i or (i.endswith(".") and name.startswith(i)) for i in ignorable)

    missing = sorted(name for name in expected if name not in got)
    unexpected = sorted(name for name in got if name not in expected and not ignored(name))
    misshaped = [
        f"{name} {tuple(got[name].shape)} (expected {tuple(shape)})"
        for name, shape in sorted(expected.items())
        if name in got and tuple(got[name].shape) != tuple(shape)
    ]
    not_float = sorted(name for name in expected if name in got and not got[name].is_floating_point())
    refuse_weight_problems(where, missing=missing, unexpected=unexpected, misshaped=misshaped, not_float=not_float)


_PROBLEM_LABELS = {
    "missing": "missing",
    "unexpected": "unexpected",
    "misshaped": "mis-shaped",
    "not_float": "not floating point",
}


def refuse_weight_problems(where: str, **names: list[str]) -> None:
    """One CheckpointError naming every problem found (`missing=[...]`, `misshaped=[...]`, ...)."""
    problems = [f"{_PROBLEM_LABELS[kind]} {some_names(found)}" for kind, found in names.items() if found]
    if problems:
        raise CheckpointError(f"{where}: weights do not match the config: {'; '.join(problems)}")


def some_names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def tower_hash(kind: str, state: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> str:
    """Content hash of a tower: its weights as stored plus every setting that changes its features."""
    return hash_json({"kind": kind, "weights": hash_state_dict(state), "settings": dict(settings)})
