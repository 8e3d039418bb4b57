"""Noise or bug: a noise floor per stage calibrated from the pair itself, and the origin.

A correct runtime makes the same kind of error at the same kind of stage in every layer
(quantized activations cost a matmul ~1% whatever the layer; an element-wise op stays at float32
rounding); a bug is a spike. So the floor of a stage is calibrated across its layers with
robust statistics (the median, which one bad layer cannot move), never a fixed threshold, with
an absolute float32 floor below it for exact paths. The **origin** is the first cell, in
computation order, whose local error leaves its stage's floor: where the disagreement starts
and it is not noise.

Stages seen in too few layers, and the whole-model stages (`final_norm`, `lm_head`) and the
embedding, which have no layers to calibrate across, take the floor of their kind of operation
(the largest calibrated floor among the stages of that kind, with a margin); when no stage of
the kind has enough layers (a run over one or two layers), the median of all the kind's
local errors pooled; when there is nothing at all to measure, the kind's ceiling, so that
noise that could not be calibrated is never reported as an origin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from engine.compare import Cell
from engine.stages import WHOLE_MODEL_LAYER

FLOAT32_FLOOR = 1e-5
"""Relative local error an exact float32 path stays under: float32 rounding against the float64
recomputation is ~6e-8 per element-wise op and a few 1e-7 for a matmul over thousands of
products (measured ≤ 2e-6 on SmolLM2 and the seeded models); 1e-5 leaves a margin of 5×."""

NOISE_SPREAD = 4.0
"""A stage's floor is this many times its median local error across layers. On llama.cpp's
clean SmolLM2 dumps the worst (layer, op) sits at 1.6× its op's median; a kernel bug that scales
1% of one layer's ffn_down block scales by 1.5 sits at 13.7×. 4× leaves room on both sides."""

BORROWED_MARGIN = 2.0
"""Extra room for a floor borrowed from other stages of the same kind: their weights may be
stored in another quantization type (SmolLM2's Q4_1 GGUF keeps its embedding table in Q8_0, and
re-quantizing both to Q4_K costs the table 8% and the Q4_1 matmuls 6%)."""

MIN_LAYERS = 3
"""Layers a stage needs for its own median: with three, one bad layer cannot move it."""

KIND_CEILINGS: dict[str, float] = {"matmul": 0.5}
"""The most noise a kind of operation may be granted, however uniform. A bug in every layer
(a wrong RoPE base, a transposed weight everywhere) is as uniform as noise and would calibrate
itself away; but no correct runtime loses more than float16 precision (~1e-3) in an op without
weights, nor half of a matmul's output to weight rounding (Q2_K stays near 30%)."""

DEFAULT_CEILING = 1e-2
"""The ceiling of every kind not in KIND_CEILINGS: the weight-free operations."""

STAGE_KINDS: dict[str, str] = {
    "embedding": "matmul",  # a row lookup of the same quantized weights the matmuls read
    "attn_norm": "norm",
    "ffn_norm": "norm",
    "final_norm": "norm",
    "qkv_matmul": "matmul",
    "attn_out": "matmul",
    "ffn_gate": "matmul",
    "ffn_up": "matmul",
    "ffn_out": "matmul",
    "lm_head": "matmul",
    "qkv_bias": "add",
    "post_attn_residual": "add",
    "post_ffn_residual": "add",
    "q_post_rope": "rope",
    "k_post_rope": "rope",
    "attn_scores": "attention",
    "attn_softmax": "softmax",
    "attention": "attention",
    "ffn_silu": "activation",
    "ffn_swigl": "activation",
}
"""The kind of operation of each stage: stages without a floor of their own take their kind's."""


@dataclass(frozen=True)
class Floor:
    """The noise floor of one stage in this pair."""

    stage: str
    value: float
    """Local errors above this are not noise."""
    median: float | None
    """Median local error across the stage's layers; None when borrowed from its kind."""
    layers: int
    """How many layers the median is taken over (0 when borrowed)."""
    source: str
    """How the value was chosen: `calibrated`, `float32 floor`, or `kind <name>`."""


@dataclass(frozen=True)
class Origin:
    """The first cell whose local error leaves its stage's floor."""

    layer: int | None
    """The layer, or None for a whole-model stage."""
    stage: str
    local_error: float
    floor: float
    ratio: float
    inputs: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "stage": self.stage,
            "local_error": self.local_error if math.isfinite(self.local_error) else None,
            "floor": self.floor,
            "ratio": self.ratio if math.isfinite(self.ratio) else None,
            "inputs": list(self.inputs),
        }


