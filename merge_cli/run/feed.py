"""The work feed: units claimed, planned against the resume scan, streamed to the decode workers.

`WorkFeed` is the DataLoader's sampler. It walks the unit stream once, takes the units this
process claims (merge_cli/run/distributed.py `unit_claims`), drops what the output already holds
(`UnitPlan`), and yields one `Todo` descriptor per entry: a DataLoader worker only ever holds the
entry it decodes, the main process only the units in flight. The writer side reports each stored
result back (`stored`); when a unit's last result is stored, its shards are committed and its
completion marker is written, last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import NamedTuple

from merge_cli.inputs.units import Entry, Unit
from merge_cli.records import Failure


class Todo(NamedTuple):
    """What the sampler hands a decode worker: one entry of one unit."""

    unit: int
    entry: Entry


@dataclass
class UnitWork:
    """What is left of one unit, and what a rerun must know about its earlier parts."""

    entries: list[Entry]
    prior_shards: list[str] = field(default_factory=list)
    prior_samples: int = 0
    prior_failures: int = 0
    """Keys of this unit with only error records in earlier shards that stay as they are."""


class UnitPlan:
    """Decides, per unit, what still has to be done (from `store.scan_units`)."""

    def __init__(self, scan, out: Path, *, retry_failed: bool, warn: Callable[[str], None]) -> None:
        self.scan = scan
        self.out = out
        self.retry_failed = retry_failed
        self.warn = warn
        self._by_key: tuple[set[str], set[str]] | None = None

    def work(self, unit: Unit, mine: bool) -> UnitWork | None:
        """None when the unit is complete; else what is left. Units of other ranks (`mine` False)
        are only counted, so nothing is read for them."""
        scan = self.scan
        keys = [entry.key for entry in unit.entries]
        if scan is None:
            return UnitWork(list(unit.entries))
        marker = scan.complete.get(unit.id)
        if marker is not None and marker.get("fingerprint") == unit.fingerprint:
            if not (self.retry_failed and int(marker.get("failures", 0))) or not unit.whole:
                return None  # a unit cut short by --limit retries its failures only when whole again
            if not mine:  # another rank retries them: only counted here
                return UnitWork(list(unit.entries[: int(marker["failures"])]))
            done, failed = self._keys_in(marker["shards"])
            return UnitWork(
                [e for e in unit.entries if e.key in failed and e.key not in done],
                prior_shards=list(marker["shards"]),
                prior_samples=sum(1 for k in keys if k in done),
            )
        if marker is not None:
            done, failed = self._all_keys()
            prior = list(marker["shards"])
        else:
            part = scan.partial.get(unit.id)
            done = part.done_keys if part else set()
            failed = part.failed_keys if part else set()
            prior = list(part.shards) if part else []
        if scan.loose_done or scan.loose_failed:
            done, failed = done | scan.loose_done, failed | scan.loose_failed
        left = [e for e in unit.entries if e.key not in done and (self.retry_failed or e.key not in failed)]
        kept_failures = 0 if self.retry_failed else sum(1 for k in keys if k in failed and k not in done)
        return UnitWork(left, prior, sum(1 for k in keys if k in done), kept_failures)

    def _keys_in(self, shard_names: Iterable[str]) -> tuple[set[str], set[str]]:
        from merge_cli.output.format import open_h5, read_strings, shard_dir

        done: set[str] = set()
        failed: set[str] = set()
        for name in shard_names:
            with open_h5(shard_dir(self.out) / name) as handle:
                done.update(read_strings(handle["keys"]))
                failed.update(read_strings(handle["errors/key"]))
        return done, failed - done

    def _all_keys(self) -> tuple[set[str], set[str]]:
        """The slow path, for a listing that changed since the output was written: every key."""
        if self._by_key is None:
            from merge_cli.output import store

            self.warn(
                f"the inputs changed since {self.out} was written (a unit's keys differ): resuming by key, "
                "which reads the keys of every shard"
            )
            existing = store.scan_existing(self.out, rank=None, delete_temporaries=False)
            self._by_key = (existing.done_keys, existing.failed_keys) if existing else (set(), set())
        return self._by_key


@dataclass
class _InFlight:
    remaining: int
    work: UnitWork
    entries: int
    fingerprint: str
    whole: bool = True
    samples: int = 0
    failures: int = 0


class WorkFeed:
    """The sampler over this process's work; also the bookkeeping of units in flight."""

    def __init__(
        self,
        units: Iterable[Unit],
        claims: Iterator[int],
        plan: UnitPlan,
        *,
        on_total: Callable[[int, bool], None] = lambda total, final: None,
        listing_ended: Callable[[], bool] = lambda: False,
    ) -> None:
        self.units = units
        self.claims = claims
        self.plan = plan
        self.on_total = on_total
        """Told the whole job's total to do as it grows, and whether it is final (the listing ended)."""
        self.listing_ended = listing_ended
        self.listed = 0
        """Entries listed so far (all units, this rank's or not)."""
        self.skipped = 0
        """Entries the output already holds (all units)."""
        self.todo_total = 0
        """Entries still to do (all units; the whole job's progress total)."""
        self.units_done: list[int] = []
        self._in_flight: dict[int, _InFlight] = {}
        self._unit_of: dict[str, int] = {}
        self.empty_units: SimpleQueue[int] = SimpleQueue()
        """Units with nothing left to do: they still get their marker (the loop passes them on;
        the DataLoader may iterate the sampler before the writer exists)."""
        self.exhausted = False

    def __iter__(self) -> Iterator[Todo]:
        units = iter(self.units)
        for claimed in self.claims:
            unit = None
            for unit in units:
                mine = unit.id == claimed
                work = self.plan.work(unit, mine)
                self.listed += len(unit.entries)
                left = len(work.entries) if work is not None else 0
                self.skipped += len(unit.entries) - left
                self.todo_total += left
                self.on_total(self.todo_total, self.listing_ended())
                if mine:
                    break
            else:
                self.exhausted = True
                self.on_total(self.todo_total, True)
                return
            if work is None:
                continue
            self._in_flight[unit.id] = _InFlight(len(work.entries), work, len(unit.entries), unit.fingerprint, unit.whole)
            if not work.entries:
                self.empty_units.put(unit.id)
                continue
            for entry in work.entries:
                self._unit_of[entry.key] = unit.id
                yield Todo(unit.id, entry)

    def unit_of(self, key: str) -> int:
        return self._unit_of[key]

    def stored(self, result) -> bool:
        """Count one stored result; True when it was its unit's last (the unit's marker is due)."""
        unit = self._unit_of.pop(result.key)
        state = self._in_flight[unit]
        if isinstance(result, Failure):
            state.failures += 1
        else:
            state.samples += 1
        state.remaining -= 1
        return state.remaining == 0

    def marker(self, unit: int, new_shards: list[str], **extra: object) -> dict | None:
        """The completion marker of a finished unit (and forget it); None for a unit cut short by
        --limit, which must not be marked complete (a later run does the rest of it)."""
        state = self._in_flight.pop(unit)
        if not state.whole:
            return None
        self.units_done.append(unit)
        return dict(
            extra,
            fingerprint=state.fingerprint,
            entries=state.entries,
            samples=state.work.prior_samples + state.samples,
            failures=state.work.prior_failures + state.failures,
            shards=state.work.prior_shards + new_shards,
        )
