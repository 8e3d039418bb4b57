"""Browse a directory of APRT stage files; mark two and diff them as `apr diff --values` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, Tree
from textual.widgets.tree import TreeNode

from aprtui.anomalies import CellAnomalies, stats_anomalies
from aprtui.widgets.stats_panel import anomaly_summary, tensor_stats_table
from engine.aprt import TraceDir, read_aprt, read_trace_dir
from engine.errors import AprTuiError, DiffError
from engine.stages import WHOLE_MODEL_LAYER
from engine.stats import DiffStats, tensor_stats

PREVIEW_VALUES = 24
DIFF_LIMIT = 10


def layer_text(layer: int) -> str:
    return "whole-model" if layer == WHOLE_MODEL_LAYER else str(layer)


def diff_aprt_files(path_a: Path, path_b: Path, limit: int = DIFF_LIMIT) -> DiffStats:
    """`apr diff --values A B` on two APRT files: size check, then layer check, then statistics.

    Raises DiffError with apr's own messages (§2.2) when the files cannot be compared.
    """
    from engine.stats import diff_stats

    a = read_aprt(path_a)
    b = read_aprt(path_b)
    if a.dim_product != b.dim_product:
        raise DiffError(
            f"APRT dim_product mismatch: {path_a} has {a.dim_product} f32s, {path_b} has "
            f"{b.dim_product} f32s — cannot compare stage tensors of different sizes"
        )
    if a.layer != b.layer:
        raise DiffError(
            f"APRT layer mismatch: {path_a} is layer {a.layer}, {path_b} is layer {b.layer} — "
            "stages from different layers cannot be compared element-wise"
        )
    return diff_stats(a.values, b.values, limit=limit)


def diff_text(path_a: Path, path_b: Path, diff: DiffStats) -> Table:
    """The numbers of apr's text report, as a table."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("A", str(path_a))
    table.add_row("B", str(path_b))
    table.add_row("elements", str(diff.count))
    table.add_row("max|diff|", f"{diff.max_abs_diff:.6e} (at index {diff.max_abs_diff_index})")
    table.add_row("RMS diff", f"{diff.rms_diff:.6e}")
    table.add_row("cosine sim", f"{diff.cosine_sim:.10f}")
    table.add_row("top |a - b|", "")
    for entry in diff.top_diffs:
        table.add_row(
            f"  [{entry.index:>8}]",
            f"a={entry.a:>+13.6e}  b={entry.b:>+13.6e}  |Δ|={entry.abs_diff:.6e}",
        )
    return table


def preview_text(values: np.ndarray) -> Text:
    head = values[:PREVIEW_VALUES]
    body = "  ".join(f"{v:+.4e}" for v in head)
    more = f"  … (+{values.size - head.size})" if values.size > head.size else ""
    return Text.assemble(("first values\n", "bold"), body, (more, "dim"))


