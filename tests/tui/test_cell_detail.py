"""The cell drill-down on real engine tensors: decoded top-K, per-token strip, histogram, save."""

from __future__ import annotations

import numpy as np
import pytest
from textual.widgets import DataTable

from aprtui.screens.cell_detail import CellDetailScreen
from engine.aprt import read_aprt
from engine.formats import open_model
from engine.forward import trace
from engine.stages import WHOLE_MODEL_LAYER
from tests.tui.conftest import SIZE, Notifications, explorer, screen_text, settle, workers_done


async def open_cell(pilot, layer: int, stage: str) -> CellDetailScreen:
    app = pilot.app
    assert app.grid.move_to(layer, stage)
    await pilot.press("enter")
    await pilot.pause()
    await workers_done(app)
    await pilot.pause()
    await pilot.pause()
    screen = app.screen
    assert isinstance(screen, CellDetailScreen)
    assert screen.tensors is not None
    return screen


def forward_stage(path, token_ids: list[int], layer: int, stage: str) -> np.ndarray:
    """One stage of one layer from the engine's forward pass over the model file."""
    with open_model(path) as model:
        (capture,) = trace(model, token_ids, stages=[stage], layers=(layer, layer + 1))
        return np.array(capture.array)


def table_rows(screen: CellDetailScreen) -> list[list[str]]:
    table = screen.query_one("#detail-topk", DataTable)
    return [[str(v) for v in table.get_row_at(i)] for i in range(table.row_count)]


async def test_top_divergences_decode_token_and_channel(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b, save_dir=None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_cell(pilot, 2, "ffn_up")
        a, b = screen.tensors
        seq, inter = screen.cell.shape
        assert a.size == b.size == seq * inter
        # the screen holds layer 2's ffn_up of A and of B, not another stage or the sides swapped:
        # checked against a fresh forward pass of each file (itself checked against HF elsewhere)
        for tensor, path in ((a, demo_pair.model_a), (b, demo_pair.model_b)):
            np.testing.assert_array_equal(
                tensor.reshape(-1), forward_stage(path, app.token_ids, 2, "ffn_up").reshape(-1)
            )
        rows = table_rows(screen)
        assert len(rows) == 20
        delta = np.abs(a - b)
        tokenizer = app.source_a.model.tokenizer
        for rank, (number, index, where, value_a, value_b, abs_diff) in enumerate(rows, 1):
            flat = int(index)
            assert number == str(rank)
            position, channel = divmod(flat, inter)
            text = tokenizer.token_text(app.token_ids[position]).replace("Ġ", "␣")
            assert where == f"token {position} {text!r}, channel {channel}"
            assert float(value_a) == pytest.approx(a[flat], rel=1e-6)
            assert float(value_b) == pytest.approx(b[flat], rel=1e-6)
            assert float(abs_diff) == pytest.approx(delta[flat], rel=1e-6)
        # sorted by |A-B|, the first being the maximum
        assert float(rows[0][5]) == pytest.approx(delta.max(), rel=1e-6)


async def test_attention_scores_decode_head_query_key(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_cell(pilot, 3, "attn_scores")
        heads, seq, _ = screen.cell.shape
        for row in table_rows(screen):
            head, rest = divmod(int(row[1]), seq * seq)
            query, key = divmod(rest, seq)
            assert row[2].startswith(f"head {head}, query {query} ")
            assert f", key {key} " in row[2]


async def test_logits_decode_vocabulary_id_and_text(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_cell(pilot, WHOLE_MODEL_LAYER, "lm_head")
        tokenizer = app.source_a.model.tokenizer
        first = table_rows(screen)[0]
        vocab_id = int(first[1])
        shown = repr(tokenizer.token_text(vocab_id).replace("Ġ", "␣"))[:14]
        assert first[2] == f"vocab {vocab_id} {shown}"
        # lm_head is last-token logits: no token axis for the strip
        assert "no token axis" in screen_text(screen.query_one("#detail-strip"))


async def test_per_token_strip_and_histogram(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_cell(pilot, 3, "attn_norm")
        a, b = screen.tensors
        np.testing.assert_array_equal(
            a.reshape(-1), forward_stage(demo_pair.model_a, app.token_ids, 3, "attn_norm").ravel()
        )
        seq, hidden = screen.cell.shape
        rows_a = a.reshape(seq, hidden).astype(np.float64)
        rows_b = b.reshape(seq, hidden).astype(np.float64)
        cosine = (rows_a * rows_b).sum(1) / np.sqrt((rows_a**2).sum(1) * (rows_b**2).sum(1))
        strip = screen_text(screen.query_one("#detail-strip"))
        values = [float(v) for v in strip.splitlines()[2].split()]
        assert values == pytest.approx(cosine, abs=5e-5)
        histogram = screen_text(screen.query_one("#detail-histogram"))
        counts = [int(line.split()[-1]) for line in histogram.splitlines()[1:] if line.strip()]
        assert sum(counts) == a.size  # every element lands in one decade bin
        delta = np.abs(a - b)
        top_decade = int(np.floor(np.log10(delta.max())))
        assert f"1e{top_decade} " in histogram


async def test_s_saves_both_tensors_as_aprt_without_overwriting(demo_pair, tmp_path):
    save_dir = tmp_path / "saved"
    save_dir.mkdir()
    existing = save_dir / "layer-2-ffn_up-A.bin"
    existing.write_bytes(b"user file")
    app = explorer(demo_pair.model_a, demo_pair.model_b, save_dir=save_dir)
    notes = Notifications()
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await settle(pilot)
        screen = await open_cell(pilot, 2, "ffn_up")
        a, b = screen.tensors
        await pilot.press("s")
        await pilot.press("s")
        await pilot.pause()
        messages = notes.messages
    assert existing.read_bytes() == b"user file"
    names = sorted(p.name for p in save_dir.iterdir())
    assert names == [
        "layer-2-ffn_up-A-1.bin",
        "layer-2-ffn_up-A-2.bin",
        "layer-2-ffn_up-A.bin",
        "layer-2-ffn_up-B-1.bin",
        "layer-2-ffn_up-B.bin",
    ]
    saved_a = read_aprt(save_dir / "layer-2-ffn_up-A-1.bin")
    saved_b = read_aprt(save_dir / "layer-2-ffn_up-B.bin")
    assert saved_a.layer == saved_b.layer == 2
    np.testing.assert_array_equal(saved_a.values, a)
    np.testing.assert_array_equal(saved_b.values, b)
    assert any(str(save_dir / "layer-2-ffn_up-B-1.bin") in m for m in messages)
