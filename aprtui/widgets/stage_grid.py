"""The layer × stage heat grid, built on Textual's Line API over numpy arrays.

Rows are the traced layers plus one row for the whole-model stages (`final_norm`, `lm_head`);
columns are the stages in canonical order. For every metric the grid keeps three arrays of shape
[n_rows, n_cols]: the value (NaN when there is none), the cell text and the heat-colour index.
A new cell writes one element of each and repaints one line (`refresh_lines`); nothing is
rebuilt. Measured in shared/reference/textual-and-numerics-notes.md §C.5: a DataTable repaints
every cell on each update (85–170 ms at 30 × 20), this grid repaints a line in well under 1 ms.
"""

from __future__ import annotations

import math

import numpy as np
from rich.segment import Segment
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive, var
from textual.scroll_view import ScrollView
from textual.strip import Strip

from aprtui.anomalies import ANOMALY_MARKER, CellAnomalies, grid_anomalies
from aprtui.messages import CellSelected, CursorMoved, MetricChanged
from aprtui.widgets.metrics import (
    CELL_TEXT_WIDTH,
    METRIC_BY_KEY,
    METRICS,
    STAGE_SHORT_NAMES,
    Metric,
    is_nonfinite,
    layer_label,
    nonfinite_text,
)
from aprtui.widgets.palette import heat_styles, score_index
from engine.compare import Cell
from engine.noise import local_ratio
from engine.stages import DENSE_STAGES, STAGE_BY_NAME, WHOLE_MODEL_LAYER

LABEL_WIDTH = 6
CELL_WIDTH = CELL_TEXT_WIDTH + 1
"""One gap column (where the divergence marker goes) plus the cell text."""

# What one grid position holds, per metric.
EMPTY = 0
"""Not applicable to this row, or not computed yet: drawn blank."""
VALUE = 1
ABSENT = 2
"""Neither side produces this stage (qkv_bias on Llama): drawn as a dim dot."""
NONFINITE = 3
"""NaN or Inf on either side: drawn loud in every metric."""
ONE_SIDED = 4
"""Only one side produces the stage, so there is nothing to compare."""

DIVERGENCE_MARKER = "▶"


def default_stages() -> list[str]:
    """The dense stages in canonical order (MoE columns are added when a MoE cell arrives)."""
    return [stage.name for stage in DENSE_STAGES]


