"""Browse one or two directories of APRT stage files; mark any two files of the same size and
diff them as `apr diff --values` does.

Two directories (`apr-tui files A B`, or `b` in the explorer when both sides are traces) sit
side by side in one tree under `A:` and `B:`, so a stage of one trace can be diffed with the
same stage of the other, or with any stage of the same size, also across layers (apr's own
`diff` refuses a layer mismatch; here the panel says that the layers differ and diffs anyway,
which is how a shifted layer is found). The two marks are always on screen; a third mark is
refused with a message rather than silently dropping the oldest.

Nothing here reads or reduces a tensor on the UI thread: the highlighted file's statistics and
every diff run in thread workers (one exclusive group each), so that holding an arrow key over
8M-value attention files never stalls the screen. Moving on cancels the worker of the file
left behind; its result, if it still arrives, is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, Tree
from textual.widgets.tree import TreeNode
from textual.worker import get_current_worker

from aprtui.anomalies import CellAnomalies, stats_anomalies
from aprtui.widgets.stats_panel import anomaly_summary, tensor_stats_table
from engine.aprt import check_aprt_pair, read_aprt
from engine.errors import AprTuiError
from engine.stages import WHOLE_MODEL_LAYER, layer_name
from engine.stats import DiffStats, TensorStats, tensor_stats
from engine.trace_directory import TraceDir, read_trace_dir

PREVIEW_VALUES = 24
"""Values shown under a file's statistics (the first ones, in file order)."""

DIFF_LIMIT = 10
"""Top divergences listed in a diff (apr's default --limit)."""

MARK_NAMES = "AB"


DIFF_LINES_IN_VIEW = 4
"""Lines of a new diff result that must show without scrolling; fewer, and `d` scrolls the
detail pane to put the result at its top."""


def layer_text(layer: int) -> str:
    """A file's layer in the panel: the index, or `whole-model` (engine.stages.layer_name)."""
    return str(layer_name(layer))


@dataclass(frozen=True)
class FileDiff:
    """The result of diffing two marked files."""

    stats: DiffStats
    layer_a: int
    layer_b: int

    @property
    def across_layers(self) -> bool:
        return self.layer_a != self.layer_b


def diff_aprt_files(path_a: Path, path_b: Path, limit: int = DIFF_LIMIT) -> FileDiff:
    """`apr diff --values A B` on two APRT files of the same size, from any layers.

    Raises DiffError with apr's message (§2.2, engine.aprt.check_aprt_pair) when the sizes
    differ; a layer mismatch, which apr refuses, is reported in the result instead
    (`across_layers`).
    """
    from engine.stats import diff_stats

    a = read_aprt(path_a)
    b = read_aprt(path_b)
    check_aprt_pair(path_a, a, path_b, b, same_layer=False)
    return FileDiff(diff_stats(a.values, b.values, limit=limit), a.layer, b.layer)


def diff_text(path_a: Path | str, path_b: Path | str, diff: FileDiff) -> Table:
    """The numbers of apr's text report, as a table."""
    stats = diff.stats
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    table.add_row("A", str(path_a))
    table.add_row("B", str(path_b))
    if diff.across_layers:
        table.add_row(
            "layers",
            Text(
                f"A is layer {layer_text(diff.layer_a)}, B is layer {layer_text(diff.layer_b)}: "
                "compared element-wise across layers (apr diff would refuse)",
                style="yellow",
            ),
        )
    table.add_row("elements", str(stats.count))
    table.add_row("max|diff|", f"{stats.max_abs_diff:.6e} (at index {stats.max_abs_diff_index})")
    table.add_row("RMS diff", f"{stats.rms_diff:.6e}")
    table.add_row("cosine sim", f"{stats.cosine_sim:.10f}")
    table.add_row("top |a - b|", "")
    for entry in stats.top_diffs:
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


@dataclass(frozen=True)
class FileSummary:
    """What the detail pane shows of one file; computed in a worker thread."""

    path: Path
    layer: int
    dim_product: int
    size: int
    stats: TensorStats
    preview: Text


