"""The grid's pure model (aprtui.widgets.grid_model.GridModel), without an app.

Positions are written out by hand from the dense column order: embedding 0, attn_norm 1, ...,
ffn_up 13, ffn_out 16, post_ffn_residual 17, final_norm 18, lm_head 19 (20 columns), and rows
are the configured layers in order, then the whole-model row.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from aprtui.widgets.grid_model import (
    ABSENT,
    EMPTY,
    NONFINITE,
    ONE_SIDED,
    VALUE,
    GridModel,
)
from engine.compare import Cell
from engine.local_error import LocalError
from engine.noise import Floor
from engine.stages import WHOLE_MODEL_LAYER
from engine.stats import DiffStats, TensorStats

EMBEDDING, ATTN_NORM, FFN_UP, FFN_OUT, RES2, FINAL_NORM, LM_HEAD = 0, 1, 13, 16, 17, 18, 19
"""Column indices of the stages used below, counted by hand in the dense stage order."""

HEALTHY = TensorStats(
    count=10,
    nan_count=0,
    inf_count=0,
    zero_count=0,
    min=-1.0,
    max=1.0,
    mean=0.0,
    std=0.5,
    l2_norm=2.0,
    max_abs=1.0,
)
LOUD = replace(HEALTHY, max=150.0, max_abs=150.0, std=120.0)
"""Large values, and HIGH-VAR on a layer output (post_ffn_residual)."""


def cell(
    layer: int,
    stage: str,
    cosine: float | None = 0.9999999,
    *,
    stats_a: TensorStats | None = HEALTHY,
    stats_b: TensorStats | None = HEALTHY,
    local: float | None = None,
) -> Cell:
    """A cell with this cosine (None: no diff) and these side statistics."""
    diff = None if cosine is None else DiffStats(10, 0.01, 0, 0.001, cosine, ())
    error = None if local is None else LocalError(local, ())
    return Cell(layer, stage, (10,), stats_a, stats_b, diff, error)


def grid(layers=(2, 3, 4), *, has_reference: bool = True, **options) -> GridModel:
    model = GridModel(threshold=0.999, has_reference=has_reference)
    model.configure(list(layers), has_reference, **options)
    return model


# ----------------------------------------------------------------------------- layout


def test_positions_follow_the_layers_and_the_stage_order():
    model = grid((2, 3, 4))
    assert (model.n_rows, model.n_cols) == (4, 20)
    assert model.position(3, "ffn_up") == (1, 13)
    assert model.position(2, "attn_norm") == (0, 1)
    assert model.position(WHOLE_MODEL_LAYER, "lm_head") == (3, 19)
    assert model.position(5, "ffn_up") is None  # not a configured layer
    assert model.position(3, "moe_router") is None  # no such column (yet)
    assert model.layer_at(0) == 2 and model.layer_at(3) == WHOLE_MODEL_LAYER


def test_which_positions_can_hold_a_cell():
    model = grid((0, 1))
    # embedding only in layer 0, the whole-model stages only in the last row
    assert model.applicable[0, EMBEDDING] and not model.applicable[1, EMBEDDING]
    assert not model.applicable[2, EMBEDDING]
    assert model.applicable[2, FINAL_NORM] and not model.applicable[0, FINAL_NORM]
    assert not model.applicable[2, ATTN_NORM]
    # layer 0: 18 per-layer stages; layer 1: 17 (no embedding); whole model: 2
    assert model.expected_count == 18 + 17 + 2
    assert model.done_count == 0


def test_a_stored_cell_fills_its_row_and_column_only():
    model = grid((2, 3, 4))
    stored = cell(
        3, "ffn_up", 0.5, stats_a=replace(HEALTHY, std=0.5), stats_b=replace(HEALTHY, std=0.25)
    )
    assert model.set_cell(stored) == (1, FFN_UP)
    assert model.cells == {(1, FFN_UP): stored}
    assert model.done_count == 1
    assert model.values["cosine"][1, FFN_UP] == 0.5
    assert model.texts["cosine"][1, FFN_UP] == "0.5000"
    assert model.values["std_a"][1, FFN_UP] == 0.5
    assert model.values["std_ratio"][1, FFN_UP] == 2.0  # 0.5 / 0.25
    assert model.texts["std_ratio"][1, FFN_UP] == "2.000"
    for key in ("cosine", "std_a", "std_ratio"):
        kinds = model.kinds[key]
        assert kinds[1, FFN_UP] == VALUE
        assert np.count_nonzero(kinds != EMPTY) == 1  # nothing else was touched
    # the transposed position (row 13 does not exist; column 1 of row 1) stays empty
    assert model.kinds["cosine"][1, ATTN_NORM] == EMPTY
    assert math.isnan(model.values["cosine"][0, FFN_UP])


def test_a_cell_outside_the_rows_is_dropped():
    model = grid((2, 3))
    assert model.set_cell(cell(7, "ffn_up")) is None
    assert model.set_cell(cell(2, "not_a_stage")) is None
    assert model.cells == {}


def test_a_moe_cell_adds_its_column_and_keeps_the_cells():
    model = grid((2, 3))
    logits = cell(WHOLE_MODEL_LAYER, "lm_head", 0.5)
    model.set_cell(logits)
    assert model.position(WHOLE_MODEL_LAYER, "lm_head") == (2, 19)
    assert model.set_cell(cell(3, "moe_router", 0.7)) == (1, 18)  # right after res2 (17)
    assert model.n_cols == 21
    assert model.stages[17:] == ["post_ffn_residual", "moe_router", "final_norm", "lm_head"]
    # the stored logits moved one column right, with their values
    assert model.cells[(2, 20)] is logits
    assert model.values["cosine"][2, 20] == 0.5
    assert model.values["cosine"][1, 18] == 0.7


# ----------------------------------------------------------------------------- kinds


def test_one_sided_cells_say_which_side_and_are_absent_without_a_reference():
    model = grid((2,))
    model.set_cell(cell(2, "ffn_up", None, stats_b=None))
    model.set_cell(cell(2, "ffn_out", None, stats_a=None))
    assert model.kinds["cosine"][0, FFN_UP] == ONE_SIDED
    assert model.texts["cosine"][0, FFN_UP] == "A only"
    assert model.texts["cosine"][0, FFN_OUT] == "B only"
    alone = grid((2,), has_reference=False)
    alone.set_cell(cell(2, "ffn_up", None, stats_b=None))
    assert alone.kinds["cosine"][0, FFN_UP] == ABSENT
    assert alone.texts["cosine"][0, FFN_UP] == "·"
    assert alone.kinds["std_a"][0, FFN_UP] == VALUE  # side A's own std is still shown


def test_a_cell_neither_side_has_is_absent_in_every_metric():
    model = grid((2,))
    model.set_cell(cell(2, "qkv_bias", None, stats_a=None, stats_b=None))
    for key in model.kinds:
        assert model.kinds[key][0, 3] == ABSENT
        assert model.texts[key][0, 3] == "·"


def test_nan_on_one_side_is_loud_in_every_metric():
    model = grid((2,))
    model.set_cell(cell(2, "ffn_up", 0.0, stats_a=replace(HEALTHY, nan_count=3)))
    for key in ("cosine", "max_diff", "std_a", "std_ratio", "local"):
        assert model.kinds[key][0, FFN_UP] == NONFINITE
        assert model.texts[key][0, FFN_UP] == "NaN"
    inf = grid((2,))
    inf.set_cell(cell(2, "ffn_up", 0.0, stats_b=replace(HEALTHY, inf_count=1)))
    assert inf.texts["std_a"][0, FFN_UP] == "Inf"


def test_unproduced_columns_are_absent_where_applicable():
    produced = ("embedding", "attn_norm", "ffn_up", "final_norm", "lm_head")
    model = grid((0, 1), produced=produced)
    assert model.kinds["cosine"][0, ATTN_NORM] == EMPTY  # produced: pending
    assert model.kinds["cosine"][0, FFN_OUT] == ABSENT  # never produced
    assert model.kinds["cosine"][1, EMBEDDING] == EMPTY  # not applicable: blank, not absent
    assert model.kinds["cosine"][2, FFN_OUT] == EMPTY  # the whole-model row has no ffn_out
    # layer 0: embedding, attn_norm, ffn_up; layer 1: attn_norm, ffn_up; whole model: 2
    assert model.expected_count == 3 + 2 + 2


def test_only_the_planned_cells_are_pending():
    model = grid((2, 3), cells=((3, "ffn_up"), (WHOLE_MODEL_LAYER, "lm_head")))
    assert model.expected_count == 2
    assert model.kinds["cosine"][1, FFN_UP] == EMPTY
    assert model.kinds["cosine"][0, FFN_UP] == ABSENT
    assert model.kinds["cosine"][2, FINAL_NORM] == ABSENT


def test_a_run_without_the_whole_model_row_leaves_it_blank():
    model = grid((2, 3), whole_model=False)
    assert not model.applicable[2].any()
    assert model.expected_count == 17 + 17  # no embedding (layer 0 is not traced)
    model.set_cell(cell(WHOLE_MODEL_LAYER, "lm_head"))  # it came after all: it counts
    assert model.applicable[2, LM_HEAD] and not model.applicable[2, FINAL_NORM]
    assert model.expected_count == 17 + 17 + 1


def test_missing_cells_become_absent_after_the_run():
    model = grid((2,))
    model.set_cell(cell(2, "ffn_up"))
    model.mark_missing_absent()
    assert model.kinds["cosine"][0, FFN_UP] == VALUE
    assert model.kinds["cosine"][0, ATTN_NORM] == ABSENT
    assert model.texts["cosine"][0, ATTN_NORM] == "·"
    assert model.kinds["cosine"][0, EMBEDDING] == EMPTY  # not applicable to layer 2
    assert model.expected_count == 1


def test_floors_rescore_the_local_metric():
    model = grid((2,))
    model.set_cell(cell(2, "ffn_up", local=3e-5))
    assert model.kinds["local"][0, FFN_UP] != VALUE  # no floor yet: nothing to divide by
    floors = {"ffn_up": Floor("ffn_up", 1e-5, 1e-5, 1, "test")}
    assert model.set_floors(floors) is True
    assert model.values["local"][0, FFN_UP] == pytest.approx(3.0)
    assert model.kinds["local"][0, FFN_UP] == VALUE
    assert model.set_floors(dict(floors)) is False  # the same floors: nothing to do


# ----------------------------------------------------------------------------- marks


def test_first_divergence_is_the_earliest_mark_in_computation_order():
    model = grid((2, 3, 4))
    std = cell(4, "attn_norm", 0.5)  # (2, 1): an earlier column, a later row
    cosine = cell(3, "ffn_out", 0.5)  # (1, 16)
    for one in (std, cosine):
        model.set_cell(one)
    assert model.first_divergence is None
    assert model.mark_divergence("std", std) == {2}
    assert model.mark_divergence("cosine", cosine) == {1}
    assert model.first_divergence == (1, FFN_OUT)  # the row wins over the column
    assert model.jump_target == (1, FFN_OUT)
    assert model.diverged_row(1) and model.diverged_row(2) and not model.diverged_row(0)
    assert model.marked_columns(2) == {ATTN_NORM}
    model.mark_divergence("origin", std)
    assert model.jump_target == (2, ATTN_NORM)  # the origin first, even when it is later
    assert model.first_divergence == (1, FFN_OUT)
    assert model.mark_divergence("cosine", None) == {1}
    assert model.divergences == {"std": (2, ATTN_NORM), "origin": (2, ATTN_NORM)}
    assert model.first_divergence == (2, ATTN_NORM)


def test_worst_order_with_a_reference():
    model = grid((2, 3))
    model.set_cell(cell(2, "attn_norm", 0.99))  # (0, 1)
    model.set_cell(cell(2, "ffn_up", 0.5))  # (0, 13)
    model.set_cell(cell(3, "attn_norm", 0.5))  # (1, 1): ties with (0, 13)
    model.set_cell(cell(3, "ffn_up", 0.0, stats_a=replace(HEALTHY, nan_count=1)))  # (1, 13)
    model.set_cell(cell(3, "ffn_out", None, stats_b=None))  # (1, 16): one-sided, not ranked
    model.set_cell(cell(2, "ffn_out", 0.9))  # (0, 16)
    assert model.worst_order() == [(1, 13), (0, 13), (1, 1), (0, 16), (0, 1)]


def test_worst_order_without_a_reference_is_std_of_a_descending():
    model = grid((2, 3), has_reference=False)
    model.set_cell(cell(2, "attn_norm", None, stats_a=replace(HEALTHY, std=2.0), stats_b=None))
    model.set_cell(cell(2, "ffn_up", None, stats_a=replace(HEALTHY, std=7.0), stats_b=None))
    model.set_cell(cell(3, "attn_norm", None, stats_a=replace(HEALTHY, std=0.1), stats_b=None))
    model.set_cell(cell(3, "ffn_up", None, stats_a=replace(HEALTHY, inf_count=1), stats_b=None))
    assert model.worst_order() == [(1, 13), (0, 13), (0, 1), (1, 1)]


def test_walk_worst_starts_at_either_end_and_wraps():
    model = grid((2,))
    model.set_cell(cell(2, "attn_norm", 0.5))  # (0, 1): worst
    model.set_cell(cell(2, "ffn_up", 0.9))  # (0, 13): best
    ranking = [(0, 1), (0, 13)]
    assert model.walk_worst(None, 1) == (0, ranking)
    assert model.walk_worst(None, -1) == (1, ranking)
    assert model.walk_worst((0, 1), 1) == (1, ranking)
    assert model.walk_worst((0, 13), 1) == (0, ranking)  # past the best: back to the worst
    assert model.walk_worst((0, 1), -1) == (1, ranking)
    assert model.walk_worst((0, 5), 1) == (0, ranking)  # not a ranked cell: a new walk
    assert grid((2,)).walk_worst(None, 1) == (-1, [])


def test_anomalies_walk_in_computation_order_and_wrap():
    model = grid((2, 3, 4))
    model.set_cell(cell(4, "attn_norm", stats_a=LOUD))  # (2, 1): large values
    model.set_cell(cell(3, "post_ffn_residual", stats_a=LOUD))  # (1, 17): also HIGH-VAR
    model.set_cell(cell(3, "ffn_up"))  # healthy: not flagged
    model.set_cell(cell(2, "ffn_up", stats_a=LOUD, stats_b=LOUD))  # shared: not flagged
    assert model.anomaly_order() == [(1, RES2), (2, ATTN_NORM)]
    assert model.next_anomaly((0, 0)) == (1, RES2)
    assert model.next_anomaly((1, RES2)) == (2, ATTN_NORM)
    assert model.next_anomaly((2, ATTN_NORM)) == (1, RES2)  # wraps around
    assert model.high_var_rows() == {1}
    assert grid((2,)).next_anomaly((0, 0)) is None


def test_a_healthy_cell_clears_its_old_flag():
    model = grid((2,))
    model.set_cell(cell(2, "ffn_up", stats_a=LOUD))
    assert model.anomaly_order() == [(0, FFN_UP)]
    model.set_cell(cell(2, "ffn_up"))
    assert model.anomaly_order() == []


def test_the_model_imports_neither_textual_nor_rich():
    code = (
        "import sys, aprtui.widgets.grid_model; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'textual', 'rich'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
