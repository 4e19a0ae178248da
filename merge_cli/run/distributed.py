"""Scaling out: the torchrun environment, which units a rank does, and rank coordination.

With no torchrun environment and no --rank/--world-size, everything here is a no-op and the
single-process path stays a plain loop.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

# Rank 0 waits for every other rank before writing the index: the slowest rank may finish long
# after the others, so this is generous (overridable with MERGE_CLI_BARRIER_TIMEOUT seconds).
DEFAULT_BARRIER_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class DistContext:
    """Who this process is: rank, world size, and whether torch.distributed connects the ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    connected: bool = False
    """True under torchrun (a process group exists); False alone or with --rank/--world-size."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_split(self) -> bool:
        return self.world_size > 1

    @classmethod
    def detect(cls, rank: int | None = None, world_size: int | None = None) -> DistContext:
        """--rank/--world-size given by hand win; else torchrun's environment; else one process."""
        if rank is not None and world_size is not None:
            return cls(rank, world_size, 0, connected=False)
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world > 1:
            return cls(
                int(os.environ["RANK"]), env_world, int(os.environ.get("LOCAL_RANK", "0")), connected=True
            )
        return cls()

    def device_name(self, requested: str) -> str:
        """Under torchrun each rank takes cuda:LOCAL_RANK when asked for auto or plain cuda."""
        if not self.connected:
            return requested
        import torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def setup(self, device_type: str) -> None:
        """Join the process group (NCCL with GPUs, gloo on CPU)."""
        if not self.connected:
            return
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return
        seconds = os.environ.get("MERGE_CLI_BARRIER_TIMEOUT")
        timeout = datetime.timedelta(seconds=float(seconds)) if seconds else DEFAULT_BARRIER_TIMEOUT
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend=backend, timeout=timeout)

    def barrier(self) -> None:
        if self.connected:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: object) -> list[object]:
        """Every rank's `value` (on every rank); just [value] when not connected."""
        if not self.connected:
            return [value]
        import torch.distributed as dist

        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def job_counts(self) -> StoreCounts | None:
        """Progress counts shared by all ranks through the process group's key-value store (one
        TCP round trip per update), or None when not connected or the store is unavailable."""
        if not self.connected:
            return None
        try:
            from torch.distributed import distributed_c10d

            return StoreCounts(distributed_c10d._get_default_store())
        except Exception:  # a private accessor: without it, rank 0 shows its own progress only
            return None

    def shutdown(self) -> None:
        if self.connected:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class StoreCounts:
    """Samples, tokens and failures of the whole job, added to atomically by every rank."""

    KEYS = ("merge-cli/samples", "merge-cli/tokens", "merge-cli/failures")

    def __init__(self, store) -> None:
        self.store = store

    def add(self, samples: int, tokens: int, failures: int) -> tuple[int, int, int]:
        return tuple(int(self.store.add(key, value)) for key, value in zip(self.KEYS, (samples, tokens, failures)))  # type: ignore[return-value]


NEXT_UNIT_KEY = "merge-cli/next-unit"
SLOW_RANK_ENV = "MERGE_CLI_TEST_SLOW_RANK"
"""Test-only: `RANK:SECONDS` makes that rank sleep after each unit it claims (a slow GPU)."""


def static_owner(unit: int, world_size: int) -> int:
    """The rank that does `unit` when ranks never talk (--rank/--world-size): round robin, so
    every rank gets every world_size-th unit of the listing, and any rerun agrees."""
    return unit % world_size


def unit_claims(dist: DistContext) -> Iterator[int]:
    """The units this process does, in increasing order, forever (the listing decides the end).

    Under torchrun each claim takes the next number of a counter in the process group's store
    (TCPStore `add`, atomic): a fast rank simply claims more, a slow or dead one holds back only
    the unit it is on. Alone, every unit; with --rank/--world-size, the static round robin."""
    slow = _slow_seconds(dist.rank)
    if dist.connected:
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        while True:
            claimed = int(store.add(NEXT_UNIT_KEY, 1)) - 1
            if slow:
                time.sleep(slow)
            yield claimed
    unit = dist.rank if dist.is_split else 0
    step = dist.world_size if dist.is_split else 1
    while True:
        yield unit
        unit += step


def _slow_seconds(rank: int) -> float:
    text = os.environ.get(SLOW_RANK_ENV, "")
    if ":" not in text:
        return 0.0
    which, seconds = text.split(":", 1)
    return float(seconds) if int(which) == rank else 0.0
