"""The trace explorer App: starts the engine worker, routes its messages, owns the key bindings.

`make_app` is the one place that wires an explorer together; the command line (`apr-tui MODEL`,
`apr-tui demo`), the tests and the screenshot script all go through it.

The engine runs in a Textual thread worker. It opens both sides, iterates `compare(...)` and
posts one `CellReady` per cell (plus `RunProgress`, then `RunFinished` or `RunFailed`); the
handlers write into the grid, which repaints only the changed line. Cancellation is the
worker's `cancelled_event`, handed to the engine, which checks it between captures.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.text import Text
from textual import events, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Static
from textual.worker import get_current_worker

from aprtui.messages import (
    CellReady,
    CellSelected,
    CursorMoved,
    LogitsProgress,
    LogitsReady,
    MetricChanged,
    RunFailed,
    RunFinished,
    RunProgress,
    RunStarted,
)
from aprtui.screens.cell_detail import CellContext, CellDetailScreen
from aprtui.screens.file_browser import FileBrowserScreen
from aprtui.screens.help import TREE_MOUSE, HelpScreen
from aprtui.screens.logits import LogitsScreen
from aprtui.widgets.footer import fit_footer
from aprtui.widgets.legend import Legend
from aprtui.widgets.metrics import STAGE_SHORT_NAMES, cell_title
from aprtui.widgets.stage_grid import StageGrid
from aprtui.widgets.stats_panel import StatsPanel
from aprtui.widgets.status_line import StatusLine, progress_bar
from engine.compare import cosine_diverged, std_diverged
from engine.defaults import DEFAULT_THRESHOLD
from engine.errors import AprTuiError
from engine.heads import HeadLayout, head_layout_of
from engine.noise import Origin, calibrate, find_origin
from engine.plan import Plan, plan_for
from engine.stages import WHOLE_MODEL_LAYER

if TYPE_CHECKING:
    from engine.compare import Cell
    from engine.sources import TraceSource


COMPACT_WIDTH = 100
COMPACT_HEIGHT = 30
"""Below either (80×24 is the classic), the explorer switches to its compact layout: no
header line, the grid as tall as its rows need, the cell in four short lines under it, and
the legend a key away (`i`), so that what matters first (the grid, the verdict) fits."""

STATUS_LINES = 3
"""The lines the layout reserves for the status line (its max-height outside compact)."""

LOGITS_BAR_WIDTH = 8
"""The logit metrics' progress bar in the status line (short: it shares the line)."""

ROOMY_PANEL = 20
"""When the panel under the grid gets this many lines (the grid's rows fitted), it also shows
the cell's local error (12 lines of statistics, 7 of local error and its inputs)."""

SHORT_KEY_LABELS = {
    "select_cell": "open",
    "cycle_metric": "metric",
    "jump_divergence": "origin",
    "walk_worst(1)": "worst",
    "next_anomaly": "anomaly",
    "toggle_legend": "legend",
    "logits": "logits",
    "browse": "browse",
    "help": "all keys",
    "quit": "quit",
}
"""The compact layout's one-line key hint (the footer's full labels do not fit 80 columns)."""

METRIC_HINTS = {
    "cosine": "cosine",
    "max_diff": "max|A-B|",
    "std_a": "std A",
    "std_ratio": "std A/B",
    "local": "local÷floor",
}
"""The compact hint names the grid's metric at its `m` key (`m max|A-B|`): the compact layout
has no legend on screen, and the numbers in the grid mean nothing without it."""

HINT_GIVES_WAY = ("browse", "logits", "walk_worst(1)", "next_anomaly", "jump_divergence")
"""Where the hint is too long for the terminal, the keys that leave it, first to last; the
others (open, metric, legend, all keys, quit) stay: `i` must stay to switch the legend back,
and `?` lists every key."""

MAIN_SCREEN_ACTIONS = frozenset({"browse", "logits", "toggle_legend"})
"""The explorer's keys that act on its main screen (the grid): offered there only, so that
`o` on the logits screen opens no second one, and `i` in a drill-down does not change the
screen under it unseen."""

COMPACT_LEGEND_LINES = 9
"""Lines the legend takes whole (the metric, its scale, the threshold, the marks), given to it
under the grid when `i` shows it in the compact layout: 5 lines cut it after its scale."""

