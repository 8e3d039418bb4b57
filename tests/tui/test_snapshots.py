"""SVG snapshots of the explorer on deterministic data (the seeded small demo pair).

The clock is hidden (clock=None), so no elapsed time is drawn. Regenerate baselines with
`pytest tests/tui/test_snapshots.py --snapshot-update` only after looking at the new pictures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aprtui.app import FilesApp
from aprtui.messages import RunProgress, RunStarted
from engine.plan import plan_for
from engine.sources import open_pair
from tests.tui.conftest import explorer, settle, workers_done

SNAP_SIZE = (150, 40)
MID_FILL_CELLS = 40


def test_grid_mid_fill(snap_compare, demo_pair):
    """Mid-run: layers 0 and 1 complete (cosine 1.0000, green), layer 2 filled up to `attn`,
    the rest blank (pending); `qkv_b` shows `·` in every row from the start (Llama has no QKV
    bias); the status line shows the progress bar at 40/99 cells and no divergence yet; the
    legend explains `NaN`, the yellow `!` anomaly flag, `·`, the gold HIGH-VAR label and `▶`."""
    app = explorer(demo_pair.model_a, demo_pair.model_b, autostart=False)

    async def run_before(pilot):
        a, b = open_pair(demo_pair.model_a, demo_pair.model_b, device="cpu")
        plan = plan_for(a, b)
        cells = list(plan.run())[:MID_FILL_CELLS]
        app.post_message(RunStarted(plan, "cpu"))
        await pilot.pause()
        for cell in cells:
            app.apply_cell(cell)
        app.post_message(RunProgress(len(cells), app.grid.expected_count))
        await pilot.pause()
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)


@pytest.mark.parametrize("presses", [0, 1, 2, 3], ids=["cosine", "max_diff", "std_a", "std_ratio"])
def test_grid_complete(snap_compare, demo_pair, presses):
    """The finished grid in one metric (m pressed `presses` times): L2 is marked `▶` at `up`
    (std ratio) and at `res2` (cosine), L2 `swigl` carries the yellow `!` anomaly flag (side B's
    values pass 100), the legend names the metric and its colour ramp, and the status line says
    where the first divergence is (on a second line: it does not fit in one at 150 columns)."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)

    async def run_before(pilot):
        await settle(pilot)
        for _ in range(presses):
            await pilot.press("m")
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)


