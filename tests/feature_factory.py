"""Random Features records for store, reader and inspect tests (fresh random tokens, never zeros)."""

from __future__ import annotations

import torch

from merge_cli.records import Failure, Features

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attrs(**overrides: object) -> dict:
    """Root attributes shaped like the pipeline's (JSON-valued ones as JSON text, as it passes them)."""
    base = {
        "merge_cli_version": "0.1.0",
        "tower": "demo-vit",
        "tower_hash": "0123456789abcdef",
        "tower_is_demo": True,
        "projector": "none",
        "projector_hash": "none",
        "output": "merged",
        "layer": -1,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 1,
        "compute_dtype": "fp32",
        "store_dtype": "bf16",
        "resize_policy": '{"kind": "smart", "max_pixels": 1003520, "min_pixels": 3136}',
        "video_options": '{"fps": 2.0, "max_frames": 32}',
        "media_options": '{"fast_decode": false}',
        "config_hash": "cafebabe12345678",
        "settings": '{"layer": -1, "output": "merged", "store_dtype": "bf16"}',
    }
    base.update(overrides)
    return base


def random_tokens(shape: tuple[int, ...], store_dtype: str = "bf16", *, all_bits: bool = False) -> torch.Tensor:
    """Random tokens in the store dtype; `all_bits` draws raw 16-bit patterns (NaN, Inf, -0, subnormals too)."""
    dtype = DTYPES[store_dtype]
    if all_bits and dtype != torch.float32:
        return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16).view(dtype)
    return (torch.randn(shape) * 3).to(dtype)


def features(
    key: str,
    *,
    dim: int = 32,
    grid: tuple[int, int, int] | None = None,
    store_dtype: str = "bf16",
    all_bits: bool = False,
) -> Features:
    """One image (t = 1) or video (t > 1) record with random tokens of a random even grid."""
    if grid is None:
        t = int(torch.randint(1, 4, ()))
        grid = (t, 2 * int(torch.randint(1, 5, ())), 2 * int(torch.randint(1, 5, ())))
    t, h, w = grid
    tokens = random_tokens((t, (h // 2) * (w // 2), dim), store_dtype, all_bits=all_bits)
    video = t > 1
    return Features(
        key=key,
        kind="video" if video else "image",
        tokens=tokens,
        grid_thw=grid,
        orig_hw=(int(torch.randint(20, 900, ())), int(torch.randint(20, 900, ()))),
        resized_hw=(h * 14, w * 14),
        decoder="pyav" if video else "pillow",
        frame_indices=[3 * i for i in range(t)] if video else [],
        frame_times=[0.5 * i for i in range(t)] if video else [],
    )


def failure(key: str, message: str = "cannot identify image file") -> Failure:
    return Failure(key=key, stage="decode", error_type="UnidentifiedImageError", message=message)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, for bit-exact comparison (NaN == NaN here)."""
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[tensor.dtype]
    return tensor.contiguous().view(view)
