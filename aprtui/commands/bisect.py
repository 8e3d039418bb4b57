"""`apr-tui bisect A B`: the first (layer, stage) where two inference paths disagree, headless."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aprtui.commands import options

if TYPE_CHECKING:
    from engine.compare import Cell, TraceSource

HELP = "headless first-divergence report of two models / traces (exit 1 when diverged)"

DESCRIPTION = """\
Trace A and B stage by stage on the same tokens and report where they start to disagree.
A and B are model files (.apr, .gguf, .safetensors, HF directory), run through our forward
pass, or trace directories of APRT stage files (ours, or what `apr trace --save-tensor`
wrote, e.g. apr's default <model-stem>-trace/ beside a model).

Two models are traced in lock-step, layer by layer. A model against a directory runs only the
layers the directory holds. Tokens must agree: a model without --prompt/--tokens adopts a
directory's tokens.json; against a directory without tokens.json the prompt's length is
checked against the stage files' sizes.

Two verdicts, in computation order:
  first divergence        the first stage whose cosine(A, B) < --threshold (default 0.999,
                          apr's documented Q4K noise floor)
  first scale divergence  the first stage whose std(A)/std(B) leaves [0.5, 2]; cosine cannot
                          see a tensor that is right in direction and wrong in scale

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

exit codes: 0 nothing diverged, 1 a divergence was found, 2 bad input or usage."""

SCHEMA = "apr-tui-bisect-v1"

SHORT_NAMES = {
    "embedding": "emb",
    "attn_norm": "anorm",
    "qkv_matmul": "qkv",
    "qkv_bias": "qkv+b",
    "q_post_rope": "q_rope",
    "k_post_rope": "k_rope",
    "attn_scores": "score",
    "attn_softmax": "smax",
    "attention": "attn",
    "attn_out": "a_out",
    "post_attn_norm": "p_attn",
    "post_attn_residual": "res1",
    "ffn_norm": "fnorm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_silu": "silu",
    "ffn_gelu": "gelu",
    "ffn_swigl": "swigl",
    "ffn_out": "f_out",
    "post_ffn_norm": "p_ffn",
    "post_ffn_residual": "res2",
    "moe_router": "router",
    "moe_ffn_out": "moe",
    "moe_router_indices": "experts",
    "final_norm": "final",
    "lm_head": "logits",
}


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


def _parse_layers(text: str | None) -> range | None:
    if text is None:
        return None
    from engine.errors import PlanError
    from engine.stages import parse_layer_range

    try:
        start, end = parse_layer_range(text)
    except PlanError as error:
        reason = str(error).split(": ", 1)[-1]
        raise PlanError(f"--layers {text!r}: {reason}") from None
    return range(start, end)


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


def _layer_json(layer: int) -> int | str:
    from engine.stages import WHOLE_MODEL_LAYER

    return "whole-model" if layer == WHOLE_MODEL_LAYER else layer


def cell_json(cell: Cell, threshold: float) -> dict[str, Any]:
    from engine.compare import cosine_diverged, std_diverged, std_ratio

    return {
        "layer": _layer_json(cell.layer),
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
    }


def _source_json(source: TraceSource | None) -> dict[str, Any] | None:
    if source is None:
        return None
    return {
        "kind": source.kind,
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
    text = "1.0" if cosine >= 0.99995 else f"{cosine:.4f}".removeprefix("0")
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


def _print_summary(
    a: TraceSource, b: TraceSource, cells: list[Cell], threshold: float, first, first_std
) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from engine.compare import DEFAULT_STD_BAND
    from engine.stages import STAGE_BY_NAME, WHOLE_MODEL_LAYER

    stage_names = sorted({c.stage for c in cells}, key=lambda s: STAGE_BY_NAME[s].index)
    layers = sorted({c.layer for c in cells})
    by_key = {(c.layer, c.stage): c for c in cells}
    table = Table(title=None, show_lines=False, pad_edge=False, box=None, padding=(0, 1))
    table.add_column("layer", justify="right", style="bold", min_width=5, no_wrap=True)
    for name in stage_names:
        table.add_column(SHORT_NAMES.get(name, name), justify="right", no_wrap=True)
    for layer in layers:
        row: list[Text | str] = ["model" if layer == WHOLE_MODEL_LAYER else str(layer)]
        for name in stage_names:
            cell = by_key.get((layer, name))
            if cell is None:
                row.append("")
                continue
            text, style = _cosine_style(cell, threshold)
            if cell is first or cell is first_std:
                style += " underline"
            row.append(Text(text, style=style))
        table.add_row(*row)

    width = max(100, 8 + 8 * len(stage_names))
    console = Console(
        highlight=False, soft_wrap=True, width=width if not sys.stdout.isatty() else None
    )
    console.print(f"[bold cyan]apr-tui bisect[/]  A: {a.description}")
    console.print(f"                B: {b.description}")
    ids = a.token_ids if a.token_ids is not None else b.token_ids
    if ids is None:
        console.print("tokens: unknown (neither trace directory has a tokens.json)")
    else:
        console.print(f"tokens: {ids} ({len(ids)} tokens)")
    console.print()
    console.print(table)
    console.print(
        "cosine(A, B) per stage; [green]green[/] ≥ 0.99999, [yellow]yellow[/] ≥ threshold, "
        f"[red]red[/] < {threshold}; * std ratio outside {list(DEFAULT_STD_BAND)}; "
        "· one side only",
        style="dim",
    )
    console.print()
    absent = [c for c in cells if c.stats_a is None or c.stats_b is None]
    compared = len(cells) - len(absent)
    if first is None:
        console.print(
            f"[bold green]No divergence[/]: all {compared} compared stages have cosine ≥ {threshold}"
        )
    else:
        console.print(f"[bold red]First divergence[/] (cosine < {threshold}): {_describe(first)}")
    low, high = DEFAULT_STD_BAND
    if first_std is None:
        console.print(
            f"[bold green]No scale divergence[/]: every std ratio is within [{low}, {high}]"
        )
    else:
        console.print(
            f"[bold magenta]First scale divergence[/] (std ratio outside [{low}, {high}]): "
            f"{_describe(first_std)}"
        )
    for side in (a, b):
        ignored = _ignored_files(side)
        if ignored:
            path, reason = ignored[0]
            more = f"; and {len(ignored) - 1} more" if len(ignored) > 1 else ""
            console.print(
                f"{side.label}: ignored {len(ignored)} file(s) that are not stage files "
                f"({path}: {reason}{more})",
                style="dim",
                markup=False,
            )
    if absent:
        only_a = sum(1 for c in absent if c.stats_b is None)
        console.print(
            f"{len(absent)} stage(s) present on one side only "
            f"({only_a} only in A, {len(absent) - only_a} only in B)",
            style="dim",
        )


def _collect(cells) -> list[Cell]:
    """All cells; on a terminal, a status line on stderr says which stage is being compared."""
    if not sys.stderr.isatty():
        return list(cells)
    from rich.console import Console

    from engine.stages import WHOLE_MODEL_LAYER

    collected = []
    with Console(stderr=True).status("comparing…") as status:
        for cell in cells:
            collected.append(cell)
            where = "whole model" if cell.layer == WHOLE_MODEL_LAYER else f"layer {cell.layer}"
            status.update(f"compared {where} {cell.stage} ({len(collected)} stages)")
    return collected


def run(args: argparse.Namespace) -> int:
    from engine.compare import (
        DEFAULT_STD_BAND,
        compare,
        first_divergence,
        first_std_divergence,
        open_pair,
    )
    from engine.tokenizer import parse_token_ids

    layers = _parse_layers(args.layers)
    token_ids = parse_token_ids(args.tokens) if args.tokens is not None else None
    a, b = open_pair(args.a, args.b, prompt=args.prompt, token_ids=token_ids, device=args.device)
    assert b is not None
    try:
        cells = _collect(compare(a, b, layers=layers))
    finally:
        a.close()
        b.close()
    first = first_divergence(cells, args.threshold)
    first_std = first_std_divergence(cells)
    diverged = first is not None or first_std is not None

    if args.json:
        document = {
            "schema": SCHEMA,
            "a": _source_json(a),
            "b": _source_json(b),
            "token_ids": a.token_ids,
            "threshold": args.threshold,
            "std_band": list(DEFAULT_STD_BAND),
            "layers": [layers.start, layers.stop] if layers is not None else None,
            "diverged": diverged,
            "first_divergence": cell_json(first, args.threshold) if first else None,
            "first_std_divergence": cell_json(first_std, args.threshold) if first_std else None,
            "cells": [cell_json(cell, args.threshold) for cell in cells],
        }
        sys.stdout.write(json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")
    else:
        _print_summary(a, b, cells, args.threshold, first, first_std)
    return 1 if diverged else 0