BOTTOM_LINES = {"compact": 5, "normal": 13, "roomy": 13}
"""The least room the panel under the grid keeps (the statistics table is 12 lines)."""

SourcesOpener = Callable[[], "Plan | tuple[TraceSource, TraceSource | None]"]
"""What the engine worker calls first: a prepared Plan, or two open sources to plan (the demo
builds its pair there, which is slow)."""


@dataclass
class ExploreRun:
    """What to explore and how; built by `make_app`."""

    open_sources: SourcesOpener
    """Runs in the worker thread: the Plan, or side A and side B (None in single-model mode)."""
    layers: tuple[int, int] | None = None
    """START..END (END exclusive) of the layers to trace when the opener returns sources."""
    threshold: float = DEFAULT_THRESHOLD
    device: str = "auto"
    reference_dir: Path | None = None
    """The trace directory behind `b` (the APRT browser), when the reference is one."""
    single_model: bool = False
    """Known up front (no --ref and no default trace dir): the header says so from the start."""
    on_close: list[Callable[[], None]] = field(default_factory=list)
    preparing: str | None = None
    """Shown in the status line while the sides are being opened (a slow demo build, say)."""
    stop: threading.Event = field(default_factory=threading.Event)
    """Set when the app quits: slow openers (the demo build) poll it to give up early."""
    engine_idle: threading.Event = field(default_factory=threading.Event)
    """Set whenever no engine worker is running; the demo waits on it before deleting files."""

    def __post_init__(self) -> None:
        self.engine_idle.set()


GLOBAL_BINDINGS = [
    Binding("q", "quit", "Quit"),
    Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    Binding("question_mark", "help", "Keys", key_display="?"),
    Binding("f1", "help", "Keys", show=False),
]
"""Quit and help, the same in the explorer and in `apr-tui files`."""


def _hint_width(items: list[tuple[str, str, str]]) -> int:
    """Cells of the key hint `key label  key label …`."""
    return sum(len(key) + 1 + len(label) for _, key, label in items) + 2 * (len(items) - 1)


