"""What a grid cell can show: the four metrics, their short text and their heat score.

Each metric turns one `Cell` into a number, a text of at most `CELL_TEXT_WIDTH` characters and a
heat score in [0, 1] (0 = agrees / low, 1 = diverges / high), which the grid maps through a
precomputed colour table. Scores are fixed functions of one cell (never of the whole grid), so
a new cell never forces the other cells to be recoloured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from aprtui.numbers import TEXT_WIDTH, cosine_text, short_number  # noqa: F401 (re-exported)
from engine.compare import Cell
from engine.stages import WHOLE_MODEL_LAYER

CELL_TEXT_WIDTH = TEXT_WIDTH
"""Numbers are formatted by aprtui.numbers (one format everywhere), at most this wide."""

STAGE_SHORT_NAMES: dict[str, str] = {
    "embedding": "emb",
    "attn_norm": "attn_n",
    "qkv_matmul": "qkv",
    "qkv_bias": "qkv_b",
    "q_post_rope": "q_rope",
    "k_post_rope": "k_rope",
    "attn_scores": "score",
    "attn_softmax": "smax",
    "attention": "attn",
    "attn_out": "attn_o",
    "post_attn_norm": "p_attn",
    "post_attn_residual": "res1",
    "ffn_norm": "ffn_n",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_silu": "silu",
    "ffn_gelu": "gelu",
    "ffn_swigl": "swigl",
    "ffn_out": "ffn_o",
    "post_ffn_norm": "p_ffn",
    "post_ffn_residual": "res2",
    "moe_router": "router",
    "moe_ffn_out": "moe_o",
    "moe_router_indices": "r_idx",
    "final_norm": "f_norm",
    "lm_head": "logits",
}
"""Column headers: at most CELL_TEXT_WIDTH characters each."""


def layer_label(layer: int) -> str:
    return "model" if layer == WHOLE_MODEL_LAYER else f"L{layer}"


def cell_title(layer: int, stage: str) -> str:
    """`layer 2 · ffn_swigl`, or `whole model · lm_head`."""
    where = "whole model" if layer == WHOLE_MODEL_LAYER else f"layer {layer}"
    return f"{where} · {stage}"


def _clip01(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


def cosine_score(cosine: float, threshold: float) -> float:
    """0 at 1 - cos <= 1e-3·(1 - threshold), 0.5 at the threshold, 1 at cos <= 0.

    Log scale of the cosine distance: noise at 1e-6 and a bug at 1e-2 must look different.
    """
    distance = max(1.0 - cosine, 1e-12)
    floor = max(1.0 - threshold, 1e-12)
    return _clip01(0.5 + (math.log10(distance) - math.log10(floor)) / 6.0)


def relative_diff_score(max_abs_diff: float, scale: float) -> float:
    """max|A-B| relative to max(|A|, |B|): 0 at 1e-6, 0.5 at 1e-3, 1 at 1."""
    relative = max_abs_diff / scale if scale > 0 else (0.0 if max_abs_diff == 0 else 1.0)
    return _clip01(0.5 + (math.log10(max(relative, 1e-12)) + 3.0) / 6.0)


def std_score(std: float) -> float:
    """Sequential log scale: 0 at std 1e-3, 1 at std 1e3."""
    return _clip01((math.log10(max(std, 1e-12)) + 3.0) / 6.0)


def local_ratio_score(ratio: float) -> float:
    """Local error as a multiple of its floor: 0 at ≤ 0.1×, 0.5 at the floor (1×), 1 at ≥ 10×."""
    if math.isinf(ratio):
        return 1.0
    return _clip01(0.5 + math.log10(max(ratio, 1e-12)) / 2.0)


def std_ratio_score(ratio: float) -> float:
    """0 at ratio 1, 0.5 at ×2 or ÷2, 1 at ×4 or ÷4 and beyond."""
    if ratio <= 0 or math.isinf(ratio):
        return 1.0
    return _clip01(abs(math.log2(ratio)) / 2.0)


@dataclass(frozen=True)
class Metric:
    """One way of reading a cell."""

    key: str
    title: str
    """Shown in the legend and the status line."""
    needs_reference: bool
    palette: str
    """`diverging` (green → yellow → red: agreement → disagreement) or `sequential`."""
    scale: tuple[tuple[float, str], ...]
    """Legend ticks: (score, label)."""
    value: Callable[[Cell], float | None]
    text: Callable[[float], str]
    score: Callable[[float, Cell, float], float]
    """(value, cell, cosine threshold) -> heat score in [0, 1]."""
    uses_floors: bool = False
    """The value is the cell's local error over its stage's noise floor, which the grid knows
    (`GridModel.floors`) and re-scores when the floors are recalibrated; `value` is unused."""


def _cosine_value(cell: Cell) -> float | None:
    """The cosine; for an index payload (expert ids) 1.0 when the ids are equal, 0.0 when not:
    ids are compared as ids, a cosine of them means nothing."""
    index_diff = getattr(cell, "index_diff", None)
    if index_diff is not None:
        return 1.0 if index_diff.equal else 0.0
    return None if cell.diff is None else float(cell.diff.cosine_sim)


def _max_diff_value(cell: Cell) -> float | None:
    return None if cell.diff is None else float(cell.diff.max_abs_diff)


def _std_a_value(cell: Cell) -> float | None:
    return None if cell.stats_a is None else float(cell.stats_a.std)


def _std_ratio_value(cell: Cell) -> float | None:
    if cell.stats_a is None or cell.stats_b is None:
        return None
    std_a, std_b = float(cell.stats_a.std), float(cell.stats_b.std)
    if std_b == 0:
        return 1.0 if std_a == 0 else math.inf
    return std_a / std_b


def _max_diff_scale(cell: Cell) -> float:
    scales = [s.max_abs for s in (cell.stats_a, cell.stats_b) if s is not None]
    finite = [float(s) for s in scales if math.isfinite(s)]
    return max(finite, default=0.0)


METRICS: tuple[Metric, ...] = (
    Metric(
        key="cosine",
        title="cosine(A, B)",
        needs_reference=True,
        palette="diverging",
        scale=((0.0, "≥0.999999"), (0.5, "0.999"), (0.75, "0.97"), (1.0, "≤0")),
        value=_cosine_value,
        text=cosine_text,
        score=lambda value, cell, threshold: cosine_score(value, threshold),
    ),
    Metric(
        key="max_diff",
        title="max|A-B| (colour: relative to max|A|,|B|)",
        needs_reference=True,
        palette="diverging",
        scale=((0.0, "≤1e-6"), (0.5, "1e-3"), (1.0, "≥1 rel")),
        value=_max_diff_value,
        text=short_number,
        score=lambda value, cell, threshold: relative_diff_score(value, _max_diff_scale(cell)),
    ),
    Metric(
        key="std_a",
        title="std of A",
        needs_reference=False,
        palette="sequential",
        scale=((0.0, "≤1e-3"), (0.5, "1"), (1.0, "≥1e3")),
        value=_std_a_value,
        text=short_number,
        score=lambda value, cell, threshold: std_score(value),
    ),
    Metric(
        key="std_ratio",
        title="std ratio A/B",
        needs_reference=True,
        palette="diverging",
        scale=((0.0, "1"), (0.5, "×2 ÷2"), (1.0, "≥×4 ≤÷4")),
        value=_std_ratio_value,
        text=short_number,
        score=lambda value, cell, threshold: std_ratio_score(value),
    ),
    Metric(
        key="local",
        title="local error ÷ noise floor (>1: not noise)",
        needs_reference=True,
        palette="diverging",
        scale=((0.0, "≤0.1×"), (0.5, "1× floor"), (1.0, "≥10×")),
        value=lambda cell: None,
        text=short_number,
        score=lambda value, cell, threshold: local_ratio_score(value),
        uses_floors=True,
    ),
)
METRIC_BY_KEY: dict[str, Metric] = {metric.key: metric for metric in METRICS}


def is_nonfinite(cell: Cell) -> bool:
    """Either side holds a NaN or an Inf: flagged in every metric."""
    return any(
        stats is not None and (stats.nan_count > 0 or stats.inf_count > 0)
        for stats in (cell.stats_a, cell.stats_b)
    )


def nonfinite_text(cell: Cell) -> str:
    nan = any(s is not None and s.nan_count > 0 for s in (cell.stats_a, cell.stats_b))
    return "NaN" if nan else "Inf"
