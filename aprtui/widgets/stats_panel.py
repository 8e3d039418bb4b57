"""Statistics of one cell: both sides' `apr trace` statistics and the `apr diff --values` numbers."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from aprtui.anomalies import (
    ANOMALY_MARKER,
    MARKER_STYLE,
    SEVERE_STYLE,
    WARNING_STYLE,
    CellAnomalies,
    cell_anomalies,
    flagged_fields,
)
from aprtui.widgets.metrics import cell_title
from engine.compare import Cell
from engine.stats import DiffStats, TensorStats

_TENSOR_ROWS: tuple[tuple[str, str], ...] = (
    ("count", "count"),
    ("std", "std"),
    ("mean", "mean"),
    ("min", "min"),
    ("max", "max"),
    ("L2 norm", "l2_norm"),
    ("NaN", "nan_count"),
    ("Inf", "inf_count"),
    ("zeros", "zero_count"),
)


def format_stat(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


def tensor_stats_table(
    stats_a: TensorStats | None,
    stats_b: TensorStats | None,
    *,
    show_b: bool = True,
    flags: CellAnomalies | None = None,
    compact: bool = False,
    heading: str = "A",
) -> Table:
    """Side-by-side statistics; a side without the stage shows `absent`. The values that break
    an anomaly rule (`flags`) are highlighted: red for NaN/Inf, black on yellow otherwise.
    `compact`: one space between columns (the panel under the grid, on narrow terminals).
    `heading`: side A's column heading (a file of its own, in the browser: `value`)."""
    table = Table(box=None, pad_edge=False, show_edge=False, expand=False, collapse_padding=compact)
    table.add_column("", style="bold")
    table.add_column(heading, justify="right")
    sides = (stats_a, stats_b) if show_b else (stats_a,)
    if show_b:
        table.add_column("B", justify="right")
    flags = flags or CellAnomalies()
    highlighted = [
        flagged_fields(stats_a, flags.a),
        flagged_fields(stats_b, flags.b),
    ]
    for label, field in _TENSOR_ROWS:
        row: list[str | Text] = [label]
        for side, stats in enumerate(sides):
            if stats is None:
                row.append("absent")
                continue
            value = Text(format_stat(getattr(stats, field)))
            if field in highlighted[side]:
                severe = field in ("nan_count", "inf_count")
                value.stylize(SEVERE_STYLE if severe else MARKER_STYLE)
            row.append(value)
        table.add_row(*row)
    return table


def anomaly_summary(flags: CellAnomalies) -> Text:
    """`! A: large values, large mean bias · B: large values` (empty when nothing is flagged)."""
    if not flags:
        return Text("")
    severe = any(flag.severe for _, side_flags in flags.sides() for flag in side_flags)
    return Text.assemble(
        (ANOMALY_MARKER, MARKER_STYLE),
        " ",
        (flags.summary(), SEVERE_STYLE if severe else WARNING_STYLE),
    )


def std_ratio_of(stats_a: TensorStats | None, stats_b: TensorStats | None) -> float | None:
    if stats_a is None or stats_b is None or stats_b.std == 0:
        return None
    return stats_a.std / stats_b.std


def diff_stats_table(
    diff: DiffStats | None,
    threshold: float,
    std_ratio: float | None = None,
    *,
    compact: bool = False,
) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, expand=False, collapse_padding=compact)
    table.add_column("", style="bold")
    table.add_column("A vs B", justify="right")
    if diff is None:
        table.add_row("diff", "n/a")
        return table
    cosine = Text(f"{diff.cosine_sim:.10f}")
    if not diff.cosine_sim >= threshold:
        cosine.stylize("bold red")
    table.add_row("cosine", cosine)
    table.add_row("max|Δ|", f"{diff.max_abs_diff:.4e}")
    table.add_row("  at", str(diff.max_abs_diff_index))
    table.add_row("RMS Δ", f"{diff.rms_diff:.4e}")
    table.add_row("elements", str(diff.count))
    if std_ratio is not None:
        ratio = Text(f"{std_ratio:.6g}")
        if not 0.5 <= std_ratio <= 2.0:
            ratio.stylize("bold red")
        table.add_row("std A/B", ratio)
    return table


def local_error_table(cell: Cell, floor, *, compact: bool = False) -> Table:
    """The error this stage adds on its own (engine.local_error) against its noise floor, and
    what the recomputation read: shown beside the propagated A-vs-B numbers. `compact`: short
    labels and numbers (~20 columns, for a drill-down under 110 columns), without how the
    floor was set (the help screen says it)."""
    table = Table(box=None, pad_edge=False, show_edge=False, expand=False, collapse_padding=compact)
    table.add_column("", style="bold")
    table.add_column("local" if compact else "local (checked side)", justify="left", max_width=44)
    local = cell.local
    if local is None:
        table.add_row("local", "not computed" if compact else "not computed in this run")
        return table
    if local.error is None:
        table.add_row("local", Text(local.missing or "n/a", style="dim"))
        return table
    table.add_row("error", f"{local.error:.3e}" if compact else f"{local.error:.4e}")
    if floor is not None:
        ratio = local.error / floor.value
        shown = Text(f"{ratio:.3g}×" if compact else f"{ratio:.4g}× floor")
        if ratio > 1:
            shown.stylize("bold red")
        table.add_row("÷ floor" if compact else "vs floor", shown)
        calibrated = floor.median is not None and floor.layers > 0
        how = f"4× median of {floor.layers} layers" if calibrated else floor.source
        table.add_row("floor", f"{floor.value:.2e}" if compact else f"{floor.value:.3e} ({how})")
    table.add_row("inputs", "\n".join(local.inputs))
    return table


