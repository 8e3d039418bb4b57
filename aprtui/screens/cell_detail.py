"""Drill-down into one grid cell: statistics, top divergences, per-token strip, |Δ| histogram.

The cell's statistics are already known; the full tensors are fetched in a thread worker (for a
model side that may mean re-running the forward pass up to that layer), and the views that need
them fill in when they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from aprtui.anomalies import (
    ANOMALY_MARKER,
    MARKER_STYLE,
    SEVERE_STYLE,
    WARNING_STYLE,
    cell_anomalies,
)
from aprtui.coordinates import decode_index, display_token
from aprtui.messages import TensorsLoaded
from aprtui.widgets.footer import fit_footer
from aprtui.widgets.histogram import DeltaHistogram, histogram_lines
from aprtui.widgets.metrics import cell_title
from aprtui.widgets.stats_panel import (
    diff_stats_table,
    local_error_table,
    std_ratio_of,
    tensor_stats_table,
)
from aprtui.widgets.token_strip import TokenStrip, per_token_cosine, per_token_rows
from engine.compare import Cell
from engine.heads import HeadLayout
from engine.stages import WHOLE_MODEL_LAYER
from engine.stats import TopDiff

TOP_K = 20
SAVE_DIR_NAME = "apr-tui-saved"

SIDE_HISTOGRAM_WIDTH = 150
"""Columns from which the |Δ| histogram stands beside the statistics (they take ~105 columns,
its bars ~45); below, it is a few lines under them (`histogram_lines`), never a squeezed
column whose lines wrap."""

COMPACT_DETAIL_WIDTH = 110
"""Columns below which the drill-down is compact: short local-error labels, and a top-K table
without the flat index (the `where` column says it in words) whose numbers have five
significant digits, so that every column, the last one included, fits 80 columns whole."""

TOPK_FIXED_COLUMNS = 46
"""Cells the compact top-K table's columns other than `where` take (rank, A, B, |A-B|, their
padding and the scroll bar): `where` is cut, with an ellipsis, to what is left."""


@dataclass
class CellContext:
    """Everything the drill-down needs besides the cell itself."""

    cell: Cell
    load_tensors: Callable[[], tuple[np.ndarray | None, np.ndarray | None]]
    """Runs in a worker thread: the full host arrays of side A and side B (None if absent)."""
    has_reference: bool = True
    threshold: float = 0.999
    token_ids: tuple[int, ...] = ()
    token_text: Callable[[int], str] | None = None
    """Vocabulary text of an id (the model's tokenizer), when there is one."""
    heads: HeadLayout | None = None
    """The model's attention head layout (decodes Q/K/V, head and dim); None between two trace
    directories, which carry no model config."""
    save_dir: Path | None = None
    """Where `s` writes APRT files; default `./apr-tui-saved/`."""
    floor: Any = None
    """The noise floor of the cell's stage in this pair (engine.noise.Floor), when calibrated."""


@dataclass(frozen=True)
class DetailData:
    """What the drill-down shows from the full tensors, computed in its worker."""

    a: Any
    """Side A, flat float32, in the comparison's conventions (engine.compare.comparable); or a
    long prompt's lazy attention capture, never materialised (saved a block at a time)."""
    b: Any
    histogram: list[tuple[str, int]]
    """|A-B| (or |A| without a reference) per decade (engine.drill)."""
    histogram_title: str
    per_token: np.ndarray | None
    """Cosine per token (or RMS of A per token without a reference)."""
    cosine: bool
    top: tuple[TopDiff, ...]


def unused_path(directory: Path, stem: str) -> Path:
    """`directory/stem.bin`, or `stem-1.bin`, `stem-2.bin`, … : never an existing file."""
    candidate = directory / f"{stem}.bin"
    counter = 1
    while candidate.exists():
        candidate = directory / f"{stem}-{counter}.bin"
        counter += 1
    return candidate


def save_cell_tensors(
    directory: Path, cell: Cell, tensors: dict[str, np.ndarray | None]
) -> list[Path]:
    """Write each side's tensor as an APRT file (apr's byte format) under `directory`."""
    from engine.aprt import write_aprt

    directory.mkdir(parents=True, exist_ok=True)
    where = "model" if cell.layer == WHOLE_MODEL_LAYER else f"layer-{cell.layer}"
    written = []
    for side, values in tensors.items():
        if values is None:
            continue
        path = unused_path(directory, f"{where}-{cell.stage}-{side}")
        lazy = hasattr(values, "blocks")  # a long prompt's attention: written block by block
        write_aprt(path, cell.layer, values if lazy else np.asarray(values, np.float32).ravel())
        written.append(path)
    return written


class CellDetailScreen(Screen[None]):
    """Everything about one (layer, stage)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("s", "save", "Save tensors (APRT)"),
    ]

    HELP = """
## Cell drill-down

Statistics of both sides and their diff, with apr's anomaly flags in words; the largest
element-wise differences with decoded coordinates (token and channel; Q/K/V, head and dim for the
attention projections when the model is known; head, query and key for attention scores;
vocabulary id for the logits); cosine per token; a histogram of |A-B|. `s` saves both tensors
as APRT files under `./apr-tui-saved/` (never overwriting a file), `esc` goes back to the grid.
"""

    def __init__(self, context: CellContext) -> None:
        super().__init__()
        self.context = context
        self.tensors: tuple[np.ndarray | None, np.ndarray | None] | None = None
        self.compact: bool | None = None
        """Whether the layout is compact (COMPACT_DETAIL_WIDTH); None before the first fit."""
        self._top: tuple[TopDiff, ...] = ()
        """The rows of the top-K table, kept to refill it when the layout changes."""
        self._histogram: tuple[list[tuple[str, int]], str] | None = None

    @property
    def cell(self) -> Cell:
        return self.context.cell

    def compose(self) -> ComposeResult:
        yield Static(self._title(), id="detail-title")
        flags = self._flags_text()
        yield Static(flags, id="detail-flags", classes="visible" if flags.plain else "")
        with Horizontal(id="detail-top"):
            yield Static(self._stats_renderable(), id="detail-stats")
            yield DeltaHistogram(
                Text("|Δ| histogram: loading tensors…", style="dim"), id="detail-histogram"
            )
        yield Static(
            Text("|Δ| histogram: loading tensors…", style="dim"), id="detail-histogram-lines"
        )
        yield TokenStrip(Text("per-token: loading tensors…", style="dim"), id="detail-strip")
        yield Static(self._topk_title(), id="detail-topk-title")
        yield DataTable(id="detail-topk", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def _title(self) -> Text:
        shape = "×".join(str(d) for d in self.cell.shape) or "?"
        return Text.assemble((cell_title(self.cell.layer, self.cell.stage), "bold"), f"  [{shape}]")

    def _flags_text(self) -> Text:
        """apr's anomaly flags of each side, in words, one per line (empty when none)."""
        text = Text()
        for side, flags in cell_anomalies(self.cell).sides():
            for flag in flags:
                if text.plain:
                    text.append("\n")
                text.append_text(
                    Text.assemble(
                        (ANOMALY_MARKER, MARKER_STYLE),
                        f" {side}: ",
                        (flag.name, SEVERE_STYLE if flag.severe else WARNING_STYLE),
                        f" — {flag.detail}",
                    )
                )
        return text

    def _topk_title(self) -> Text:
        if not self.context.has_reference:
            return Text("largest |A| elements", style="bold")
        return Text("top divergences (by |A-B|)", style="bold")

    def _stats_renderable(self) -> Table:
        compact = bool(self.compact)
        grid = Table.grid(padding=(0, 2 if compact else 3))
        flags = cell_anomalies(self.cell)
        if self.context.has_reference:
            grid.add_row(
                tensor_stats_table(self.cell.stats_a, self.cell.stats_b, flags=flags),
                diff_stats_table(
                    self.cell.diff,
                    self.context.threshold,
                    std_ratio_of(self.cell.stats_a, self.cell.stats_b),
                ),
                local_error_table(self.cell, self.context.floor, compact=compact),
            )
        else:
            grid.add_row(tensor_stats_table(self.cell.stats_a, None, show_b=False, flags=flags))
        return grid

    def on_mount(self) -> None:
        if self.cell.diff is not None:
            self._top = self.cell.diff.top_diffs
        self._fit(self.app.size.width)
        self.load_tensors()

    def on_resize(self, event) -> None:
        self._fit(event.size.width)

    def _fit(self, width: int) -> None:
        """Lay the screen out for `width` columns: the histogram beside the statistics or
        under them (SIDE_HISTOGRAM_WIDTH), compact or not (COMPACT_DETAIL_WIDTH)."""
        fit_footer(self.query_one(Footer), width)
        self.set_class(width < SIDE_HISTOGRAM_WIDTH, "-histogram-lines")
        self._show_histogram_lines(width)
        compact = width < COMPACT_DETAIL_WIDTH
        if compact == self.compact:
            if compact:  # `where` is cut to the width
                self._fill_topk(self._top)
            return
        self.compact = compact
        self.set_class(compact, "-compact")
        self.query_one("#detail-stats", Static).update(self._stats_renderable())
        table = self.query_one("#detail-topk", DataTable)
        table.clear(columns=True)
        if self.context.has_reference:
            columns = ("#", "where", "A", "B", "|A-B|")
        else:  # the largest |A|: no B, and |A| is A's magnitude
            columns = ("#", "where", "A")
        if not compact:
            columns = (columns[0], "index", *columns[1:])
        table.add_columns(*columns)
        self._fill_topk(self._top)

    def _show_histogram_lines(self, width: int) -> None:
        if self._histogram is not None:
            bins, title = self._histogram
            lines = self.query_one("#detail-histogram-lines", Static)
            lines.update(histogram_lines(bins, title, max(20, width - 2)))

    def _fill_topk(self, top: tuple[TopDiff, ...]) -> None:
        self._top = top
        table = self.query_one("#detail-topk", DataTable)
        table.clear()
        context = self.context
        digits = 4 if self.compact else 6
        where_width = max(12, self.app.size.width - TOPK_FIXED_COLUMNS)
        for rank, entry in enumerate(top, start=1):
            where = decode_index(
                entry.index,
                self.cell.stage,
                self.cell.shape,
                context.token_ids,
                context.token_text,
                context.heads,
            )
            if self.compact and len(where) > where_width:
                where = where[: where_width - 1] + "…"
            row = [str(rank), where, f"{entry.a:+.{digits}e}"]
            if context.has_reference:
                row += [f"{entry.b:+.{digits}e}", f"{entry.abs_diff:.{digits}e}"]
            if not self.compact:
                row.insert(1, str(entry.index))
            table.add_row(*row)

    @work(thread=True, exclusive=True, exit_on_error=False, group="tensors")
    def load_tensors(self) -> None:
        """Load both tensors and compute everything the screen shows from them, in this worker
        thread; the handler on the main thread only fills the widgets."""
        try:
            a, b = self.context.load_tensors()
            details = None if a is None else self._details(a, b)
        except Exception as error:  # shown in the screen; the app stays usable
            self.post_message(TensorsLoaded(None, None, error=str(error) or type(error).__name__))
            return
        self.post_message(TensorsLoaded(a, b, details=details))

    def _details(self, a: np.ndarray, b: np.ndarray | None) -> DetailData:
        """Histogram input, per-token values and top-K of one cell (worker thread)."""
        from engine.compare import comparable
        from engine.drill import decade_histogram, is_lazy, streamed_details
        from engine.stats import diff_stats

        context = self.context
        n_tokens = len(context.token_ids)
        if is_lazy(a) or (b is not None and is_lazy(b)):  # a long prompt's attention cell
            streamed = streamed_details(a, b, TOP_K)
            return DetailData(
                a,
                b,
                streamed.histogram,
                streamed.histogram_title,
                streamed.per_token,
                streamed.cosine,
                streamed.top,
            )
        a, b = comparable(self.cell.stage, a, b, n_tokens or None)
        a = np.asarray(a, dtype=np.float32).ravel()
        b = None if b is None else np.asarray(b, dtype=np.float32).ravel()
        shape = self.cell.shape or (a.size,)
        if a.size != int(np.prod(shape)):
            shape = (a.size,)
        rows_a = per_token_rows(a, shape, n_tokens)
        if b is not None and b.size == a.size:
            rows_b = per_token_rows(b, shape, n_tokens)
            per_token = None if rows_a is None else per_token_cosine(rows_a, rows_b)
            top = diff_stats(a, b, limit=TOP_K).top_diffs
            histogram = decade_histogram(np.abs(a - b))
            return DetailData(a, b, histogram, "|A-B| per decade", per_token, True, top)
        rms = None if rows_a is None else np.sqrt(np.mean(rows_a.astype(np.float64) ** 2, 1))
        histogram = decade_histogram(np.abs(a))
        return DetailData(a, b, histogram, "|A| per decade", rms, False, self._largest_a(a))

    def on_tensors_loaded(self, message: TensorsLoaded) -> None:
        histogram = self.query_one(DeltaHistogram)
        strip = self.query_one(TokenStrip)
        details = message.details
        if message.error is not None or message.a is None or details is None:
            reason = message.error or "side A does not produce this stage"
            histogram.update(Text(f"tensors unavailable: {reason}", style="red"))
            self.query_one("#detail-histogram-lines", Static).update(
                Text(f"tensors unavailable: {reason}", style="red")
            )
            strip.update("")
            return
        self.tensors = (details.a, details.b)
        histogram.show(details.histogram, details.histogram_title)
        self._histogram = (details.histogram, details.histogram_title)
        self._show_histogram_lines(self.app.size.width)
        strip.show(
            details.per_token,
            cosine=details.cosine,
            threshold=self.context.threshold,
            token_labels=self._token_labels(),
        )
        self._fill_topk(details.top)

    def _largest_a(self, a: np.ndarray) -> tuple[TopDiff, ...]:
        magnitude = np.abs(a)
        order = np.argsort(-magnitude, kind="stable")[:TOP_K]
        return tuple(
            TopDiff(index=int(i), a=float(a[i]), b=float("nan"), abs_diff=float(magnitude[i]))
            for i in order
        )

    def _token_labels(self) -> list[str]:
        context = self.context
        labels = []
        for position, token_id in enumerate(context.token_ids):
            text = str(position)
            if context.token_text is not None:
                try:
                    text = display_token(context.token_text(token_id)) or str(position)
                except Exception:
                    text = str(position)
            labels.append(text)
        return labels

    def action_save(self) -> None:
        if self.tensors is None:
            self.notify("the tensors are still loading", title="Save", severity="warning")
            return
        a, b = self.tensors
        directory = self.context.save_dir or (Path.cwd() / SAVE_DIR_NAME)
        try:
            written = save_cell_tensors(directory, self.cell, {"A": a, "B": b})
        except OSError as error:
            self.notify(
                f"{directory}: {error.strerror or error}",
                title="Save",
                severity="error",
                markup=False,
            )
            return
        self.notify(
            "\n".join(str(path) for path in written), title="Saved APRT files", markup=False
        )
