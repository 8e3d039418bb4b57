"""The APRT browser (`apr-tui files DIR`, and `b` in the explorer) on a real trace directory."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from textual.widgets import Tree

from aprtui.app import FilesApp
from aprtui.screens.file_browser import FileBrowserScreen
from aprtui.screens.help import HelpScreen
from engine.aprt import read_aprt
from tests.tui.conftest import SIZE, Notifications, screen_text, workers_done


async def highlight(pilot, path):
    screen = pilot.app.screen
    tree = screen.query_one(Tree)
    node = screen.node_for(path)
    assert node is not None
    node.parent.expand()
    await pilot.pause()
    tree.move_cursor(node)
    await pilot.pause()
    await settle_workers(pilot)
    return screen


async def settle_workers(pilot) -> None:
    """Wait for the browser's workers (file summary, diff) and draw their results."""
    await workers_done(pilot.app)
    await pilot.pause()
    await pilot.pause()


async def test_tree_lists_layers_and_whole_model_files(traced):
    app = FilesApp(traced.trace_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, FileBrowserScreen)
        tree = screen.query_one(Tree)
        labels = [str(child.label) for child in tree.root.children]
        assert labels[:6] == [f"layer-{n}" for n in range(6)]
        assert "final_norm" in labels and "lm_head" in labels
        layer0 = tree.root.children[0]
        assert [str(c.label) for c in layer0.children][:3] == [
            "embedding",
            "attn_norm",
            "qkv_matmul",
        ]


async def test_highlight_shows_header_stats_and_values(traced):
    path = traced.trace_dir / "layer-1" / "ffn_up.bin"
    raw = path.read_bytes()  # APRT: magic, u32 layer, u32 count, f32 values (§1.1)
    values = np.frombuffer(raw[12:], dtype="<f4")
    assert raw[4:12] == struct.pack("<II", 1, values.size)
    app = FilesApp(traced.trace_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = await highlight(pilot, path)
        header = screen_text(screen.query_one("#aprt-header"))
        assert [line.rstrip() for line in header.splitlines()] == [
            "file         layer-1/ffn_up.bin",
            "layer        1",
            f"dim_product  {values.size}",
            f"size         {12 + 4 * values.size} bytes",
        ]
        stats = screen_text(screen.query_one("#aprt-stats"))
        std_line = next(line for line in stats.splitlines() if line.strip().startswith("std"))
        assert float(std_line.split()[1]) == pytest.approx(np.std(values, ddof=1), rel=1e-4)
        preview = screen_text(screen.query_one("#aprt-preview"))
        assert f"{values[0]:+.4e}" in preview


async def test_mark_two_and_diff_like_apr(traced, demo_pair, tmp_path):
    ours = traced.trace_dir / "layer-2" / "ffn_up.bin"
    a = read_aprt(ours).values.astype(np.float64)
    app = FilesApp(traced.trace_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await highlight(pilot, ours)
        await pilot.press("space")
        other = traced.trace_dir / "layer-3" / "ffn_up.bin"
        screen = await highlight(pilot, other)
        await pilot.press("space")
        assert screen.marked == [ours, other]
        await pilot.press("d")
        await settle_workers(pilot)
        panel = screen_text(screen.query_one("#aprt-diff"))
        # same size, different layers: diffed, and the panel says so (apr diff would refuse)
        assert "A is layer 2, B is layer 3" in " ".join(panel.split())
        assert "cosine sim" in panel
        await pilot.press("space")  # unmark layer-3
        sized = traced.trace_dir / "layer-2" / "attn_norm.bin"
        await highlight(pilot, sized)
        await pilot.press("space", "d")
        await settle_workers(pilot)
        panel = screen_text(screen.query_one("#aprt-diff"))
        assert "APRT dim_product mismatch" in panel
        await pilot.press("space")  # unmark attn_norm
        same = traced.trace_dir / "layer-2" / "ffn_gate.bin"
        await highlight(pilot, same)
        await pilot.press("space", "d")
        await settle_workers(pilot)
        panel = screen_text(screen.query_one("#aprt-diff"))
    b = read_aprt(same).values.astype(np.float64)
    cosine = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
    assert f"{cosine:.10f}" in panel
    assert f"{np.max(np.abs(a - b)):.6e}" in panel


async def test_d_with_fewer_than_two_marks_explains(traced):
    app = FilesApp(traced.trace_dir)
    notes = Notifications()
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await pilot.pause()
        assert not notes
        await pilot.press("d")
        await pilot.pause()
        assert any("mark two files" in message for message in notes.messages)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "escape")  # escape on the standalone browser stays
        await pilot.pause()
        assert isinstance(app.screen, FileBrowserScreen)
        await pilot.press("q")
    assert app.return_code == 0


async def test_not_a_trace_dir_is_shown_not_raised(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    app = FilesApp(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        header = screen_text(app.screen.query_one("#aprt-header"))
        assert "no APRT stage files" in header and str(tmp_path) in header


async def test_files_app_f1_help_and_ctrl_c(traced):
    app = FilesApp(traced.trace_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app.screen.query_one("#help-keys"))
        assert "Mark A / B" in text and "Diff A with B" in text and "Clear marks" in text
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("ctrl+c")
    assert app.return_code == 0


async def test_a_file_that_breaks_an_anomaly_rule_says_so(traced, tmp_path):
    import shutil

    from engine.aprt import write_stage

    directory = tmp_path / "nan-trace"
    shutil.copytree(traced.trace_dir, directory)
    values = read_aprt(directory / "layer-3" / "attn_out.bin").values.copy()
    values[7] = np.nan
    write_stage(directory, "attn_out", 3, values)
    app = FilesApp(directory)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = await highlight(pilot, directory / "layer-3" / "attn_norm.bin")
        healthy = screen_text(screen.query_one("#aprt-stats"))
        assert "count" in healthy and "A: " not in healthy
        await highlight(pilot, directory / "layer-3" / "attn_out.bin")
        flagged = screen_text(screen.query_one("#aprt-stats"))
        assert "! A: NaN" in flagged
        assert f"count {values.size}" in " ".join(flagged.split())
