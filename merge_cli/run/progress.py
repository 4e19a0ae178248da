"""Run progress for `extract`: a rich bar on a terminal, periodic log lines otherwise, or silence.

The pipeline only calls `warn`, `start`, `set_total`, `advance` and `finish`; what the user sees
depends on where the output goes (`--json` prints nothing but the final JSON; warnings are kept
for it).

The total grows while the inputs are listed (they stream, never listed whole up front): until the
listing has ended it is only what has been listed so far, so no percent and no ETA are shown then
(the log line says `1,200/10,000+ samples (listing)`, the bar pulses); once the listing has ended
(`set_total(..., final=True)`, at the latest when the last unit is handed out) the total is exact
and the percent and ETA follow: the ETA is what is left at the average rate so far.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from merge_cli.records import Failure, printable


class JobCounts(Protocol):
    """Counts shared by every rank of a job (see `DistContext.job_counts`)."""

    def add(self, samples: int, tokens: int, failures: int) -> tuple[int, int, int]:
        """Add this rank's new counts; returns the job's totals."""


@dataclass
class Reporter:
    """Silent reporter: collects warnings (for the JSON summary), shows nothing.

    With `job` set (torchrun), every rank adds its counts to the job's shared counts about once a
    second, and the counts shown are the whole job's.
    """

    warnings: list[str] = field(default_factory=list)
    total: int = 0
    total_final: bool = False
    """Whether the listing has ended (the total is exact); until then it is what was listed so far."""
    samples: int = 0
    tokens: int = 0
    failures: int = 0
    clock: Callable[[], float] = time.perf_counter
    started: float = field(default_factory=time.perf_counter)
    job: JobCounts | None = None
    sync_interval: float = 1.0
    _unsent: tuple[int, int, int] = (0, 0, 0)
    _synced: float = field(default_factory=time.perf_counter)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def start(self, total: int, description: str = "extracting") -> None:
        self.total, self.started = total, self.clock()
        self._synced = self.started

    def set_total(self, total: int, final: bool = False) -> None:
        """The listing streams: the total grows as units are listed; `final` once it has ended."""
        self.total, self.total_final = total, final

    def advance(self, samples: int = 0, tokens: int = 0, failures: int = 0) -> None:
        if self.job is None:
            self.samples += samples
            self.tokens += tokens
            self.failures += failures
            return
        self._unsent = tuple(a + b for a, b in zip(self._unsent, (samples, tokens, failures)))  # type: ignore[assignment]
        if self.clock() - self._synced >= self.sync_interval:
            self.sync()

    def sync(self) -> None:
        """Send this rank's unsent counts to the job and take the job's totals (a round trip)."""
        if self.job is not None:
            self.samples, self.tokens, self.failures = self.job.add(*self._unsent)
            self._unsent, self._synced = (0, 0, 0), self.clock()

    def failed(self, failure: Failure) -> None:
        """One input failed (its record is stored; the summary lists the first few)."""

    def finish(self) -> None:
        self.sync()

    @property
    def done(self) -> int:
        """Inputs finished in this run: written or failed."""
        return self.samples + self.failures

    @property
    def elapsed(self) -> float:
        return max(0.0, self.clock() - self.started)

    @property
    def tokens_per_second(self) -> float:
        elapsed = self.elapsed
        return self.tokens / elapsed if elapsed > 0 else 0.0

    @property
    def samples_per_second(self) -> float:
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def percent(self) -> float | None:
        """Share of the total done; None while the total still grows (or is empty)."""
        if not self.total_final or self.total <= 0:
            return None
        return 100.0 * min(self.done, self.total) / self.total

    @property
    def eta(self) -> float | None:
        """Seconds left at the average rate so far; None while the total grows, before any input is
        done and once all are."""
        rate = self.samples_per_second
        if self.percent is None or rate <= 0 or self.done >= self.total:
            return None
        return (self.total - self.done) / rate


def clock_text(seconds: float) -> str:
    """0:07:31, or 26:03:10 past a day (hours keep counting)."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def progress_line(reporter: Reporter) -> str:
    """The periodic log line: done/total (percent), failures, rates, elapsed time and ETA."""
    if reporter.percent is None:
        count = f"{reporter.done:,}/{reporter.total:,}+ samples (listing)"
    else:
        count = f"{reporter.done:,}/{reporter.total:,} samples ({reporter.percent:.0f}%)"
    eta = reporter.eta
    return (
        f"merge-cli: {count}, {reporter.failures:,} failed, {reporter.samples_per_second:,.1f} samples/s, "
        f"{reporter.tokens_per_second:,.0f} tokens/s, {clock_text(reporter.elapsed)} elapsed"
        + ("" if eta is None else f", ETA {clock_text(eta)}")
    )


