"""What the layer × stage grid holds, without drawing it: the pure model under `StageGrid`.

Rows are the traced layers plus one row for the whole-model stages (`final_norm`, `lm_head`);
columns are the stages in canonical order. For every metric the model keeps four arrays of shape
[n_rows, n_cols]: the value (NaN when there is none), the cell text, the heat score in [0, 1]
and what the position holds (`EMPTY`, `VALUE`, `ABSENT`, `NONFINITE`, `ONE_SIDED`). Storing a
cell writes one element of each; nothing is rebuilt (except when a MoE column first arrives).

Everything here is data: which cells arrived, which are absent, the noise floors, the marked
divergences, the anomaly flags and the orders the keys walk (first divergence, worst to best,
flagged cells). The widget (`aprtui.widgets.stage_grid`) owns the cursor, the scrolling, the
keys and the colours; this module imports neither Textual nor Rich, so every rule of the grid
can be tested by plain assertions, without an app.
"""

from __future__ import annotations

import math

import numpy as np

from aprtui.anomalies import CellAnomalies, grid_anomalies
from aprtui.widgets.metrics import (
    CELL_TEXT_WIDTH,
    METRICS,
    Metric,
    is_nonfinite,
    nonfinite_text,
)
from engine.compare import Cell
from engine.noise import local_ratio
from engine.stages import DENSE_STAGES, STAGE_BY_NAME, WHOLE_MODEL_LAYER

Position = tuple[int, int]
"""(row, column) of a grid cell: rows are `row_layers` then the whole-model row."""

# What one grid position holds, per metric.
EMPTY = 0
"""Not applicable to this row, or not computed yet: drawn blank."""
VALUE = 1
"""A finite value (or an infinite ratio of finite sides): drawn on its heat colour."""
ABSENT = 2
"""Neither side produces this stage (qkv_bias on Llama): drawn as a dim dot."""
NONFINITE = 3
"""NaN or Inf on either side: drawn loud in every metric."""
ONE_SIDED = 4
"""Only one side produces the stage, so there is nothing to compare."""

ABSENT_TEXT = "·"
"""The text of an absent cell (also of a one-sided one without a reference, where the other
side does not exist at all)."""


def default_stages() -> list[str]:
    """The dense stages in canonical order (MoE columns are added when a MoE cell arrives)."""
    return [stage.name for stage in DENSE_STAGES]


