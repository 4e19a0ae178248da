"""Human-readable output rendered with rich: check-grid reports, inspect views, run summaries."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from merge_cli.records import plural, printable

SHOWN_CHARS = 500
"""Longest text from a file shown in one place (an attribute, an error message): a 50 MB attribute
took minutes to lay out; `--json` has every value whole."""


def _shown(text: object, limit: int | None = SHOWN_CHARS) -> str:
    """Text from a file or an input, ready for rich markup: control characters escaped (a file
    name cannot drive the terminal), markup brackets escaped, cut after `limit` characters."""
    return escape(printable(text, limit))


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
    if "tower" in report:
        frames = f", {report['frames']} frames sampled" if "frames" in report else ""
        table.add_row("tower", f"{_shown(report['tower'])} (--preprocess {report['preprocess']}{frames})")
    resized = report.get("resized")
    if resized is None:
        table.add_row("resized", f"[red]refused by extract[/]: {report.get('resize_error')}")
    else:
        note = "" if resized["changed"] else " (unchanged)"
        table.add_row("resize policy", _policy_text(report["policy"]))
        if resized.get("crop") and resized.get("resize") and list(resized["crop"][2:]) != list(resized["resize"]):
            note += f" (resized to {_hw(resized['resize'])}, then cropped)"
        table.add_row("resized to", f"{_hw(resized['size'])}{note}")
        even = (
            f" (the processor's {_hw(resized['processor_grid'])} made even)" if resized.get("made_even") else ""
        )
        table.add_row(
            "resized grid",
            f"{_hw(resized['patch_grid'])} -> merged {_hw(resized['merged_grid'])}{even}",
        )
        table.add_row("resized tokens", f"{resized['tokens']} -> {resized['merged_tokens']} after merging")
    console.print(table)


def _policy_text(policy: dict) -> str:
    kind, resample = policy["kind"], policy.get("resample", "bicubic")
    if kind == "fixed":
        rule = f"fixed {_hw(policy['size'] or policy.get('fit'))}"
    elif kind == "shortest_edge":
        crop = f", center crop {_hw(policy['crop'])}" if policy.get("crop") else ""
        rule = f"shortest edge {policy['shortest_edge']}{crop}"
    elif kind == "naflex":
        rule = f"NaFlex, at most {policy['max_num_patches']:,} patches"
    else:
        rule = f"smart, {policy['min_pixels']:,}..{policy['max_pixels']:,} px"
    return f"{rule}, {resample}"


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


_KEEP = "\u00a0"
"""Joins the parts of one value (`0.5 s`, `12 failed`): summary lines break between values only."""
_MARKUP = re.compile(r"\[/?(?:[a-z]+(?: [a-z]+)*)?\]")


def _value(amount: object, unit: str, spec: str = ",") -> str:
    """One unbreakable value: an amount (formatted with `spec`) and what it counts."""
    return f"{amount:{spec}} {unit}".replace(" ", _KEEP)


def _keep(text: str) -> str:
    """`text` kept on one line."""
    return text.replace(" ", _KEEP)


def _fit(text: str, width: int) -> str:
    """`text` broken into lines of at most `width` cells at its spaces, never inside a value (whose
    parts `_value` joined); rich markup takes no room. Rich then has nothing left to wrap."""
    lines: list[str] = []
    line, used = "", 0
    for word in text.split(" "):
        size = len(_MARKUP.sub("", word))
        if line and used + 1 + size > width:
            lines.append(line)
            line, used = "", 0
        line, used = (f"{line} {word}", used + 1 + size) if line else (word, size)
    lines.append(line)
    return "\n".join(lines).replace(_KEEP, " ")


def render_extract_summary(summary: dict, console: Console) -> None:
    """The end-of-run summary of `extract` (a `RunSummary.to_dict()`). At any terminal width its
    lines break between values, never inside one (`12.5 s` stays on one line)."""
    failed = summary["failed"]
    status = "[green]done[/]" if not failed else f"[yellow]done with {_value(failed, 'failed')}[/]"
    if summary["stopped_early"]:
        status = "[red]stopped at the first failure (--strict)[/]"
    samples = (
        f"{_value(summary['written'], 'written')}, {_value(summary['skipped'], 'already done')}, "
        f"{_value(failed, 'failed')}"
    )
    if summary["ignored_files"]:
        samples += f", {_value(plural(summary['ignored_files'], 'other file'), 'ignored', '')}"
    if summary.get("limit"):
        samples += f" (the first {_value(summary['limit'], 'inputs')}: --limit)"
    seconds = ",.1f"
    timings = summary["timings"]
    tower = _shown(summary["tower"]) + (" [yellow](demo: features are meaningless for training)[/]" if summary["tower_is_demo"] else "")
    made_even = summary.get("made_even", 0)
    rows = [
        ("output", f"{_shown(summary['out'])}  {status}"),
        ("samples", samples),
        (
            "tokens",
            f"{_value(summary['tokens'], 'stored')} ({_value(summary['patch_tokens'], 'patch tokens')} before "
            f"merging), {_value(_bytes(summary['bytes']), '', '').strip(_KEEP)}",
        ),
        (
            "throughput",
            f"{_value(summary['samples_per_second'], 'samples/s', ',.1f')}, "
            f"{_value(summary['patch_tokens_per_second'], 'patch tokens/s', ',.0f')} "
            f"in {_value(summary['seconds'], 's', seconds)} "
            f"on {_value(summary['device'], '(' + summary['compute_dtype'] + ')', '')}",
        ),
        (
            "time split",
            f"{_value('waiting for decode', format(timings['decode_wait'], seconds) + ' s', '')} "
            f"({_value('decode work', format(timings['decode_cpu'], seconds) + ' s', '')} in workers), "
            f"{_value('compute', format(timings['compute'], seconds) + ' s', '')}, "
            f"{_value('write', format(timings['write'], seconds) + ' s', '')}",
        ),
        ("batches", f"{summary['batches']:,}, {_value(summary['batch_fill'], 'of the token budget', '.0%')} filled"),
        ("tower", f"{tower}, output {summary['output']}, stored as {summary['store_dtype']}"),
        (
            "preprocess",
            f"{summary.get('preprocess', 'native')}"
            + (f", {_value(plural(made_even, 'grid'), 'made even', '')} (both grids stored)" if made_even else ""),
        ),
    ]
    _print_rows(console, rows)
    if summary["failures"]:
        shown, failed = len(summary["failures"]), summary["failed"]
        title = f"{failed} failure" + ("" if failed == 1 else "s")
        if shown < failed:
            title = f"first {shown} of {title} (all: merge-cli inspect {_shown(summary['out'])} --failures)"
        errors = Table(title=title, title_justify="left")
        errors.add_column("key", overflow="fold")
        errors.add_column("stage", no_wrap=True)
        errors.add_column("type", no_wrap=True)
        errors.add_column("message", overflow="fold")
        for failure in summary["failures"]:
            errors.add_row(
                _shown(failure["key"]), _shown(failure["stage"]), _shown(failure["error_type"]), _shown(failure["message"])
            )
        console.print(errors)


def _duration(seconds: float) -> str:
    """`0.4 s` under a minute, else `1:02:03` (hours keep counting past a day)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def render_plan(plan: dict, console: Console) -> None:
    """`extract --dry-run`: what the run would do (a `dry_run.Plan.to_dict()`), nothing written."""
    from rich.markup import escape

    limit = f", the first {_value(plan['limit'], 'inputs')} (--limit)" if plan["limit"] else ""
    inputs = f"{_value(plan['listed'], 'listed')}{limit}: {_value(plan['to_do'], 'to do')}, {_value(plan['skipped'], 'already done')}"
    if plan["would_fail"]:
        inputs += f"; {_value(plan['would_fail'], 'would fail')} (from their headers)"
    if plan["ignored_files"]:
        inputs += f"; {_keep(plural(plan['ignored_files'], 'other file'))} ignored"
    media = f"{_keep(plural(plan['images'], 'image'))}, {_keep(plural(plan['videos'], 'video'))}"
    if plan["videos"]:
        media += f" ({_keep(plural(plan['frames'], 'frame'))})"
    size = (
        f"about {_keep(_bytes(plan['bytes']))}: {_value(plan['tokens'], 'tokens')} x {plan['token_dim']:,} x "
        f"{_keep(plan['store_dtype'] + ' (' + str(plan['dtype_bytes']) + ' B)')} + shard and index tables"
        + (", uncompressed (an upper bound)" if plan["compression"] != "none" else "")
    )
    estimate = plan["estimate"]
    if plan["estimated_seconds"] is None:
        time_text = f"[yellow]{escape(plan['estimate_note'])}[/]"
    elif estimate is None:
        time_text = f"{_duration(plan['estimated_seconds'])} ({escape(plan['estimate_note'])})"
    else:
        per_sample = ", ".join(
            _keep(f"{seconds:.3f} s per {kind}") for kind, seconds in estimate["decode_seconds_per_sample"].items()
        )
        workers = estimate["decode_workers"]
        time_text = (
            f"about {_keep(_duration(plan['estimated_seconds']))} estimated ({estimate['bound']} bound) from a probe "
            f"on {plan['device']}: the tower ran {_value(estimate['tower_patch_tokens_per_second'], 'patch tokens/s', ',.0f')} "
            f"in one batch of {_value(estimate['probe_batch_patch_tokens'], 'patch tokens')}, decoding took {per_sample} "
            f"on one core ({_value(workers, 'worker' if workers == 1 else 'workers')}); {escape(plan['estimate_note'])}"
        )
    rows = [
        ("dry run", f"{escape(plan['out'])}  [green]nothing written[/]"),
        ("inputs", inputs),
        ("media", media),
        ("tokens", f"{_value(plan['tokens'], 'stored')} ({_value(plan['patch_tokens'], 'patch tokens')} before merging), from the headers"),
        ("output", size),
        ("time", time_text),
        ("tower", f"{plan['tower']}, output {plan['output']}"),
    ]
    _print_rows(console, rows)
    if plan["failures"]:
        shown, failed = len(plan["failures"]), plan["would_fail"]
        title = f"would fail: {failed:,}" + (f" (first {shown})" if shown < failed else "")
        errors = Table(title=title, title_justify="left")
        errors.add_column("key", overflow="fold")
        errors.add_column("stage", no_wrap=True)
        errors.add_column("type", no_wrap=True)
        errors.add_column("message", overflow="fold")
        for failure in plan["failures"]:
            errors.add_row(escape(failure["key"]), failure["stage"], failure["error_type"], escape(failure["message"]))
        console.print(errors)


