"""Narrow terminals (120×36, 100×30): nothing important is cut off and the cursor stays in view.

At 150 columns the whole 20-stage grid fits; below that it scrolls horizontally, by whole
cells, following the cursor. The status line wraps rather than losing its end, the legend keeps
every line, and every footer key stays on screen.
"""

from __future__ import annotations

import pytest
from textual.widgets import Footer

from aprtui.widgets.legend import legend_text
from aprtui.widgets.stage_grid import CELL_WIDTH, LABEL_WIDTH
from aprtui.widgets.status_line import status_text
from engine.stages import WHOLE_MODEL_LAYER
from tests.tui.conftest import explorer, screen_text, settle
from tests.tui.test_explorer import painted_text

NARROW = [(120, 36), (100, 30)]


@pytest.mark.parametrize("size", NARROW, ids=["120x36", "100x30"])
async def test_status_legend_and_footer_are_whole(demo_pair, size):
    width, height = size
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        # status line: every part is on screen, the first divergence included
        status = app.status
        shown = " ".join(screen_text(status).split())
        parts = status_text(status.status).plain.split(" │ ")
        assert any(part.startswith("origin L2 up") for part in parts)
        for part in parts:
            assert " ".join(part.split()) in shown, part
        assert status.region.bottom <= height - 1  # above the footer
        # legend: every line of the key, none wrapped or cut
        legend = app.query_one("#legend")
        # (each rendered line starts with the left border and one column of padding)
        lines = [line[2:].rstrip() for line in screen_text(legend).splitlines()]
        expected = legend_text(app.grid.metric, 0.999, True).plain.splitlines()
        assert lines[: len(expected)] == [line.rstrip() for line in expected]
        # the cell statistics under the grid keep every digit (no `…`), both sides and the diff
        assert app.grid.move_to(WHOLE_MODEL_LAYER, "lm_head")
        await pilot.pause()
        cell = app.grid.cursor_cell
        panel = screen_text(app.query_one("#cell-stats"))
        assert "…" not in panel
        for value in (cell.stats_a.mean, cell.stats_b.mean, cell.stats_a.std, cell.stats_b.std):
            assert f"{value:.6g}" in panel
        assert f"{cell.diff.cosine_sim:.10f}" in panel
        # footer: every key the footer shows lies fully inside the screen
        footer = app.query_one(Footer)
        keys = list(footer.query("FooterKey"))  # CSS type selector: FooterKey is not exported
        assert {key.description for key in keys} >= {
            "Open cell",
            "Metric",
            "First divergence",
            "Next worst",
            "Next anomaly",
            "Quit",
            "Keys",
        }
        # two model files: nothing to browse, so `b` is not offered (check_action)
        assert "Browse APRT" not in {key.description for key in keys}
        for key in keys:
            assert key.region.width > 0 and key.region.right <= width, key.description


