"""Engine failures appear in the app as a clear message; the app stays usable and quits cleanly."""

from __future__ import annotations

import re

import pytest

from aprtui.screens.help import HelpScreen
from tests.tui.conftest import SIZE, Notifications, explorer, screen_text, settle


async def assert_failed_and_usable(pilot, notes: Notifications, expected: str) -> None:
    """The engine's one-line error is `expected` (a regular expression, matched whole), the panel
    shows all of it after "The engine stopped:", and the app still answers keys."""
    app = pilot.app
    await settle(pilot)
    assert app.state == "failed"
    panel = app.query_one("#error-panel")
    assert panel.display
    assert re.fullmatch(expected, app.error), app.error
    # the panel wraps long lines inside its border: compare the words
    words = " ".join(screen_text(panel).replace("┃", " ").split())
    assert f"The engine stopped: {' '.join(app.error.split())}" in words
    assert any(n.severity == "error" and n.message == app.error for n in notes)
    assert "failed" in screen_text(app.status)
    # still usable: keys work
    await pilot.press("m", "right")
    assert app.grid.cursor == (0, 1)
    await pilot.press("question_mark")
    await pilot.pause()
    assert isinstance(app.screen, HelpScreen)
    await pilot.press("escape")
    await pilot.pause()
    await pilot.press("escape")  # hides the error panel
    await pilot.pause()
    assert not panel.display
    await pilot.press("q")


async def test_bad_file(truncated_apr, demo_pair):
    app = explorer(truncated_apr, demo_pair.model_b)
    notes = Notifications()
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await assert_failed_and_usable(
            pilot,
            notes,
            re.escape(f"{truncated_apr}: tensor 'model.layers.2.mlp.up_proj.weight' data [")
            + r"\d+, \d+\) lies past the end of the data section \(\d+ bytes\)",
        )
    assert app.return_code == 0


async def test_unsupported_model(unsupported_gguf, demo_pair):
    app = explorer(demo_pair.model_a, unsupported_gguf)
    notes = Notifications()
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await assert_failed_and_usable(
            pilot,
            notes,
            re.escape(
                f"{unsupported_gguf}: unsupported architecture 'gpt2'; "
                "supported: llama, mistral, qwen2, qwen3, qwen2_moe, qwen3_moe, gemma2, gemma3"
            ),
        )
    assert app.return_code == 0


async def test_token_mismatch(traced):
    """The trace dir was made from the default prompt; the model is asked to run other tokens."""
    app = explorer(traced.model, traced.trace_dir, token_ids=[5, 6, 7])
    notes = Notifications()
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await assert_failed_and_usable(
            pilot,
            notes,
            re.escape(
                "token ids differ: model.apr has [5, 6, 7] (3 tokens), model-trace/ has "
                "[261, 263, 35, 53, 46, 53, 66] (7 tokens); "
                "trace both with the same --prompt or --tokens"
            ),
        )
    assert app.return_code == 0


@pytest.mark.parametrize("missing", ["nowhere.apr"])
async def test_missing_file(tmp_path, missing, demo_pair):
    app = explorer(tmp_path / missing, demo_pair.model_b)
    notes = Notifications()
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await assert_failed_and_usable(
            pilot, notes, re.escape(f"{tmp_path / missing}: no such file or directory")
        )
