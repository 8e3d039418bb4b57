"""`apr-tui diff A B`: `apr diff --values` on two APRT files, or on two trace directories."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aprtui.commands import options
from aprtui.commands.output import incomplete_warnings, print_lines, print_report, table_lines
from engine.errors import path_display
from engine.stages import layer_name

SHOWS_STEP_PROGRESS = True
"""Long engine steps (a big APR file's footer check) show progress on stderr (aprtui.cli)."""

if TYPE_CHECKING:
    from engine.compare import Cell
    from engine.stats import DiffStats
    from engine.trace_directory import TraceDir

HELP = "`apr diff --values` on two APRT stage files or two trace directories"

DESCRIPTION = """\
Compare stage tensors element-wise, with exactly the statistics of `apr diff --values`:
|a - b| in f32, f64 accumulation, the first maximum wins, RMS, cosine similarity (0 when a
norm is 0) and the top divergences by |a - b| (a stable sort, ties in index order).

Two APRT files (as `apr trace --save-tensor` writes them) are checked the way apr checks
them (dim_product first, then layer) and shown as a panel, or with --json as apr's
`apr-stage-diff-v1` document.

Two trace directories (layer-N/<stage>.bin plus the whole-model final_norm.bin and
lm_head.bin at the root) are compared stage by stage for every (layer, stage) both have,
in computation order, with the first divergence marked (a cosine below --threshold, as
bisect judges it: identical files never diverge, expert ids must match exactly);
stages only one side has, and files neither understands, are listed after the table.
With --json the directory result is an `apr-tui-dir-diff-v1` document."""

EPILOG = """\
examples:
  apr-tui diff ref/layer-3/ffn_out.bin mine/layer-3/ffn_out.bin
  apr-tui diff ref/lm_head.bin mine/lm_head.bin --limit 64 --json
  apr-tui diff model-trace/ hf-trace/            every common stage, first divergence marked
  apr-tui diff model-trace/ hf-trace/ --json > report.json

exit codes: 0 compared, 2 bad input (unreadable or mismatched files, bad arguments)."""

DEFAULT_LIMIT = 10

PANEL_TOP_ROWS = 200
"""Top divergences listed inside the report's panel, as a Rich table; a longer list (`--limit
49152`: every logit) follows the panel as plain aligned lines, which print in a fraction of a
second where Rich's layout of the table took about a minute."""
_USIZE = re.compile(r"\+?[0-9]+", re.ASCII)
"""What Rust's `usize::from_str` (clap's `--limit`) accepts: no sign but `+`, no `_`, no spaces."""

FILE_SCHEMA = "apr-stage-diff-v1"
DIR_SCHEMA = "apr-tui-dir-diff-v1"


def _limit(text: str) -> int:
    if text.startswith("-") and _USIZE.fullmatch(text[1:]):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    if not _USIZE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="APRT stage file or trace directory (side A)")
    parser.add_argument("b", metavar="B", help="APRT stage file or trace directory (side B)")
    parser.add_argument(
        "--limit",
        type=_limit,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"top divergences to list (default {DEFAULT_LIMIT}; 0 counts as 1, as in apr)",
    )
    options.add_threshold(parser, "directories: cosine below this is a divergence")
    parser.add_argument("--json", action="store_true", help="print a JSON document to stdout")


# ----------------------------------------------------------------------------- file vs file

MODEL_MAGICS = {b"GGUF": "GGUF", b"APR\x00": "APR", b"APR1": "APR", b"APR2": "APR"}
"""First bytes of the model containers a user may hand to `diff` by mistake (an APRT stage file
starts with `APRT`): those get a pointer to `bisect` instead of apr's raw-magic complaint."""


def _refuse_model_file(path: str, path_a: str, path_b: str) -> None:
    """A model file given to `diff`: say what it is and which command compares models."""
    from engine.errors import DiffError

    kind = _model_kind(path)
    if kind is None:
        return
    if _model_kind(path_a) and _model_kind(path_b):
        pair = f"{path_display(path_a)} {path_display(path_b)}"
        hint = f"compare models with `apr-tui bisect {pair}`"
    else:
        hint = "compare a model with another model or a trace directory with `apr-tui bisect`"
    raise DiffError(
        f"{path_display(path)}: this is {_article(kind)} {kind} model, not an APRT stage file; "
        f"{hint}"
    )


def _article(kind: str) -> str:
    return "an" if kind[0] in "AEIOU" else "a"


