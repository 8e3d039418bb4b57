"""A 4,096-token explorer run on SmolLM2: the cursor moves while the grid fills, and the
drill-down opens on an attention cell (`[9, 4096, 4096]`, 604 MB a side) without ever holding
it whole: every view is computed a block at a time (engine.drill)."""

from __future__ import annotations

import asyncio

import pytest

from aprtui.screens.cell_detail import CellDetailScreen
from engine.attention import AttentionStage
from tests.tui.conftest import SIZE, explorer, screen_text, settle

TOKENS = [10 + (i * 7919) % 40_000 for i in range(4096)]


@pytest.fixture(scope="module")
def smollm2_copy(smollm2_gguf, tmp_path_factory):
    from engine.formats import apr, open_model

    with open_model(smollm2_gguf) as model:
        return apr.write(model, tmp_path_factory.mktemp("copy") / "copy-q8.apr", dtype="q8_0")


async def wait_until(pilot, predicate, what: str, timeout: float = 300.0) -> None:
    """Pause until predicate() holds; fail loudly after `timeout` seconds."""
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


async def test_4096_tokens_cursor_moves_while_filling_and_attention_drills_down(
    smollm2_gguf, smollm2_copy, monkeypatch
):
    def never_whole(self):  # a long prompt's attention is never materialised
        raise AssertionError("an attention capture of 4096 tokens was materialised whole")

    monkeypatch.setattr(AttentionStage, "materialize", never_whole)
    app = explorer(smollm2_gguf, smollm2_copy, token_ids=TOKENS, layers=(0, 1))
    async with app.run_test(size=SIZE) as pilot:
        grid = app.grid
        await wait_until(pilot, lambda: grid.done_count >= 1, "the first cell")
        start = grid.cursor
        await pilot.press("down", "right")
        await pilot.pause()
        moved, done_then = grid.cursor, grid.done_count
        assert moved != start
        assert done_then < grid.expected_count  # the keys were handled mid-run
        await settle(pilot, timeout=600)
        assert app.state == "finished", app.error
        assert grid.move_to(0, "attn_softmax")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: isinstance(app.screen, CellDetailScreen) and app.screen.tensors is not None,
            "the attention drill-down",
        )
        screen = app.screen
        await asyncio.wait_for(app.workers.wait_for_complete(), 60)
        await pilot.pause()
        histogram = screen_text(screen.query_one("#detail-histogram"))
        assert "|A-B| per decade" in histogram
        strip = screen_text(screen.query_one("#detail-strip"))
        assert "of 4096 positions, binned" in strip  # the heat strip, 100 bins
        assert screen.tensors is not None
        a, b = screen.tensors
        assert hasattr(a, "blocks") and hasattr(b, "blocks")  # still lazy, never arrays
        await pilot.press("escape", "q")
