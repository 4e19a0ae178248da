"""The `merge-cli` command line: Typer commands only.

Each command parses options, calls the core, and maps the project's exceptions to one red line
and an exit code. Nothing heavy (torch, h5py, decord) is imported at module level, so `--help`
stays fast; each command imports what it needs when it runs.

Exit codes (also in the README):
  0  success (check-grid: the size is already a valid merge grid)
  1  check-grid: the size is not a valid grid; extract: the run could not start
  2  unusable input or options (a bad size, an unreadable or foreign file)
  3  extract: the run finished but some inputs failed (their error records are in the output)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional, TypeVar

import typer

from merge_cli import __version__
from merge_cli.errors import MergeCliError

app = typer.Typer(
    name="merge-cli",
    help="Pre-extract vision-tower features, 2x2-merged, into HDF5 shards for offline LLM training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

T = TypeVar("T")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console():
    from rich.console import Console

    return Console(highlight=False)


def fail(message: str, code: int, json_output: bool = False) -> NoReturn:
    """One line on stderr (or a JSON object on stdout with --json), then exit with `code`."""
    if json_output:
        print(json.dumps({"error": message, "exit_code": code}))
    else:
        _stderr_console().print(f"[bold red]merge-cli: error:[/] {message}", soft_wrap=True, markup=True)
    raise typer.Exit(code)


def run_core(call: Callable[[], T], json_output: bool = False) -> T:
    """Run a core function; turn the project's exceptions into their exit codes."""
    try:
        return call()
    except MergeCliError as error:
        fail(str(error), error.exit_code, json_output)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _version_callback(value: bool) -> None:
    if value:
        print(f"merge-cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Pre-extract vision-tower features, 2x2-merged, into HDF5 shards for offline LLM training."""


@app.command("check-grid")
def check_grid(
    target: Annotated[
        Optional[str],
        typer.Argument(help="A size HxW (height first, e.g. 252x448) or an image/video file.", show_default=False),
    ] = None,
    patch_size: Annotated[int, typer.Option(min=1, help="Tower patch size in pixels.")] = 14,
    merge_size: Annotated[int, typer.Option(min=1, help="Merge window side (2 = 2x2).")] = 2,
    min_pixels: Annotated[
        Optional[int], typer.Option(min=1, help="Resize floor in pixels [default: 4 * factor^2].", show_default=False)
    ] = None,
    max_pixels: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Resize ceiling in pixels [default: 1280 * factor^2; for a video file 64 * factor^2].",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        Optional[str], typer.Option(help="Fixed-size policy: resize everything to exactly HxW.", show_default=False)
    ] = None,
    tokens: Annotated[
        Optional[int],
        typer.Option(help="Instead of a size, infer the (h, w) grid of N raster tokens.", show_default=False),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print only JSON (stable keys).")] = False,
) -> None:
    """Is a size a valid merge grid, and what would the resize policy make of it?

    Exit 0 when it already is a valid grid, 1 when it is not (the output still shows the resized
    size), 2 for unusable input.
    """
    from merge_cli import grid
    from merge_cli.report import render_check_grid

    if tokens is not None:
        if target is not None:
            fail("give either a size/file or --tokens, not both", 2, json_output)
        if tokens < 1:
            fail(f"--tokens must be a positive number of tokens; got {tokens}", 2, json_output)
        report = grid.describe_tokens(tokens, patch_size, merge_size)
    else:
        if target is None:
            fail("give a size HxW (e.g. 252x448), an image or video file, or --tokens N", 2, json_output)
        report = run_core(
            lambda: _describe_target(target, patch_size, merge_size, min_pixels, max_pixels, size), json_output
        )
    if json_output:
        print_json(report)
    else:
        render_check_grid(report, _stdout_console())
    raise typer.Exit(0 if report["valid"] else 1)


def _describe_target(
    target: str,
    patch_size: int,
    merge_size: int,
    min_pixels: int | None,
    max_pixels: int | None,
    size: str | None,
) -> dict:
    from merge_cli import grid
    from merge_cli.errors import MediaError, UsageError

    path = Path(target)
    source = "size"
    if path.exists() or not grid.looks_like_size(target):
        from merge_cli.probe import media_kind, probe_media

        if not path.exists():
            raise UsageError(f"{target!r} is neither a size HxW (e.g. 252x448) nor an existing file")
        if media_kind(path) is None:
            raise UsageError(f"{target}: not a recognized image or video file")
        try:
            info = probe_media(path)
        except MediaError as error:
            raise UsageError(f"cannot read the size of {target}: {error}") from error
        height, width, source = info.height, info.width, info.kind
    else:
        height, width = grid.parse_hw(target)
    fixed = grid.parse_hw(size) if size else None
    factor = grid.merge_factor(patch_size, merge_size)
    if source == "video" and max_pixels is None:
        from merge_cli.config import default_video_max_pixels

        max_pixels = default_video_max_pixels(factor)
        min_pixels = min(min_pixels or 4 * factor**2, max_pixels)
    policy = grid.ResizePolicy(patch_size, merge_size, min_pixels, max_pixels, fixed)
    report = {"input": target, "source": source}
    report.update(grid.describe_size(height, width, policy))
    return report


@app.command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="A merge-cli output (feats.h5) or one of its shards.", show_default=False)],
    key: Annotated[Optional[str], typer.Option(help="Show one sample in detail.", show_default=False)] = None,
    check: Annotated[bool, typer.Option("--check", help="Also scan every token for NaN/Inf (reads all data).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print only JSON.")] = False,
) -> None:
    """What is in a features file, and is it sound?

    Exit 0 when the file is sound, 1 when an integrity problem was found, 2 when the file is not a
    merge-cli output, is damaged beyond reading, or --key names no sample.
    """
    from merge_cli.inspection import inspect_features

    report = run_core(lambda: inspect_features(path, key=key, check=check), json_output)
    if json_output:
        print_json(report)
    else:
        from merge_cli.report import render_inspect

        render_inspect(report, _stdout_console())
    raise typer.Exit(1 if report.get("problems") else 0)


@app.command("index")
def index_command(
    out: Annotated[Path, typer.Argument(help="The output to (re)build, e.g. feats.h5.", show_default=False)],
    json_output: Annotated[bool, typer.Option("--json", help="Print only JSON.")] = False,
) -> None:
    """Rebuild feats.h5 from whatever complete shards exist beside it (after a crash, or after
    separate --rank/--world-size jobs)."""
    from merge_cli.store import build_index

    summary = run_core(lambda: build_index(out), json_output)
    if json_output:
        print_json(summary)
    else:
        from merge_cli.report import render_index_summary

        render_index_summary(summary, _stdout_console())


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        print("merge-cli: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