class StageGrid(ScrollView, can_focus=True):
    """Layer × stage heat grid of the selected metric."""

    BINDINGS = [
        Binding("up,k", "cursor(-1, 0)", "Up", show=False),
        Binding("down,j", "cursor(1, 0)", "Down", show=False),
        Binding("left,h", "cursor(0, -1)", "Left", show=False),
        Binding("right,l", "cursor(0, 1)", "Right", show=False),
        Binding("pageup", "cursor(-10, 0)", "Page up", show=False),
        Binding("pagedown", "cursor(10, 0)", "Page down", show=False),
        Binding("home", "cursor_home", "First cell", show=False),
        Binding("end", "cursor_end", "Last cell", show=False),
        Binding("enter", "select_cell", "Open cell"),
        Binding("m", "cycle_metric", "Metric"),
        Binding("f", "jump_divergence", "First divergence"),
        Binding("n", "walk_worst(1)", "Next worst"),
        Binding("N", "walk_worst(-1)", "Previous worst", key_display="shift+n", show=False),
        Binding("a", "next_anomaly", "Next anomaly"),
    ]

    HELP = """
## Stage grid

One row per layer (plus `model` for the whole-model stages), one column per stage in
computation order. Each cell shows the selected metric on a heat colour; the legend below the
grid says what the colours mean.

- `·` the stage is absent (neither side produces it); blank: not computed (yet)
- `NaN` / `Inf` (magenta): a non-finite value on either side
- `!` (gold): an apr anomaly flag (with a reference: one that only one side has) — NaN, Inf, near-zero variance (std < 1e-8),
  large values (max|x| > 100), large mean bias (|mean| > 10), or HIGH-VAR (the layer output's
  std > 100, which also turns the layer label gold); `a` jumps to the next flagged cell
- `▶` and reverse video: the first divergence
- `m` cycles cosine → max|A-B| → std of A → std ratio A/B
- `f` jumps to the first divergence, `n` / `shift+n` walk the cells from worst to best
- `Enter` (or a click on the cursor cell) opens the cell
"""

    COMPONENT_CLASSES = {
        "stage-grid--header",
        "stage-grid--label",
        "stage-grid--label-diverged",
        "stage-grid--cursor",
        "stage-grid--divergence",
        "stage-grid--absent",
        "stage-grid--nonfinite",
        "stage-grid--one-sided",
        "stage-grid--marker",
        "stage-grid--anomaly-marker",
        "stage-grid--label-high-var",
    }

    metric: reactive[str] = reactive("cosine")
    """Key of the metric the cells show."""
    cursor: var[tuple[int, int]] = var((0, 0))
    """(row, column) of the cursor."""

    def __init__(
        self,
        *,
        threshold: float = 0.999,
        has_reference: bool = True,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.threshold = threshold
        self.has_reference = has_reference
        self.row_layers: list[int] = []
        self.stages: list[str] = default_stages()
        self.cells: dict[tuple[int, int], Cell] = {}
        self.divergences: dict[str, tuple[int, int]] = {}
        """Marked cells by kind (`origin`, `cosine`, `std`) -> (row, column)."""
        self.floors: dict = {}
        """The noise floor of each stage (engine.noise.Floor), for the `local` metric."""
        self.anomalies: dict[tuple[int, int], CellAnomalies] = {}
        """apr's anomaly flags of the flagged cells, by (row, column)."""
        self._row_of: dict[int, int] = {}
        self._walk: tuple[int, int] | None = None
        """The cell the last n / shift+n landed on (a walk continues from there)."""
        self._col_of: dict[str, int] = {}
        self._allocate()
        if not has_reference:
            self.set_reactive(StageGrid.metric, "std_a")

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
        self.refresh_bindings()  # f and m exist only with a reference (check_action)
        self.post_message(self.ShapeChanged())  # new rows: the app re-fits (even at one size)
        if not has_reference and METRIC_BY_KEY[self.metric].needs_reference:
            self.set_reactive(StageGrid.metric, "std_a")
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
        self.cursor = (0, 0)
        self._post_cursor()
        self.refresh()

    def _allocate(self) -> None:
        rows = [*self.row_layers, WHOLE_MODEL_LAYER]
        self._row_of = {layer: row for row, layer in enumerate(rows)}
        self._col_of = {stage: col for col, stage in enumerate(self.stages)}
        shape = (self.n_rows, self.n_cols)
        self.values = {m.key: np.full(shape, np.nan) for m in METRICS}
        self.texts = {m.key: np.full(shape, "", dtype=f"<U{CELL_TEXT_WIDTH}") for m in METRICS}
        self.heat = {m.key: np.zeros(shape, dtype=np.uint8) for m in METRICS}
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
        self._fit_virtual_size()

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
        self.refresh()

    # -- data -------------------------------------------------------------------------------

    def position(self, layer: int, stage: str) -> tuple[int, int] | None:
        row = self._row_of.get(layer)
        col = self._col_of.get(stage)
        return None if row is None or col is None else (row, col)

    def layer_at(self, row: int) -> int:
        return self.row_layers[row] if row < len(self.row_layers) else WHOLE_MODEL_LAYER

    def cell_at(self, row: int, col: int) -> Cell | None:
        return self.cells.get((row, col))

    @property
    def cursor_cell(self) -> Cell | None:
        return self.cells.get(self.cursor)

    def set_cell(self, cell: Cell) -> None:
        """Store one result and repaint its line only."""
        if cell.stage not in self._col_of:
            if cell.stage not in STAGE_BY_NAME:
                return
            self._add_column(cell.stage)
        if cell.layer not in self._row_of:
            return
        row, col = self._store(cell)
        self._refresh_row(row)
        if (row, col) == self.cursor:
            self._post_cursor()

    def _store(self, cell: Cell) -> tuple[int, int]:
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
                    self.heat[key][row, col] = score_index(1.0)
                    self.values[key][row, col] = value
                    continue
                self.kinds[key][row, col] = NONFINITE
                self.texts[key][row, col] = nonfinite_text(cell) if nonfinite else "NaN"
                self.values[key][row, col] = np.nan
            elif value is not None:
                self.kinds[key][row, col] = VALUE
                self.values[key][row, col] = value
                self.texts[key][row, col] = metric.text(value)
                self.heat[key][row, col] = score_index(metric.score(value, cell, self.threshold))
            elif cell.stats_a is None and cell.stats_b is None:
                self.kinds[key][row, col] = ABSENT
                self.texts[key][row, col] = "·"
            else:
                self.kinds[key][row, col] = ONE_SIDED
                self.texts[key][row, col] = "A only" if cell.stats_b is None else "B only"
                if not self.has_reference:
                    self.texts[key][row, col] = "·"
                    self.kinds[key][row, col] = ABSENT
        return row, col

    def set_floors(self, floors: dict) -> None:
        """New noise floors (recalibrated as layers arrive): re-score every stored cell."""
        if floors == self.floors:
            return
        self.floors = dict(floors)
        for cell in list(self.cells.values()):
            self._store(cell)
        self.refresh()
        self._post_cursor()  # the panel under the grid shows the cursor cell's floor too

    def mark_divergence(self, kind: str, cell: Cell | None) -> None:
        """Mark `cell` as the first divergence of `kind` (`cosine` or `std`); None unmarks."""
        old = self.divergences.pop(kind, None)
        position = None if cell is None else self.position(cell.layer, cell.stage)
        if position is not None:
            self.divergences[kind] = position
        for row in {p[0] for p in (old, position) if p is not None}:
            self._refresh_row(row)

    @property
    def first_divergence(self) -> tuple[int, int] | None:
        """The earliest marked cell in computation order."""
        marked = sorted(self.divergences.values())
        return marked[0] if marked else None

    def mark_missing_absent(self) -> None:
        """After a complete run: every applicable cell that never arrived is absent."""
        self._mark_absent(self.applicable & (self.kinds["cosine"] == EMPTY))
        self.refresh()

    def _mark_absent(self, mask: np.ndarray) -> None:
        for metric in METRICS:
            self.kinds[metric.key][mask] = ABSENT
            self.texts[metric.key][mask] = "·"

    @property
    def done_count(self) -> int:
        return len(self.cells)

    @property
    def expected_count(self) -> int:
        """Cells this grid can still receive or has received (absent ones excluded)."""
        return int((self.applicable & (self.kinds["cosine"] != ABSENT)).sum())

    # -- drawing ----------------------------------------------------------------------------

    def watch_metric(self, metric: str) -> None:
        self.refresh()
        self.post_message(MetricChanged(metric))

    def _refresh_row(self, row: int) -> None:
        line = row + 1 - self.scroll_offset.y
        if 1 <= line < self.size.height:
            self.refresh_lines(line)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        scroll_x, scroll_y = self.scroll_offset
        cells_width = max(0, width - LABEL_WIDTH)
        if y == 0:
            style = self.get_component_rich_style("stage-grid--header")
            header = "".join(
                f"{STAGE_SHORT_NAMES.get(s, s[:CELL_TEXT_WIDTH]):>{CELL_WIDTH}}"
                for s in self.stages
            )
            label = Strip([Segment(f"{'layer':<{LABEL_WIDTH}}", style)])
            cells = Strip([Segment(header, style)]).crop(scroll_x, scroll_x + cells_width)
            return Strip.join([label, cells]).extend_cell_length(width, style)
        row = y - 1 + scroll_y
        if row >= self.n_rows:
            return Strip.blank(width, self.rich_style)
        label = Strip([self._label_segment(row)])
        cells = Strip(self._row_segments(row)).crop(scroll_x, scroll_x + cells_width)
        return Strip.join([label, cells]).extend_cell_length(width, self.rich_style).simplify()

    def high_var_rows(self) -> set[int]:
        """Rows whose layer has apr's `[HIGH-VAR]` status."""
        return {row for (row, _), flags in self.anomalies.items() if flags.high_var}

    def _label_segment(self, row: int) -> Segment:
        diverged = any(position[0] == row for position in self.divergences.values())
        component = "stage-grid--label-diverged" if diverged else "stage-grid--label"
        if not diverged and row in self.high_var_rows():
            component = "stage-grid--label-high-var"
        text = layer_label(self.layer_at(row))
        if diverged:
            text = f"{DIVERGENCE_MARKER}{text}"
        return Segment(f"{text:>{LABEL_WIDTH - 1}} ", self.get_component_rich_style(component))

    def _row_segments(self, row: int) -> list[Segment]:
        metric = METRIC_BY_KEY[self.metric]
        palette = heat_styles(metric.palette)
        kinds = self.kinds[metric.key][row]
        texts = self.texts[metric.key][row]
        heat = self.heat[metric.key][row]
        base = self.rich_style
        absent = self.get_component_rich_style("stage-grid--absent")
        nonfinite = self.get_component_rich_style("stage-grid--nonfinite")
        one_sided = self.get_component_rich_style("stage-grid--one-sided")
        cursor = self.get_component_rich_style("stage-grid--cursor", partial=True)
        divergence = self.get_component_rich_style("stage-grid--divergence", partial=True)
        marker_style = self.get_component_rich_style("stage-grid--marker")
        anomaly_style = self.get_component_rich_style("stage-grid--anomaly-marker")
        marked = {c for (r, c) in self.divergences.values() if r == row}
        cursor_row, cursor_col = self.cursor
        segments: list[Segment] = []
        for col in range(self.n_cols):
            kind = int(kinds[col])
            if kind == VALUE:
                style = palette[int(heat[col])]
            elif kind == NONFINITE:
                style = nonfinite
            elif kind == ABSENT:
                style = absent
            elif kind == ONE_SIDED:
                style = one_sided
            else:
                style = base
            if col in marked:
                style = style + divergence
                segments.append(Segment(DIVERGENCE_MARKER, marker_style))
            elif (row, col) in self.anomalies:
                segments.append(Segment(ANOMALY_MARKER, anomaly_style))
            else:
                segments.append(Segment(" ", base))
            if row == cursor_row and col == cursor_col:
                style = style + cursor
            text = str(texts[col])
            if kind == EMPTY and row == cursor_row and col == cursor_col:
                text = "…" if self.applicable[row, col] else ""
            segments.append(Segment(f"{text:>{CELL_TEXT_WIDTH}}", style))
        return segments

    # -- cursor -----------------------------------------------------------------------------

    def validate_cursor(self, cursor: tuple[int, int]) -> tuple[int, int]:
        row, col = cursor
        return (min(max(row, 0), self.n_rows - 1), min(max(col, 0), self.n_cols - 1))

    def watch_cursor(self, old: tuple[int, int], new: tuple[int, int]) -> None:
        self._scroll_to_cursor()
        self._refresh_row(old[0])
        self._refresh_row(new[0])
        self._post_cursor()

    def _post_cursor(self) -> None:
        row, col = self.cursor
        if row < self.n_rows and col < self.n_cols:
            layer = self.layer_at(row)
            self.post_message(CursorMoved(layer, self.stages[col], self.cells.get((row, col))))

    @property
    def visible_cells_width(self) -> int:
        """Columns of the viewport left for cells: the layer labels stay put on the left, and
        the scrollbars are not part of it."""
        return max(CELL_WIDTH, self.scrollable_content_region.width - LABEL_WIDTH)

    @property
    def visible_rows(self) -> int:
        """Layer rows in view: the viewport less the header line (and any scrollbar)."""
        return max(1, self.scrollable_content_region.height - 1)

    def _fit_virtual_size(self) -> None:
        """Width of the scrollable area: the cells, padded so that the furthest horizontal
        scroll is a whole number of cells (every scroll position starts on a cell boundary)."""
        cells_width = self.n_cols * CELL_WIDTH
        view = self.scrollable_content_region.width - LABEL_WIDTH
        excess = cells_width - view
        if view > 0 and excess > 0:
            cells_width = view + -(-excess // CELL_WIDTH) * CELL_WIDTH
        size = Size(LABEL_WIDTH + cells_width, self.n_rows + 1)
        if size != self.virtual_size:
            self.virtual_size = size
            self.post_message(self.ShapeChanged())

    class ShapeChanged(Message):
        """The grid's rows or columns changed: the app re-fits the layout around it."""

    def wanted_height(self) -> int:
        """Lines that show every row: the header, the rows, and a horizontal scrollbar when the
        columns do not fit the width."""
        width = self.size.width or (self.app.size.width if self.is_attached else 0)
        cells = LABEL_WIDTH + self.n_cols * CELL_WIDTH
        scrollbar = 1 if width and cells > width - 1 else 0
        return self.n_rows + 1 + scrollbar

    def on_resize(self) -> None:
        self._fit_virtual_size()
        self._scroll_to_cursor()

    def _scroll_to_cursor(self) -> None:
        """Scroll (by whole cells) just enough to bring the cursor cell fully into view."""
        row, col = self.cursor
        scroll_x, scroll_y = (int(v) for v in self.scroll_offset)
        visible_rows = self.visible_rows
        visible_width = self.visible_cells_width
        if row < scroll_y:
            scroll_y = row
        elif row >= scroll_y + visible_rows:
            scroll_y = row - visible_rows + 1
        left = col * CELL_WIDTH
        if left < scroll_x:
            scroll_x = left
        elif left + CELL_WIDTH > scroll_x + visible_width:
            needed = left + CELL_WIDTH - visible_width
            scroll_x = -(-needed // CELL_WIDTH) * CELL_WIDTH
        if (scroll_x, scroll_y) != tuple(self.scroll_offset):
            self.scroll_to(scroll_x, scroll_y, animate=False, immediate=True)
            self.refresh()

    def move_to(self, layer: int, stage: str) -> bool:
        position = self.position(layer, stage)
        if position is None:
            return False
        self.cursor = position
        return True

    REFERENCE_ACTIONS = frozenset({"jump_divergence", "cycle_metric"})
    """Keys that need a reference to compare with: hidden in single-model mode, where there is
    one metric and nothing to diverge from (`n` stays: it walks the largest std of A)."""

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Show (and run) a key only where it works (Textual hides a binding for False)."""
        return self.has_reference or action not in self.REFERENCE_ACTIONS

    def action_cursor(self, rows: int, cols: int) -> None:
        row, col = self.cursor
        self.cursor = (row + rows, col + cols)

    def action_cursor_home(self) -> None:
        self.cursor = (0, 0)

    def action_cursor_end(self) -> None:
        self.cursor = (self.n_rows - 1, self.n_cols - 1)

    def action_select_cell(self) -> None:
        row, col = self.cursor
        if self.applicable[row, col]:
            self.post_message(CellSelected(self.layer_at(row), self.stages[col]))

    def action_cycle_metric(self) -> None:
        keys = [metric.key for metric in self.metrics]
        if len(keys) == 1:
            self.notify(
                "single-model mode: only std of A (no reference to compare with)",
                title="Metric",
            )
            return
        index = keys.index(self.metric) if self.metric in keys else -1
        self.metric = keys[(index + 1) % len(keys)]

    def action_jump_divergence(self) -> None:
        position = self.divergences.get("origin") or self.first_divergence
        if position is None:
            if not self.has_reference:
                message = "single-model mode: nothing to diverge from"
            else:
                message = f"no divergence so far (every cosine ≥ {self.threshold})"
            self.notify(message, title="First divergence")
            return
        self.cursor = position

    def worst_order(self) -> list[tuple[int, int]]:
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

    def action_walk_worst(self, step: int) -> None:
        ranking = self.worst_order()
        if not ranking:
            self.notify("no cells to rank yet", title="Worst cells")
            return
        walking = self._walk is not None and self._walk == self.cursor and self.cursor in ranking
        if walking:
            index = (ranking.index(self.cursor) + step) % len(ranking)
        else:  # a new walk starts at the worst (n) or the best (shift+n) cell
            index = 0 if step > 0 else len(ranking) - 1
        self._walk = ranking[index]
        self.cursor = ranking[index]
        self.notify(f"worst #{index + 1} of {len(ranking)}", title="Worst cells", timeout=1.5)

    def action_next_anomaly(self) -> None:
        """The next flagged cell after the cursor in computation order (wrapping around)."""
        flagged = sorted(self.anomalies)
        if not flagged:
            self.notify("no cell breaks an anomaly rule (so far)", title="Anomaly flags")
            return
        later = [position for position in flagged if position > self.cursor]
        target = later[0] if later else flagged[0]
        self.cursor = target
        self.notify(
            f"{flagged.index(target) + 1} of {len(flagged)}: {self.anomalies[target].summary()}",
            title="Anomaly flags",
            timeout=2.5,
            markup=False,
        )

    # -- mouse ------------------------------------------------------------------------------

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < 1 or offset.x < LABEL_WIDTH:
            return
        row = offset.y - 1 + self.scroll_offset.y
        col = (offset.x - LABEL_WIDTH + self.scroll_offset.x) // CELL_WIDTH
        if row >= self.n_rows or col >= self.n_cols:
            return
        if (row, col) == self.cursor or event.chain >= 2:
            self.cursor = (row, col)
            self.action_select_cell()
        else:
            self.cursor = (row, col)