def _model_kind(path: str) -> str | None:
    """`GGUF`, `APR` or `safetensors` for a model file, None for anything else."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError:
        return None
    kind = MODEL_MAGICS.get(magic)
    if kind is None and path.lower().endswith(".safetensors"):
        kind = "safetensors"
    return kind


def _stats_document(stats: DiffStats) -> dict[str, object]:
    """The statistics part of apr's JSON (f32 fields printed as serde_json prints an f32)."""
    from engine.rustfmt import JsonF32

    return {
        "dim_product": stats.count,
        "max_abs_diff": JsonF32(stats.max_abs_diff),
        "max_abs_diff_index": stats.max_abs_diff_index,
        "rms_diff": JsonF32(stats.rms_diff),
        "cosine_sim": stats.cosine_sim,
        "top_diffs": [
            {
                "index": top.index,
                "a": JsonF32(top.a),
                "b": JsonF32(top.b),
                "abs_diff": JsonF32(top.abs_diff),
            }
            for top in stats.top_diffs
        ],
    }


def _read_for_diff(path: str):
    """read_aprt with apr's error wording (`Cannot open ...` / `Cannot read APRT stage tensor ...`)."""
    from engine.aprt import AprtOpenError, read_aprt
    from engine.errors import FormatError

    try:
        return read_aprt(path)
    except AprtOpenError as error:
        raise FormatError(
            f"Cannot open {path_display(path)}: {error.reason.removeprefix('cannot open: ')}"
        ) from None
    except FormatError as error:
        reason = getattr(error, "reason", str(error))
        raise FormatError(f"Cannot read APRT stage tensor {path_display(path)}: {reason}") from None


def diff_files(path_a: str, path_b: str, limit: int) -> tuple[int, DiffStats]:
    """Read, check and diff two APRT files; returns (layer, stats)."""
    from engine.aprt import check_aprt_pair
    from engine.stats import diff_stats

    tensor_a = _read_for_diff(path_a)
    tensor_b = _read_for_diff(path_b)
    check_aprt_pair(path_a, tensor_a, path_b, tensor_b)
    return tensor_a.layer, diff_stats(tensor_a.values, tensor_b.values, limit)


def file_document(path_a: str, path_b: str, layer: int, stats: DiffStats) -> dict[str, object]:
    """apr's `apr-stage-diff-v1` object."""
    return {
        "schema": FILE_SCHEMA,
        "path_a": path_display(path_a),
        "path_b": path_display(path_b),
        "layer": layer_name(layer),
        **_stats_document(stats),
    }


def _cosine_style(cosine: float, threshold: float) -> str:
    return "green" if cosine >= threshold else "bold red"  # NaN compares False: red


def _print_file_diff(path_a: str, path_b: str, layer: int, stats: DiffStats, threshold: float):
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from engine.rustfmt import rust_fixed, rust_lower_exp

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    # A long path folds onto more lines on a narrow terminal; it is never cut (the file name
    # is at its end).
    facts.add_row("A:", Text(path_display(path_a), overflow="fold"))
    facts.add_row("B:", Text(path_display(path_b), overflow="fold"))
    facts.add_row("Layer:", str(layer_name(layer)))
    facts.add_row("Elements:", str(stats.count))
    facts.add_row(
        "max|diff|:",
        f"{rust_lower_exp(stats.max_abs_diff)} (at index {stats.max_abs_diff_index})",
    )
    facts.add_row("RMS diff:", rust_lower_exp(stats.rms_diff))
    facts.add_row(
        "cosine sim:",
        Text(rust_fixed(stats.cosine_sim, 10), style=_cosine_style(stats.cosine_sim, threshold)),
    )

    rows = [
        (
            str(entry.index),
            rust_lower_exp(entry.a, plus=True),
            rust_lower_exp(entry.b, plus=True),
            rust_lower_exp(entry.abs_diff),
        )
        for entry in stats.top_diffs
    ]
    title = "Top divergences (by |a - b|)"
    if len(rows) > PANEL_TOP_ROWS:  # below the panel as plain lines: Rich lays out ~1 ms a row
        listed = Text(f"{title}: {len(rows)}, listed below the panel", style="bold")
        parts = [facts, Text(""), listed]
    else:
        top = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, expand=False)
        for column in ("index", "a", "b", "|Δ|"):
            top.add_column(column, justify="right")
        for row in rows:
            top.add_row(*row)
        parts = [facts, Text(""), top]
    panel = Panel(
        Group(*parts),
        title="APR STAGE TENSOR DIFF (APRT, element-wise)",
        border_style="cyan",
        box=box.DOUBLE,
        expand=False,
    )
    print_report(panel)
    if len(rows) > PANEL_TOP_ROWS:
        print_lines([title, *table_lines(["index", "a", "b", "|Δ|"], rows)])


# ----------------------------------------------------------------------------- dir vs dir


