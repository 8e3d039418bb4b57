"""NaN/Inf cells and MoE columns, from trace directories compared by the real engine."""

from __future__ import annotations

import shutil

import numpy as np

from engine.aprt import read_aprt, write_stage
from tests.tui.conftest import SIZE, explorer, settle
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
            style = grid._row_segments(row)[2 * col + 1].style
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