def test_cell_drill_down(snap_compare, demo_pair):
    """L2 `ffn_up` opened: A and B statistics (std ratio 1/18 visible as 0.99 vs 17.8), cosine
    1.0, the |A-B| histogram by decade, the per-token cosine strip (all 1.0000) and the top
    divergences with token text and channel."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("f", "enter")
        await pilot.pause()
        await workers_done(app)
        await pilot.pause()
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)


def test_file_browser(snap_compare, traced, monkeypatch):
    """`apr-tui files model-trace/`: the layer tree with layer-2 open, `ffn_gate` and `ffn_up`
    marked [A] [B] and diffed (the apr diff numbers and top divergences on the right)."""
    monkeypatch.chdir(traced.trace_dir.parent)  # the header shows the directory as given
    directory = Path(traced.trace_dir.name)
    app = FilesApp(directory)

    async def run_before(pilot):
        from tests.tui.test_browser import highlight

        await pilot.pause()
        await highlight(pilot, directory / "layer-2" / "ffn_gate.bin")
        await pilot.press("space")
        await highlight(pilot, directory / "layer-2" / "ffn_up.bin")
        await pilot.press("space", "d")
        await pilot.pause()
        await workers_done(app)  # the diff runs in a worker: drawn only once it has ended
        await pilot.pause()
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)


def test_help_screen(snap_compare, demo_pair):
    """The help screen over the grid: every key of the explorer, grid, drill-down and browser,
    and where `s` saves (a fixed directory here: the default is the working directory's, which
    differs between checkouts)."""
    app = explorer(demo_pair.model_a, demo_pair.model_b, save_dir=Path("/saved-by-apr-tui"))

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=(150, 56))


def test_error_state(snap_compare, traced):
    """A token mismatch: the red error panel under the (empty) grid names both sides and their
    token ids, the status line says `failed`, and an error notification is shown."""
    app = explorer(traced.model, traced.trace_dir, token_ids=[5, 6, 7])

    async def run_before(pilot):
        await settle(pilot)

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)


def test_single_model_mode(snap_compare, demo_pair):
    """No reference: the header says single-model mode; the grid shows std of A (blue → yellow);
    the healthy model breaks no anomaly rule, so no cell has a `!`; the legend has no `▶` line."""
    app = explorer(demo_pair.model_a, None)

    async def run_before(pilot):
        await settle(pilot)

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)


def test_single_model_anomalies(snap_compare, loud_model):
    """Single-model mode on the small model with layer 1's up_proj ×1000: yellow `!` flags from
    L1 `up` on, the labels L1–L5 in gold (HIGH-VAR: layer output std > 100), and the cursor on
    L1 `res2`, whose stats panel names the flags (`A: large values, large mean bias, HIGH-VAR`)
    and highlights the offending std, mean, min and max."""
    app = explorer(loud_model, None)

    async def run_before(pilot):
        await settle(pilot)
        assert app.grid.move_to(1, "post_ffn_residual")
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)


@pytest.mark.parametrize("size", [(120, 36), (100, 30)], ids=["120x36", "100x30"])
def test_narrow_terminal(snap_compare, demo_pair, size):
    """The finished grid at 120×36 and 100×30, cursor moved 19 cells right on the whole-model
    row: the grid scrolled by whole cells (headers aligned) so that `logits` and the cursor are
    in view; the status line wraps onto two lines instead of losing the first divergence; the
    legend is whole; the compact footer shows every key (at 100 columns without `^p palette`)."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press(*["j"] * 6, *["l"] * 19)
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=size)


@pytest.mark.parametrize(
    "size", [(80, 24), (160, 45), (220, 60)], ids=["80x24", "160x45", "220x60"]
)
def test_layout_sizes(snap_compare, demo_pair, size):
    """The finished grid with the cursor on the origin (f), at the classic 80×24 and at two
    large sizes. 80×24: no header, every layer row and the whole-model row in view, the cell in
    four short lines (cosine, max|Δ|, RMS Δ, std A/B in red, then A and B), the verdict on the
    status lines, and the one-line key hint (`i legend`). 160×45 and 220×60: the grid exactly
    as tall as its rows, the statistics and the legend right under it, and the cell's local
    error (9.444e+04× floor, in red) with the inputs the recomputation read."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("f")
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=size)


def test_file_browser_two_traces(snap_compare, traced, demo_pair, tmp_path, monkeypatch):
    """`apr-tui files model-trace/ defect-trace/`: the two trees under A: and B:, layer 2
    `ffn_up` marked in each (the marks line names both), and their diff: cosine 1.0, the ×18
    in max|diff|."""
    import shutil

    from tests.tui.conftest import write_trace_dir
    from tests.tui.test_browser import highlight, settle_workers

    monkeypatch.chdir(tmp_path)  # the tree shows the directories as given: short and stable
    shutil.copytree(traced.trace_dir, tmp_path / "model-trace")
    write_trace_dir(demo_pair.model_b, tmp_path / "defect-trace", token_ids=traced.token_ids)
    good, bad = Path("model-trace"), Path("defect-trace")
    app = FilesApp([good, bad])

    async def run_before(pilot):
        await pilot.pause()
        await highlight(pilot, good / "layer-2" / "ffn_up.bin")
        await pilot.press("space")
        await highlight(pilot, bad / "layer-2" / "ffn_up.bin")
        await pilot.press("space", "d")
        await settle_workers(pilot)

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)
