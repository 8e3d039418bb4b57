"""Keys as a newcomer meets them (issue 10, items 4, 5 and 11): the command palette lists the
app's own actions and runs them, its Keys entry opens the help screen that esc closes, a key
shows only where it works, and the help screen says where `s` saves."""

from __future__ import annotations

from pathlib import Path

from textual.command import CommandPalette

from aprtui.screens.cell_detail import SAVE_DIR_NAME
from aprtui.screens.file_browser import FileBrowserScreen
from aprtui.screens.help import HelpScreen
from engine.demo import DEFECT_LAYER
from tests.tui.conftest import SIZE, explorer, screen_text, settle

WAIT_STEPS = 400
"""Pauses of 10 ms: the palette's search runs in a worker; 4 s bounds it."""


def command_titles(app) -> list[str]:
    return [command.title for command in app.get_system_commands(app.screen)]


async def test_palette_lists_the_explorers_actions(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        titles = command_titles(app)
        for title in ("Open cell", "Metric", "First divergence", "Next worst", "Next anomaly"):
            assert title in titles
        assert titles.count("Quit") == 1 and "Keys" in titles
        assert "Focus Next" not in titles  # Textual's own bindings stay off the list
        assert "Hide the engine error panel" not in titles  # no error to hide
        assert "Browse APRT" not in titles  # two model files: nothing to browse


async def palette_run(pilot, query: str) -> None:
    """ctrl+p, type `query`, wait (bounded) for a match, enter."""
    app = pilot.app
    await pilot.press("ctrl+p")
    await pilot.pause()
    assert isinstance(app.screen, CommandPalette)
    await pilot.press(*query)
    from textual.command import CommandList

    commands = app.screen.query_one(CommandList)
    for _ in range(WAIT_STEPS):
        if commands.option_count:
            break
        await pilot.pause(0.01)
    else:
        raise AssertionError(f"the palette found nothing for {query!r}")
    await pilot.pause(0.1)
    await pilot.press("enter")
    for _ in range(WAIT_STEPS):
        if not isinstance(app.screen, CommandPalette):
            break
        await pilot.pause(0.01)
    await pilot.pause()
    await pilot.pause()


async def test_palette_runs_metric_and_first_divergence(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        grid = app.grid
        before = grid.metric
        await palette_run(pilot, "metric")
        assert grid.metric != before
        assert grid.cursor == (0, 0)
        await palette_run(pilot, "diverg")
        assert grid.cursor == grid.position(DEFECT_LAYER, "ffn_up")  # the origin


async def test_palette_keys_opens_help_and_escape_closes_it(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await palette_run(pilot, "keys")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, (HelpScreen, CommandPalette))
        assert not app.screen.query("HelpPanel")


async def test_single_model_mode_hides_f_and_m(demo_pair):
    app = explorer(demo_pair.model_a, None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        shown = app.screen.active_bindings
        assert "f" not in shown and "m" not in shown
        assert "n" in shown and "a" in shown and "enter" in shown
        assert "b" not in shown
        titles = command_titles(app)
        assert "First divergence" not in titles and "Metric" not in titles


async def test_b_shows_with_a_trace_directory(traced):
    app = explorer(traced.model, traced.trace_dir)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "b" in app.screen.active_bindings
        assert "Browse APRT" in command_titles(app)
        await pilot.press("b")
        await pilot.pause()
        assert isinstance(app.screen, FileBrowserScreen)
        assert "escape" in app.screen.active_bindings  # back to the grid


async def test_help_screen_wording_and_save_location(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=(150, 60)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        keys = screen_text(app.screen.query_one("#help-keys"))
        assert "Hide error" not in keys
        assert "Hide the engine error panel" in keys
        notes = " ".join(screen_text(app.screen.query_one("#help-mouse")).split())
        assert f"{Path.cwd() / SAVE_DIR_NAME}/" in notes


async def test_explorer_names_an_incomplete_reference(traced, tmp_path):
    """The default trace directory of an interrupted run: the header and a notification say
    it is incomplete (issue 10, item 10)."""
    import shutil

    from engine.trace_directory import write_tokens_json
    from tests.tui.conftest import Notifications

    partial = tmp_path / "model-trace"
    shutil.copytree(traced.trace_dir, partial)
    write_tokens_json(partial, traced.token_ids, None, str(traced.model), complete=False)
    notes = Notifications()
    app = explorer(traced.model, partial)
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await settle(pilot)
        assert "incomplete trace" in app.sub_title
        assert any(f"B: {partial} is an incomplete trace" in m for m in notes.messages)
