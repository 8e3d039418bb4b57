"""`apr-tui bisect A B`: the first (layer, stage) where two inference paths disagree, headless."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from aprtui.commands import options
from aprtui.commands.output import Line, Segment, print_lines, table_lines

SHOWS_STEP_PROGRESS = True
"""Long engine steps (a big APR file's footer check) show progress on stderr (aprtui.cli)."""

if TYPE_CHECKING:
    from engine.compare import Cell
    from engine.sources import TraceSource

HELP = "headless noise-or-bug report of two models / traces (exit 1 when a bug's origin is found)"

DESCRIPTION = """\
Trace A and B stage by stage on the same tokens and report where they start to disagree.
A and B are model files (.apr, .gguf, .safetensors, HF directory), run through our forward
pass, or trace directories of APRT stage files (ours, or what `apr trace --save-tensor`
wrote, e.g. apr's default <model-stem>-trace/ beside a model).

Two models are traced in lock-step, layer by layer. A model against a directory runs only the
layers the directory holds. Tokens must agree: a model without --prompt/--tokens adopts a
directory's tokens.json; against a directory without tokens.json the prompt's length is
checked against the stage files' sizes.

The verdict is the ORIGIN: for every stage, the error it adds on its own (its local error:
the stage recomputed exactly, in float64, from the checked side's own inputs to it, with the
model file's weights, against that side's output) is compared with a noise floor calibrated
from this very pair (4x the stage's median local error across layers, never below 1e-5, the
float32 floor; whole-model stages borrow the floor of their kind of operation). Noise is
uniform across layers; a bug is a spike. The origin is the first stage whose local error
leaves its floor. A correct but noisy runtime (llama.cpp's 8-bit activations, a Q4_K copy of
the weights) has no origin; a bug inside that noise still has one. The checked side is B (A
when only B is a model file run by us), with A's weights (B's when A is a trace directory).

Conventions of other runtimes are honoured: attn_scores/attn_softmax are compared on their
causal entries only, an all-position lm_head [seq, vocab] is paired with apr's last-token
[vocab] by its last row, and stages a runtime does not produce are listed, not errors.

Two propagated verdicts stay in the report as information:
  first divergence        the first stage whose cosine(A, B) < --threshold (default 0.999,
                          apr's documented Q4K noise floor)
  first scale divergence  the first stage whose std(A)/std(B) leaves [0.5, 2]; cosine cannot
                          see a tensor that is right in direction and wrong in scale
Giving --threshold explicitly makes them a gate again (exit 1 when either fires). When no
local error can be computed (two trace directories), they are the gate.

Two models must have the same width (hidden size, heads, head dim, FFN size), else no stage
could be compared and bisect stops with an error. Layer count, vocabulary and architecture may
differ: the common layers are compared, and stages or layers one side lacks are listed as
one-sided; a different vocabulary makes lm_head a size mismatch, which counts as diverged.

The summary is a layer × stage table coloured by cosine; --json prints an
apr-tui-bisect-v1 document with every cell's statistics instead (files in a trace directory
that are not stage files are listed under "ignored_files")."""

EPILOG = """\
examples:
  apr-tui bisect model.gguf model.apr                  two containers of one model
  apr-tui bisect model.apr model-trace/                our pass against apr's saved stages
  apr-tui bisect a.gguf b.gguf --layers 0..4 --json > report.json

exit codes: 0 the pair agrees within its noise floor, 1 an origin was found (or, with an
explicit --threshold, a propagated divergence), 2 bad input or usage."""

SCHEMA = "apr-tui-bisect-v1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="model file / HF dir, or APRT trace directory")
    parser.add_argument("b", metavar="B", help="model file / HF dir, or APRT trace directory")
    options.add_threshold(parser, "cosine below which a stage has diverged")
    parser.add_argument(
        "--layers", metavar="START..END", help="only these layers, END exclusive (default all)"
    )
    options.add_prompt_options(parser)
    options.add_device_option(parser)
    parser.add_argument("--json", action="store_true", help="print an apr-tui-bisect-v1 document")


# ------------------------------------------------------------------------------------ JSON


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become null (as serde_json does)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def cell_json(cell: Cell, threshold: float, floors: dict | None = None) -> dict[str, Any]:
    from engine.anomalies import cell_anomalies, grid_anomalies
    from engine.compare import cosine_diverged, std_diverged, std_ratio
    from engine.noise import local_ratio
    from engine.stages import layer_name

    local = cell.local
    flags, one_sided = cell_anomalies(cell), grid_anomalies(cell)
    return {
        "layer": layer_name(cell.layer),
        "stage": cell.stage,
        "shape": list(cell.shape),
        "a": asdict(cell.stats_a) if cell.stats_a is not None else None,
        "b": asdict(cell.stats_b) if cell.stats_b is not None else None,
        "diff": asdict(cell.diff) if cell.diff is not None else None,
        "cosine": cell.diff.cosine_sim if cell.diff is not None else None,
        "index_diff": asdict(cell.index_diff) if cell.index_diff is not None else None,
        "std_ratio": std_ratio(cell),
        "diverged": cosine_diverged(cell, threshold),
        "std_diverged": std_diverged(cell),
        "local_error": None if local is None else local.error,
        "local_ratio": None if floors is None else local_ratio(cell, floors),
        "local_inputs": None if local is None else list(local.inputs),
        "local_missing": None if local is None else local.missing,
        "anomalies": {
            side.lower(): [{"rule": f.rule, "detail": f.detail} for f in found]
            for side, found in (("A", flags.a), ("B", flags.b))
        },
        "one_sided_anomalies": [f.rule for f in (*one_sided.a, *one_sided.b)],
    }


def _source_json(source: TraceSource | None) -> dict[str, Any] | None:
    if source is None:
        return None
    return {
        "kind": source.kind,
        "complete": getattr(source, "complete", None),
        "label": source.label,
        "description": source.description,
        "token_ids": source.token_ids,
        "ignored_files": [
            {"path": str(path), "reason": reason} for path, reason in _ignored_files(source)
        ],
    }


def _ignored_files(source: TraceSource) -> list[tuple[object, str]]:
    """Files in a trace directory that are not stage files (unknown names, unreadable)."""
    trace_dir = getattr(source, "trace_dir", None)
    return list(trace_dir.unknown) if trace_dir is not None else []


# ------------------------------------------------------------------------------------ text


def _cosine_style(cell: Cell, threshold: float) -> tuple[str, str]:
    """(text, rich style) for one table cell."""
    from aprtui.numbers import cosine_text
    from engine.compare import cosine_diverged, std_diverged

    if cell.stats_a is None or cell.stats_b is None:
        return "·", "dim"
    if cell.diff is None:
        return "size≠", "bold white on red"
    if cell.index_diff is not None:  # expert ids: equal or not, never a cosine
        if cell.index_diff.equal:
            return "=", "green"
        return f"≠{len(cell.index_diff.positions)}", "bold red"
    cosine = cell.diff.cosine_sim
    text = cosine_text(cosine)  # aprtui.numbers: the grid's format
    if std_diverged(cell):
        text += "*"
    if cosine_diverged(cell, threshold):
        return text, "bold white on red" if cosine < 0.9 else "bold red"
    if std_diverged(cell):
        return text, "bold magenta"
    if cosine >= 0.99999:
        return text, "green"
    return text, "yellow"


def _describe(cell: Cell) -> str:
    from engine.compare import std_ratio
    from engine.stages import WHOLE_MODEL_LAYER

    where = "whole model" if cell.layer == WHOLE_MODEL_LAYER else f"layer {cell.layer}"
    parts = [f"{where} {cell.stage} {list(cell.shape)}"]
    if cell.index_diff is not None:
        ids = cell.index_diff
        parts.append(f"ids A {list(ids.a)} / B {list(ids.b)}")
        parts.append("equal" if ids.equal else f"differ at {list(ids.positions)}")
        return ", ".join(parts)
    if cell.diff is not None:
        parts.append(f"cosine {cell.diff.cosine_sim:.6f}")
        parts.append(f"max|diff| {cell.diff.max_abs_diff:.4g} at {cell.diff.max_abs_diff_index}")
        parts.append(f"rms diff {cell.diff.rms_diff:.4g}")
    else:
        parts.append("element counts differ")
    if cell.stats_a is not None and cell.stats_b is not None:
        ratio = std_ratio(cell)
        parts.append(f"std A {cell.stats_a.std:.4g} / B {cell.stats_b.std:.4g} = {ratio:.3g}")
    return ", ".join(parts)


def _summary_lines(
    a: TraceSource,
    b: TraceSource,
    cells: list[Cell],
    threshold: float,
    first,
    first_std,
    verdict: NoiseVerdict,
) -> list[Line]:
    """The text report: the sides, the cosine grid, the verdicts, what was left out."""
    from engine.compare import DEFAULT_STD_BAND

    lines: list[Line] = [
        [("apr-tui bisect", "bold cyan"), f"  A: {a.description}"],
        f"                B: {b.description}",
    ]
    ids = a.token_ids if a.token_ids is not None else b.token_ids
    if ids is None:
        lines.append("tokens: unknown (neither trace directory has a tokens.json)")
    else:
        lines.append(f"tokens: {ids} ({len(ids)} tokens)")
    for label, side in (("A", a), ("B", b)):  # a trace directory whose run did not finish
        note = getattr(getattr(side, "trace_dir", None), "incomplete_note", None)
        if note:
            lines.append((f"warning: {label}: {note}", "bold yellow"))
    lines.append("")
    lines += _grid_lines(cells, threshold, first, first_std, verdict)
    lines.append(
        [
            ("cosine(A, B) per stage; ", "dim"),
            ("green", "dim green"),
            (" ≥ 0.99999, ", "dim"),
            ("yellow", "dim yellow"),
            (" ≥ threshold, ", "dim"),
            ("red", "dim red"),
            (
                f" < {threshold}; * std ratio outside {list(DEFAULT_STD_BAND)}; · one side only",
                "dim",
            ),
        ]
    )
    lines.append("")
    lines += _noise_verdict_lines(verdict)
    absent = [c for c in cells if c.stats_a is None or c.stats_b is None]
    compared = len(cells) - len(absent)
    if first is None:
        lines.append(
            [
                ("No propagated divergence", "green"),
                f": all {compared} compared stages have cosine ≥ {threshold}",
            ]
        )
    else:
        lines.append(
            [
                ("First propagated divergence", "yellow"),
                f" (cosine < {threshold}): {_describe(first)}",
            ]
        )
    low, high = DEFAULT_STD_BAND
    if first_std is None:
        lines.append(
            [("No scale divergence", "green"), f": every std ratio is within [{low}, {high}]"]
        )
    else:
        lines.append(
            [
                ("First scale divergence", "magenta"),
                f" (std ratio outside [{low}, {high}]): {_describe(first_std)}",
            ]
        )
    lines += _anomaly_lines(cells)
    for side in (a, b):
        if getattr(side, "complete", None) is False:
            lines.append(
                (
                    f"{side.label}: INCOMPLETE trace: the run that wrote it did not finish; its "
                    "missing stages are one-sided, not compared",
                    "bold yellow",
                )
            )
        ignored = _ignored_files(side)
        if ignored:
            path, reason = ignored[0]
            more = f"; and {len(ignored) - 1} more" if len(ignored) > 1 else ""
            lines.append(
                (
                    f"{side.label}: ignored {len(ignored)} file(s) that are not stage files "
                    f"({path}: {reason}{more})",
                    "dim",
                )
            )
    if absent:
        only_a = sum(1 for c in absent if c.stats_b is None)
        lines.append(
            (
                f"{len(absent)} stage(s) present on one side only "
                f"({only_a} only in A, {len(absent) - only_a} only in B)",
                "dim",
            )
        )
    return lines


def _grid_lines(
    cells: list[Cell], threshold: float, first, first_std, verdict: NoiseVerdict
) -> list[Line]:
    """The cosine of every cell, a row per layer and a column per stage (`table_lines`)."""
    from aprtui.widgets.metrics import STAGE_SHORT_NAMES
    from engine.stages import STAGE_BY_NAME, WHOLE_MODEL_LAYER

    stage_names = sorted({c.stage for c in cells}, key=lambda s: STAGE_BY_NAME[s].index)
    layers = sorted({c.layer for c in cells})
    by_key = {(c.layer, c.stage): c for c in cells}
    rows: list[list[Segment]] = []
    for layer in layers:
        row: list[Segment] = [("model" if layer == WHOLE_MODEL_LAYER else str(layer), "bold")]
        for name in stage_names:
            cell = by_key.get((layer, name))
            if cell is None:
                row.append("")
                continue
            text, style = _cosine_style(cell, threshold)
            if verdict.is_origin(cell):
                text, style = "◆" + text, "bold white on red"
            if cell is first or cell is first_std:
                style += " underline"
            row.append((text, style))
        rows.append(row)
    header = ["layer"] + [STAGE_SHORT_NAMES.get(name, name) for name in stage_names]
    return table_lines(header, rows, min_widths=[5])


PIPED_PROGRESS_EVERY_S = 5.0
"""Without a terminal, a progress line on stderr at most this often (nothing for short runs)."""


def _anomaly_lines(cells: list[Cell]) -> list[Line]:
    """apr's anomaly flags (NaN, Inf, near-zero variance, large values, large mean bias,
    HIGH-VAR) that one side breaks and the other does not: the first one and a count."""
    from engine.anomalies import grid_anomalies
    from engine.stages import WHOLE_MODEL_LAYER

    flagged = [(cell, flags) for cell in cells if (flags := grid_anomalies(cell))]
    if not flagged:
        return []
    cell, flags = flagged[0]
    where = "whole model" if cell.layer == WHOLE_MODEL_LAYER else f"layer {cell.layer}"
    more = f"; {len(flagged) - 1} more stage(s) flagged" if len(flagged) > 1 else ""
    text = f"apr anomaly flags on one side only: {where} {cell.stage}: {flags.summary()}{more}"
    return [(text, "yellow")]


LONG_RUN_MEMORY = 256 * 1024 * 1024
"""A comparison that needs more working memory than this is announced before it starts."""


class _Progress:
    """Progress of one long step on stderr: a live status line on a terminal, otherwise a plain
    line every PIPED_PROGRESS_EVERY_S seconds (a long bisection is never silent, piped or not).
    `update(text)` after each unit of work; use it as a context manager."""

    def __init__(self, first: str) -> None:
        self.first = first
        self.status: Any = None
        self.last = 0.0

    def __enter__(self) -> _Progress:
        self.last = time.monotonic()
        if sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status(self.first)
            self.status.__enter__()
        return self

    def update(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)
            return
        now = time.monotonic()
        if now - self.last >= PIPED_PROGRESS_EVERY_S:
            self.last = now
            print(f"apr-tui bisect: {text}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)


def _collect(cells, expected: int) -> list[Cell]:
    """All cells, with progress on stderr (`_Progress`)."""
    from engine.stages import WHOLE_MODEL_LAYER

    def where(cell: Cell) -> str:
        return "whole model" if cell.layer == WHOLE_MODEL_LAYER else f"layer {cell.layer}"

    collected: list[Cell] = []
    with _Progress("comparing…") as progress:
        for cell in cells:
            collected.append(cell)
            progress.update(f"{len(collected)}/{expected} cells ({where(cell)} {cell.stage})")
    return collected


@dataclass
class NoiseVerdict:
    """The origin verdict of one bisection: floors per stage, the origin, and what gated."""

    floors: dict
    origin: Any
    available: bool
    """Whether any cell has a local error (two trace directories have none)."""
    note: str | None = None

    def is_origin(self, cell: Cell) -> bool:
        from engine.stages import WHOLE_MODEL_LAYER

        if self.origin is None or cell.stage != self.origin.stage:
            return False
        layer = None if cell.layer == WHOLE_MODEL_LAYER else cell.layer
        return layer == self.origin.layer

    def floors_json(self) -> dict[str, Any]:
        return {
            stage: {
                "floor": floor.value,
                "median": floor.median,
                "layers": floor.layers,
                "source": floor.source,
            }
            for stage, floor in self.floors.items()
        }


def noise_verdict(cells: list[Cell], note: str | None) -> NoiseVerdict:
    from engine.noise import calibrate, find_origin

    floors = calibrate(cells)
    available = any(c.local is not None and c.local.error is not None for c in cells)
    return NoiseVerdict(floors, find_origin(cells, floors) if available else None, available, note)


def _noise_verdict_lines(verdict: NoiseVerdict) -> list[Line]:
    """The origin (or why there is none) and the floor of each stage, in one block."""
    from aprtui.widgets.metrics import STAGE_SHORT_NAMES
    from engine.noise import STAGE_KINDS
    from engine.stages import STAGE_BY_NAME

    if not verdict.available:
        reason = verdict.note or "no stage has a local error"
        return [
            [("No noise verdict", "bold yellow"), f": {reason}; the propagated verdicts below gate"]
        ]
    origin = verdict.origin
    lines: list[Line] = []
    if origin is None:
        lines.append(
            [
                ("No origin", "bold green"),
                ": every stage's local error is within its noise floor "
                "(the pair agrees up to noise)",
            ]
        )
    else:
        where = "whole model" if origin.layer is None else f"layer {origin.layer}"
        lines.append(
            [
                ("Origin", "bold red"),
                f": {where} {origin.stage}: local error {origin.local_error:.3g} "
                f"is {origin.ratio:.3g}× its floor {origin.floor:.3g} "
                f"(recomputed from {', '.join(origin.inputs)})",
            ]
        )
    kinds: dict[str, list[str]] = {}
    for stage in sorted(verdict.floors, key=lambda s: STAGE_BY_NAME[s].index):
        floor = verdict.floors[stage]
        label = STAGE_SHORT_NAMES.get(stage, stage)
        kinds.setdefault(STAGE_KINDS.get(stage, stage), []).append(f"{label} {floor.value:.2g}")
    parts = [f"{kind}: {', '.join(entries)}" for kind, entries in kinds.items()]
    lines.append(("noise floors (relative local error) — " + "; ".join(parts), "dim"))
    if verdict.note:
        lines.append((verdict.note, "dim"))
    lines.append("")
    return lines


def logits_block(a: TraceSource, b: TraceSource, cells: list[Cell]) -> tuple[dict | None, list]:
    """Per-position logit metrics (engine.logits) when the comparison reached the whole-model
    stages and both sides have every position's logits: the JSON object and the text lines."""
    from engine.logits import format_logit_report, pair_logit_report
    from engine.stages import WHOLE_MODEL_LAYER

    if not any(cell.layer == WHOLE_MODEL_LAYER for cell in cells):
        return None, []
    with _Progress("logit metrics…") as progress:
        report = pair_logit_report(
            a,
            b,
            progress=lambda done, total: progress.update(f"logit metrics {done}/{total} positions"),
        )
    if report is None:
        return None, []
    tokenizer = next(
        (t for s in (a, b) if (t := getattr(getattr(s, "model", None), "tokenizer", None))),
        None,
    )
    return report, format_logit_report(report, tokenizer.token_text if tokenizer else None)


def _warn_past_context(plan) -> None:
    """A warning on stderr for each model side whose context length the prompt runs past."""
    from engine.model import context_warning

    for side in (plan.a, plan.b):
        config = getattr(side, "config", None)
        if config is not None and plan.seq_len is not None:
            beyond = context_warning(config, plan.seq_len, getattr(side, "label", "model"))
            if beyond is not None:
                print(beyond, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from aprtui.commands.locations import model_argument  # `smollm2`: the bundled GGUF
    from engine.compare import DEFAULT_STD_BAND, first_divergence, first_std_divergence
    from engine.plan import prepare
    from engine.tokenizer import parse_token_ids

    layers = options.parse_layers(args.layers)
    token_ids = parse_token_ids(args.tokens) if args.tokens is not None else None

    plan = prepare(
        model_argument(args.a),
        model_argument(args.b),
        prompt=args.prompt,
        token_ids=token_ids,
        layers=layers,
        device=args.device,
    )
    a, b = plan.a, plan.b
    assert b is not None
    _warn_past_context(plan)
    need = plan.working_memory()
    if need > LONG_RUN_MEMORY:  # a long prompt: say what it costs before the wait
        print(
            f"apr-tui bisect: {plan.seq_len} tokens, {plan.expected} cells: about "
            f"{need / 2**20:,.0f} MiB of working memory (attention compared in blocks)",
            file=sys.stderr,
            flush=True,
        )
    with plan:
        cells = _collect(plan.run(), plan.expected)
        logits, logits_lines = logits_block(a, b, cells)
    first = first_divergence(cells, args.threshold)
    first_std = first_std_divergence(cells)
    verdict = noise_verdict(cells, None if plan.local is None else plan.local.note)
    propagated = first is not None or first_std is not None
    if verdict.available:
        failed = verdict.origin is not None or (args.threshold_given and propagated)
    else:
        failed = propagated

    if args.json:
        document = {
            "schema": SCHEMA,
            "a": _source_json(a),
            "b": _source_json(b),
            "token_ids": list(plan.token_ids) if plan.token_ids is not None else None,
            "threshold": args.threshold,
            "std_band": list(DEFAULT_STD_BAND),
            "layers": [layers.start, layers.stop] if layers is not None else None,
            "diverged": failed,
            "origin": None if verdict.origin is None else verdict.origin.as_json(),
            "checked_side": None if plan.local is None else plan.local.side,
            "noise_floors": verdict.floors_json(),
            "first_divergence": cell_json(first, args.threshold, verdict.floors) if first else None,
            "first_std_divergence": cell_json(first_std, args.threshold, verdict.floors)
            if first_std
            else None,
            "cells": [cell_json(cell, args.threshold, verdict.floors) for cell in cells],
            "logits": logits,
        }
        sys.stdout.write(json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")
    else:
        print_lines(_summary_lines(a, b, cells, args.threshold, first, first_std, verdict))
        if logits_lines:
            sys.stdout.write("\n" + "\n".join(logits_lines) + "\n")
    return 1 if failed else 0