def compact_cell_text(cell: Cell, has_reference: bool, threshold: float) -> Text:
    """The cell in four short lines for small terminals (80×24): the diff numbers first, then
    each side's statistics, every number in the grid's format (aprtui.numbers)."""
    from aprtui.numbers import cosine_text, short_number

    shape = "×".join(str(d) for d in cell.shape) if cell.shape else "?"
    text = Text.assemble((cell_title(cell.layer, cell.stage), "bold"), f"  [{shape}]")
    flags = cell_anomalies(cell)
    if flags:
        text.append("  ")
        text.append_text(anomaly_summary(flags))
    if has_reference and cell.diff is not None:
        cosine = Text(cosine_text(cell.diff.cosine_sim))
        if not cell.diff.cosine_sim >= threshold:
            cosine.stylize("bold red")
        text.append("\n")
        text.append_text(
            Text.assemble(
                ("cosine ", "bold"),
                cosine,
                ("  max|Δ| ", "bold"),
                short_number(cell.diff.max_abs_diff),
                ("  RMS Δ ", "bold"),
                short_number(cell.diff.rms_diff),
            )
        )
        ratio = std_ratio_of(cell.stats_a, cell.stats_b)
        if ratio is not None:
            shown = Text(short_number(ratio))
            if not 0.5 <= ratio <= 2.0:
                shown.stylize("bold red")
            text.append_text(Text.assemble(("  std A/B ", "bold"), shown))
    sides = (("A", cell.stats_a), ("B", cell.stats_b)) if has_reference else (("A", cell.stats_a),)
    for label, stats in sides:
        text.append(f"\n{label} ", "bold")
        if stats is None:
            text.append("absent", "dim")
            continue
        text.append(
            f"std {short_number(stats.std)}  mean {short_number(stats.mean)}  "
            f"min {short_number(stats.min)}  max {short_number(stats.max)}"
        )
        if stats.nan_count or stats.inf_count:
            text.append(f"  NaN {stats.nan_count} Inf {stats.inf_count}", "bold red")
    return text


class StatsPanel(Static):
    """The cell under the grid cursor: shape, both sides' statistics and the diff."""

    HELP = """
## Cell statistics

The cell under the cursor: `apr trace` statistics of side A and side B (sample std, NaN/Inf/zero
counts over all elements) and the `apr diff --values` numbers (cosine, max|A-B| and where,
RMS of the difference). A line under the title names apr's anomaly flags the cell breaks, and
the values that break them are highlighted. Press `Enter` on the grid for the full drill-down.
"""

    def __init__(
        self, *, threshold: float = 0.999, has_reference: bool = True, id: str | None = None
    ) -> None:
        super().__init__(id=id)
        self.threshold = threshold
        self.has_reference = has_reference
        self.layout_size = "normal"
        """`compact` (80×24: four short lines), `normal`, or `roomy` (the local error too)."""
        self.floor_of = None
        """stage -> its noise floor (set by the app), for the local error in the roomy layout."""
        self._shown: tuple[int, str, Cell | None, str] | None = None

    def set_layout_size(self, size: str) -> None:
        """Re-render the cell on show for the terminal's size class."""
        if size != self.layout_size:
            self.layout_size = size
            if self._shown is not None:
                self.show_cell(*self._shown)

    def show_cell(
        self, layer: int, stage: str, cell: Cell | None, missing: str = "not computed yet"
    ) -> None:
        """The cell's statistics; without a cell, `missing` says why (GridModel.missing_reason)."""
        self._shown = (layer, stage, cell, missing)
        title = Text(cell_title(layer, stage), style="bold")
        if cell is None:
            self.update(Text.assemble(title, "\n", Text(missing, style="dim")))
            return
        if self.layout_size == "compact":
            self.update(compact_cell_text(cell, self.has_reference, self.threshold))
            return
        shape = "×".join(str(d) for d in cell.shape) if cell.shape else "?"
        heading = Text.assemble(title, f"  [{shape}]")
        flags = cell_anomalies(cell)
        grid = Table.grid(padding=(0, 2))
        if not self.has_reference:
            grid.add_row(
                tensor_stats_table(cell.stats_a, None, show_b=False, flags=flags, compact=True)
            )
        else:
            grid.add_row(
                tensor_stats_table(cell.stats_a, cell.stats_b, flags=flags, compact=True),
                diff_stats_table(
                    cell.diff,
                    self.threshold,
                    std_ratio_of(cell.stats_a, cell.stats_b),
                    compact=True,
                ),
            )
        container = Table.grid()
        container.add_row(heading)
        if flags:
            container.add_row(anomaly_summary(flags))
        container.add_row(grid)
        if self.layout_size == "roomy" and self.has_reference and cell.local is not None:
            floor = None if self.floor_of is None else self.floor_of(stage)
            container.add_row(Text(""))
            container.add_row(local_error_table(cell, floor))
        self.update(container)
