"""The logits screen on a real report: the demo pair (a seeded Llama against its copy with
layer 2's up_proj ×18), every position's logits from the engine, metrics from engine.logits."""

from __future__ import annotations

import pytest
from textual.app import App
from textual.widgets import DataTable

from aprtui.screens.logits import LogitsScreen, kl_score
from engine.logits import pair_logit_report
from engine.sources import open_pair
from engine.stages import WHOLE_MODEL_LAYER


@pytest.fixture(scope="module")
def demo_report(demo_pair):
    a, b = open_pair(demo_pair.model_a, demo_pair.model_b, device="cpu")
    try:
        b.adopt_tokens(a.token_ids)
        for source in (a, b):
            assert source.tensor(WHOLE_MODEL_LAYER, "final_norm") is not None
        report = pair_logit_report(a, b)
        names = a.model.tokenizer.token_text if a.model.tokenizer else None
        return report, list(a.token_ids), names
    finally:
        a.close()
        b.close()


class Host(App):
    def __init__(self, screen: LogitsScreen) -> None:
        super().__init__()
        self.logits_screen = screen

    def on_mount(self) -> None:
        self.push_screen(self.logits_screen)


def test_kl_colour_scale():
    assert kl_score(0.0) == 0.0 and kl_score(1e-6) == 0.0
    assert kl_score(1e-3) == pytest.approx(0.5) and kl_score(5.0) == 1.0


async def test_logits_screen_lists_the_disagreeing_positions(demo_report):
    report, ids, names = demo_report
    assert report is not None and report["positions"] == len(ids)
    app = Host(LogitsScreen(report, ids, names))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        table = app.screen.query_one(DataTable)
        disagree = report["disagreeing_positions"]
        assert table.row_count == max(len(disagree), 1)
        if disagree:
            worst = max(disagree, key=lambda i: report["kl_ab"][i])
            first = table.get_row_at(0)
            assert first[0] == str(worst)
            assert first[3].split()[0] == (
                names(report["top_a"][worst][0]).replace("Ġ", "␣").replace("Ċ", "⏎")
                if names
                else str(report["top_a"][worst][0])
            )
        summary = str(app.screen.query_one("#logits-summary").render())
        assert f"Logits, every position ({len(ids)} positions" in summary
        await pilot.press("escape")
        assert not isinstance(app.screen, LogitsScreen)


def test_logits_screen_snapshot(snap_compare, demo_report):
    report, ids, names = demo_report
    assert snap_compare(Host(LogitsScreen(report, ids, names)), terminal_size=(120, 40))
