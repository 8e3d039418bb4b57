"""NaN/Inf cells, apr's anomaly flags and MoE columns, on real models and trace directories."""

from __future__ import annotations

import shutil

import numpy as np

from aprtui.screens.cell_detail import CellDetailScreen
from engine.aprt import read_aprt, write_stage
from tests.tui.conftest import (
    SIZE,
    Notifications,
    explorer,
    painted_gap,
    painted_style,
    screen_text,
    settle,
    workers_done,
)
from tests.tui.test_explorer import painted_text


async def test_nan_cells_stand_out_in_every_metric(traced, tmp_path):
    broken = tmp_path / "broken-trace"
    shutil.copytree(traced.trace_dir, broken)
    values = read_aprt(broken / "layer-1" / "ffn_out.bin").values.copy()
    values[3] = np.nan
    write_stage(broken, "ffn_out", 1, values)
    app = explorer(traced.trace_dir, broken)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        row, col = grid.position(1, "ffn_out")
        for _ in range(4):
            assert painted_text(grid, row, col) == "NaN"
            style = painted_style(grid, row, col)
            assert tuple(style.bgcolor.get_truecolor()) == (255, 0, 255)  # magenta
            await pilot.press("m")
        # the NaN cell is the worst: n goes there first
        await pilot.press("n")
        assert grid.cursor == (row, col)


async def test_moe_stage_adds_a_column(traced, tmp_path):
    sides = []
    for name in ("moe-a", "moe-b"):
        directory = tmp_path / name
        shutil.copytree(traced.trace_dir, directory)
        write_stage(directory, "moe_router", 0, np.array([0.75, 0.25], np.float32))
        sides.append(directory)
    app = explorer(*sides)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        assert "moe_router" in grid.stages
        # MoE columns keep the canonical order: after post_ffn_residual, before final_norm
        assert grid.stages.index("moe_router") == grid.stages.index("post_ffn_residual") + 1
        row, col = grid.position(0, "moe_router")
        assert painted_text(grid, row, col) == "1.0000"
        header = grid.render_line(0).text
        assert "router" in header


def breaks_a_rule(stats, stage: str) -> bool:
    """apr's §3.4 rules, written out here independently of aprtui.anomalies."""
    return (
        stats.nan_count > 0
        or stats.inf_count > 0
        or (stats.count > 1 and stats.std < 1e-8)
        or stats.max_abs > 100
        or abs(stats.mean) > 10
        or (stage == "post_ffn_residual" and stats.std > 100)
    )


async def test_planted_high_variance_is_flagged_in_single_model_mode(loud_model):
    app = explorer(loud_model, None)
    notes = Notifications()
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await settle(pilot)
        grid = app.grid
        assert not grid.has_reference
        row, res2 = grid.position(1, "post_ffn_residual")
        std = grid.cells[(row, res2)].stats_a.std
        assert std > 100  # the ×1000 up_proj reaches the layer output: HIGH-VAR
        flagged = sorted(p for p, c in grid.cells.items() if breaks_a_rule(c.stats_a, c.stage))
        assert (row, res2) in flagged
        assert all(r > 0 for r, _ in flagged)  # layer 0 is untouched
        # flagged cells carry the marker, the others do not
        for position, cell in grid.cells.items():
            expected = "!" if position in flagged else " "
            assert painted_gap(grid, *position) == expected, (cell.layer, cell.stage)
        assert tuple(painted_style(grid, row, res2, gap=True).bgcolor.get_truecolor()) == (
            255,
            215,
            0,
        )
        # the HIGH-VAR layer's label is gold; layer 0's is not
        label = list(grid.render_line(1 + row))[0]
        assert label.text.strip() == "L1"
        assert tuple(label.style.color.get_truecolor()) == (255, 215, 0)
        layer0 = list(grid.render_line(1))[0]
        assert layer0.text.strip() == "L0"
        assert layer0.style.color != label.style.color

        # `a` walks the flagged cells in computation order, then wraps around
        assert grid.cursor == (0, 0)
        for position in flagged[:3]:
            await pilot.press("a")
            assert grid.cursor == position
        grid.cursor = flagged[-1]
        await pilot.press("a")
        assert grid.cursor == flagged[0]
        assert any(m.startswith(f"1 of {len(flagged)}: A: ") for m in notes.messages)

        # the stats panel says what is wrong, in words
        assert grid.move_to(1, "post_ffn_residual")
        await pilot.pause()
        panel = screen_text(app.query_one("#cell-stats"))
        assert "A: large values" in panel and "HIGH-VAR" in panel

        # and so does the drill-down, with the evidence
        await pilot.press("enter")
        await pilot.pause()
        await workers_done(app)
        await pilot.pause()
        assert isinstance(app.screen, CellDetailScreen)
        flags = screen_text(app.screen.query_one("#detail-flags"))
        assert f"A: HIGH-VAR — layer output std {std:.6g} > 100" in flags
        max_abs = grid.cells[(row, res2)].stats_a.max_abs
        assert f"A: large values — max|x| {max_abs:.6g} > 100" in flags


async def test_nan_in_a_trace_dir_is_flagged_alone(traced, tmp_path):
    broken = tmp_path / "nan-trace"
    shutil.copytree(traced.trace_dir, broken)
    values = read_aprt(broken / "layer-3" / "attn_out.bin").values.copy()
    values[[0, 5]] = np.nan
    write_stage(broken, "attn_out", 3, values)
    app = explorer(broken, None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        position = grid.position(3, "attn_out")
        flagged = sorted(p for p, c in grid.cells.items() if breaks_a_rule(c.stats_a, c.stage))
        assert position in flagged
        # the first flagged cell after the cursor: set the cursor just before it
        row, col = position
        grid.cursor = (row, col - 1)
        await pilot.press("a")
        assert grid.cursor == position
        await pilot.pause()
        panel = screen_text(app.query_one("#cell-stats"))
        assert "A: NaN" in panel
        assert painted_gap(grid, row, col) == "!"


async def test_a_without_flags_says_so(demo_pair):
    """The healthy small demo model alone breaks no rule: `a` only explains."""
    app = explorer(demo_pair.model_a, None)
    notes = Notifications()
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await settle(pilot)
        grid = app.grid
        assert not any(breaks_a_rule(c.stats_a, c.stage) for c in grid.cells.values())
        await pilot.press("l", "a")
        assert grid.cursor == (0, 1)
        assert any("no cell breaks an anomaly rule" in m for m in notes.messages)


async def test_side_b_is_flagged_in_compare_mode(demo_pair):
    """Side B's ×18 up_proj pushes layer 2's swigl past 100; A stays below."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        flagged = sorted(
            p
            for p, c in grid.cells.items()
            if breaks_a_rule(c.stats_a, c.stage) or breaks_a_rule(c.stats_b, c.stage)
        )
        swigl = grid.position(2, "ffn_swigl")
        cell = grid.cells[swigl]
        assert cell.stats_b.max_abs > 100 >= cell.stats_a.max_abs
        assert flagged == [swigl]
        await pilot.press("a")
        assert grid.cursor == swigl
        await pilot.pause()
        assert "B: large values" in screen_text(app.query_one("#cell-stats"))
        assert painted_gap(grid, *swigl) == "!"