class ExplorerApp(App[int]):
    """apr-tui: where do two inference paths start to disagree?"""

    CSS_PATH = "app.tcss"
    TITLE = "apr-tui"

    BINDINGS = [
        *GLOBAL_BINDINGS,
        Binding("b", "browse", "Browse APRT"),
        Binding("o", "logits", "Output logits"),
        Binding("i", "toggle_legend", "Legend"),
        Binding("escape", "dismiss_error", "Hide the engine error panel", show=False),
    ]

    def __init__(
        self,
        run_spec: ExploreRun,
        *,
        clock: Callable[[], float] | None = time.monotonic,
        autostart: bool = True,
        save_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.run_spec = run_spec
        self.clock = clock
        """None hides the elapsed time (tests and snapshots stay deterministic)."""
        self.autostart = autostart
        self.save_dir = save_dir
        self.plan: Plan | None = None
        self.cells: list[Cell] = []
        """Every cell of the run so far, in computation order (the floors are calibrated on
        them)."""
        self.origin: Origin | None = None
        self.source_a: TraceSource | None = None
        self.source_b: TraceSource | None = None
        self.token_ids: tuple[int, ...] = ()
        self.error: str | None = None
        self.state = "starting"
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._close_lock = threading.Lock()
        self._hinting = False
        """True while key_hint reads the grid's keys: as offered over the grid, whatever screen
        is on top (check_action)."""

    # -- layout -----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        spec = self.run_spec
        yield Header()
        yield StageGrid(threshold=spec.threshold, has_reference=not spec.single_model, id="grid")
        yield Static("", id="error-panel")
        with Horizontal(id="bottom"):
            yield StatsPanel(
                threshold=spec.threshold, has_reference=not spec.single_model, id="cell-stats"
            )
            yield Legend(id="legend")
        yield StatusLine(id="status")
        yield Static("", id="key-hint")
        yield Footer()

    @property
    def grid(self) -> StageGrid:
        return self.screen_stack[0].query_one(StageGrid)

    @property
    def status(self) -> StatusLine:
        return self.screen_stack[0].query_one(StatusLine)

    def on_mount(self) -> None:
        self.sub_title = (
            "single-model mode: statistics and anomaly flags only"
            if self.run_spec.single_model
            else "A vs B"
        )
        grid = self.grid
        self.screen_stack[0].query_one(Legend).show_metric(
            grid.metric, self.run_spec.threshold, grid.has_reference
        )
        grid.focus()
        self.screen_stack[0].query_one(StatsPanel).floor_of = lambda stage: grid.floors.get(stage)
        self._fit_footer(self.size.width)
        self.call_after_refresh(self._fit_layout)
        if self.run_spec.preparing:
            self.status.set(note=self.run_spec.preparing)
        if self.clock is not None:
            self.set_interval(0.25, self._tick)
        if self.autostart:
            self.start_run()

    def on_resize(self, event: events.Resize) -> None:
        self._fit_footer(event.size.width)
        self._fit_layout()

    def on_stage_grid_shape_changed(self, message: StageGrid.ShapeChanged) -> None:
        self._fit_layout()

    def layout_size(self) -> str:
        """`compact` (below 100×30), else `roomy` when the panel under the fitted grid has
        ROOMY_PANEL lines, else `normal`."""
        width, height = self.size
        if width < COMPACT_WIDTH or height < COMPACT_HEIGHT:
            return "compact"
        grid = self.screen_stack[0].query_one(StageGrid)
        chrome = 2 + STATUS_LINES  # header, footer, status
        panel = height - chrome - grid.wanted_height() - 1  # 1: the panel's top rule
        return "roomy" if panel >= ROOMY_PANEL else "normal"

    def _fit_layout(self) -> None:
        """Give the grid the lines its rows need (no more: the panel under it takes the rest,
        so a tall terminal has no gap), keeping the panel's least room; compact below 100×30."""
        screen = self.screen_stack[0]
        if not screen.is_mounted:
            return
        size = self.layout_size()
        compact = size == "compact"
        screen.set_class(compact, "-compact")
        if not compact:
            screen.remove_class("-legend")
        screen.query_one(Header).display = not compact
        screen.query_one(Footer).display = not compact
        hint = screen.query_one("#key-hint", Static)
        hint.display = compact
        if compact:
            hint.update(self.key_hint())
        screen.query_one(StatsPanel).set_layout_size(size)
        grid = screen.query_one(StageGrid)
        error = screen.query_one("#error-panel", Static)
        # header, keys, status: the status line's most lines, so the layout never depends on
        # how long its text is at the moment (the panel under the grid takes what is left).
        chrome = (0 if compact else 1) + 1 + STATUS_LINES
        if error.has_class("visible"):
            chrome += error.outer_size.height
        bottom = BOTTOM_LINES[size]
        if compact and screen.has_class("-legend"):  # the legend, whole: the grid scrolls
            bottom = max(bottom, COMPACT_LEGEND_LINES)
        room = self.size.height - chrome - bottom - 1  # 1: the panel's top rule
        grid.styles.height = max(6, min(grid.wanted_height(), room))
        self.refresh_bindings()

    def key_hint(self) -> Text:
        """`⏎ open  m metric  f origin …  ? all keys  q quit`: the keys that work here (the
        same check_action as the footer), in one line for the compact layout."""
        items: list[tuple[str, str, str]] = []  # (action, key, label)
        self._hinting = True  # the grid's keys as they are over the grid, whatever is on top
        try:
            bindings = [active.binding for active in self.screen_stack[0].active_bindings.values()]
        finally:
            self._hinting = False
        for binding in bindings:
            label = SHORT_KEY_LABELS.get(binding.action)
            if label is None or not binding.show or binding.action in {a for a, _, _ in items}:
                continue
            if binding.action == "cycle_metric":
                label = METRIC_HINTS.get(self.grid.metric, label)
            items.append((binding.action, self.get_key_display(binding), label))
        width = self.size.width - 2  # the hint's padding
        for action in HINT_GIVES_WAY:
            if _hint_width(items) <= width:
                break
            items = [item for item in items if item[0] != action]
        text = Text()
        for _, key, label in items:
            if text:
                text.append("  ")
            text.append(key, "bold #ffa62b")  # the footer key colour
            text.append(f" {label}")
        return text

    def action_toggle_legend(self) -> None:
        """Compact layout: swap the cell's statistics and the legend under the grid (which
        gives the legend the lines it needs)."""
        self.screen_stack[0].toggle_class("-legend")
        self._fit_layout()

    def _fit_footer(self, width: int) -> None:
        """Keep every footer key of the grid's screen visible (aprtui.widgets.footer)."""
        fit_footer(self.screen_stack[0].query_one(Footer), width)

    def _tick(self) -> None:
        if self._started_at is None or self.clock is None:
            return
        end = self._finished_at if self._finished_at is not None else self.clock()
        self.status.set(elapsed=end - self._started_at)

    # -- the engine worker ------------------------------------------------------------------

    def start_run(self) -> None:
        """Start (or restart) the engine worker."""
        self.state = "starting"
        if self.clock is not None:
            self._started_at = self.clock()
            self._finished_at = None
        self.run_engine()

    @work(thread=True, exclusive=True, exit_on_error=False, group="engine", name="engine")
    def run_engine(self) -> None:
        """Get the plan, run it, post every cell. Never raises into Textual; never assigns app
        state (the handlers do, on the main thread)."""
        worker = get_current_worker()
        cancel = worker.cancelled_event
        done = 0
        self.run_spec.engine_idle.clear()
        plan: Plan | None = None
        try:
            opened = self.run_spec.open_sources()
            if isinstance(opened, Plan):
                plan = opened
            else:
                source_a, source_b = opened
                try:
                    plan = plan_for(source_a, source_b, layers=self.run_spec.layers)
                except BaseException:
                    for side in (source_a, source_b):
                        if side is not None:
                            side.close()
                    raise
            self.post_message(RunStarted(plan, _device_of(plan.a, self.run_spec.device)))
            for cell in plan.run(cancel):
                if cancel.is_set():
                    break
                done += 1
                self.post_message(CellReady(cell))
                self.post_message(RunProgress(done, max(plan.expected, done)))
            self.post_message(RunFinished(done, cancelled=cancel.is_set()))
        except AprTuiError as error:
            self.post_message(RunFailed(str(error)))
        except MemoryError:
            self.post_message(RunFailed("out of memory while tracing the model"))
        except Exception as error:  # an engine bug: show it, keep the app usable
            self.post_message(RunFailed(f"internal error: {type(error).__name__}: {error}"))
        finally:
            self.run_spec.engine_idle.set()
            if self.run_spec.stop.is_set() and plan is not None:
                with contextlib.suppress(Exception):  # best effort: a busy mmap refuses
                    plan.close()  # idempotent: the app may close it too

    def on_run_started(self, message: RunStarted) -> None:
        plan = message.plan
        self.cells = []
        self.origin = None
        self.plan = plan
        self.source_a, self.source_b = plan.a, plan.b
        self.state = "running"
        self.token_ids = plan.token_ids or ()
        has_reference = plan.b is not None
        label_a, label_b = plan.a.label, None if plan.b is None else plan.b.label
        grid = self.grid
        grid.configure(
            tuple(plan.layers),
            has_reference,
            plan.stages or None,
            whole_model=plan.whole_model,
            cells=plan.cells,
        )
        self.screen_stack[0].query_one(StatsPanel).has_reference = has_reference
        self.sub_title = (
            f"{label_a} vs {label_b}"
            if has_reference
            else f"{label_a} · single-model mode: statistics and anomaly flags only"
        )
        self.status.set(
            label_a=label_a,
            label_b=label_b,
            tokens=len(self.token_ids),
            device=message.device,
            state="running",
            total=plan.expected,
        )
        self._show_legend()
        self._warn_incomplete(plan)

    def _warn_incomplete(self, plan: Plan) -> None:
        """A trace directory whose run did not finish is a partial reference: say so in the
        header and in a notification, never treat it as complete silently."""
        notes = []
        for label, side in (("A", plan.a), ("B", plan.b)):
            note = getattr(getattr(side, "trace_dir", None), "incomplete_note", None)
            if note:
                notes.append(f"{label}: {note}")
        if notes:
            self.sub_title += " · incomplete trace"
            for note in notes:
                self.notify(note, title="Incomplete trace", severity="warning", timeout=15)

    def on_cell_ready(self, message: CellReady) -> None:
        self.apply_cell(message.cell)

    def apply_cell(self, cell: Cell) -> None:
        """Put one result into the grid and update the divergence marks; after each layer (and
        at the end) recalibrate the noise floors and re-mark the origin."""
        grid = self.grid
        grid.set_cell(cell)
        if not grid.has_reference:
            return
        self.cells.append(cell)
        if cell.stage == "post_ffn_residual" or cell.layer == WHOLE_MODEL_LAYER:
            self.recalibrate()
        if "cosine" not in grid.divergences and cosine_diverged(cell, self.run_spec.threshold):
            grid.mark_divergence("cosine", cell)
            self._announce_divergence()
        if "std" not in grid.divergences and std_diverged(cell):
            grid.mark_divergence("std", cell)
            self._announce_divergence()

    def recalibrate(self) -> None:
        """Floors from every cell so far (engine.noise); the origin under them, marked ◆."""
        grid = self.grid
        floors = calibrate(self.cells)
        grid.set_floors(floors)
        origin = find_origin(self.cells, floors)
        self.origin = origin
        if origin is None:
            grid.mark_divergence("origin", None)
        else:
            layer = WHOLE_MODEL_LAYER if origin.layer is None else origin.layer
            position = grid.position(layer, origin.stage)
            grid.mark_divergence("origin", None if position is None else grid.cell_at(*position))
        self._announce_divergence()

    def _announce_divergence(self) -> None:
        grid = self.grid
        parts = []
        if self.origin is not None:
            where = "model" if self.origin.layer is None else f"L{self.origin.layer}"
            short = STAGE_SHORT_NAMES.get(self.origin.stage, self.origin.stage)
            parts.append(f"origin {where} {short} ({self.origin.ratio:.3g}× its noise floor)")
        for kind, label in (("std", "std"), ("cosine", "cosine")):
            position = grid.divergences.get(kind)
            if position is None:
                continue
            cell = grid.cell_at(*position)
            if cell is None:
                continue
            if kind == "cosine" and cell.diff is not None:
                parts.append(f"first {label}: {_short_title(cell)} ({cell.diff.cosine_sim:.4f})")
            elif cell.stats_a is not None and cell.stats_b is not None and cell.stats_b.std:
                ratio = cell.stats_a.std / cell.stats_b.std
                factor = f"×{ratio:.3g}" if ratio >= 1 else f"÷{1 / ratio:.3g}"
                parts.append(f"first {label}: {_short_title(cell)} (A/B {factor})")
            else:
                parts.append(f"first {label}: {_short_title(cell)}")
        if not parts:
            return
        self.status.set(divergence=", ".join(parts))

    def on_run_progress(self, message: RunProgress) -> None:
        self.status.set(done=message.done, total=message.total)

    def on_run_finished(self, message: RunFinished) -> None:
        self._stop_clock()
        self.state = "cancelled" if message.cancelled else "finished"
        grid = self.grid
        if not message.cancelled:
            grid.mark_missing_absent()
        self.status.set(state=self.state, done=grid.done_count)
        self.refresh_bindings()  # `o` (output logits) works from now on: the footer says so now
        self._refresh_hint()
        if grid.has_reference and not message.cancelled:
            self.recalibrate()
            if self.origin is None:
                noise = "no origin: every local error is within its noise floor"
                if grid.first_divergence is None:
                    noise += f", every cosine ≥ {self.run_spec.threshold}"
                self.status.set(divergence=noise + self._propagated_note())

    def _propagated_note(self) -> str:
        grid = self.grid
        position = grid.divergences.get("cosine")
        cell = None if position is None else grid.cell_at(*position)
        if cell is None or cell.diff is None:
            return ""
        return f" (first cosine < {self.run_spec.threshold}: {_short_title(cell)}, noise)"

    def on_run_failed(self, message: RunFailed) -> None:
        self._stop_clock()
        self.state = "failed"
        self.error = message.error
        panel = self.screen_stack[0].query_one("#error-panel", Static)
        panel.update(
            Text.assemble(
                ("The engine stopped: ", "bold"),
                message.error,
                ("\nThe grid keeps what was computed. esc hides this, q quits.", "dim"),
            )
        )
        panel.add_class("visible")
        self.status.set(state="failed")
        self.notify(message.error, title="Engine error", severity="error", timeout=10, markup=False)

    def _stop_clock(self) -> None:
        if self.clock is not None:
            self._finished_at = self.clock()
            self._tick()

    # -- selection --------------------------------------------------------------------------

    def on_cursor_moved(self, message: CursorMoved) -> None:
        missing = self.grid.model.missing_reason(message.layer, message.stage)
        self.screen_stack[0].query_one(StatsPanel).show_cell(
            message.layer, message.stage, message.cell, missing
        )

    def on_cell_selected(self, message: CellSelected) -> None:
        grid = self.grid
        position = grid.position(message.layer, message.stage)
        cell = None if position is None else grid.cell_at(*position)
        if cell is None:
            reason = grid.model.missing_reason(message.layer, message.stage)
            self.notify(f"{cell_title(message.layer, message.stage)}: {reason}", title="Open cell")
            return
        self.push_screen(CellDetailScreen(self.cell_context(cell)))

    def cell_context(self, cell: Cell) -> CellContext:
        source_a, source_b = self.source_a, self.source_b

        def load_tensors() -> tuple[np.ndarray | None, np.ndarray | None]:
            a = None if source_a is None else source_a.tensor(cell.layer, cell.stage)
            b = None if source_b is None else source_b.tensor(cell.layer, cell.stage)
            return a, b

        return CellContext(
            cell=cell,
            load_tensors=load_tensors,
            has_reference=self.grid.has_reference,
            threshold=self.run_spec.threshold,
            token_ids=self.token_ids,
            token_text=_token_text_of(source_a),
            heads=_heads_of(source_a, source_b),
            save_dir=self.save_dir,
            floor=self.grid.floors.get(cell.stage),
        )

    # -- actions ----------------------------------------------------------------------------

    def on_metric_changed(self, message: MetricChanged) -> None:
        self._show_legend()
        self._refresh_hint()  # it names the metric

    def _refresh_hint(self) -> None:
        """Redraw the compact layout's key hint (what works changed: the run ended, the
        metric)."""
        if self.screen_stack[0].is_mounted and self.layout_size() == "compact":
            self.screen_stack[0].query_one("#key-hint", Static).update(self.key_hint())

    def _show_legend(self) -> None:
        grid = self.grid
        self.screen_stack[0].query_one(Legend).show_metric(
            grid.metric, self.run_spec.threshold, grid.has_reference
        )

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(help_sections(), notes=[self.save_note()]))

    def save_note(self) -> str:
        """Where `s` in a cell's drill-down writes (the help screen says it)."""
        from aprtui.screens.cell_detail import SAVE_DIR_NAME

        directory = self.save_dir or (Path.cwd() / SAVE_DIR_NAME)
        return f"s in a cell's drill-down saves both tensors as APRT files to {directory}/"

    def trace_dirs(self) -> list[Path]:
        """The trace directories behind the two sides (A's first), for `b`."""
        found = []
        side_a = getattr(self.source_a, "root", None)
        if getattr(self.source_a, "kind", None) == "trace-dir" and side_a is not None:
            found.append(Path(side_a))
        reference = self.run_spec.reference_dir
        if reference is not None and reference.is_dir() and reference not in found:
            found.append(reference)
        return found

    def action_browse(self) -> None:
        directories = self.trace_dirs()
        if not directories:
            self.notify(
                "neither side is a trace directory: nothing to browse",
                title="APRT browser",
                severity="warning",
            )
            return
        self.push_screen(FileBrowserScreen(directories))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Show each key only where it works: `b` needs a trace directory on one side, `esc`
        (hide the error panel) an engine error; the grid's own keys only over the grid."""
        over_the_grid = self._hinting or self.screen is self.screen_stack[0]
        if action in MAIN_SCREEN_ACTIONS and not over_the_grid:
            return False
        if action == "browse":
            return bool(self.trace_dirs())
        if action == "logits":  # per-position logit metrics need both sides, and a whole run
            return self.plan is not None and self.plan.b is not None and self.state == "finished"
        if action == "dismiss_error":
            return self.error is not None
        if action == "toggle_legend":  # the legend has its own place in the larger layouts
            return self.layout_size() == "compact"
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The command palette (ctrl+p): every key the current screen offers, by its name
        (`Metric`, `First divergence`, ...), then Keys (the help screen, which esc closes),
        Theme and Quit."""
        yield from palette_commands(self, screen)
        yield SystemCommand("Keys", "Every key of every screen (esc closes it)", self.action_help)
        yield SystemCommand("Theme", "Change the current theme", self.action_change_theme)
        yield SystemCommand("Quit", "Stop the engine worker and leave", self.action_quit)

    def action_logits(self) -> None:
        """The output, position by position (engine.logits), computed in a worker."""
        if self.plan is None or self.plan.b is None:
            return
        self.notify("computing the logit metrics…", title="Output logits", timeout=2)
        self.compute_logits(self.plan)

    @work(thread=True, exclusive=True, exit_on_error=False, group="logits")
    def compute_logits(self, plan: Plan) -> None:
        """pair_logit_report of the plan's two sides (both open until the app closes)."""
        from engine.logits import pair_logit_report

        def progress(done: int, total: int) -> None:
            self.post_message(LogitsProgress(done, total))

        try:
            report = pair_logit_report(plan.a, plan.b, plan.token_ids, progress=progress)
        except Exception as error:  # shown, the app stays usable
            self.post_message(LogitsReady(None, f"{type(error).__name__}: {error}"))
            return
        self.post_message(LogitsReady(report, None))

    def on_logits_progress(self, message: LogitsProgress) -> None:
        bar = progress_bar(message.done, message.total, LOGITS_BAR_WIDTH)
        self.status.set(task=f"logits {bar} {message.done}/{message.total}")

    def on_logits_ready(self, message: LogitsReady) -> None:
        self.status.set(task=None)

        if message.report is None:
            reason = message.error or (
                "both sides need every position's logits: two model files, a trace directory "
                "with logits_all.bin (trace --save-tensor logits_all), or a runtime's "
                "[seq, vocab] lm_head"
            )
            self.notify(reason, title="Output logits", severity="warning", markup=False)
            return
        source = self.source_a if self.source_a is not None else self.source_b
        self.push_screen(LogitsScreen(message.report, self.token_ids, _token_text_of(source)))

    def action_dismiss_error(self) -> None:
        self.screen_stack[0].query_one("#error-panel", Static).remove_class("visible")

    async def action_quit(self) -> None:
        """Stop the engine worker, then leave."""
        self.run_spec.stop.set()
        self.workers.cancel_group(self, "engine")
        self.exit(0)

    def on_unmount(self) -> None:
        self.run_spec.stop.set()
        if self.run_spec.engine_idle.is_set():
            self._close_sources()
        for callback in self.run_spec.on_close:
            callback()

    def _close_sources(self) -> None:
        """Close both sides once, after the engine worker is done with them."""
        with self._close_lock:
            plan, self.plan = self.plan, None
            self.source_a = self.source_b = None
        if plan is not None:
            with contextlib.suppress(Exception):  # best effort: a busy mmap refuses
                plan.close()


