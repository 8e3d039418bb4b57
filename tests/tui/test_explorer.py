"""The explorer driven by a Pilot on the engine's real output (small .apr files, trace dirs)."""

from __future__ import annotations

import numpy as np
import pytest

from aprtui.messages import CellReady, RunFinished, RunProgress, RunStarted
from aprtui.screens.cell_detail import CellDetailScreen
from aprtui.screens.file_browser import FileBrowserScreen
from aprtui.screens.help import HelpScreen
from aprtui.widgets.stage_grid import ABSENT, CELL_WIDTH, LABEL_WIDTH, StageGrid
from engine.compare import compare
from engine.sources import open_pair
from engine.stages import WHOLE_MODEL_LAYER
from tests.tui.conftest import SIZE, explorer, screen_text, settle, workers_done

DEFECT_LAYER = 2


def engine_cells(model_a, model_b):
    """The cells the engine itself produces for the pair (what the grid must show)."""
    a, b = open_pair(model_a, model_b, device="cpu")
    try:
        return list(compare(a, b))
    finally:
        a.close()
        if b is not None:
            b.close()


async def test_grid_fills_with_every_engine_cell(demo_pair):
    messages = []
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        await settle(pilot)
        grid = app.grid
        expected = engine_cells(demo_pair.model_a, demo_pair.model_b)
        assert app.state == "finished"
        assert grid.done_count == len(expected)
        for cell in expected:
            row, col = grid.position(cell.layer, cell.stage)
            assert grid.cells[(row, col)] == cell
            assert grid.values["cosine"][row, col] == pytest.approx(cell.diff.cosine_sim)
        # 6 decoder layers plus the whole-model row.
        assert grid.row_layers == list(range(6))
        assert grid.n_rows == 7
    kinds = [type(m) for m in messages]
    assert kinds.count(CellReady) == len(expected)
    assert RunStarted in kinds and RunFinished in kinds
    # RunProgress can replace an older queued one, so at most one per cell arrives.
    assert 1 <= kinds.count(RunProgress) <= len(expected)


