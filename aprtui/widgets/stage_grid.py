"""The layer × stage heat grid, drawn with Textual's Line API from a `GridModel`.

The data (rows, columns, the stored cells, the per-metric value / text / score / kind arrays,
the absent mask, the floors, the divergence marks and the orders the keys walk) lives in
`aprtui.widgets.grid_model.GridModel`, a plain object without Textual; this widget draws it,
moves the cursor, scrolls and answers the keys. A new cell writes one element of each array of
the model and repaints one line (`refresh_lines`); nothing is rebuilt. Measured in
shared/reference/textual-and-numerics-notes.md §C.5: a DataTable repaints every cell on each
update (85–170 ms at 30 × 20), this grid repaints a line in well under 1 ms.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive, var
from textual.scroll_view import ScrollView
from textual.strip import Strip

from aprtui.anomalies import ANOMALY_MARKER, CellAnomalies
from aprtui.messages import CellSelected, CursorMoved, MetricChanged
from aprtui.widgets.grid_model import (
    ABSENT,
    EMPTY,
    NONFINITE,
    ONE_SIDED,
    VALUE,
    GridModel,
    Position,
)
from aprtui.widgets.metrics import (
    CELL_TEXT_WIDTH,
    METRIC_BY_KEY,
    STAGE_SHORT_NAMES,
    Metric,
    layer_label,
)
from aprtui.widgets.palette import heat_styles, score_index
from engine.compare import Cell

LABEL_WIDTH = 6
"""The layer label column on the left (`▶L12 ` fits), which stays put when scrolling."""
CELL_WIDTH = CELL_TEXT_WIDTH + 1
"""One gap column (where the divergence marker goes) plus the cell text."""

DIVERGENCE_MARKER = "▶"
"""Drawn in the gap before a marked cell and before its row's label."""


class _Styles(NamedTuple):
    """The Rich styles a repaint needs, looked up once (`StageGrid._rich_styles`) and dropped when
    the CSS applies new styles (`notify_style_update`: focus, theme), not once per line."""

    base: Style
    header: Style
    label: Style
    label_diverged: Style
    label_high_var: Style
    absent: Style
    nonfinite: Style
    one_sided: Style
    cursor: Style
    """Partial: added to the cell's own style."""
    divergence: Style
    """Partial: added to the cell's own style."""
    marker: Style
    anomaly_marker: Style


MORE_COLUMNS = "›"
"""Drawn where a column did not fit whole at the grid's right edge: more columns that way."""