async def test_cursor_stays_visible_moving_right_at_100_columns(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        grid = app.grid
        assert LABEL_WIDTH + grid.n_cols * CELL_WIDTH > 100  # the grid does not fit
        await pilot.press(*["j"] * 6)  # the whole-model row: f_norm and logits have values
        row = grid.n_rows - 1
        assert grid.cursor == (row, 0)
        view_right = grid.scrollable_content_region.width
        for step in range(1, 20):
            await pilot.press("l")
            assert grid.cursor == (row, step)
            scroll_x = grid.scroll_offset.x
            left = LABEL_WIDTH + step * CELL_WIDTH - scroll_x
            assert left >= LABEL_WIDTH and left + CELL_WIDTH <= view_right, (step, scroll_x)
            assert scroll_x % CELL_WIDTH == 0  # whole cells: headers stay aligned
        assert grid.scroll_offset.x > 0
        # what is painted there is the last column's value, under its header
        assert painted_text(grid, row, 19) == grid.texts["cosine"][row, 19] == "0.2105"
        header = grid.render_line(0).text
        start = LABEL_WIDTH + 19 * CELL_WIDTH - grid.scroll_offset.x
        assert header[start : start + CELL_WIDTH].strip() == "logits"
        # and back: h scrolls left again to the first column
        await pilot.press(*["h"] * 19)
        assert grid.cursor == (row, 0)
        assert grid.scroll_offset.x == 0


async def test_cursor_stays_visible_moving_down_on_a_short_terminal(demo_pair):
    """16 rows leave the grid fewer lines than layers (and a horizontal scrollbar)."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=(100, 16)) as pilot:
        await settle(pilot)
        grid = app.grid
        rows_in_view = grid.scrollable_content_region.height - 1  # less the header line
        assert rows_in_view < grid.n_rows
        for step in range(1, grid.n_rows):
            await pilot.press("j")
            line = 1 + step - grid.scroll_offset.y
            assert 1 <= line <= rows_in_view, (step, grid.scroll_offset)
        line = grid.render_line(1 + grid.n_rows - 1 - grid.scroll_offset.y).text
        assert line.startswith("model")


# ----------------------------------------------------------------------------- 80×24 (issue 10)


async def test_80x24_shows_the_whole_grid_the_cell_and_the_verdict(demo_pair):
    """The classic terminal: every layer row and the whole-model row are on screen, the cell
    under the cursor reads whole in four lines (no `…`), the verdict is in the status line,
    and the keys that work fit one line; the legend is a key (`i`) away."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        grid = app.grid
        assert app.screen.has_class("-compact")
        assert grid.scrollable_content_region.height - 1 >= grid.n_rows  # every row in view
        await pilot.press("f")
        await pilot.pause()
        cell = grid.cursor_cell
        panel = screen_text(app.query_one("#cell-stats"))
        assert "…" not in panel
        assert "layer 2 · ffn_up" in panel and "cosine 1.0000" in panel
        assert "std A/B 0.0556" in " ".join(panel.split())
        assert cell.stats_b.std == pytest.approx(17.78, abs=0.01)
        assert "B std 17.78" in panel
        status = " ".join(screen_text(app.status).split())
        assert "origin L2 up" in status and "first cosine: L2 res2" in status
        hint = screen_text(app.query_one("#key-hint"))
        assert len(hint.rstrip()) <= 80
        # The metric's name at its key: no legend is on screen to say what the numbers are.
        for part in ("open", "m cosine", "f origin", "i legend", "? all keys", "q quit"):
            assert part in hint
        await pilot.press("m")
        await pilot.pause()
        assert "m max|A-B|" in screen_text(app.query_one("#key-hint"))
        await pilot.press(*"mmmm")  # round the five metrics, back to the cosine
        await pilot.pause()
        assert "m cosine" in screen_text(app.query_one("#key-hint"))
        await pilot.press("i", "i")  # the legend and back: `i` stays in the hint to get back
        await pilot.pause()
        assert "i legend" in screen_text(app.query_one("#key-hint"))
        assert not app.query_one(Footer).display
        legend = app.query_one("#legend")
        assert not legend.display or legend.region.width == 0
        await pilot.press("i")
        await pilot.pause()
        assert legend.region.width > 0
        assert "cosine(A, B)" in screen_text(legend)
        assert app.query_one("#cell-stats").region.width == 0
        await pilot.press("i")
        await pilot.pause()
        assert app.query_one("#cell-stats").region.width > 0


@pytest.mark.parametrize("size", [(160, 45), (220, 60)], ids=["160x45", "220x60"])
async def test_large_terminals_have_no_gap_under_the_grid(demo_pair, size):
    """The grid takes the lines its rows need; the panel under it starts right after and
    shows the cell's local error beside the propagated numbers."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        grid = app.grid
        assert grid.region.height == grid.n_rows + 1  # header + rows; every column fits
        bottom = app.query_one("#bottom")
        assert bottom.region.y == grid.region.bottom
        await pilot.press("f")
        await pilot.pause()
        panel = screen_text(app.query_one("#cell-stats"))
        assert "local (checked side)" in panel and "× floor" in panel
        assert "i" not in app.screen.active_bindings  # the legend is on screen already