@dataclass
class StageComparison:
    """One (layer, stage) both directories have: its Cell (both sides' statistics and the
    `apr diff --values` statistics of the pair), or why it was not compared."""

    layer: int
    stage: str
    path_a: Path
    path_b: Path
    cell: Cell | None
    error: str | None = None

    @property
    def stats(self) -> DiffStats | None:
        """The pair's `apr diff --values` statistics (None when not compared)."""
        return None if self.cell is None else self.cell.diff


def diff_dirs(trace_a: TraceDir, trace_b: TraceDir, limit: int) -> list[StageComparison]:
    """Diff every (layer, stage) both traces have, in computation order.

    A pair whose files disagree in size gets `error` instead of a cell (apr's message) and
    the walk goes on; the directory reader has already checked headers against places. The
    files are compared as they are, as apr does (no convention of engine.compare.comparable).
    """
    from engine.aprt import check_aprt_pair
    from engine.compare import Cell
    from engine.errors import AprTuiError
    from engine.stats import diff_stats, tensor_stats

    results = []
    for key, file_a in trace_a.entries.items():
        file_b = trace_b.entries.get(key)
        if file_b is None:
            continue
        layer, stage_name = key
        try:
            tensor_a = _read_for_diff(str(file_a))
            tensor_b = _read_for_diff(str(file_b))
            check_aprt_pair(file_a, tensor_a, file_b, tensor_b)
        except AprTuiError as error:
            results.append(StageComparison(layer, stage_name, file_a, file_b, None, str(error)))
            continue
        a, b = tensor_a.values, tensor_b.values
        cell = Cell(
            layer,
            stage_name,
            (int(a.size),),
            tensor_stats(a),
            tensor_stats(b),
            diff_stats(a, b, limit),
        )
        results.append(StageComparison(layer, stage_name, file_a, file_b, cell))
    return results


def _first_divergence(results: list[StageComparison], threshold: float) -> StageComparison | None:
    """The first compared stage that diverges, by the rule bisect and the explorer use
    (engine.compare.first_divergence: cosine below `threshold`, except that identical files
    never diverge and expert ids must match exactly)."""
    from engine.compare import first_divergence

    first = first_divergence((r.cell for r in results if r.cell is not None), threshold)
    return next((r for r in results if first is not None and r.cell is first), None)


def _only_in(trace: TraceDir, other: TraceDir) -> list[tuple[int, str, Path]]:
    return [
        (layer, name, path)
        for (layer, name), path in trace.entries.items()
        if (layer, name) not in other.entries
    ]


def dir_document(
    trace_a: TraceDir,
    trace_b: TraceDir,
    results: list[StageComparison],
    threshold: float,
    limit: int,
) -> dict[str, object]:
    """The `apr-tui-dir-diff-v1` document.

    {schema, dir_a, dir_b, threshold, limit, token_ids_a, token_ids_b, tokens_match,
     complete_a, complete_b (tokens.json's "complete": true, false, or null when not said),
     first_divergence: {layer, stage} | null,
     stages: [{layer, stage, path_a, path_b, error, and when error is null the
               apr-stage-diff-v1 statistics: dim_product, max_abs_diff, max_abs_diff_index,
               rms_diff, cosine_sim, top_diffs}],
     only_in_a / only_in_b: [{layer, stage, path}],
     unknown_a / unknown_b: [{path, reason}]}
    `layer` is an integer or "whole-model" throughout; keys are sorted at every level.
    """
    first = _first_divergence(results, threshold)
    stages = []
    for result in results:
        entry: dict[str, object] = {
            "layer": layer_name(result.layer),
            "stage": result.stage,
            "path_a": path_display(result.path_a),
            "path_b": path_display(result.path_b),
            "error": result.error,
        }
        if result.stats is not None:
            entry.update(_stats_document(result.stats))
        stages.append(entry)
    tokens_match = (
        None
        if trace_a.token_ids is None or trace_b.token_ids is None
        else trace_a.token_ids == trace_b.token_ids
    )
    return {
        "schema": DIR_SCHEMA,
        "dir_a": path_display(trace_a.root),
        "dir_b": path_display(trace_b.root),
        "threshold": threshold,
        "limit": limit,
        "token_ids_a": trace_a.token_ids,
        "token_ids_b": trace_b.token_ids,
        "tokens_match": tokens_match,
        "complete_a": trace_a.complete,
        "complete_b": trace_b.complete,
        "first_divergence": None
        if first is None
        else {"layer": layer_name(first.layer), "stage": first.stage},
        "stages": stages,
        "only_in_a": [
            {"layer": layer_name(layer), "stage": name, "path": path_display(path)}
            for layer, name, path in _only_in(trace_a, trace_b)
        ],
        "only_in_b": [
            {"layer": layer_name(layer), "stage": name, "path": path_display(path)}
            for layer, name, path in _only_in(trace_b, trace_a)
        ],
        "unknown_a": [{"path": path_display(p), "reason": r} for p, r in trace_a.unknown],
        "unknown_b": [{"path": path_display(p), "reason": r} for p, r in trace_b.unknown],
    }


