"""Token-budget batching: group decoded items so each forward pass holds about `batch_tokens`.

Counting patch tokens instead of images keeps the GPU's work per pass even when a 1,280-token
photo sits next to a 64-token thumbnail or an 8,192-token video. Two modes:

- `pack` (default): fill each pass with whatever arrives, mixed shapes; the tower runs the
  per-token work (projections, MLP) over all tokens at once and attention per sample.
- `bucket`: one shape per pass (classic bucketing); leftovers form small ragged batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from merge_cli.records import Item

TokenCounter = Callable[[Item], int]

# Bucketing holds partly filled buckets in memory; beyond this many budgets' worth, the
# fullest bucket is sent as it is, so thousands of distinct shapes cannot exhaust memory.
MAX_PENDING_BUDGETS = 8


@dataclass
class Batch:
    """Items for one forward pass."""

    items: list[Item]
    tokens: int
    """Patch tokens (before merging) over all items."""


@dataclass
class BatchStats:
    """How well batches were filled: real tokens over (batches x budget), capped per batch."""

    batches: int = 0
    tokens: int = 0
    budget_tokens: int = 0

    def record(self, batch: Batch, budget: int) -> None:
        self.batches += 1
        self.tokens += batch.tokens
        self.budget_tokens += max(budget, batch.tokens)

    @property
    def fill(self) -> float:
        return self.tokens / self.budget_tokens if self.budget_tokens else 0.0


@dataclass
class _Bin:
    shape: tuple | None
    """The one shape a bucket holds; None in pack mode (any shape)."""
    items: list[Item] = field(default_factory=list)
    tokens: int = 0


@dataclass
class TokenBatcher:
    """Online batcher: `add` items as they are decoded, take full batches out, `flush` at the end.

    Pack mode keeps a few open bins and puts each item into the first one it fits (online
    first-fit), so a large item that does not fit the current pass waits for the next one
    instead of closing a half-empty pass. Bucket mode keeps one bin per shape.
    """

    batch_tokens: int
    count_tokens: TokenCounter
    mode: str = "pack"
    open_bins: int = 4
    """Pack mode: bins filled at once before the fullest is sent."""
    stats: BatchStats = field(default_factory=BatchStats)
    _bins: list[_Bin] = field(default_factory=list)
    _pending_tokens: int = 0

    def add(self, item: Item) -> list[Batch]:
        tokens = self.count_tokens(item)
        if tokens >= self.batch_tokens:
            return [self._emit(_Bin(None, [item], tokens))]  # a pass of its own
        shape = None if self.mode == "pack" else tuple(item.pixels.shape)
        ready: list[Batch] = []
        target = next(
            (b for b in self._bins if b.shape == shape and b.tokens + tokens <= self.batch_tokens), None
        )
        if target is None:
            if self.mode == "bucket":
                # A bucket that cannot take one more item of its own shape is as full as it gets.
                ready.extend(self._close(b) for b in [b for b in self._bins if b.shape == shape])
            elif len(self._bins) >= self.open_bins:
                ready.append(self._close(max(self._bins, key=lambda b: b.tokens)))
            target = _Bin(shape)
            self._bins.append(target)
        target.items.append(item)
        target.tokens += tokens
        self._pending_tokens += tokens
        if target.tokens == self.batch_tokens:
            ready.append(self._close(target))
        while self._pending_tokens > MAX_PENDING_BUDGETS * self.batch_tokens:
            ready.append(self._close(max(self._bins, key=lambda b: b.tokens)))
        return ready

    def flush(self) -> list[Batch]:
        return [self._close(b) for b in list(self._bins)]

    def _close(self, bin_: _Bin) -> Batch:
        self._bins.remove(bin_)
        self._pending_tokens -= bin_.tokens
        return self._emit(bin_)

    def _emit(self, bin_: _Bin) -> Batch:
        batch = Batch(bin_.items, bin_.tokens)
        self.stats.record(batch, self.batch_tokens)
        return batch


def split_in_halves(items: list[Item]) -> Iterator[list[Item]]:
    """The two halves of a batch, for retrying after running out of device memory."""
    middle = len(items) // 2
    yield items[:middle]
    yield items[middle:]