# -- inspect and index (merge_cli.output.inspection, merge_cli.output.index) ------------------------------------

_PROVENANCE = (
    "tower", "tower_hash", "tower_is_demo", "projector", "projector_hash", "output", "layer", "patch_size",
    "merge_size", "temporal_patch_size", "compute_dtype", "store_dtype", "compression", "preprocess",
    "temporal_positions", "resize_policy",
    "video_options", "media_options", "config_hash", "merge_cli_version",
)
"""Root attributes shown first by inspect, in this order; `settings` is left to --json."""
_MAX_SHARD_ROWS = 12


def _size(n: int | None) -> str:
    return "-" if n is None else _bytes(n)


def _attr_text(value: object) -> str:
    import json

    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def render_inspect(report: dict, console: Console) -> None:
    """Render an `inspection.inspect_features` report: provenance, shards, counts, grids, token
    statistics, errors, problems, and with --key one sample. Every string read from the file is
    shown through `_shown`."""
    counts = report["counts"]
    console.print(
        f"[bold]{_shown(report['path'])}[/]: merge-cli {_shown(report['role'])} "
        f"(format {_shown(report['format'])} v{_shown(report['format_version'])}), "
        f"{_shown(report['dtype'])} x {_shown(report['token_dim'])}"
    )

    attrs = report["attrs"]
    table = Table(title="provenance", title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name in _PROVENANCE:
        if name in attrs:
            table.add_row(name, _shown(_attr_text(attrs[name])))
    if "settings" in attrs:
        table.add_row("settings", f"{len(attrs['settings'])} hashed settings (see --json)")
    console.print(table)

    shards = report["shards"]
    table = Table(title=f"shards ({len(shards)}, {_size(counts['shard_bytes'])})", title_justify="left")
    for column in ("shard", "size", "samples", "rows", "errors", "status"):
        table.add_column(column, justify="left" if column in ("shard", "status") else "right")
    shown = shards if len(shards) <= _MAX_SHARD_ROWS else shards[: _MAX_SHARD_ROWS - 2] + shards[-2:]
    for i, shard in enumerate(shown):
        if len(shards) > _MAX_SHARD_ROWS and i == _MAX_SHARD_ROWS - 2:
            table.add_row(f"... {len(shards) - _MAX_SHARD_ROWS} more", "", "", "", "", "")
        status = "ok" if shard["exists"] else "[red]missing[/]"
        table.add_row(
            _shown(shard["name"]), _size(shard["bytes"]), f"{shard['samples']:,}", f"{shard['rows']:,}",
            f"{shard['errors']:,}", status,
        )
    console.print(table)

    console.print(
        f"[bold]samples[/] {counts['samples']:,} ({plural(counts['images'], 'image')}, "
        f"{plural(counts['videos'], 'video')}, {plural(counts['frames'], 'frame')})  "
        f"[bold]tokens[/] {counts['tokens']:,}  [bold]errors[/] {counts['errors']:,}"
    )
    attrs = report.get("attrs", {})
    made_even = counts.get("made_even", 0)
    console.print(
        f"[bold]preprocess[/] {_shown(attrs.get('preprocess', 'native (before --preprocess)'))}"
        + (f", {plural(made_even, 'grid')} made even (processor_grid differs from grid_thw)" if made_even else "")
    )

    if report["grids"]:
        table = Table(title="most common grids", title_justify="left")
        for column in ("grid t x h x w", "merged h x w", "tokens", "samples", "share"):
            table.add_column(column, justify="right")
        for grid in report["grids"]:
            t, h, w = grid["grid_thw"]
            table.add_row(
                f"{t} x {h} x {w}", _hw(grid["merged_hw"]), f"{grid['tokens']:,}", f"{grid['count']:,}",
                f"{grid['share']:.1%}",
            )
        console.print(table)

    stats = report["token_stats"]
    if stats:
        console.print(
            f"[bold]tokens per sample[/] min {stats['min']:,}  median {stats['median']:,.0f}  "
            f"mean {stats['mean']:,.1f}  max {stats['max']:,}"
        )
        peak = max(b["count"] for b in stats["histogram"]) or 1
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(justify="right")
        table.add_column()
        table.add_column(justify="right")
        for bucket in stats["histogram"]:
            span = str(bucket["from"]) if bucket["from"] == bucket["to"] else f"{bucket['from']}-{bucket['to']}"
            table.add_row(span, "#" * max(1 if bucket["count"] else 0, round(30 * bucket["count"] / peak)),
                          f"{bucket['count']:,}")
        console.print(table)

    if report["errors"]:
        shown = len(report["errors"])
        title = f"errors ({counts['errors']:,}" + (
            f", first {shown}; all with: merge-cli inspect {_shown(report['path'])} --failures)"
            if shown < counts["errors"]
            else ")"
        )
        table = Table(title=title, title_justify="left")
        for column in ("key", "stage", "type", "message"):
            table.add_column(column, overflow="fold")
        for error in report["errors"]:
            table.add_row(_shown(error["key"]), _shown(error["stage"]), _shown(error["type"]), _shown(error["message"]))
        console.print(table)

    if report.get("sample"):
        render_sample(report["sample"], console)

    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {_shown(note, 4 * SHOWN_CHARS)}")
    if report["problems"]:
        for problem in report["problems"]:
            console.print(f"[bold red]problem:[/] {_shown(problem, 4 * SHOWN_CHARS)}")
    else:
        checked = " (values checked: no NaN/Inf)" if report.get("checked") else ""
        console.print(f"[green]no integrity problems found[/]{checked}")


def render_sample(sample: dict, console: Console) -> None:
    """`inspect --key`: one sample's grid, shape, sizes, frames, storage and value statistics."""
    table = Table(title=f"sample {_shown(sample['key'])}", title_justify="left", show_header=False, box=None,
                  pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    t, h, w = sample["grid_thw"]
    table.add_row("kind", _shown(sample["kind"]))
    table.add_row("grid t x h x w", f"{t} x {h} x {w} -> merged {_hw(sample['merged_hw'])}")
    table.add_row("tokens", f"{tuple(sample['shape'])} {_shown(sample['dtype'])}")
    table.add_row("original size", f"{_hw(sample['orig_hw'])} (HxW)")
    table.add_row("resized to", f"{_hw(sample['resized_hw'])} (HxW)")
    if sample.get("processor_grid") and list(sample["processor_grid"]) != list(sample["grid_thw"][1:]):
        table.add_row("processor grid", f"{_hw(sample['processor_grid'])}, made even to {_hw(sample['grid_thw'][1:])}")
    table.add_row("decoder", _shown(sample["decoder"]))
    if sample["frame_indices"]:
        times = ", ".join(f"{x:.2f}" for x in sample["frame_times"])
        table.add_row("frames", ", ".join(str(i) for i in sample["frame_indices"]))
        table.add_row("frame times (s)", times)
    table.add_row("stored at", f"{_shown(sample['shard'])}, row {sample['offset']:,} (index {sample['index']:,})")
    stats = sample["stats"]
    if stats["mean"] is None:
        table.add_row("values", "no finite values")
    else:
        table.add_row(
            "values",
            f"mean {stats['mean']:.4g}  std {stats['std']:.4g}  min {stats['min']:.4g}  max {stats['max']:.4g}",
        )
    if stats["nan"] or stats["inf"]:
        table.add_row("non-finite", f"[red]{stats['nan']:,} NaN, {stats['inf']:,} Inf[/]")
    console.print(table)


def render_index_summary(summary: dict, console: Console) -> None:
    """Render the summary `store.build_index` returns."""
    console.print(
        f"[bold]{_shown(summary['output'])}[/]: {plural(summary['samples'], 'sample')}, "
        f"{plural(summary['tokens'], 'token')} ({_shown(summary['dtype'])} x {summary['token_dim']}) from "
        f"{plural(summary['shards'], 'shard')} ({_size(summary['shard_bytes'])}); {plural(summary['errors'], 'error')}"
    )
    if summary.get("duplicates"):
        console.print(
            f"[yellow]note:[/] ignored {plural(summary['duplicates'], 'sample')} stored twice across shards "
            "(the first copy is used)"
        )


def _print_rows(console: Console, rows: list[tuple[str, str]]) -> None:
    """A two-column summary (bold label, value); values break only between their parts to fit."""
    label_width = max(len(label) for label, _ in rows)
    width = max(20, console.width - label_width - 2)  # the label column and the gap after it
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for label, value in rows:
        table.add_row(label, _fit(value, width))
    console.print(table)
