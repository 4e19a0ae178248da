"""OneVision encoder, native implementation: loads the published checkpoints' weights unchanged.

Architecture (checkpoint `model_type` "onevision_encoder"):

    pixels (T, 3, H, W) per sample
      -> embeddings.patch_embedding: Conv2d, kernel = stride = patch, no bias, per frame
      -> tokens in raster order (t, h, w), no CLS token, no absolute position embedding
      -> layernorm_pre                                   hidden_states[0]
      -> encoder.layers[i]: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))
                                                         hidden_states[i + 1]
      (layernorm_post and the pooling head are not needed for features and are not loaded)

Attention has 3D rotary position embeddings: head_dim/2 frequencies split 4:6:6 over (t, h, w),
each part with its own inverse frequencies 1/theta**(arange(n)/n); the per-token angles
[f_t[t], f_h[h], f_w[w]] are duplicated to head_dim by concatenation and applied with the
interleaved rotation (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...). Video frames have temporal
positions 0..T-1; an image is one frame at t = 0.

Several samples of different sizes run in one call: the per-token work (norms, projections, MLP)
runs over all samples' tokens concatenated, and attention runs once per group of samples that
share a (t, h, w) grid, batched through `scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from merge_cli.errors import CheckpointError
from merge_cli.models.checkpoints import read_tensors
from merge_cli.models.towers import Tower
from merge_cli.models.towers._common import (
    CLIP_MEAN,
    CLIP_STD,
    check_tensors,
    read_normalization,
    resolve_layer,
    tower_hash,
)

# MLP activations by their transformers names: "gelu" is the exact erf GELU.
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
NORM_TYPES = ("layer_norm", "rms_norm")

# Tensors a checkpoint may hold that feature extraction does not use (the pooling head's path).
UNUSED_PREFIXES = ("layernorm_post.", "head.", "video_rope.")

# Rotary frequency split of head_dim / 2 across (t, h, w), in units of head_dim / 2 / 16.
ROPE_SPLIT = (4, 6, 6)


@dataclass(frozen=True)
class OneVisionConfig:
    """The architecture, read from config.json; defaults are those of the upstream config class."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 16
    """16 is the code default; the published large checkpoint says 14: always read it."""
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    layer_norm_type: str = "layer_norm"
    rope_theta: float = 10000.0
    rope_temporal_size: int | None = 64
    """Upstream's rotary table length in frames; positions are 0..T-1 either way."""
    use_head: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"config {name} must be a positive integer; got {value!r}")
        if self.num_channels != 3:
            raise CheckpointError(f"config num_channels must be 3 (RGB); got {self.num_channels!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(
                f"config hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )
        if self.layer_norm_type not in NORM_TYPES:
            raise CheckpointError(
                f"config layer_norm_type {self.layer_norm_type!r} is not supported; use one of {', '.join(NORM_TYPES)}"
            )
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise CheckpointError(f"config layer_norm_eps must be positive; got {self.layer_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise CheckpointError(f"config rope_theta must be positive; got {self.rope_theta!r}")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"config hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 32:
            raise CheckpointError(
                f"head_dim {self.head_dim} (hidden_size / num_attention_heads) must be a multiple of 32: "
                f"the 3D rotary embedding splits head_dim/2 = {self.head_dim // 2} frequencies 4:6:6 in units of 16"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_sizes(self) -> tuple[int, int, int]:
        """Rotary frequencies per axis (t, h, w): 4, 6 and 6 units of head_dim / 2 / 16."""
        unit = self.head_dim // 2 // 16
        return tuple(part * unit for part in ROPE_SPLIT)  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OneVisionConfig:
        """The architecture keys of a config.json; other keys (image_size, dropout, ...) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def function_settings(self) -> dict[str, Any]:
        """The settings that change the features (for the content hash)."""
        settings = asdict(self)
        for irrelevant in ("use_head", "rope_temporal_size"):
            settings.pop(irrelevant)
        return settings


# ---------------------------------------------------------------------------------------------
# Rotary position embedding


def axis_inv_freq(size: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of one axis: 1 / theta**(arange(size) / size), in fp32 (as upstream)."""
    return 1.0 / (theta ** (torch.arange(size, dtype=torch.float32) / size))


def spread_positions(frames: int, table_size: int) -> torch.Tensor:
    """The model card's temporal positions of `frames` frames: linspace(0, table_size - 1, T)
    truncated to integers (`.long()`), as it builds `visible_indices`."""
    return torch.linspace(0, table_size - 1, frames).long()


def rotary_angles(
    grid: tuple[int, int, int],
    head_dim: int,
    theta: float,
    device=None,
    temporal: torch.Tensor | None = None,
) -> torch.Tensor:
    """Angles (t*h*w, head_dim/2) of every token of a (t, h, w) grid, tokens in raster order.

    Token (t, h, w) gets [f_t[pos_t], f_h[h], f_w[w]], with f_axis = outer(positions,
    inv_freq_axis); the temporal positions are 0..t-1 unless `temporal` gives them.
    """
    t, h, w = grid
    unit = head_dim // 2 // 16
    sizes = [part * unit for part in ROPE_SPLIT]
    positions = [
        torch.arange(t) if temporal is None else temporal,
        torch.arange(h),
        torch.arange(w),
    ]
    per_axis = [
        torch.outer(pos.to(device=device, dtype=torch.float32), axis_inv_freq(size, theta).to(device))
        for pos, size in zip(positions, sizes)
    ]  # (t, 4u), (h, 6u), (w, 6u)
    angles_t = per_axis[0][:, None, None, :].expand(t, h, w, sizes[0])
    angles_h = per_axis[1][None, :, None, :].expand(t, h, w, sizes[1])
    angles_w = per_axis[2][None, None, :, :].expand(t, h, w, sizes[2])
    return torch.cat([angles_t, angles_h, angles_w], dim=-1).reshape(t * h * w, head_dim // 2)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """The interleaved rotation (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) over the last dim."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_pairs(x) * sin; cos and sin (L, head_dim) broadcast over (..., L, head_dim)."""
    return x * cos + rotate_pairs(x) * sin


class RotaryTables:
    """cos and sin (L, head_dim) in fp32 per (grid, device), computed once and kept (LRU).

    Not a module buffer, so `.to(bfloat16)` never degrades the frequencies; attention casts the
    fp32 tables to the query dtype, as upstream does.
    """

    def __init__(self, head_dim: int, theta: float, capacity: int = 64, spread_over: int | None = None):
        self.head_dim = head_dim
        self.theta = float(theta)
        self.spread_over = spread_over
        """None: temporal positions 0..T-1; else the rotary table length they are spread over."""
        self.capacity = capacity
        self._tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __call__(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, device)
        cached = self._tables.get(key)
        if cached is not None:
            self._tables.move_to_end(key)
            return cached
        # Plain tensors even when first asked under inference_mode, so a later autograd call can use them.
        with torch.inference_mode(False), torch.no_grad():
            temporal = spread_positions(grid[0], self.spread_over) if self.spread_over else None
            angles = rotary_angles(grid, self.head_dim, self.theta, device=device, temporal=temporal)  # (L, D/2)
            angles = torch.cat([angles, angles], dim=-1)  # (L, D): duplicated by concatenation
            tables = angles.cos(), angles.sin()
        self._tables[key] = tables
        if len(self._tables) > self.capacity:
            self._tables.popitem(last=False)
        return tables


# ---------------------------------------------------------------------------------------------
# Modules; attribute names are the checkpoint's weight names.


@dataclass(frozen=True)
class AttentionGroup:
    """`batch` samples of `length` tokens each, contiguous in the concatenated token sequence."""

    batch: int
    length: int
    cos: torch.Tensor
    """(length, head_dim) fp32"""
    sin: torch.Tensor


def make_norm(config: OneVisionConfig) -> nn.Module:
    if config.layer_norm_type == "rms_norm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class OneVisionEmbeddings(nn.Module):
    def __init__(self, config: OneVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )

    def forward(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """(T, 3, H, W) per sample -> (sum of T*h*w, C) raster tokens, all samples in one matmul.

        The stride-p convolution is a linear map of each flattened (3, p, p) patch.
        """
        p = self.patch_size
        weight = self.patch_embedding.weight  # (C, 3, p, p)
        patches = []
        for sample in pixels:
            frames, channels, height, width = sample.shape
            grid = sample.reshape(frames, channels, height // p, p, width // p, p)
            patches.append(grid.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels * p * p))  # (T*h*w, 3*p*p)
        flat = patches[0] if len(patches) == 1 else torch.cat(patches)
        return F.linear(flat.to(weight.dtype), weight.flatten(1))  # (N, C)


class OneVisionAttention(nn.Module):
    def __init__(self, config: OneVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, groups: list[AttentionGroup]) -> torch.Tensor:
        """x (N, C), the tokens of all groups concatenated -> (N, C)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (N, C) each
        outputs = []
        start = 0
        for group in groups:
            end = start + group.batch * group.length
            q_g, k_g, v_g = (
                t[start:end].view(group.batch, group.length, self.num_heads, self.head_dim).transpose(1, 2)
                for t in (q, k, v)
            )  # (B, heads, L, D)
            cos, sin = group.cos.to(q_g.dtype), group.sin.to(q_g.dtype)
            q_g, k_g = apply_rotary(q_g, cos, sin), apply_rotary(k_g, cos, sin)
            out = F.scaled_dot_product_attention(q_g, k_g, v_g, scale=self.scale)  # (B, heads, L, D)
            outputs.append(out.transpose(1, 2).reshape(end - start, -1))
            start = end
        return self.out_proj(outputs[0] if len(outputs) == 1 else torch.cat(outputs))


class OneVisionMLP(nn.Module):
    def __init__(self, config: OneVisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OneVisionLayer(nn.Module):
    def __init__(self, config: OneVisionConfig):
        super().__init__()
        self.layer_norm1 = make_norm(config)
        self.self_attn = OneVisionAttention(config)
        self.layer_norm2 = make_norm(config)
        self.mlp = OneVisionMLP(config)

    def forward(self, x: torch.Tensor, groups: list[AttentionGroup]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), groups)
        return x + self.mlp(self.layer_norm2(x))


class OneVisionEncoder(nn.Module):
    def __init__(self, config: OneVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(OneVisionLayer(config) for _ in range(config.num_hidden_layers))


class OneVisionTower(Tower):
    """The OneVision encoder up to the hidden state `layer` selects; blocks past it are dropped.

    `state_dict()` keys are the checkpoint's own (`embeddings.patch_embedding.weight`, ...).
    """

    def __init__(
        self,
        config: OneVisionConfig,
        *,
        layer: int = -1,
        name: str = "onevision_encoder",
        kind: str = "onevision",
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
    ):
        super().__init__()
        self.config = config
        self.name = name
        self.kind = kind
        self.patch_size = config.patch_size
        self.hidden_size = config.hidden_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.layer = layer
        self.num_layers = config.num_hidden_layers
        self.num_blocks = resolve_layer(layer, config.num_hidden_layers)
        self.content_hash = ""  # set by the loader, from the weights as stored
        self.embeddings = OneVisionEmbeddings(config)
        self.layernorm_pre = make_norm(config)
        self.encoder = OneVisionEncoder(config)
        self.rotary = RotaryTables(config.head_dim, config.rope_theta)

    def set_temporal_positions(self, mode: str) -> None:
        """`index` (0..T-1, the LLaVA training path) or `spread` (the model card's
        linspace(0, rope_temporal_size - 1, T)); the cached rotary tables are rebuilt."""
        from merge_cli.errors import UsageError

        if mode == "index":
            spread = None
        elif mode == "spread":
            if not self.config.rope_temporal_size:
                raise UsageError("--temporal-positions spread needs the config's rope_temporal_size")
            spread = int(self.config.rope_temporal_size)
        else:
            raise UsageError(f"--temporal-positions must be index or spread; got {mode!r}")
        self.temporal_positions = mode
        self.rotary = RotaryTables(self.config.head_dim, self.config.rope_theta, spread_over=spread)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor the full checkpoint must provide (all layers)."""
        return {name: tuple(t.shape) for name, t in self.state_dict().items()}

    @classmethod
    def empty(cls, config: OneVisionConfig, **kwargs) -> OneVisionTower:
        """The module with its parameters on the meta device, for `load_weights` to fill: no time is
        spent initializing weights that are overwritten anyway."""
        with torch.device("meta"):
            return cls(config, **kwargs)

    def load_weights(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Check `state` against the architecture, take its tensors as fp32 parameters, then drop
        the blocks the selected layer does not need."""
        check_tensors(state, self.expected_shapes(), where, ignorable=UNUSED_PREFIXES)
        used = {name: state[name].to(torch.float32) for name in self.expected_shapes()}
        self.load_state_dict(used, strict=True, assign=True)
        self.content_hash = tower_hash(
            self.kind,
            {name: state[name] for name in used},
            {
                **self.config.function_settings(),
                "layer": self.num_blocks,
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
            },
        )
        del self.encoder.layers[self.num_blocks:]  # never run: keep them out of device memory

    def forward(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        grids = self._check_pixels(pixels)
        if not grids:
            return []
        # Samples with the same grid are made adjacent so that each group is one contiguous slice.
        by_grid: dict[tuple[int, int, int], list[int]] = {}
        for index, grid in enumerate(grids):
            by_grid.setdefault(grid, []).append(index)
        order = [index for members in by_grid.values() for index in members]

        x = self.embeddings([pixels[i] for i in order])  # (N, C), N = sum of t*h*w
        x = self.layernorm_pre(x)
        groups = []
        for grid, members in by_grid.items():
            cos, sin = self.rotary(grid, x.device)
            groups.append(AttentionGroup(len(members), math.prod(grid), cos, sin))
        for block in self.encoder.layers:
            x = block(x, groups)

        pieces = x.split([math.prod(grids[i]) for i in order])
        features: list[torch.Tensor] = [None] * len(grids)  # type: ignore[list-item]
        for position, index in enumerate(order):
            features[index] = pieces[position]
        return features


def load(folder: Path, config: dict, *, layer: int = -1, trust_remote_code: bool = False) -> OneVisionTower:
    """A OneVision encoder from a local folder (config.json, *.safetensors, optional preprocessor)."""
    try:
        architecture = OneVisionConfig.from_dict(config)
    except CheckpointError as error:
        raise CheckpointError(f"{folder / 'config.json'}: {error}") from error
    mean, std = read_normalization(folder, (CLIP_MEAN, CLIP_STD))
    tower = OneVisionTower.empty(
        architecture, layer=layer, name=f"onevision_encoder:{folder.name}", image_mean=mean, image_std=std
    )
    tensors = read_tensors(folder, keep=lambda name: not name.startswith(UNUSED_PREFIXES))
    tower.load_weights(tensors, str(folder))
    return tower.eval()