def _print_dir_diff(
    trace_a: TraceDir,
    trace_b: TraceDir,
    results: list[StageComparison],
    threshold: float,
) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from engine.rustfmt import rust_fixed, rust_lower_exp

    report: list[object] = [
        Text(f"A: {path_display(trace_a.root)}", overflow="fold"),
        Text(f"B: {path_display(trace_b.root)}", overflow="fold"),
    ]
    report.extend(incomplete_warnings(("A", trace_a), ("B", trace_b)))
    first = _first_divergence(results, threshold)
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("cosine", justify="right", no_wrap=True)
    table.add_column("max|diff|", justify="right", no_wrap=True)
    table.add_column("rms", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for result in results:
        layer = str(layer_name(result.layer))
        if result.stats is None:
            table.add_row(layer, result.stage, "", Text("not compared", style="yellow"))
            continue
        stats = result.stats
        table.add_row(
            layer,
            result.stage,
            str(stats.count),
            Text(
                rust_fixed(stats.cosine_sim, 6),
                style=_cosine_style(stats.cosine_sim, threshold),
            ),
            rust_lower_exp(stats.max_abs_diff, 3),
            rust_lower_exp(stats.rms_diff, 3),
            Text("◀ first", style="bold red") if result is first else "",
        )
    report.append(table)

    compared = sum(result.stats is not None for result in results)
    below = sum(
        result.stats is not None and not result.stats.cosine_sim >= threshold for result in results
    )
    summary = f"{compared} stage(s) compared, {below} below cosine {threshold}"
    if first is not None:
        summary += f"; first divergence: layer {layer_name(first.layer)} {first.stage}"
    report.append(Text(summary, style="bold red" if below else "bold green"))

    not_compared = [result for result in results if result.stats is None]
    if not_compared:
        report.append(Text(f"not compared ({len(not_compared)}):", style="bold yellow"))
        for result in not_compared:
            report.append(Text(f"  {result.error}"))
    if (
        trace_a.token_ids is not None
        and trace_b.token_ids is not None
        and trace_a.token_ids != trace_b.token_ids
    ):
        report.append(
            Text(
                f"warning: the traces ran different tokens: A {trace_a.token_ids} vs "
                f"B {trace_b.token_ids}",
                style="bold yellow",
            )
        )
    for label, trace, other in (("A", trace_a, trace_b), ("B", trace_b, trace_a)):
        only = _only_in(trace, other)
        if only:
            report.append(Text(f"only in {label} ({len(only)}):", style="bold"))
            for _, _, path in only:
                report.append(Text(f"  {path_display(path)}"))
        if trace.unknown:
            report.append(
                Text(f"not understood in {label} ({len(trace.unknown)}):", style="bold yellow")
            )
            for path, reason in trace.unknown:
                report.append(Text(f"  {path_display(path)}: {reason}"))
    print_report(*report)


# ----------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    from engine.errors import DiffError

    kinds = []
    for label, path in (("A", args.a), ("B", args.b)):
        if not path:
            raise DiffError(f"{label}: empty path")
        if not os.path.exists(path):
            raise DiffError(f"{path_display(path)}: no such file or directory")
        kinds.append("dir" if os.path.isdir(path) else "file")
    if kinds[0] != kinds[1]:
        file_side, dir_side = (args.a, args.b) if kinds[0] == "file" else (args.b, args.a)
        raise DiffError(
            f"cannot diff a file with a directory ({path_display(file_side)} is a file, "
            f"{path_display(dir_side)} is a directory): give two APRT files or two trace directories"
        )

    if kinds[0] == "file":
        for path in (args.a, args.b):
            _refuse_model_file(path, args.a, args.b)
        layer, stats = diff_files(args.a, args.b, args.limit)
        if args.json:
            from engine.rustfmt import serde_json_pretty

            print(serde_json_pretty(file_document(args.a, args.b, layer, stats)))
        else:
            _print_file_diff(args.a, args.b, layer, stats, args.threshold)
        return 0

    from engine.trace_directory import read_trace_dir

    trace_a, trace_b = read_trace_dir(args.a), read_trace_dir(args.b)
    if not any(key in trace_b.entries for key in trace_a.entries):
        raise DiffError(
            f"{path_display(args.a)} and {path_display(args.b)} have no (layer, stage) file in common"
        )
    results = diff_dirs(trace_a, trace_b, args.limit)
    if args.json:
        from engine.rustfmt import serde_json_pretty

        print(
            serde_json_pretty(dir_document(trace_a, trace_b, results, args.threshold, args.limit))
        )
    else:
        _print_dir_diff(trace_a, trace_b, results, args.threshold)
    return 0