async def test_llama_qkv_bias_is_absent_not_zero(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        row, col = grid.position(1, "qkv_bias")
        assert grid.kinds["cosine"][row, col] == ABSENT
        assert grid.texts["cosine"][row, col] == "·"
        line = grid.render_line(1 + row).text
        assert "·" in line and "0.0000" not in line
        # embedding exists only in layer 0: blank elsewhere, never absent.
        row1, emb = grid.position(1, "embedding")
        assert not grid.applicable[row1, emb]


async def test_planted_defect_is_marked_where_it_is(demo_pair):
    """×18 on up_proj: std ratio flags ffn_up, cosine first drops at the residual add."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        assert grid.divergences["std"] == grid.position(DEFECT_LAYER, "ffn_up")
        assert grid.divergences["cosine"] == grid.position(DEFECT_LAYER, "post_ffn_residual")
        row = grid.position(DEFECT_LAYER, "ffn_up")[0]
        line = grid.render_line(1 + row).text
        assert line.lstrip().startswith("▶L2")
        assert line.count("▶") == 3  # the row label and both marked cells
        status = screen_text(app.status)
        assert "origin L2 up" in status and "first cosine: L2 res2" in status
        # The origin: B's ffn_up against A's weights from B's own input, far above its floor.
        assert grid.divergences["origin"] == grid.position(DEFECT_LAYER, "ffn_up")
        # The std ratio there is 1/18 (side B carries the ×18).
        assert grid.values["std_ratio"][row, grid.position(2, "ffn_up")[1]] == pytest.approx(
            1 / 18, rel=1e-4
        )


async def test_threshold_option_decides_the_cosine_verdict(demo_pair):
    """`--threshold -1`: no cosine is below it, so only the scale verdict remains; the mark the
    default threshold puts at L2 res2 (test above) must come from the threshold, not a constant."""
    app = explorer(demo_pair.model_a, demo_pair.model_b, threshold=-1.0)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        assert app.state == "finished"
        up = grid.position(DEFECT_LAYER, "ffn_up")
        assert grid.divergences == {"std": up, "origin": up}
        await pilot.press("f")
        assert grid.cursor == grid.position(DEFECT_LAYER, "ffn_up")


async def test_cursor_keys_and_jumps(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        assert grid.cursor == (0, 0)
        await pilot.press("down", "right", "j", "l")
        assert grid.cursor == (2, 2)
        await pilot.press("up", "k", "left", "h")
        assert grid.cursor == (0, 0)
        await pilot.press("left", "up")  # clamped at the edge
        assert grid.cursor == (0, 0)
        await pilot.press("end")
        assert grid.cursor == (grid.n_rows - 1, grid.n_cols - 1)
        await pilot.press("home")
        assert grid.cursor == (0, 0)
        await pilot.press("pagedown")
        assert grid.cursor == (grid.n_rows - 1, 0)  # 10 rows down, clamped at 7 rows
        await pilot.press("pageup")
        assert grid.cursor == (0, 0)
        await pilot.press("f")
        assert grid.cursor == grid.position(DEFECT_LAYER, "ffn_up")
        # n walks from the worst cosine; N from the best.
        await pilot.press("n")
        worst = min(grid.cells, key=lambda p: grid.values["cosine"][p])
        assert grid.cursor == worst
        await pilot.press("n")
        second = sorted(grid.cells, key=lambda p: grid.values["cosine"][p])[1]
        assert grid.cursor == second
        await pilot.press("N", "N")
        best = grid.cursor
        assert grid.values["cosine"][best] == pytest.approx(1.0)


async def test_metric_key_cycles_the_five_metrics_and_the_legend(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        legend = app.query_one("#legend")
        row, col = grid.position(DEFECT_LAYER, "ffn_up")
        seen = {}
        titles = {}
        for _ in range(5):
            seen[grid.metric] = painted_text(grid, row, col)
            titles[grid.metric] = screen_text(legend)
            await pilot.press("m")
        assert list(seen) == ["cosine", "max_diff", "std_a", "std_ratio", "local"]
        assert grid.metric == "cosine"  # wrapped around
        assert "local error ÷ noise floor" in titles["local"]
        assert seen["local"] == "94444"  # 0.944 relative over the 1e-5 float32 floor
        assert "cosine(A, B)" in titles["cosine"]
        assert "max|A-B|" in titles["max_diff"]
        assert "std of A" in titles["std_a"]
        assert "std ratio A/B" in titles["std_ratio"]
        cell = grid.cells[(row, col)]
        assert seen["cosine"] == "1.0000"  # a pure scale keeps the cosine
        assert seen["std_ratio"] == "0.0556"  # 1/18
        assert float(seen["std_a"]) == pytest.approx(cell.stats_a.std, rel=1e-3)
        assert float(seen["max_diff"]) == pytest.approx(cell.diff.max_abs_diff, rel=0.01)


def painted_text(grid: StageGrid, row: int, col: int) -> str:
    """The characters the grid paints for one cell, read back from its rendered line."""
    line = grid.render_line(1 + row - grid.scroll_offset.y).text
    start = LABEL_WIDTH + col * CELL_WIDTH + 1 - grid.scroll_offset.x
    return line[start : start + CELL_WIDTH - 1].strip()


async def test_enter_opens_the_drill_down_and_escape_returns(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("f", "enter")
        await pilot.pause()
        assert isinstance(app.screen, CellDetailScreen)
        assert (app.screen.cell.layer, app.screen.cell.stage) == (DEFECT_LAYER, "ffn_up")
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, CellDetailScreen)
        assert app.grid.has_focus


async def test_mouse_click_moves_then_opens(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        row, col = grid.position(3, "attn_out")
        offset = (LABEL_WIDTH + col * CELL_WIDTH + 3, 1 + row)
        await pilot.click(StageGrid, offset=offset)
        assert grid.cursor == (row, col)
        assert not isinstance(app.screen, CellDetailScreen)
        await pilot.click(StageGrid, offset=offset)
        await pilot.pause()
        assert isinstance(app.screen, CellDetailScreen)
        assert (app.screen.cell.layer, app.screen.cell.stage) == (3, "attn_out")


@pytest.mark.parametrize("key", ["question_mark", "f1"])
async def test_help_lists_every_binding(demo_pair, key):
    from aprtui.app import ExplorerApp

    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=(150, 60)) as pilot:
        await settle(pilot)
        await pilot.press(key)
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app.screen.query_one("#help-keys"))
        for bindings in (
            ExplorerApp.BINDINGS,
            StageGrid.BINDINGS,
            CellDetailScreen.BINDINGS,
            FileBrowserScreen.BINDINGS,
        ):
            for binding in bindings:
                assert binding.description in text
        for key_name in ("up / k", "down / j", "left / h", "right / l", "shift+n", "space", "esc"):
            assert key_name in text
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


async def test_every_action_is_a_described_binding():
    """The footer and the command palette list bindings by their description."""
    from aprtui.app import ExplorerApp, FilesApp
    from aprtui.screens.help import as_bindings

    for bindings in (
        ExplorerApp.BINDINGS,
        FilesApp.BINDINGS,
        StageGrid.BINDINGS,
        CellDetailScreen.BINDINGS,
        FileBrowserScreen.BINDINGS,
        HelpScreen.BINDINGS,
    ):
        for binding in as_bindings(bindings):
            assert binding.description, binding


async def test_q_quits_cleanly(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0
    assert app.run_spec.stop.is_set()


async def test_ctrl_c_quits_and_stops_a_running_worker(tmp_path):
    """A model deep enough to still be tracing when ctrl+c arrives; a spy counts the captures
    the real engine produced, which must stop short of the whole model."""
    from aprtui.app import make_app
    from engine.formats import apr
    from engine.synth import synthesize

    layers = 48
    model = synthesize("llama", seed=5, num_layers=layers, hidden_size=256, intermediate_size=1024)
    path = apr.write(model, tmp_path / "deep.apr")
    produced = []

    def open_sources():
        a, b = open_pair(path, path, device="cpu")
        real_captures = a.captures

        def counted(*args, **kwargs):
            for capture in real_captures(*args, **kwargs):
                produced.append(capture.stage)
                yield capture

        a.captures = counted
        return a, b

    app = make_app(open_sources, clock=None)
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(6000):  # 60 s at most, then fail loudly
            if produced:
                break
            await pilot.pause(0.01)
        else:
            raise AssertionError("the engine produced no capture within 60 s")
        await pilot.press("ctrl+c")
        await pilot.pause()
    assert app.return_code == 0
    # The engine thread saw the cancel and let go (a bound, not a timing assertion).
    assert app.run_spec.engine_idle.wait(120)
    assert 0 < len(produced) < layers * 17


async def test_single_model_mode_says_so_and_shows_std(demo_pair):
    app = explorer(demo_pair.model_a, None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "single-model mode" in app.sub_title
        grid = app.grid
        assert grid.metric == "std_a"
        assert not grid.has_reference
        await pilot.press("m")
        assert grid.metric == "std_a"  # nothing else to show without a reference
        await pilot.press("f")
        assert grid.cursor == (0, 0)
        # every produced stage of A has its std; the last row holds final_norm and lm_head
        row, col = grid.position(WHOLE_MODEL_LAYER, "lm_head")
        assert grid.values["std_a"][row, col] == pytest.approx(grid.cells[(row, col)].stats_a.std)
        await pilot.press("n")  # largest std first
        stds = {p: grid.values["std_a"][p] for p in grid.cells}
        assert grid.cursor == max(stds, key=stds.get)
        await pilot.press("enter")
        await pilot.pause()
        await workers_done(app)
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, CellDetailScreen)
        assert "largest |A|" in screen_text(screen.query_one("#detail-topk-title"))


async def test_default_trace_dir_is_the_reference_and_b_browses_it(traced):
    from aprtui.commands.explore import resolve_reference

    reference = resolve_reference(traced.model, None)
    assert reference == traced.trace_dir
    app = explorer(traced.model, reference)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.state == "finished"
        grid = app.grid
        assert grid.divergences["std"] == grid.position(DEFECT_LAYER, "ffn_up")
        await pilot.press("b")
        await pilot.pause()
        assert isinstance(app.screen, FileBrowserScreen)
        assert app.screen.directory == traced.trace_dir
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, FileBrowserScreen)


async def test_b_without_a_trace_dir_is_not_offered(demo_pair):
    """Two model files: `b` has nothing to browse, so it is neither shown nor run."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "b" not in app.screen.active_bindings
        await pilot.press("b")
        await pilot.pause()
        assert not isinstance(app.screen, FileBrowserScreen)


async def test_layers_option_limits_the_rows(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b, layers=(1, 4))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        assert grid.row_layers == [1, 2, 3]
        assert {cell.layer for cell in grid.cells.values()} == {1, 2, 3}
        # final_norm / lm_head are not part of a run that stops before the last layer:
        # blank, not "absent"
        row, col = grid.position(WHOLE_MODEL_LAYER, "lm_head")
        assert painted_text(grid, row, col) == ""
        assert grid.divergences["std"] == grid.position(DEFECT_LAYER, "ffn_up")


async def test_local_error_metric_and_origin(demo_pair):
    """The fifth metric is local error over its stage's noise floor; `f` jumps to the origin."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        for _ in range(4):
            await pilot.press("m")
        assert grid.metric == "local"
        origin = grid.position(DEFECT_LAYER, "ffn_up")
        # |1 - 18| / 18 relative against the float32 floor 1e-5 of an exact copy.
        assert grid.values["local"][origin] == pytest.approx((17 / 18) / 1e-5, rel=1e-6)
        others = np.delete(
            grid.values["local"].ravel(), np.ravel_multi_index(origin, grid.values["local"].shape)
        )
        assert np.nanmax(others) < 1.0  # everything else is float32 rounding
        await pilot.press("home")
        await pilot.press("f")
        assert grid.cursor == origin
        assert "local error" in screen_text(app.screen_stack[0].query_one("#legend"))


async def open_logits_screen(app, pilot) -> None:
    """Press `o` and wait for the logits screen (30 s at most, then fail loudly)."""
    from aprtui.screens.logits import LogitsScreen

    await pilot.press("o")
    for _ in range(3000):
        if isinstance(app.screen, LogitsScreen):
            return
        await pilot.pause(0.01)
    raise AssertionError("the logits screen did not open within 30 s")


async def test_output_logits_screen(demo_pair):
    """`o` after a finished run: the per-position logit metrics of both sides in a screen; the
    last position's top-1 of each side is the argmax of that side's own lm_head stage."""
    from aprtui.screens.logits import LogitsScreen
    from engine.stages import WHOLE_MODEL_LAYER

    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await open_logits_screen(app, pilot)
        report = app.screen.report
        seq = len(app.token_ids)
        assert len(report["kl_ab"]) == len(report["top1_a"]) == seq
        last_a = app.source_a.tensor(WHOLE_MODEL_LAYER, "lm_head")
        last_b = app.source_b.tensor(WHOLE_MODEL_LAYER, "lm_head")
        assert report["top1_a"][-1] == int(np.argmax(last_a))
        assert report["top1_b"][-1] == int(np.argmax(last_b))
        assert 0.0 <= report["top1_agreement"] <= 1.0
        await pilot.press("escape")
        assert not isinstance(app.screen, LogitsScreen)


async def test_logit_metrics_progress_shows_in_the_status_line(demo_pair, monkeypatch):
    """While the metrics' worker measures position blocks the status line says how far it is
    (each block posts LogitsProgress); the screen's arrival clears it."""
    import engine.logits as logits_module
    from aprtui.messages import LogitsProgress

    seen: list[str] = []
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        monkeypatch.setattr(logits_module, "LOGIT_BLOCK_BYTES", 8 * app.plan.a.config.vocab_size)
        shown = type(app).on_logits_progress

        def record(self, message: LogitsProgress) -> None:
            shown(self, message)
            seen.append(screen_text(self.query_one("#status")))

        monkeypatch.setattr(type(app), "on_logits_progress", record)  # handlers are looked up
        await open_logits_screen(app, pilot)
        seq = len(app.token_ids)
        assert len(seen) == seq  # one block a position
        assert f"logits ████████ {seq}/{seq}" in seen[-1] and f" 1/{seq}" in seen[0]
        assert "logits" not in screen_text(app.screen_stack[0].query_one("#status"))


async def test_output_logits_key_needs_a_reference(demo_pair):
    app = explorer(demo_pair.model_a, None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.check_action("logits", ()) is False
        await pilot.press("o")
        await pilot.pause()
        assert type(app.screen).__name__ != "LogitsScreen"
