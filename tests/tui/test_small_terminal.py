"""The explorer at 80×24: a drill-down whose every number reads whole, the grid's own keys only
over the grid, and blank cells that say why they are blank."""

from __future__ import annotations

import math
import re

import numpy as np
from textual.widgets import DataTable

from aprtui.screens.logits import LogitsScreen
from tests.tui.conftest import Notifications, explorer, screen_text, settle, workers_done
from tests.tui.test_cell_detail import open_cell, table_rows

SMALL = (80, 24)


def decade_counts(values: np.ndarray) -> dict[str, int]:
    """|values| per decade, one value at a time (exact zeros left out)."""
    counts: dict[str, int] = {}
    for value in np.abs(values.astype(np.float64)).tolist():
        if value > 0 and math.isfinite(value):
            label = f"1e{math.floor(math.log10(value))}"
            counts[label] = counts.get(label, 0) + 1
    return counts


async def test_the_drill_down_fits_80_columns_with_every_number_whole(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        screen = await open_cell(pilot, 2, "ffn_up")
        a, b = (np.asarray(x, np.float64).ravel() for x in screen.tensors)
        table = screen.query_one("#detail-topk", DataTable)
        assert [str(c.label) for c in table.ordered_columns] == ["#", "where", "A", "B", "|A-B|"]
        assert table.virtual_size.width <= SMALL[0]  # the last column is on screen, whole
        largest = np.sort(np.abs(a - b))[::-1][:20]  # the top-K, from the tensors themselves
        shown = [float(row[4]) for row in table_rows(screen)]
        np.testing.assert_allclose(shown, largest, rtol=1e-4)  # five significant digits
        assert all(re.fullmatch(r"\d\.\d{4}e[+-]\d\d", row[4]) for row in table_rows(screen))

        # The histogram is a few lines under the statistics, every decade with its count.
        assert screen.query_one("#detail-histogram").region.width == 0
        lines = screen.query_one("#detail-histogram-lines")
        assert lines.region.width > 0
        text = screen_text(lines)
        assert max(len(line.rstrip()) for line in text.splitlines()) <= SMALL[0]
        shown_bins = {label: int(count) for label, count in re.findall(r"(1e-?\d+) \S?(\d+)", text)}
        assert shown_bins == decade_counts(a - b)

        stats = screen_text(screen.query_one("#detail-stats"))
        assert max(len(line.rstrip()) for line in stats.splitlines()) <= SMALL[0] - 2
        assert "÷ floor" in stats and "L2 ffn_norm" in stats  # the local error, whole


async def test_a_wide_drill_down_keeps_the_histogram_beside_and_the_flat_index(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=(160, 45)) as pilot:
        await settle(pilot)
        screen = await open_cell(pilot, 2, "ffn_up")
        assert screen.query_one("#detail-histogram").region.width > 0
        assert screen.query_one("#detail-histogram-lines").region.width == 0
        table = screen.query_one("#detail-topk", DataTable)
        labels = [str(c.label) for c in table.ordered_columns]
        assert labels == ["#", "index", "where", "A", "B", "|A-B|"]
        a, b = (np.asarray(x, np.float64).ravel() for x in screen.tensors)
        first = table_rows(screen)[0]
        assert int(first[1]) == int(np.argmax(np.abs(a - b)))


async def test_the_grids_keys_act_only_over_the_grid(demo_pair):
    """`i` in a drill-down does not swap the panel under the grid unseen, and `o` on the
    logits screen opens no second one."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        await open_cell(pilot, 2, "ffn_up")
        await pilot.press("i")
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert not app.screen.has_class("-legend")
        await pilot.press("o")
        await pilot.pause()
        await workers_done(app)
        for _ in range(100):  # the report arrives as a message after the worker ends
            if isinstance(app.screen, LogitsScreen):
                break
            await pilot.pause(0.05)
        assert isinstance(app.screen, LogitsScreen)
        await pilot.press("o")
        await pilot.pause()
        await workers_done(app)
        await pilot.pause()
        assert [type(s) for s in app.screen_stack].count(LogitsScreen) == 1


async def test_a_blank_cell_says_why_it_is_blank(demo_pair):
    notes = Notifications()
    app = explorer(demo_pair.model_a, demo_pair.model_a)  # a model against itself: no divergence
    async with app.run_test(size=SMALL, message_hook=notes) as pilot:
        await settle(pilot)
        assert app.grid.move_to(1, "embedding")  # the embedding is layer 0's only
        await pilot.pause()
        assert "no such cell" in screen_text(app.query_one("#cell-stats"))
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is app.screen_stack[0]
        assert any("no such cell" in message for message in notes.messages)
        await pilot.press("f")
        await pilot.pause()
        # The run is over: "no divergence", not "no divergence so far".
        assert any(m.startswith("no divergence (every cosine") for m in notes.messages)


async def test_a_diff_in_the_file_browser_shows_at_80x24(traced):
    """Was: `d` drew the diff below the file's preview, out of view, and nothing seemed to
    happen; now its first lines are brought into view."""
    from aprtui.app import FilesApp
    from tests.tui.test_browser import highlight, settle_workers

    app = FilesApp(traced.trace_dir)
    async with app.run_test(size=SMALL) as pilot:
        await pilot.pause()
        await highlight(pilot, traced.trace_dir / "layer-2" / "ffn_gate.bin")
        await pilot.press("space")
        await highlight(pilot, traced.trace_dir / "layer-2" / "ffn_up.bin")
        await pilot.press("space", "d")
        await settle_workers(pilot)
        await pilot.pause()
        detail = app.screen.query_one("#aprt-detail")
        panel = app.screen.query_one("#aprt-diff")
        shown = detail.content_region
        assert shown.y <= panel.region.y < shown.bottom - 3  # its first lines on screen
        assert "cosine sim" in screen_text(panel)


def test_a_grid_column_cut_at_the_edge_is_not_drawn_in_part():
    """Was: 0.4615 cut at the right edge read `0.4`; a cut column is blank, with `›`."""
    from rich.segment import Segment
    from textual.strip import Strip

    from aprtui.widgets.stage_grid import CELL_WIDTH, MORE_COLUMNS, whole_columns

    cells = ["1.0000", "0.4615", "0.9999"]
    line = Strip([Segment(f"{text:>{CELL_WIDTH}}") for text in cells])
    seen = whole_columns(line, 0, 2 * CELL_WIDTH - 3, None).text  # 1 whole, 1 cut
    assert seen.split() == ["1.0000", MORE_COLUMNS]
    assert len(seen) == 2 * CELL_WIDTH - 3
    scrolled = whole_columns(line, CELL_WIDTH - 2, 2 * CELL_WIDTH + 2, None).text  # cut left
    assert scrolled.split() == ["0.4615", "0.9999"]
    assert whole_columns(line, 0, 3 * CELL_WIDTH, None).text.split() == cells  # all fit


async def test_the_legend_shows_whole_under_a_deep_grid(tmp_path):
    """Was: at 80×24 on a 30-layer model `i` showed 4 of the legend's 8 lines (the marks `!`,
    `·`, `▶` never explained); the legend now gets its lines and the grid scrolls."""
    from engine.formats import apr
    from engine.synth import synthesize

    model = synthesize("llama", seed=2, num_layers=30, hidden_size=32, intermediate_size=64)
    path = apr.write(model, tmp_path / "deep.apr")
    app = explorer(path, path)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        await pilot.press("i")
        await pilot.pause()
        legend = app.query_one("#legend")
        lines = [line for line in screen_text(legend).splitlines() if line.strip()]
        assert any("origin / first divergence" in line for line in lines)  # its last line
        # ... and every line of it on screen, beside the verdict (the status line), not over it
        visible = legend.region.intersection(app.screen.region)
        assert visible.height >= len(lines), (visible, lines)
        status = app.status.region
        assert status.bottom <= SMALL[1] and not status.overlaps(legend.region)
        assert "done" in screen_text(app.status)
        await pilot.press("i")
        await pilot.pause()
        assert app.query_one("#cell-stats").region.width > 0


def test_the_histogram_lines_join_runs_of_empty_decades():
    """An attention cell's |Δ| can span 1e-40 to 1e2: its empty decades are one bin, so the
    largest decades and NaN/Inf stay on a narrow screen."""
    from aprtui.widgets.histogram import histogram_lines

    bins = [(f"1e{d}", 0 if -39 < d < -4 else 5) for d in range(-40, 3)] + [("NaN/Inf", 2)]
    text = histogram_lines(bins, "|A-B| per decade", 78).plain
    assert len(text.splitlines()) <= 3
    assert "1e-38…1e-5 0" in text and "1e-6" not in text
    for label, count in bins:
        if count:
            assert re.search(rf"(^|\s){re.escape(label)} \S{count}(\s|$)", text), label


async def test_no_grid_number_is_cut_beside_a_vertical_scroll_bar(tmp_path):
    """Was: with a scroll bar (a 30-layer grid at 83×24) the column under it counted as
    whole and read `1.000` for 1.0000."""
    from engine.formats import apr
    from engine.synth import synthesize

    model = synthesize("llama", seed=2, num_layers=30, hidden_size=32, intermediate_size=64)
    path = apr.write(model, tmp_path / "deep.apr")
    app = explorer(path, path)
    async with app.run_test(size=(83, 24)) as pilot:
        await settle(pilot)
        grid = app.grid
        visible = grid.scrollable_content_region.width
        assert visible < grid.size.width  # the scroll bar is there
        for y in range(1, grid.scrollable_content_region.height):
            text = grid.render_line(y).text[:visible]
            numbers = re.findall(r"\d+\.\d*", text)
            assert numbers and all(re.fullmatch(r"\d\.\d{4}", n) for n in numbers), text