def summarize_file(path: Path) -> FileSummary:
    """Read one APRT file and reduce it (the worker's job; raises AprTuiError)."""
    tensor = read_aprt(path)
    return FileSummary(
        path=path,
        layer=tensor.layer,
        dim_product=tensor.dim_product,
        size=path.stat().st_size,
        stats=tensor_stats(tensor.values),
        preview=preview_text(tensor.values),
    )


class FileBrowserScreen(Screen[None]):
    """A tree of one or two trace directories; details of the highlighted file; two marks."""

    BINDINGS = [
        Binding("space", "mark", "Mark A / B", priority=True),
        Binding("d", "diff", "Diff A with B"),
        Binding("c", "clear_marks", "Clear marks"),
        Binding("escape", "back", "Back"),
    ]

    HELP = """
## APRT browser

The stage files of one or two trace directories (`layer-N/<stage>.bin`, whole-model stages at
the root). Highlight a file to see its header, statistics and first values. `space` marks a
file as A, then B (again on a marked file unmarks it; a third is refused); `d` diffs A with B
with `apr diff --values` numbers, also across layers and across the two directories.
"""

    def __init__(self, directories: Path | Sequence[Path], *, standalone: bool = False) -> None:
        super().__init__()
        if isinstance(directories, (str, Path)):
            directories = [Path(directories)]
        self.directories = [Path(d) for d in directories][:2]
        self.directory = self.directories[0]
        """The first directory (the only one for `apr-tui files DIR`)."""
        self.standalone = standalone
        self.marked: list[Path] = []
        self.traces: dict[Path, TraceDir] = {}
        self.trace: TraceDir | None = None
        """The first directory's trace, once read."""
        self.showing: Path | None = None
        """The file the detail pane is for (a worker's late result for another is dropped)."""
        self._tree_nodes: dict[Path, TreeNode] = {}
        self._owner: dict[Path, Path] = {}
        """Stage file -> the directory it was listed under."""
        self._notes: list[str] = []
        """One line per incomplete trace directory, kept under the marks."""

    # -- layout -----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        if self.standalone:
            yield Header()
        with Horizontal(id="browser-body"):
            root_label = (
                self.directory.name or str(self.directory)
                if len(self.directories) == 1
                else f"{len(self.directories)} traces"
            )
            yield Tree(root_label, id="aprt-tree")
            with Vertical(id="aprt-side"):
                yield Static("", id="aprt-marks")
                with VerticalScroll(id="aprt-detail"):
                    yield Static(Text("highlight a file", style="dim"), id="aprt-header")
                    yield Static("", id="aprt-stats")
                    yield Static("", id="aprt-preview")
                    yield Static("", id="aprt-diff")
        yield Footer()

    def on_mount(self) -> None:
        tree = self.query_one(Tree)
        tree.root.expand()
        two = len(self.directories) > 1
        errors = []
        for index, directory in enumerate(self.directories):
            try:
                trace = read_trace_dir(directory, strict=False)  # lists corrupt files
            except AprTuiError as error:
                errors.append(str(error))
                continue
            self.traces[directory] = trace
            if index == 0:
                self.trace = trace
            if trace.incomplete_note:
                self._notes.append(trace.incomplete_note)
            if two:
                label = f"{MARK_NAMES[index]}: {directory.name or directory}/"
                branch = tree.root.add(label, expand=True)
            else:
                branch = tree.root
            self._add_trace(branch, directory, trace)
        if errors:
            self.query_one("#aprt-header", Static).update(Text("\n".join(errors), style="bold red"))
            for error in errors:
                self.notify(error, title="APRT browser", severity="error", markup=False)
        for note in self._notes:
            self.notify(note, title="Incomplete trace", severity="warning", markup=False)
        self._show_marks()
        tree.focus()

    def _add_trace(self, branch: TreeNode, directory: Path, trace: TraceDir) -> None:
        by_layer: dict[int, list[tuple[str, Path]]] = {}
        for (layer, stage), path in trace.entries.items():
            by_layer.setdefault(layer, []).append((stage, path))
        for layer, files in by_layer.items():
            if layer == WHOLE_MODEL_LAYER:
                continue
            layer_branch = branch.add(f"layer-{layer}", expand=layer == min(by_layer))
            for stage, path in files:
                self._tree_nodes[path] = layer_branch.add_leaf(stage, data=path)
                self._owner[path] = directory
        for stage, path in by_layer.get(WHOLE_MODEL_LAYER, []):
            self._tree_nodes[path] = branch.add_leaf(stage, data=path)
            self._owner[path] = directory
        if trace.unknown:
            other = branch.add(f"not stage files ({len(trace.unknown)})")
            for path, reason in trace.unknown:
                other.add_leaf(Text.assemble(path.name, (f"  {reason}", "dim")), data=None)

    # -- the highlighted file (a worker reads and reduces it) -------------------------------

    @on(Tree.NodeHighlighted)
    def show_file(self, event: Tree.NodeHighlighted) -> None:
        path = event.node.data
        if isinstance(path, Path):
            self.show_path(path)

    def show_path(self, path: Path) -> None:
        """Say which file is being read, and read it in a worker (the one before is
        cancelled: exclusive group)."""
        self.showing = path
        self.query_one("#aprt-header", Static).update(
            Text(f"reading {self.shown(path)} …", style="dim")
        )
        self.query_one("#aprt-stats", Static).update("")
        self.query_one("#aprt-preview", Static).update("")
        self.query_one("#aprt-detail", VerticalScroll).scroll_home(animate=False)  # its name first
        self._summarize(path)

    @work(thread=True, exclusive=True, group="aprt-show", exit_on_error=False)
    def _summarize(self, path: Path) -> None:
        worker = get_current_worker()
        try:
            result: FileSummary | str = summarize_file(path)
        except AprTuiError as error:
            result = str(error)
        except OSError as error:
            result = f"{path}: {error.strerror or error}"
        if not worker.is_cancelled:
            self.app.call_from_thread(self._show_summary, path, result)

    def _show_summary(self, path: Path, result: FileSummary | str) -> None:
        if path != self.showing or not self.is_attached:
            return  # the user moved on
        header = self.query_one("#aprt-header", Static)
        if isinstance(result, str):
            header.update(Text(result, style="bold red"))
            return
        info = Table(box=None, show_header=False, pad_edge=False)
        info.add_column("", style="bold")
        info.add_column("", overflow="fold")
        info.add_row("file", str(self.shown(path)))
        info.add_row("layer", layer_text(result.layer))
        info.add_row("dim_product", str(result.dim_product))
        info.add_row("size", f"{result.size} bytes")
        header.update(info)
        flags = CellAnomalies(a=stats_anomalies(path.stem, result.stats))
        table = tensor_stats_table(result.stats, None, show_b=False, flags=flags, heading="")
        if flags:  # apr's anomaly flags of this file, above its statistics
            both = Table.grid()
            both.add_row(anomaly_summary(flags))
            both.add_row(table)
            table = both
        self.query_one("#aprt-stats", Static).update(table)
        self.query_one("#aprt-preview", Static).update(result.preview)

    # -- marks ------------------------------------------------------------------------------

    def node_for(self, path: Path) -> TreeNode | None:
        """The tree node of one stage file (None for a path the tree does not list)."""
        return self._tree_nodes.get(path)

    def shown(self, path: Path) -> str:
        """A stage file as the user knows it: relative to its directory, and prefixed with
        that directory's name when two are open."""
        owner = self._owner.get(path)
        if owner is None:
            return str(path)
        relative = str(path.relative_to(owner))
        if len(self.directories) > 1:
            return f"{owner.name or owner}/{relative}"
        return relative

    def _highlighted_path(self) -> Path | None:
        node = self.query_one(Tree).cursor_node
        return node.data if node is not None and isinstance(node.data, Path) else None

    def _relabel(self, path: Path) -> None:
        node = self._tree_nodes.get(path)
        if node is None:
            return
        label = Text(path.stem)
        if path in self.marked:
            label.append(f"  [{MARK_NAMES[self.marked.index(path)]}]", "bold reverse")
        node.set_label(label)

    def action_mark(self) -> None:
        path = self._highlighted_path()
        if path is None:
            self.notify("highlight a stage file to mark it", title="Mark", severity="warning")
            return
        if path in self.marked:
            self.marked.remove(path)
        elif len(self.marked) == len(MARK_NAMES):
            self.notify(
                f"A and B are already marked ({self.shown(self.marked[0])}, "
                f"{self.shown(self.marked[1])}): space on one of them unmarks it, c clears both",
                title="Mark",
                severity="warning",
                markup=False,
            )
            return
        else:
            self.marked.append(path)
        for node_path in self._tree_nodes:
            self._relabel(node_path)
        self._show_marks()

    def action_clear_marks(self) -> None:
        self.marked.clear()
        for node_path in self._tree_nodes:
            self._relabel(node_path)
        self._show_marks()

    def _show_marks(self) -> None:
        """The marks line: what A and B are, and what the next key does."""
        line = Text()
        for index, name in enumerate(MARK_NAMES):
            if index:  # one mark a line: two paths side by side wrap mid-path on 80 columns
                line.append("\n")
            line.append(f" {name} ", "bold reverse")
            if index < len(self.marked):
                line.append(f" {self.shown(self.marked[index])}")
            else:
                line.append(" (space marks)", "dim")
        if len(self.marked) == len(MARK_NAMES):
            line.append("\n d diffs them", "bold")
        for note in self._notes:
            line.append(f"\n⚠ {note}", "yellow")
        self.query_one("#aprt-marks", Static).update(line)

    # -- diff (a worker) --------------------------------------------------------------------

    def action_diff(self) -> None:
        if len(self.marked) != 2:
            self.notify(
                "mark two files with space first (A, then B)", title="Diff", severity="warning"
            )
            return
        path_a, path_b = self.marked
        panel = self.query_one("#aprt-diff", Static)
        panel.update(Text(f"diffing {self.shown(path_a)} with {self.shown(path_b)} …", style="dim"))
        self._scroll_to_diff()
        self._diff(path_a, path_b)

    def _scroll_to_diff(self) -> None:
        """Bring the diff panel's first lines into view when they are not (on a small terminal
        the panel starts below the file's preview), once it has been laid out with its new
        content; where they already show, nothing moves."""
        detail = self.query_one("#aprt-detail", VerticalScroll)
        panel = self.query_one("#aprt-diff", Static)

        def scroll() -> None:
            shown = detail.content_region
            if not shown.y <= panel.region.y < shown.bottom - DIFF_LINES_IN_VIEW:
                detail.scroll_to_widget(panel, animate=False, top=True)

        self.call_after_refresh(scroll)

    @work(thread=True, exclusive=True, group="aprt-diff", exit_on_error=False)
    def _diff(self, path_a: Path, path_b: Path) -> None:
        worker = get_current_worker()
        try:
            result: FileDiff | str = diff_aprt_files(path_a, path_b)
        except AprTuiError as error:
            result = str(error)
        if not worker.is_cancelled:
            self.app.call_from_thread(self._show_diff, path_a, path_b, result)

    def _show_diff(self, path_a: Path, path_b: Path, result: FileDiff | str) -> None:
        if not self.is_attached:
            return
        panel = self.query_one("#aprt-diff", Static)
        if isinstance(result, str):
            panel.update(Text(result, style="bold red"))
            self.notify(result, title="Diff", severity="error", markup=False)
            self._scroll_to_diff()
            return
        panel.update(diff_text(self.shown(path_a), self.shown(path_b), result))
        self._scroll_to_diff()

    def action_back(self) -> None:
        if self.standalone:
            return
        self.app.pop_screen()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """`esc` (back to the grid) only where there is a screen to go back to."""
        if action == "back":
            return not self.standalone
        return True