class GridModel:
    """The cells, metric arrays, masks and marks of one layer × stage grid."""

    def __init__(self, *, threshold: float = 0.999, has_reference: bool = True) -> None:
        self.threshold = threshold
        """Cosine below this is a divergence (and scores red in the cosine metric)."""
        self.has_reference = has_reference
        """False in single-model mode: a one-sided cell is absent, not `A only`."""
        self.row_layers: list[int] = []
        self.complete = False
        """Whether the run has ended with every cell it could give (mark_missing_absent)."""
        self.stages: list[str] = default_stages()
        self.cells: dict[Position, Cell] = {}
        self.divergences: dict[str, Position] = {}
        """Marked cells by kind (`origin`, `cosine`, `std`) -> (row, column)."""
        self.floors: dict = {}
        """The noise floor of each stage (engine.noise.Floor), for the `local` metric."""
        self.anomalies: dict[Position, CellAnomalies] = {}
        """apr's anomaly flags of the flagged cells, by (row, column)."""
        self._row_of: dict[int, int] = {}
        self._col_of: dict[str, int] = {}
        self._allocate()

    # -- shape ------------------------------------------------------------------------------

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The metrics this grid can show (only `std of A` without a reference)."""
        return tuple(m for m in METRICS if self.has_reference or not m.needs_reference)

    @property
    def n_rows(self) -> int:
        return len(self.row_layers) + 1

    @property
    def n_cols(self) -> int:
        return len(self.stages)

    def configure(
        self,
        layers: list[int] | tuple[int, ...],
        has_reference: bool,
        produced: tuple[str, ...] | None = None,
        *,
        whole_model: bool = True,
        cells: tuple[tuple[int, str], ...] | None = None,
    ) -> None:
        """Lay the grid out for these decoder layers (plus the whole-model row); clears it.

        `produced`: the stages either side can produce; the other columns are absent at once.
        `whole_model`: False when the run stops before the last layer (no final_norm, lm_head).
        `cells`: every (layer, stage) the run will yield (the plan's); any other cell can never
        exist and is absent from the start, not pending.
        """
        self.row_layers = list(layers)
        self.has_reference = has_reference
        self.complete = False
        self.stages = default_stages()
        self.cells.clear()
        self.divergences.clear()
        self.anomalies.clear()
        self._allocate()
        if not whole_model:
            self.applicable[-1, :] = False  # not part of this run: blank, never "absent"
        if produced:
            never = [col for col, name in enumerate(self.stages) if name not in produced]
            missing = np.zeros_like(self.applicable)
            missing[:, never] = self.applicable[:, never]
            self._mark_absent(missing)
        if cells is not None:
            planned = np.zeros_like(self.applicable)
            for layer, stage_name in cells:
                position = self.position(layer, stage_name)
                if position is not None:
                    planned[position] = True
            self._mark_absent(self.applicable & ~planned)

    def _allocate(self) -> None:
        """Empty arrays for the current rows and columns, and which positions can hold a cell
        (`embedding` only in layer 0, whole-model stages only in the last row)."""
        rows = [*self.row_layers, WHOLE_MODEL_LAYER]
        self._row_of = {layer: row for row, layer in enumerate(rows)}
        self._col_of = {stage: col for col, stage in enumerate(self.stages)}
        shape = (self.n_rows, self.n_cols)
        self.values = {m.key: np.full(shape, np.nan) for m in METRICS}
        self.texts = {m.key: np.full(shape, "", dtype=f"<U{CELL_TEXT_WIDTH}") for m in METRICS}
        self.scores = {m.key: np.zeros(shape) for m in METRICS}
        """Heat score in [0, 1] of each VALUE position (0 = agrees / low, 1 = diverges / high)."""
        self.kinds = {m.key: np.full(shape, EMPTY, dtype=np.int8) for m in METRICS}
        self.applicable = np.zeros(shape, dtype=bool)
        for col, stage_name in enumerate(self.stages):
            stage = STAGE_BY_NAME[stage_name]
            if not stage.per_layer:
                self.applicable[-1, col] = True
            elif stage_name == "embedding":
                self.applicable[:-1, col] = np.array(
                    [layer == 0 for layer in self.row_layers], bool
                )
            else:
                self.applicable[:-1, col] = True

    def _add_column(self, stage_name: str) -> None:
        """A stage the default columns lack (MoE): re-lay the grid out and re-apply the cells."""
        order = {name: STAGE_BY_NAME[name].index for name in [*self.stages, stage_name]}
        old_cells = list(self.cells.values())
        self.stages = sorted(order, key=order.__getitem__)
        self.cells.clear()
        self.divergences.clear()
        self.anomalies.clear()
        self._allocate()
        for cell in old_cells:
            self._store(cell)

    # -- lookups ----------------------------------------------------------------------------

    def position(self, layer: int, stage: str) -> Position | None:
        """The (row, column) of a (layer, stage), or None when the grid has no such place."""
        row = self._row_of.get(layer)
        col = self._col_of.get(stage)
        return None if row is None or col is None else (row, col)

    def missing_reason(self, layer: int, stage: str) -> str:
        """Why the grid has no cell at (layer, stage): it is still to come, neither side
        produces it, or the grid has no such cell at all (`embedding` past layer 0, a
        whole-model stage in a layer's row, a row beyond the run)."""
        position = self.position(layer, stage)
        if position is None or not self.applicable[position]:
            return "no such cell: this stage is not part of this row"
        if self.kinds["cosine"][position] == ABSENT:
            return "absent: not produced by either side in this run"
        return "not computed yet"

    def layer_at(self, row: int) -> int:
        return self.row_layers[row] if row < len(self.row_layers) else WHOLE_MODEL_LAYER

    def cell_at(self, row: int, col: int) -> Cell | None:
        return self.cells.get((row, col))

    # -- cells ------------------------------------------------------------------------------

    def set_cell(self, cell: Cell) -> Position | None:
        """Store one result; returns its position, or None when the grid has no place for it
        (a layer outside the rows, an unknown stage). A known stage without a column (MoE)
        gets one first, which re-lays the grid out (`n_cols` grows)."""
        if cell.stage not in self._col_of:
            if cell.stage not in STAGE_BY_NAME:
                return None
            self._add_column(cell.stage)
        if cell.layer not in self._row_of:
            return None
        return self._store(cell)

    def _store(self, cell: Cell) -> Position:
        row, col = self._row_of[cell.layer], self._col_of[cell.stage]
        self.cells[(row, col)] = cell
        self.applicable[row, col] = True
        flags = grid_anomalies(cell)
        if flags:
            self.anomalies[(row, col)] = flags
        else:
            self.anomalies.pop((row, col), None)
        nonfinite = is_nonfinite(cell)
        for metric in METRICS:
            key = metric.key
            value = local_ratio(cell, self.floors) if metric.uses_floors else metric.value(cell)
            if nonfinite or (value is not None and not math.isfinite(value) and value != 0):
                if value is not None and math.isinf(value) and not nonfinite:
                    self.kinds[key][row, col] = VALUE
                    self.texts[key][row, col] = metric.text(value)
                    self.scores[key][row, col] = 1.0
                    self.values[key][row, col] = value
                    continue
                self.kinds[key][row, col] = NONFINITE
                self.texts[key][row, col] = nonfinite_text(cell) if nonfinite else "NaN"
                self.values[key][row, col] = np.nan
            elif value is not None:
                self.kinds[key][row, col] = VALUE
                self.values[key][row, col] = value
                self.texts[key][row, col] = metric.text(value)
                self.scores[key][row, col] = metric.score(value, cell, self.threshold)
            elif cell.stats_a is None and cell.stats_b is None:
                self.kinds[key][row, col] = ABSENT
                self.texts[key][row, col] = ABSENT_TEXT
            else:
                self.kinds[key][row, col] = ONE_SIDED
                self.texts[key][row, col] = "A only" if cell.stats_b is None else "B only"
                if not self.has_reference:
                    self.texts[key][row, col] = ABSENT_TEXT
                    self.kinds[key][row, col] = ABSENT
        return row, col

    def set_floors(self, floors: dict) -> bool:
        """New noise floors (recalibrated as layers arrive): re-score every stored cell.
        Returns False (and changes nothing) when they are the floors already in use."""
        if floors == self.floors:
            return False
        self.floors = dict(floors)
        for cell in list(self.cells.values()):
            self._store(cell)
        return True

    def mark_missing_absent(self) -> None:
        """After a complete run: every applicable cell that never arrived is absent."""
        self._mark_absent(self.applicable & (self.kinds["cosine"] == EMPTY))
        self.complete = True

    def _mark_absent(self, mask: np.ndarray) -> None:
        for metric in METRICS:
            self.kinds[metric.key][mask] = ABSENT
            self.texts[metric.key][mask] = ABSENT_TEXT

    @property
    def done_count(self) -> int:
        """Cells received so far."""
        return len(self.cells)

    @property
    def expected_count(self) -> int:
        """Cells this grid can still receive or has received (absent ones excluded)."""
        return int((self.applicable & (self.kinds["cosine"] != ABSENT)).sum())

    # -- marks ------------------------------------------------------------------------------

    def mark_divergence(self, kind: str, cell: Cell | None) -> set[int]:
        """Mark `cell` as the first divergence of `kind` (`cosine`, `std` or `origin`); None
        unmarks. Returns the rows whose marks changed (the old mark's and the new one's)."""
        old = self.divergences.pop(kind, None)
        position = None if cell is None else self.position(cell.layer, cell.stage)
        if position is not None:
            self.divergences[kind] = position
        return {p[0] for p in (old, position) if p is not None}

    @property
    def first_divergence(self) -> Position | None:
        """The earliest marked cell in computation order."""
        marked = sorted(self.divergences.values())
        return marked[0] if marked else None

    @property
    def jump_target(self) -> Position | None:
        """Where `f` goes: the origin when one is marked, else the first divergence."""
        return self.divergences.get("origin") or self.first_divergence

    def diverged_row(self, row: int) -> bool:
        """Whether a divergence mark sits in this row (its label gets the marker)."""
        return any(position[0] == row for position in self.divergences.values())

    def marked_columns(self, row: int) -> set[int]:
        """The columns of this row that carry a divergence mark."""
        return {c for (r, c) in self.divergences.values() if r == row}

    def high_var_rows(self) -> set[int]:
        """Rows whose layer has apr's `[HIGH-VAR]` status."""
        return {row for (row, _), flags in self.anomalies.items() if flags.high_var}

    # -- orders the keys walk ---------------------------------------------------------------

    def worst_order(self) -> list[Position]:
        """Cells from worst to best: cosine ascending (non-finite first) with a reference,
        otherwise non-finite first, then std of A descending."""
        positions = list(self.cells)
        if not positions:
            return []
        rows = np.array([p[0] for p in positions])
        cols = np.array([p[1] for p in positions])
        nonfinite = self.kinds["cosine"][rows, cols] == NONFINITE
        if self.has_reference:
            cosine = self.values["cosine"][rows, cols]
            badness = np.where(np.isnan(cosine), -np.inf, -cosine)
            keep = ~np.isnan(cosine) | nonfinite
        else:
            badness = np.nan_to_num(self.values["std_a"][rows, cols], nan=-np.inf)
            keep = np.ones(len(positions), bool)
        badness = np.where(nonfinite, np.inf, badness)
        # Stable: ties keep computation order (rows, then columns).
        order = np.lexsort((cols, rows, -badness))
        return [positions[i] for i in order if keep[i]]

    def walk_worst(self, current: Position | None, step: int) -> tuple[int, list[Position]]:
        """One step of `n` / `shift+n`: (index into the ranking, the ranking).

        `current`: the cell a walk in progress stands on (None starts a new walk, at the worst
        cell for `n` and the best for `shift+n`); a cell no longer ranked starts anew as well.
        The walk wraps around at both ends. An empty ranking returns index -1.
        """
        ranking = self.worst_order()
        if not ranking:
            return -1, ranking
        if current is not None and current in ranking:
            index = (ranking.index(current) + step) % len(ranking)
        else:
            index = 0 if step > 0 else len(ranking) - 1
        return index, ranking

    def anomaly_order(self) -> list[Position]:
        """Flagged cells in computation order (rows, then columns)."""
        return sorted(self.anomalies)

    def next_anomaly(self, after: Position) -> Position | None:
        """The first flagged cell after `after` in computation order, wrapping around to the
        first one; None when no cell is flagged."""
        flagged = self.anomaly_order()
        if not flagged:
            return None
        later = [position for position in flagged if position > after]
        return later[0] if later else flagged[0]
