"""Run progress for `extract`: a rich bar on a terminal, periodic log lines otherwise, or silence.

The pipeline only calls `warn`, `start`, `advance` and `finish`; what the user sees depends on
where the output goes (`--json` prints nothing but the final JSON; warnings are kept for it).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

from merge_cli.records import Failure


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
    samples: int = 0
    tokens: int = 0
    failures: int = 0
    started: float = field(default_factory=time.perf_counter)
    job: JobCounts | None = None
    sync_interval: float = 1.0
    _unsent: tuple[int, int, int] = (0, 0, 0)
    _synced: float = field(default_factory=time.perf_counter)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def start(self, total: int, description: str = "extracting") -> None:
        self.total, self.started = total, time.perf_counter()
        self._synced = self.started

    def set_total(self, total: int) -> None:
        """The listing streams: the total grows as units are listed (final once it ends)."""
        self.total = total

    def advance(self, samples: int = 0, tokens: int = 0, failures: int = 0) -> None:
        if self.job is None:
            self.samples += samples
            self.tokens += tokens
            self.failures += failures
            return
        self._unsent = tuple(a + b for a, b in zip(self._unsent, (samples, tokens, failures)))  # type: ignore[assignment]
        if time.perf_counter() - self._synced >= self.sync_interval:
            self.sync()

    def sync(self) -> None:
        """Send this rank's unsent counts to the job and take the job's totals (a round trip)."""
        if self.job is not None:
            self.samples, self.tokens, self.failures = self.job.add(*self._unsent)
            self._unsent, self._synced = (0, 0, 0), time.perf_counter()

    def failed(self, failure: Failure) -> None:
        """One input failed (its record is stored; the summary lists the first few)."""

    def finish(self) -> None:
        self.sync()

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.tokens / elapsed if elapsed > 0 else 0.0


@dataclass
class LogReporter(Reporter):
    """Plain lines on stderr every `interval` seconds, for logs and non-terminals."""

    interval: float = 10.0
    _last: float = 0.0

    def warn(self, message: str) -> None:
        super().warn(message)
        print(f"merge-cli: warning: {message}", file=sys.stderr, flush=True)

    def start(self, total: int, description: str = "extracting") -> None:
        super().start(total, description)
        self._last = time.perf_counter()
        print(f"merge-cli: {description} (inputs are listed as the work goes)", file=sys.stderr, flush=True)

    def advance(self, samples: int = 0, tokens: int = 0, failures: int = 0) -> None:
        super().advance(samples, tokens, failures)
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._line()

    def finish(self) -> None:
        super().finish()
        self._line()

    def _line(self) -> None:
        done = self.samples + self.failures
        print(
            f"merge-cli: {done}/{self.total} samples, {self.failures} failed, "
            f"{self.tokens_per_second:,.0f} tokens/s",
            file=sys.stderr,
            flush=True,
        )


@dataclass
class RichReporter(Reporter):
    """A live rich progress bar: samples, tokens/s, errors so far, ETA."""

    _progress: object = None
    _task: object = None

    def warn(self, message: str) -> None:
        super().warn(message)
        from rich.console import Console

        console = self._progress.console if self._progress is not None else Console(stderr=True)
        console.print(f"[bold yellow]warning:[/] {message}", highlight=False)

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
            TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("[red]{task.fields[errors]} errors"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, rate="0", errors=0)

    def set_total(self, total: int) -> None:
        super().set_total(total)
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def advance(self, samples: int = 0, tokens: int = 0, failures: int = 0) -> None:
        super().advance(samples, tokens, failures)
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=self.samples + self.failures,
                rate=f"{self.tokens_per_second:,.0f}",
                errors=self.failures,
            )

    def finish(self) -> None:
        super().finish()
        if self._progress is not None:
            self._progress.update(self._task, completed=self.samples + self.failures, errors=self.failures)
            self._progress.stop()
            self._progress = None


@dataclass
class ErrorLogReporter(Reporter):
    """For torchrun ranks other than 0: one stderr line per failed input, nothing else."""

    rank: int = 0

    def failed(self, failure: Failure) -> None:
        print(
            f"merge-cli[rank {self.rank}]: {failure.key}: {failure.stage} failed: "
            f"{failure.error_type}: {failure.message}",
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