def _local_errors(cells: Iterable[Cell]) -> dict[str, list[tuple[int, float]]]:
    by_stage: dict[str, list[tuple[int, float]]] = {}
    for cell in cells:
        if cell.local is not None and cell.local.error is not None:
            by_stage.setdefault(cell.stage, []).append((cell.layer, cell.local.error))
    return by_stage


def _median(values: list[float]) -> float:
    """The median of finite values, as np.median computes it (the mean of the middle two for an
    even count), without np.median's masked-array check (which imports numpy.ma: 15 ms)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def calibrate(cells: Iterable[Cell]) -> dict[str, Floor]:
    """The floor of every stage that has a local error in `cells`."""
    by_stage = _local_errors(cells)
    floors: dict[str, Floor] = {}
    for stage, values in by_stage.items():
        per_layer = [e for layer, e in values if layer != WHOLE_MODEL_LAYER and math.isfinite(e)]
        if stage in ("embedding",) or len(per_layer) < MIN_LAYERS:
            continue
        median = _median(per_layer)
        ceiling = KIND_CEILINGS.get(STAGE_KINDS.get(stage, stage), DEFAULT_CEILING)
        value = min(max(FLOAT32_FLOOR, NOISE_SPREAD * median), ceiling)
        source = "calibrated" if value > FLOAT32_FLOOR else "float32 floor"
        if value == ceiling:
            source = "kind ceiling"
        floors[stage] = Floor(stage, value, median, len(per_layer), source)
    kind_floor: dict[str, float] = {}
    for stage, floor in floors.items():
        kind = STAGE_KINDS.get(stage, stage)
        kind_floor[kind] = max(kind_floor.get(kind, 0.0), floor.value)
    pooled: dict[str, list[float]] = {}  # kind -> every per-layer local error of its stages
    for stage, values in by_stage.items():
        if stage != "embedding":
            pooled.setdefault(STAGE_KINDS.get(stage, stage), []).extend(
                e for layer, e in values if layer != WHOLE_MODEL_LAYER and math.isfinite(e)
            )
    for stage in by_stage:
        if stage in floors:
            continue
        kind = STAGE_KINDS.get(stage, stage)
        ceiling = KIND_CEILINGS.get(kind, DEFAULT_CEILING)
        if kind in kind_floor:
            value = BORROWED_MARGIN * kind_floor[kind]
            floors[stage] = Floor(stage, value, None, 0, f"kind {kind}")
        elif len(pooled.get(kind, ())) >= MIN_LAYERS:
            # Too few layers for any stage of the kind alone (a `--layers 0..2` run): the
            # median of all of them, with the borrowed margin, since they mix stages.
            median = _median(pooled[kind])
            value = min(max(FLOAT32_FLOOR, BORROWED_MARGIN * NOISE_SPREAD * median), ceiling)
            source = f"kind {kind}, pooled" if value > FLOAT32_FLOOR else "float32 floor"
            floors[stage] = Floor(stage, value, median, 0, source)
        else:
            # Nothing to calibrate from: the most the kind may be granted, so that no origin
            # is claimed from noise we could not measure (a large spike still leaves it).
            floors[stage] = Floor(stage, ceiling, None, 0, "uncalibrated: kind ceiling")
    return floors


def local_ratio(cell: Cell, floors: dict[str, Floor]) -> float | None:
    """local error / floor for one cell, or None when it has none."""
    if cell.local is None or cell.local.error is None or cell.stage not in floors:
        return None
    return cell.local.error / floors[cell.stage].value


def find_origin(cells: list[Cell], floors: dict[str, Floor] | None = None) -> Origin | None:
    """The first cell in computation order whose local error is above its stage's floor."""
    floors = calibrate(cells) if floors is None else floors
    for cell in cells:
        ratio = local_ratio(cell, floors)
        if ratio is None or not ratio > 1.0:
            continue
        assert cell.local is not None and cell.local.error is not None
        return Origin(
            layer=None if cell.layer == WHOLE_MODEL_LAYER else cell.layer,
            stage=cell.stage,
            local_error=cell.local.error,
            floor=floors[cell.stage].value,
            ratio=ratio,
            inputs=cell.local.inputs,
        )
    return None