class FileBrowserScreen(Screen[None]):
    """A tree of `layer-N/` directories and stage files; details of the highlighted file."""

    BINDINGS = [
        Binding("space", "mark", "Mark for diff", priority=True),
        Binding("d", "diff", "Diff marked"),
        Binding("escape", "back", "Back"),
    ]

    HELP = """
## APRT browser

The stage files of a trace directory (`layer-N/<stage>.bin`, whole-model stages at the root).
Highlight a file to see its header, statistics and first values. `space` marks up to two files
(A, then B); `d` diffs them with `apr diff --values` semantics.
"""

    def __init__(self, directory: Path, *, standalone: bool = False) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.standalone = standalone
        self.marked: list[Path] = []
        self.trace: TraceDir | None = None
        self._tree_nodes: dict[Path, TreeNode] = {}

    def compose(self) -> ComposeResult:
        if self.standalone:
            yield Header()
        with Horizontal(id="browser-body"):
            yield Tree(self.directory.name or str(self.directory), id="aprt-tree")
            with VerticalScroll(id="aprt-detail"):
                yield Static(Text("highlight a file", style="dim"), id="aprt-header")
                yield Static("", id="aprt-stats")
                yield Static("", id="aprt-preview")
                yield Static(
                    Text("space: mark two files, d: diff them", style="dim"), id="aprt-diff"
                )
        yield Footer()

    def on_mount(self) -> None:
        tree = self.query_one(Tree)
        tree.root.expand()
        try:
            self.trace = read_trace_dir(self.directory, strict=False)  # lists corrupt files
        except AprTuiError as error:
            self.query_one("#aprt-header", Static).update(Text(str(error), style="bold red"))
            self.notify(str(error), title="APRT browser", severity="error", markup=False)
            return
        by_layer: dict[int, list[tuple[str, Path]]] = {}
        for (layer, stage), path in self.trace.entries.items():
            by_layer.setdefault(layer, []).append((stage, path))
        for layer, files in by_layer.items():
            if layer == WHOLE_MODEL_LAYER:
                continue
            branch = tree.root.add(f"layer-{layer}", expand=layer == min(by_layer))
            for stage, path in files:
                self._tree_nodes[path] = branch.add_leaf(stage, data=path)
        for stage, path in by_layer.get(WHOLE_MODEL_LAYER, []):
            self._tree_nodes[path] = tree.root.add_leaf(stage, data=path)
        if self.trace.unknown:
            other = tree.root.add(f"not stage files ({len(self.trace.unknown)})")
            for path, reason in self.trace.unknown:
                other.add_leaf(Text.assemble(path.name, (f"  {reason}", "dim")), data=None)
        tree.focus()

    @on(Tree.NodeHighlighted)
    def show_file(self, event: Tree.NodeHighlighted) -> None:
        path = event.node.data
        if isinstance(path, Path):
            self.show_path(path)

    def show_path(self, path: Path) -> None:
        header = self.query_one("#aprt-header", Static)
        try:
            tensor = read_aprt(path)
        except AprTuiError as error:
            header.update(Text(str(error), style="bold red"))
            self.query_one("#aprt-stats", Static).update("")
            self.query_one("#aprt-preview", Static).update("")
            return
        info = Table(box=None, show_header=False, pad_edge=False)
        info.add_column("", style="bold")
        info.add_column("")
        info.add_row("file", str(path.relative_to(self.directory)))
        info.add_row("layer", layer_text(tensor.layer))
        info.add_row("dim_product", str(tensor.dim_product))
        info.add_row("size", f"{path.stat().st_size} bytes")
        header.update(info)
        stats = tensor_stats(tensor.values)
        flags = CellAnomalies(a=stats_anomalies(path.stem, stats))
        table = tensor_stats_table(stats, None, show_b=False, flags=flags)
        if flags:  # apr's anomaly flags of this file, above its statistics
            both = Table.grid()
            both.add_row(anomaly_summary(flags))
            both.add_row(table)
            table = both
        self.query_one("#aprt-stats", Static).update(table)
        self.query_one("#aprt-preview", Static).update(preview_text(tensor.values))

    def node_for(self, path: Path) -> TreeNode | None:
        """The tree node of one stage file (None for a path the tree does not list)."""
        return self._tree_nodes.get(path)

    def _highlighted_path(self) -> Path | None:
        node = self.query_one(Tree).cursor_node
        return node.data if node is not None and isinstance(node.data, Path) else None

    def _relabel(self, path: Path) -> None:
        node = self._tree_nodes.get(path)
        if node is None:
            return
        label = Text(path.stem)
        if path in self.marked:
            label.append(f"  [{'AB'[self.marked.index(path)]}]", "bold reverse")
        node.set_label(label)

    def action_mark(self) -> None:
        path = self._highlighted_path()
        if path is None:
            return
        if path in self.marked:
            self.marked.remove(path)
        else:
            self.marked.append(path)
            if len(self.marked) > 2:
                self.marked.pop(0)
        for node_path in self._tree_nodes:
            self._relabel(node_path)
        names = ", ".join(
            f"{'AB'[i]}: {p.relative_to(self.directory)}" for i, p in enumerate(self.marked)
        )
        self.query_one("#aprt-diff", Static).update(
            Text(f"marked {names}" if names else "nothing marked", style="dim")
        )

    def action_diff(self) -> None:
        panel = self.query_one("#aprt-diff", Static)
        if len(self.marked) != 2:
            self.notify("mark two files with space first", title="Diff", severity="warning")
            return
        path_a, path_b = self.marked
        try:
            diff = diff_aprt_files(path_a, path_b)
        except AprTuiError as error:
            panel.update(Text(str(error), style="bold red"))
            self.notify(str(error), title="Diff", severity="error", markup=False)
            return
        panel.update(diff_text(self._shown(path_a), self._shown(path_b), diff))

    def _shown(self, path: Path) -> Path:
        """A path inside the browsed directory, relative to it (short and stable)."""
        try:
            return path.relative_to(self.directory)
        except ValueError:
            return path

    def action_back(self) -> None:
        if self.standalone:
            return
        self.app.pop_screen()
