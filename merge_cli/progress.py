"""Run progress for `extract`: a rich bar on a terminal, periodic log lines otherwise, or silence.

The pipeline only calls `warn`, `start`, `advance` and `finish`; what the user sees depends on
where the output goes (`--json` prints nothing but the final JSON; warnings are kept for it).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from merge_cli.records import Failure


@dataclass
class Reporter:
    """Silent reporter: collects warnings (for the JSON summary), shows nothing."""

    warnings: list[str] = field(default_factory=list)
    total: int = 0
    samples: int = 0
    tokens: int = 0
    failures: int = 0
    started: float = field(default_factory=time.perf_counter)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def start(self, total: int, description: str = "extracting") -> None:
        self.total, self.started = total, time.perf_counter()

    def advance(self, samples: int = 0, tokens: int = 0, failures: int = 0) -> None:
        self.samples += samples
        self.tokens += tokens
        self.failures += failures

    def failed(self, failure: Failure) -> None:
        """One input failed (its record is stored; the summary lists the first few)."""

    def finish(self) -> None:
        pass

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
        print(f"merge-cli: {description} {total} samples", file=sys.stderr, flush=True)

    def advance(self, samples: int = 0, tokens: int = 0, failures: int = 0) -> None:
        super().advance(samples, tokens, failures)
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._line()

    def finish(self) -> None:
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

    def advance(self, samples: int = 0, tokens: int = 0, failures: int = 0) -> None:
        super().advance(samples, tokens, failures)
        if self._progress is not None:
            self._progress.update(
                self._task,
                advance=samples + failures,
                rate=f"{self.tokens_per_second:,.0f}",
                errors=self.failures,
            )

    def finish(self) -> None:
        if self._progress is not None:
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
