"""The device step: decoded items -> normalized pixels -> tower -> 2x2 merge (-> projector).

One `FeatureExtractor` per process holds the models on their device. It owns the numerics that
`extract` promises: autocast to the compute dtype, the merge of every frame's (h, w) grid into
(h/2 * w/2) tokens, and a retry in halves when the device runs out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_cli.media.images import normalize
from merge_cli.models.merger import SpatialMergeProjector, merge_windows
from merge_cli.records import Failure, Features, Item
from merge_cli.run.batching import split_in_halves

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """`auto` -> the first CUDA device when there is one, else the CPU."""
    from merge_cli.errors import UsageError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass
class PendingOutput:
    """One batch's outputs on their way to the host; `wait` before reading the tensors."""

    results: list[Features | Failure]
    done: torch.cuda.Event | None = None

    def wait(self) -> list[Features | Failure]:
        if self.done is not None:
            self.done.synchronize()
        return self.results


class FeatureExtractor:
    """Runs tower + merger (+ projector) on batches of items; never raises for one bad sample."""

    def __init__(
        self,
        tower: torch.nn.Module,
        projector: SpatialMergeProjector | None,
        *,
        merge_size: int,
        device: torch.device,
        compute_dtype: str,
        store_dtype: str,
        rescale_factor: float = 1 / 255,
    ) -> None:
        self.rescale_factor = float(rescale_factor)
        self.tower = tower.to(device).eval()
        self.projector = projector.to(device).eval() if projector is not None else None
        self.merge_size = merge_size
        self.device = device
        self.compute_dtype = TORCH_DTYPES[compute_dtype]
        self.store_dtype = TORCH_DTYPES[store_dtype]
        self._mean = tuple(float(v) for v in tower.image_mean)
        self._std = tuple(float(v) for v in tower.image_std)

    def extract(self, items: list[Item]) -> PendingOutput:
        """Features for every item (or a Failure for the ones that do not fit in memory alone)."""
        try:
            return self._forward(items)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(error):
                raise
            self._release_memory()
            if len(items) == 1:
                item = items[0]
                message = f"does not fit in device memory alone ({tuple(item.pixels.shape)} pixels)"
                return PendingOutput([Failure(item.key, "tower", "OutOfMemoryError", message)])
            results: list[Features | Failure] = []
            for half in split_in_halves(items):
                results.extend(self.extract(half).wait())
            return PendingOutput(results)

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _forward(self, items: list[Item]) -> PendingOutput:
        pixels = self._to_device([item.pixels for item in items])
        enabled = self.compute_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled):
            features = self.tower(pixels)  # one (t*h*w, C) per item, raster order
            outputs = [self._merge(item, feats) for item, feats in zip(items, features)]
        return self._to_host(items, outputs)

    def _to_device(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 pixels -> normalized compute-dtype tensors on the device, one copy per batch."""
        if self.device.type == "cuda":
            # One pinned staging buffer and one asynchronous copy instead of one per item.
            flat = torch.cat([p.reshape(-1) for p in pixels]).pin_memory()
            on_device = flat.to(self.device, non_blocking=True)
            pieces = on_device.split([p.numel() for p in pixels])
            pixels = [piece.view(p.shape) for piece, p in zip(pieces, pixels)]
        dtype = self.compute_dtype
        return [normalize(p, self._mean, self._std, torch.float32, self.rescale_factor).to(dtype) for p in pixels]

    def _merge(self, item: Item, features: torch.Tensor) -> torch.Tensor:
        """(t*h*w, C) raster tokens -> (t, h/m * w/m, D), merged per frame (temporal patch)."""
        t, h, w = self.feature_grid(item)
        frames = features.reshape(t, h * w, features.shape[-1])  # (t, h*w, C)
        if self.projector is None:
            return merge_windows(frames, h, w, self.merge_size)  # (t, h*w/m^2, m^2*C)
        return self.projector(frames, height=h, width=w)  # (t, h*w/m^2, llm_dim)

    def feature_grid(self, item: Item) -> tuple[int, int, int]:
        frames, _, height, width = item.pixels.shape
        return tuple(self.tower.feature_grid(frames, height, width))

    def _to_host(self, items: list[Item], outputs: list[torch.Tensor]) -> PendingOutput:
        stored = [out.to(self.store_dtype) for out in outputs]
        done = None
        if self.device.type == "cuda":
            # Copy back asynchronously; the writer waits on the event, so the next batch's
            # compute overlaps this copy and the disk write.
            sizes = [s.numel() for s in stored]
            host = torch.cat([s.reshape(-1) for s in stored]).to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            stored = [piece.view(s.shape) for piece, s in zip(host.split(sizes), stored)]
        results: list[Features | Failure] = [
            Features(
                key=item.key,
                kind=item.kind,
                tokens=tokens,
                grid_thw=self.feature_grid(item),
                orig_hw=item.orig_hw,
                resized_hw=item.resized_hw,
                decoder=item.decoder,
                frame_indices=item.frame_indices,
                frame_times=item.frame_times,
                processor_grid=item.processor_grid,
            )
            for item, tokens in zip(items, stored)
        ]
        return PendingOutput(results, done)