@dataclass
class LogReporter(Reporter):
    """Plain lines on stderr every `interval` seconds, for logs and non-terminals."""

    interval: float = 10.0
    _last: float = 0.0

    def warn(self, message: str) -> None:
        super().warn(message)
        print(f"merge-cli: warning: {printable(message)}", file=sys.stderr, flush=True)

    def start(self, total: int, description: str = "extracting") -> None:
        super().start(total, description)
        self._last = self.clock()
        print(
            f"merge-cli: {description} (inputs are listed as the work goes: percent and ETA once the listing ends)",
            file=sys.stderr,
            flush=True,
        )

    def advance(self, samples: int = 0, tokens: int = 0, failures: int = 0) -> None:
        super().advance(samples, tokens, failures)
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            self._line()

    def finish(self) -> None:
        super().finish()
        self._line()

    def _line(self) -> None:
        print(progress_line(self), file=sys.stderr, flush=True)


@dataclass
class RichReporter(Reporter):
    """A live rich progress bar: samples, samples/s, tokens/s, errors so far, elapsed time, ETA.

    While the listing still streams the total is unknown to the bar (it pulses, shows `N/?` and no
    ETA); once the listing has ended the bar fills and rich's ETA takes over."""

    console: object = None
    """Where the bar is drawn (default: stderr)."""
    _progress: object = None
    _task: object = None

    def warn(self, message: str) -> None:
        super().warn(message)
        from rich.console import Console

        console = self._progress.console if self._progress is not None else Console(stderr=True)
        from rich.markup import escape

        console.print(f"[bold yellow]warning:[/] {escape(printable(message))}", highlight=False)

    def start(self, total: int, description: str = "extracting") -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        super().start(total, description)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[samples_rate]} samples/s"),
            TextColumn("{task.fields[tokens_rate]} tok/s"),
            TextColumn("[red]{task.fields[errors]} errors"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console or Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=None, samples_rate="0.0", tokens_rate="0", errors=0)

    def set_total(self, total: int, final: bool = False) -> None:
        super().set_total(total, final)
        if self._progress is not None:
            self._progress.update(self._task, total=total if final else None)

    def advance(self, samples: int = 0, tokens: int = 0, failures: int = 0) -> None:
        super().advance(samples, tokens, failures)
        self._refresh()

    def _refresh(self) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=self.done,
                samples_rate=f"{self.samples_per_second:,.1f}",
                tokens_rate=f"{self.tokens_per_second:,.0f}",
                errors=self.failures,
            )

    def finish(self) -> None:
        super().finish()
        if self._progress is not None:
            self._progress.update(self._task, total=self.total)
            self._refresh()
            self._progress.stop()
            self._progress = None


@dataclass
class ErrorLogReporter(Reporter):
    """For torchrun ranks other than 0: one stderr line per failed input, nothing else."""

    rank: int = 0

    def failed(self, failure: Failure) -> None:
        print(
            f"merge-cli[rank {self.rank}]: {printable(failure.key)}: {failure.stage} failed: "
            f"{printable(failure.error_type)}: {printable(failure.message)}",
            file=sys.stderr,
            flush=True,
        )


def make_reporter(json_output: bool, rank: int = 0) -> Reporter:
    """Silent for --json, errors only for ranks other than 0, a bar on a terminal, else log lines."""
    if rank != 0:
        return ErrorLogReporter(rank=rank)
    if json_output:
        return Reporter()
    if sys.stderr.isatty():
        return RichReporter()
    return LogReporter()