PALETTE_SKIP = frozenset({"quit", "help", "command_palette", "cursor", "dismiss"})
"""Actions the palette lists once by itself (Quit, Keys) or that make no sense as a command
(cursor moves, closing a modal)."""


def palette_commands(app: App, screen: Screen) -> Iterator[SystemCommand]:
    """One palette command per key binding active on `screen` (its focused widget, the screen,
    the app), in binding order, only where the binding works (`check_action`), one per action."""
    seen: set[str] = set()
    for active in screen.active_bindings.values():
        binding = active.binding
        name = binding.action.split("(", 1)[0]
        if name in PALETTE_SKIP or binding.action in seen or not active.enabled:
            continue
        if not binding.description or not _ours(active.node, name):
            continue  # Textual's own (focus, copy, scroll) stay off the list
        seen.add(binding.action)
        keys = binding.key_display or app.get_key_display(binding)
        node, action = active.node, binding.action

        def run(node=node, action=action) -> None:
            app.call_later(app.run_action, action, node)

        yield SystemCommand(binding.description, f"key: {keys}", run)


def _ours(node: object, action: str) -> bool:
    """Whether `action` is one of apr-tui's (defined in the aprtui package), or the app's."""
    method = getattr(type(node), f"action_{action}", None)
    return getattr(method, "__module__", "").startswith("aprtui")