def whole_columns(line: Strip, scroll_x: int, width: int, style) -> Strip:
    """The cells of `line` (CELL_WIDTH columns each) seen through a `width`-cell window scrolled
    to `scroll_x`, showing only columns that fit whole: a column cut at an edge would show
    part of a number (`0.4` of 0.4615, `1.` of 1.0000) that reads as another value. The room
    of a cut column is left blank, with MORE_COLUMNS at the right edge when more follow."""
    first = -(-scroll_x // CELL_WIDTH) * CELL_WIDTH  # the first column starting in view
    last = max(first, (scroll_x + width) // CELL_WIDTH * CELL_WIDTH)  # end of the last whole one
    shown = line.crop(first, last)
    parts = [Strip.blank(first - scroll_x, style), shown]
    room = width - (first - scroll_x) - shown.cell_length
    if room > 0:
        more = line.cell_length > last
        parts.append(Strip([Segment(" " * (room - 1) + (MORE_COLUMNS if more else " "), style)]))
    return Strip.join(parts).crop(0, width)  # a window narrower than one column: blank


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

- `·` the stage is absent (neither side produces it); blank: not computed yet, or no such cell
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
        self.model = GridModel(threshold=threshold, has_reference=has_reference)
        """Everything the grid shows; the widget only draws it and moves over it."""
        self._walk: Position | None = None
        """The cell the last n / shift+n landed on (a walk continues from there)."""
        self._rich_styles_cache: _Styles | None = None
        self._fit_virtual_size()
        if not has_reference:
            self.set_reactive(StageGrid.metric, "std_a")

    # -- the model's data, as the app and the tests read it ---------------------------------

    @property
    def threshold(self) -> float:
        return self.model.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.model.threshold = value

    @property
    def has_reference(self) -> bool:
        return self.model.has_reference

    @has_reference.setter
    def has_reference(self, value: bool) -> None:
        self.model.has_reference = value

    @property
    def row_layers(self) -> list[int]:
        return self.model.row_layers

    @property
    def stages(self) -> list[str]:
        return self.model.stages

    @property
    def cells(self) -> dict[Position, Cell]:
        return self.model.cells

    @property
    def divergences(self) -> dict[str, Position]:
        """Marked cells by kind (`origin`, `cosine`, `std`) -> (row, column)."""
        return self.model.divergences

    @property
    def floors(self) -> dict:
        """The noise floor of each stage (engine.noise.Floor), for the `local` metric."""
        return self.model.floors

    @property
    def anomalies(self) -> dict[Position, CellAnomalies]:
        return self.model.anomalies

    @property
    def values(self) -> dict[str, np.ndarray]:
        return self.model.values

    @property
    def texts(self) -> dict[str, np.ndarray]:
        return self.model.texts

    @property
    def kinds(self) -> dict[str, np.ndarray]:
        return self.model.kinds

    @property
    def applicable(self) -> np.ndarray:
        return self.model.applicable

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The metrics this grid can show (only `std of A` without a reference)."""
        return self.model.metrics

    @property
    def n_rows(self) -> int:
        return self.model.n_rows

    @property
    def n_cols(self) -> int:
        return self.model.n_cols

    @property
    def first_divergence(self) -> Position | None:
        """The earliest marked cell in computation order."""
        return self.model.first_divergence

    @property
    def done_count(self) -> int:
        return self.model.done_count

    @property
    def expected_count(self) -> int:
        """Cells this grid can still receive or has received (absent ones excluded)."""
        return self.model.expected_count

    def position(self, layer: int, stage: str) -> Position | None:
        return self.model.position(layer, stage)

    def layer_at(self, row: int) -> int:
        return self.model.layer_at(row)

    def cell_at(self, row: int, col: int) -> Cell | None:
        return self.model.cell_at(row, col)

    def worst_order(self) -> list[Position]:
        """Cells from worst to best (GridModel.worst_order)."""
        return self.model.worst_order()

    def high_var_rows(self) -> set[int]:
        """Rows whose layer has apr's `[HIGH-VAR]` status."""
        return self.model.high_var_rows()

    @property
    def cursor_cell(self) -> Cell | None:
        return self.model.cells.get(self.cursor)

    # -- changes: the model changes, the widget repaints what changed ------------------------

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
        The arguments are GridModel.configure's."""
        self.model.configure(layers, has_reference, produced, whole_model=whole_model, cells=cells)
        self.refresh_bindings()  # f and m exist only with a reference (check_action)
        self.post_message(self.ShapeChanged())  # new rows: the app re-fits (even at one size)
        if not has_reference and METRIC_BY_KEY[self.metric].needs_reference:
            self.set_reactive(StageGrid.metric, "std_a")
        self._fit_virtual_size()
        self.cursor = (0, 0)
        self._post_cursor()
        self.refresh()

    def set_cell(self, cell: Cell) -> None:
        """Store one result and repaint its line only (all lines when it adds a column)."""
        n_cols = self.model.n_cols
        position = self.model.set_cell(cell)
        if self.model.n_cols != n_cols:  # a MoE column: the grid was laid out anew
            self._fit_virtual_size()
            self.refresh()
        if position is None:
            return
        self._refresh_row(position[0])
        if position == self.cursor:
            self._post_cursor()

    def set_floors(self, floors: dict) -> None:
        """New noise floors (recalibrated as layers arrive): re-score every stored cell."""
        if not self.model.set_floors(floors):
            return
        self.refresh()
        self._post_cursor()  # the panel under the grid shows the cursor cell's floor too

    def mark_divergence(self, kind: str, cell: Cell | None) -> None:
        """Mark `cell` as the first divergence of `kind` (`cosine` or `std`); None unmarks."""
        for row in self.model.mark_divergence(kind, cell):
            self._refresh_row(row)

    def mark_missing_absent(self) -> None:
        """After a complete run: every applicable cell that never arrived is absent."""
        self.model.mark_missing_absent()
        self.refresh()

    # -- drawing ----------------------------------------------------------------------------

    def watch_metric(self, metric: str) -> None:
        self.refresh()
        self.post_message(MetricChanged(metric))

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._rich_styles_cache = None

    @property
    def _rich_styles(self) -> _Styles:
        """The styles of every part of the grid, looked up once per style change."""
        if self._rich_styles_cache is None:
            style = self.get_component_rich_style
            self._rich_styles_cache = _Styles(
                base=self.rich_style,
                header=style("stage-grid--header"),
                label=style("stage-grid--label"),
                label_diverged=style("stage-grid--label-diverged"),
                label_high_var=style("stage-grid--label-high-var"),
                absent=style("stage-grid--absent"),
                nonfinite=style("stage-grid--nonfinite"),
                one_sided=style("stage-grid--one-sided"),
                cursor=style("stage-grid--cursor", partial=True),
                divergence=style("stage-grid--divergence", partial=True),
                marker=style("stage-grid--marker"),
                anomaly_marker=style("stage-grid--anomaly-marker"),
            )
        return self._rich_styles_cache

    def _refresh_row(self, row: int) -> None:
        line = row + 1 - self.scroll_offset.y
        if 1 <= line < self.size.height:
            self.refresh_lines(line)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        scroll_x, scroll_y = self.scroll_offset
        # Only the columns not under a vertical scroll bar count as room for the cells.
        cells_width = max(0, self.scrollable_content_region.width - LABEL_WIDTH)
        styles = self._rich_styles
        if y == 0:
            style = styles.header
            header = "".join(
                f"{STAGE_SHORT_NAMES.get(s, s[:CELL_TEXT_WIDTH]):>{CELL_WIDTH}}"
                for s in self.model.stages
            )
            label = Strip([Segment(f"{'layer':<{LABEL_WIDTH}}", style)])
            cells = whole_columns(Strip([Segment(header, style)]), scroll_x, cells_width, style)
            return Strip.join([label, cells]).extend_cell_length(width, style)
        row = y - 1 + scroll_y
        if row >= self.model.n_rows:
            return Strip.blank(width, styles.base)
        label = Strip([self._label_segment(row)])
        cells = whole_columns(Strip(self._row_segments(row)), scroll_x, cells_width, styles.base)
        return Strip.join([label, cells]).extend_cell_length(width, styles.base).simplify()

    def _label_segment(self, row: int) -> Segment:
        styles = self._rich_styles
        diverged = self.model.diverged_row(row)
        style = styles.label_diverged if diverged else styles.label
        if not diverged and row in self.model.high_var_rows():
            style = styles.label_high_var
        text = layer_label(self.model.layer_at(row))
        if diverged:
            text = f"{DIVERGENCE_MARKER}{text}"
        return Segment(f"{text:>{LABEL_WIDTH - 1}} ", style)

    def _row_segments(self, row: int) -> list[Segment]:
        model = self.model
        metric = METRIC_BY_KEY[self.metric]
        palette = heat_styles(metric.palette)
        kinds = model.kinds[metric.key][row]
        texts = model.texts[metric.key][row]
        scores = model.scores[metric.key][row]
        styles = self._rich_styles
        base = styles.base
        marked = model.marked_columns(row)
        cursor_row, cursor_col = self.cursor
        segments: list[Segment] = []
        for col in range(model.n_cols):
            kind = int(kinds[col])
            if kind == VALUE:
                style = palette[score_index(float(scores[col]))]
            elif kind == NONFINITE:
                style = styles.nonfinite
            elif kind == ABSENT:
                style = styles.absent
            elif kind == ONE_SIDED:
                style = styles.one_sided
            else:
                style = base
            if col in marked:
                style = style + styles.divergence
                segments.append(Segment(DIVERGENCE_MARKER, styles.marker))
            elif (row, col) in model.anomalies:
                segments.append(Segment(ANOMALY_MARKER, styles.anomaly_marker))
            else:
                segments.append(Segment(" ", base))
            if row == cursor_row and col == cursor_col:
                style = style + styles.cursor
            text = str(texts[col])
            if kind == EMPTY and row == cursor_row and col == cursor_col:
                text = "…" if model.applicable[row, col] else ""
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
            self.post_message(CursorMoved(layer, self.stages[col], self.cell_at(row, col)))

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
        """Open the cell under the cursor (the app says why when there is none to open)."""
        row, col = self.cursor
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
        position = self.model.jump_target
        if position is None:
            if not self.has_reference:
                message = "single-model mode: nothing to diverge from"
            else:
                so_far = "" if self.model.complete else " so far"
                message = f"no divergence{so_far} (every cosine ≥ {self.threshold})"
            self.notify(message, title="First divergence")
            return
        self.cursor = position

    def action_walk_worst(self, step: int) -> None:
        walking = self._walk is not None and self._walk == self.cursor
        index, ranking = self.model.walk_worst(self.cursor if walking else None, step)
        if not ranking:
            self.notify("no cells to rank yet", title="Worst cells")
            return
        self._walk = ranking[index]
        self.cursor = ranking[index]
        self.notify(f"worst #{index + 1} of {len(ranking)}", title="Worst cells", timeout=1.5)

    def action_next_anomaly(self) -> None:
        """The next flagged cell after the cursor in computation order (wrapping around)."""
        target = self.model.next_anomaly(self.cursor)
        if target is None:
            so_far = "" if self.model.complete else " (so far)"
            self.notify(f"no cell breaks an anomaly rule{so_far}", title="Anomaly flags")
            return
        flagged = self.model.anomaly_order()
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
