"""Human-readable output rendered with rich: check-grid reports, inspect views, run summaries."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _hw(pair: list[int] | tuple[int, int] | None) -> str:
    return "-" if pair is None else f"{pair[0]}x{pair[1]}"


def render_check_grid(report: dict, console: Console) -> None:
    """Render a `grid.describe_size` / `grid.describe_tokens` report."""
    if "size" in report and "patch_grid" in report and "resized" in report:
        _render_size_report(report, console)
    else:
        _render_tokens_report(report, console)


def _render_size_report(report: dict, console: Console) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    source = report.get("source", "size")
    label = "size" if source == "size" else f"{source} size"
    table.add_row(label, f"{_hw(report['size'])} (HxW)")
    table.add_row("patch / merge", f"{report['patch_size']} px / {report['merge_size']}x{report['merge_size']} (factor {report['factor']})")
    table.add_row("patch grid", _hw(report["patch_grid"]))
    if report["valid"]:
        table.add_row("valid", "[green]yes[/]")
        table.add_row("tokens", f"{report['tokens']} -> {report['merged_tokens']} after merging")
    else:
        table.add_row("valid", f"[red]no[/]: {report['problem']}")
    resized = report.get("resized")
    if resized is None:
        table.add_row("resized", f"[red]cannot resize[/]: {report.get('resize_error')}")
    else:
        policy = report["policy"]
        rule = f"fixed {_hw(policy['size'])}" if policy["kind"] == "fixed" else (
            f"smart, {policy['min_pixels']:,}..{policy['max_pixels']:,} px"
        )
        note = "" if resized["changed"] else " (unchanged)"
        table.add_row("resize policy", rule)
        table.add_row("resized to", f"{_hw(resized['size'])}{note}")
        table.add_row(
            "resized grid",
            f"{_hw(resized['patch_grid'])} -> merged {_hw(resized['merged_grid'])}",
        )
        table.add_row("resized tokens", f"{resized['tokens']} -> {resized['merged_tokens']} after merging")
    console.print(table)


def _render_tokens_report(report: dict, console: Console) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("tokens", str(report["tokens"]))
    if report["valid"]:
        table.add_row("inferred grid", f"{_hw(report['patch_grid'])} (closest to square)")
        table.add_row("merged grid", f"{_hw(report['merged_grid'])} -> {report['merged_tokens']} tokens")
        table.add_row("pixel size", f"{_hw(report['size'])} at patch {report['patch_size']}")
    else:
        table.add_row("inferred grid", f"[red]none[/]: {report['problem']}")
    console.print(table)


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    return f"{count:,.1f} TB"


def render_extract_summary(summary: dict, console: Console) -> None:
    """The end-of-run summary of `extract` (a `RunSummary.to_dict()`)."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    status = "[green]done[/]" if not summary["failed"] else f"[yellow]done with {summary['failed']} failed[/]"
    if summary["stopped_early"]:
        status = "[red]stopped at the first failure (--strict)[/]"
    table.add_row("output", f"{summary['out']}  {status}")
    table.add_row(
        "samples",
        f"{summary['written']:,} written, {summary['skipped']:,} already done, {summary['failed']:,} failed"
        + (f", {summary['ignored_files']:,} other files ignored" if summary["ignored_files"] else ""),
    )
    table.add_row(
        "tokens",
        f"{summary['tokens']:,} stored ({summary['patch_tokens']:,} patch tokens before merging), {_bytes(summary['bytes'])}",
    )
    table.add_row(
        "throughput",
        f"{summary['samples_per_second']:,.1f} samples/s, {summary['patch_tokens_per_second']:,.0f} patch tokens/s "
        f"in {summary['seconds']:,.1f} s on {summary['device']} ({summary['compute_dtype']})",
    )
    timings = summary["timings"]
    table.add_row(
        "time split",
        f"waiting for decode {timings['decode_wait']:,.1f} s (decode work {timings['decode_cpu']:,.1f} s in workers), "
        f"compute {timings['compute']:,.1f} s, write {timings['write']:,.1f} s",
    )
    table.add_row("batches", f"{summary['batches']:,}, {summary['batch_fill']:.0%} of the token budget filled")
    tower = summary["tower"] + (" [yellow](demo: features are meaningless for training)[/]" if summary["tower_is_demo"] else "")
    table.add_row("tower", f"{tower}, output {summary['output']}, stored as {summary['store_dtype']}")
    console.print(table)
    if summary["failures"]:
        errors = Table(title=f"first {len(summary['failures'])} of {summary['failed']} failures "
                       f"(all are in the output: merge-cli inspect {summary['out']})", title_justify="left")
        for column in ("key", "stage", "type", "message"):
            errors.add_column(column, overflow="fold")
        for failure in summary["failures"]:
            errors.add_row(failure["key"], failure["stage"], failure["error_type"], failure["message"])
        console.print(errors)