def help_sections() -> list[tuple[str, list]]:
    return [
        ("Explorer", ExplorerApp.BINDINGS),
        ("Grid", StageGrid.BINDINGS),
        ("Cell drill-down", CellDetailScreen.BINDINGS),
        ("Output logits (o)", LogitsScreen.BINDINGS),
        ("APRT browser", FileBrowserScreen.BINDINGS),
        ("Help", HelpScreen.BINDINGS),
        ("Everywhere", [Binding("ctrl+p", "command_palette", "Command palette")]),
    ]


def _device_of(source: TraceSource, requested: str) -> str:
    backend = getattr(source, "backend", None)
    device = getattr(backend, "device_name", None)
    return str(device) if device else requested


def _token_text_of(source: TraceSource | None) -> Callable[[int], str] | None:
    tokenizer = getattr(source, "tokenizer", None)
    if tokenizer is None:
        model = getattr(source, "model", None)
        tokenizer = getattr(model, "tokenizer", None)
    return None if tokenizer is None else tokenizer.token_text


def _heads_of(*sources: TraceSource | None) -> HeadLayout | None:
    """The attention head layout of the first side that is a model (a trace directory has no
    config); None when neither is."""
    for source in sources:
        model = getattr(source, "model", None)
        layout = head_layout_of(getattr(model, "config", None))
        if layout is not None:
            return layout
    return None


