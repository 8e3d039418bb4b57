"""The APRT browser compares traces (issue 10, item 6; issue 8: the UI thread never computes).

Two real trace directories (the healthy and the defective demo model, written by the project's
own writer) open side by side; any two files of one size diff, across layers and across the
two directories; the marks are always on screen and a third is refused; every read and diff
runs in a worker thread, and moving on cancels the worker of the file left behind.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from textual.widgets import Tree

from aprtui.app import FilesApp
from aprtui.screens import file_browser
from engine.aprt import read_aprt
from engine.demo import DEFECT_LAYER
from engine.trace_directory import write_tokens_json
from tests.tui.conftest import SIZE, Notifications, screen_text, write_trace_dir
from tests.tui.test_browser import highlight, settle_workers


@pytest.fixture(scope="module")
def two_traces(demo_pair, tmp_path_factory):
    """(healthy-trace/, defect-trace/): every stage of the demo pair, same tokens."""
    root = tmp_path_factory.mktemp("two-traces")
    good, bad = root / "healthy-trace", root / "defect-trace"
    ids = write_trace_dir(demo_pair.model_a, good)
    write_trace_dir(demo_pair.model_b, bad, token_ids=ids)
    return good, bad


def flat(text: str) -> str:
    return " ".join(text.split())


async def test_two_directories_side_by_side_and_a_diff_between_them(two_traces):
    good, bad = two_traces
    app = FilesApp([good, bad])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.screen
        tree = screen.query_one(Tree)
        assert [str(child.label) for child in tree.root.children] == [
            "A: healthy-trace/",
            "B: defect-trace/",
        ]
        path_a = good / f"layer-{DEFECT_LAYER}" / "ffn_up.bin"
        path_b = bad / f"layer-{DEFECT_LAYER}" / "ffn_up.bin"
        await highlight(pilot, path_a)
        await pilot.press("space")
        await highlight(pilot, path_b)
        await pilot.press("space")
        marks = flat(screen_text(screen.query_one("#aprt-marks")))
        assert f"A healthy-trace/layer-{DEFECT_LAYER}/ffn_up.bin" in marks
        assert f"B defect-trace/layer-{DEFECT_LAYER}/ffn_up.bin" in marks
        assert "d diffs them" in marks
        await pilot.press("d")
        await settle_workers(pilot)
        panel = screen_text(screen.query_one("#aprt-diff"))
    a = read_aprt(path_a).values.astype(np.float64)
    b = read_aprt(path_b).values.astype(np.float64)
    cosine = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
    assert f"{cosine:.10f}" in panel
    assert f"{np.max(np.abs(a - b)):.6e}" in panel  # the planted ×18 shows in max|Δ|
    assert "across layers" not in panel


async def test_same_shape_across_layers_and_directories(two_traces):
    good, bad = two_traces
    app = FilesApp([good, bad])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = await highlight(pilot, good / "layer-1" / "attn_out.bin")
        await pilot.press("space")
        await highlight(pilot, bad / "layer-4" / "attn_out.bin")
        await pilot.press("space", "d")
        await settle_workers(pilot)
        panel = flat(screen_text(screen.query_one("#aprt-diff")))
    assert "A is layer 1, B is layer 4: compared element-wise across layers" in panel
    assert "cosine sim" in panel


async def test_a_third_mark_is_refused_and_said(two_traces):
    good, _ = two_traces
    notes = Notifications()
    app = FilesApp(good)
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await pilot.pause()
        first, second, third = (
            good / "layer-0" / f"{s}.bin" for s in ("attn_norm", "ffn_norm", "attn_out")
        )
        screen = await highlight(pilot, first)
        await pilot.press("space")
        await highlight(pilot, second)
        await pilot.press("space")
        await highlight(pilot, third)
        await pilot.press("space")
        await pilot.pause()
        assert screen.marked == [first, second]  # nothing dropped
        assert any("A and B are already marked" in message for message in notes.messages)
        await pilot.press("c")
        await pilot.pause()
        assert screen.marked == []
        assert "(space marks)" in screen_text(screen.query_one("#aprt-marks"))


async def test_reads_and_diffs_run_off_the_ui_thread(two_traces, monkeypatch):
    good, bad = two_traces
    threads: list[str] = []
    real_stats = file_browser.tensor_stats

    def spy_stats(values):
        threads.append(f"stats:{threading.current_thread() is threading.main_thread()}")
        return real_stats(values)

    import engine.stats

    real_diff = engine.stats.diff_stats

    def spy_diff(*args, **kwargs):
        threads.append(f"diff:{threading.current_thread() is threading.main_thread()}")
        return real_diff(*args, **kwargs)

    monkeypatch.setattr(file_browser, "tensor_stats", spy_stats)
    monkeypatch.setattr(engine.stats, "diff_stats", spy_diff)
    app = FilesApp([good, bad])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await highlight(pilot, good / "layer-0" / "attn_scores.bin")
        await pilot.press("space")
        await highlight(pilot, bad / "layer-0" / "attn_scores.bin")
        await pilot.press("space", "d")
        await settle_workers(pilot)
    assert "stats:False" in threads and "diff:False" in threads
    assert "stats:True" not in threads and "diff:True" not in threads


async def test_moving_on_cancels_the_read_left_behind(two_traces, monkeypatch):
    """The first file's read blocks; the user moves to a second file, which shows; the first
    worker is cancelled and its late result never replaces the second file's."""
    good, _ = two_traces
    slow = good / "layer-0" / "attn_norm.bin"
    fast = good / "layer-0" / "ffn_norm.bin"
    release = threading.Event()
    entered = threading.Event()
    real = file_browser.summarize_file

    def gated(path):
        if path == slow:
            entered.set()
            assert release.wait(30), "the test never released the slow read"
        return real(path)

    monkeypatch.setattr(file_browser, "summarize_file", gated)
    app = FilesApp(good)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.screen
        tree = screen.query_one(Tree)
        node = screen.node_for(slow)
        node.parent.expand()
        await pilot.pause()
        tree.move_cursor(node)
        for _ in range(500):  # bounded: 5 s for the worker to start
            if entered.is_set():
                break
            await pilot.pause(0.01)
        assert entered.is_set()
        slow_workers = [w for w in app.workers if w.group == "aprt-show"]
        assert "reading layer-0/attn_norm.bin" in screen_text(screen.query_one("#aprt-header"))
        await highlight(pilot, fast)  # waits for the fast read; the slow one is still blocked
        header = screen_text(screen.query_one("#aprt-header"))
        assert "layer-0/ffn_norm.bin" in header
        assert all(w.is_cancelled for w in slow_workers)
        release.set()
        await settle_workers(pilot)
        assert "layer-0/ffn_norm.bin" in screen_text(screen.query_one("#aprt-header"))


async def test_an_incomplete_trace_is_named(two_traces, tmp_path):
    import shutil

    good, _ = two_traces
    partial = tmp_path / "partial-trace"
    shutil.copytree(good, partial)
    for layer in range(3, 6):
        shutil.rmtree(partial / f"layer-{layer}")
    for name in ("final_norm.bin", "lm_head.bin"):
        (partial / name).unlink()
    write_tokens_json(partial, [1, 2], None, "model.apr", complete=False)
    notes = Notifications()
    app = FilesApp(partial)
    async with app.run_test(size=SIZE, message_hook=notes) as pilot:
        await pilot.pause()
        marks = flat(screen_text(app.screen.query_one("#aprt-marks")))
        assert "is an incomplete trace" in marks and "layers 0..3" in marks
        assert any("incomplete trace" in message for message in notes.messages)
