"""SpatialMergeProjector: the 2x2 spatial token merger (Qwen2-VL style) and its weight loader.

Weight-compatible with LLaVA checkpoints trained with `--mm_projector_type spatial_merge`:
parameters `ln_q` (LayerNorm over the tower width C), `mlp.0` (4C -> 4C), GELU, `mlp.2` (4C -> D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from merge_cli.errors import CheckpointError, GridError
from merge_cli.hashing import hash_state_dict
from merge_cli.media.grid import DEFAULT_MERGE_SIZE, infer_hw
from merge_cli.models.checkpoints import read_tensors

PROJECTOR_KEYS = ("ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")

# Where projector weights live inside LLaVA-family checkpoints, most specific first.
PROJECTOR_PREFIXES = (
    "base_model.model.model.mm_projector.",
    "model.visual.merger.",
    "model.mm_projector.",
    "visual.merger.",
    "mm_projector.",
)


def merge_windows(x: torch.Tensor, height: int, width: int, merge_size: int = DEFAULT_MERGE_SIZE) -> torch.Tensor:
    """Space-to-depth over merge windows: (B, H*W, C) raster tokens -> (B, H*W/m^2, m^2*C).

    Output token (i, j) concatenates window (i, j)'s tokens in the order top-left, top-right,
    bottom-left, bottom-right (for m = 2). A plain `view(B, -1, 4C)` would merge 1x4 strips.
    """
    batch, num_tokens, channels = _check_grid(x, height, width, merge_size)
    x = x.reshape(batch, height // merge_size, merge_size, width // merge_size, merge_size, channels)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/m, W/m, m, m, C)
    return x.reshape(batch, num_tokens // merge_size**2, merge_size**2 * channels)


def _check_grid(x: torch.Tensor, height: int, width: int, merge_size: int) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise GridError(f"expected tokens shaped (B, N, C); got {tuple(x.shape)}")
    batch, num_tokens, channels = x.shape
    if height * width != num_tokens:
        raise GridError(f"Height {height} * Width {width} != N {num_tokens}")
    if height % merge_size or width % merge_size:
        raise GridError(f"Grid size ({height}, {width}) not divisible by merge_size {merge_size}")
    return batch, num_tokens, channels


class SpatialMergeProjector(nn.Module):
    """LayerNorm each token, merge 2x2 windows into one 4C token, then an MLP to the LLM width.

    Input (B, N, C) in raster order; output (B, N / merge_size**2, llm_dim).
    """

    def __init__(self, llm_dim: int, vit_dim: int, spatial_merge_size: int = DEFAULT_MERGE_SIZE, eps: float = 1e-6):
        super().__init__()
        self.llm_dim = llm_dim
        self.vit_dim = vit_dim
        self.spatial_merge_size = spatial_merge_size
        self.hidden_size = vit_dim * spatial_merge_size**2
        self.ln_q = nn.LayerNorm(vit_dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, llm_dim),
        )

    def forward(
        self,
        x: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        *,
        merged_only: bool = False,
    ) -> torch.Tensor:
        """Project (B, N, C) raster tokens; `height`/`width` default to a closest-to-square guess.

        With `merged_only=True` return the 2x2-merged tower features (B, N/4, 4C) *before* `ln_q`
        and the MLP: the parameters of both are what a user still training the projector needs
        to learn, so the stored features must not depend on them. `project_merged` finishes the job.
        """
        height, width = self._resolve_hw(x, height, width)
        if merged_only:
            return merge_windows(x, height, width, self.spatial_merge_size)
        x = self.ln_q(x)  # (B, N, C); LayerNorm is per token, so before or after merging is alike
        return self.mlp(merge_windows(x, height, width, self.spatial_merge_size))

    def project_merged(self, merged: torch.Tensor) -> torch.Tensor:
        """Finish projecting tokens stored by `merged_only`: (..., 4C) -> (..., llm_dim).

        `project_merged(forward(x, h, w, merged_only=True)) == forward(x, h, w)`.
        """
        windows = merged.unflatten(-1, (self.spatial_merge_size**2, self.vit_dim))  # (..., 4, C)
        return self.mlp(self.ln_q(windows).flatten(-2))

    def _resolve_hw(self, x: torch.Tensor, height: int | None, width: int | None) -> tuple[int, int]:
        if height is not None and width is not None:
            return height, width
        if height is not None or width is not None:
            raise GridError("pass both height and width, or neither")
        if x.dim() != 3:
            raise GridError(f"expected tokens shaped (B, N, C); got {tuple(x.shape)}")
        return infer_hw(x.shape[1], self.spatial_merge_size)


@dataclass(frozen=True)
class LoadedProjector:
    """A projector with its provenance: where it came from and a hash of its weights."""

    module: SpatialMergeProjector
    source: str
    content_hash: str


def load_projector(path: Path | str, eps: float = 1e-6) -> SpatialMergeProjector:
    """Load a SpatialMergeProjector from safetensors, `mm_projector.bin` or a full checkpoint."""
    return load_projector_with_hash(path, eps).module


def load_projector_with_hash(path: Path | str, eps: float = 1e-6) -> LoadedProjector:
    """`load_projector` plus the weights' content hash, for the output's provenance."""
    tensors = read_tensors(path)
    state = _projector_state(tensors, path)
    vit_dim, llm_dim, merge_size = _infer_dims(state, path)
    module = SpatialMergeProjector(llm_dim, vit_dim, merge_size, eps=eps)
    module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return LoadedProjector(module.eval(), str(path), hash_state_dict(state))


def _projector_state(tensors: dict[str, torch.Tensor], path: Path | str) -> dict[str, torch.Tensor]:
    """Strip the LLaVA prefix; keep only projector tensors; refuse anything else under it."""
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    bare: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        prefix = next((p for p in PROJECTOR_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            bare[name] = tensor
        else:
            by_prefix.setdefault(prefix, {})[name[len(prefix):]] = tensor
    if len(by_prefix) > 1:
        raise CheckpointError(f"{path} holds more than one projector: {sorted(by_prefix)}; pass the one you mean")
    # With a prefix, everything else in the file is the rest of the model and is ignored.
    state = next(iter(by_prefix.values())) if by_prefix else bare
    missing = [k for k in PROJECTOR_KEYS if k not in state]
    unexpected = sorted(k for k in state if k not in PROJECTOR_KEYS)
    if missing or unexpected:
        prefix = next(iter(by_prefix), "")
        details = []
        if missing:
            details.append("missing " + ", ".join(prefix + k for k in missing))
        if unexpected:
            shown = unexpected[:8] + (["..."] if len(unexpected) > 8 else [])
            details.append("unexpected " + ", ".join(prefix + k for k in shown))
        raise CheckpointError(
            f"{path} is not a spatial_merge projector checkpoint: {'; '.join(details)}"
        )
    return state


def _infer_dims(state: dict[str, torch.Tensor], path: Path | str) -> tuple[int, int, int]:
    """vit_dim, llm_dim and merge size from the tensor shapes, checked against each other."""
    vit_dim = state["ln_q.weight"].shape[0]
    hidden, llm_dim = state["mlp.0.weight"].shape[0], state["mlp.2.weight"].shape[0]
    windows = hidden // vit_dim if vit_dim else 0
    merge_size = math.isqrt(windows)
    expected = {
        "ln_q.weight": (vit_dim,),
        "ln_q.bias": (vit_dim,),
        "mlp.0.weight": (hidden, hidden),
        "mlp.0.bias": (hidden,),
        "mlp.2.weight": (llm_dim, hidden),
        "mlp.2.bias": (llm_dim,),
    }
    wrong = [
        f"{name} {tuple(state[name].shape)} (expected {shape})"
        for name, shape in expected.items()
        if tuple(state[name].shape) != shape
    ]
    if hidden != vit_dim * windows or merge_size**2 != windows or merge_size < 1:
        wrong.append(f"mlp width {hidden} is not merge_size**2 x vit_dim {vit_dim}")
    if wrong:
        raise CheckpointError(f"{path}: mis-shaped projector tensors: {'; '.join(wrong)}")
    return vit_dim, llm_dim, merge_size