def _short_title(cell: Cell) -> str:
    from aprtui.widgets.metrics import STAGE_SHORT_NAMES, layer_label

    return f"{layer_label(cell.layer)} {STAGE_SHORT_NAMES.get(cell.stage, cell.stage)}"


def make_app(
    open_sources: SourcesOpener | Plan | tuple[TraceSource, TraceSource | None],
    *,
    layers: tuple[int, int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    device: str = "auto",
    reference_dir: Path | None = None,
    single_model: bool | None = None,
    clock: Callable[[], float] | None = time.monotonic,
    autostart: bool = True,
    save_dir: Path | None = None,
    on_close: list[Callable[[], None]] | None = None,
    preparing: str | None = None,
) -> ExplorerApp:
    """An explorer over two sides (or one): a callable that opens them in the worker thread, so
    that a bad file shows up in the app, or a pair of sources that are already open."""
    if isinstance(open_sources, Plan):
        plan = open_sources
        opener: SourcesOpener = lambda: plan  # noqa: E731
        single = plan.b is None
    elif isinstance(open_sources, tuple):
        pair = open_sources
        opener = lambda: pair  # noqa: E731
        single = pair[1] is None
    else:
        opener = open_sources
        single = False
    spec = ExploreRun(
        open_sources=opener,
        layers=layers,
        threshold=threshold,
        device=device,
        reference_dir=reference_dir,
        single_model=single if single_model is None else single_model,
        on_close=list(on_close or []),
        preparing=preparing,
    )
    return ExplorerApp(spec, clock=clock, autostart=autostart, save_dir=save_dir)


class FilesApp(App[int]):
    """`apr-tui files DIR [DIR2]`: the APRT browser on its own."""

    CSS_PATH = "app.tcss"
    TITLE = "apr-tui files"

    BINDINGS = [
        *GLOBAL_BINDINGS,
    ]

    def __init__(self, directories: Path | list[Path]) -> None:
        super().__init__()
        if isinstance(directories, (str, Path)):
            directories = [Path(directories)]
        self.directories = [Path(d) for d in directories]
        self.directory = self.directories[0]

    def get_default_screen(self) -> Screen:
        return FileBrowserScreen(self.directories, standalone=True)

    def on_mount(self) -> None:
        self.sub_title = "  vs  ".join(str(d) for d in self.directories)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from palette_commands(self, screen)
        yield SystemCommand("Keys", "Every key of the browser (esc closes it)", self.action_help)
        yield SystemCommand("Theme", "Change the current theme", self.action_change_theme)
        yield SystemCommand("Quit", "Leave", self.action_quit)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        browser = [b for b in FileBrowserScreen.BINDINGS if b.action != "back"]  # no grid here
        self.push_screen(
            HelpScreen([("Files", FilesApp.BINDINGS), ("APRT browser", browser)], mouse=TREE_MOUSE)
        )
