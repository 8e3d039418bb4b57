"""The per-position logit metrics after a comparison: measured a few blocks at once, in order,
and never silent (a long prompt's metrics take seconds after the last cell)."""

from __future__ import annotations

import numpy as np

import engine.logits as logits_module
from aprtui.commands import bisect
from engine.plan import prepare


def test_blocks_measured_at_once_give_the_one_at_a_time_report(monkeypatch):
    rng = np.random.default_rng(7)
    seq, vocab = 11, 300
    a = (rng.standard_normal((seq, vocab)) * 4).astype(np.float32)  # [seq, vocab]
    b = (a + rng.standard_normal((seq, vocab)) * 0.5).astype(np.float32)
    ids = rng.integers(0, vocab, seq).tolist()
    reports, calls = {}, {}
    for workers in (1, 2):
        monkeypatch.setattr(logits_module, "LOGIT_WORKERS", workers)
        seen: list[tuple[int, int]] = []
        reports[workers] = logits_module.logit_report(
            a, b, ids, block=2, progress=lambda done, total, seen=seen: seen.append((done, total))
        )
        calls[workers] = seen
    assert reports[2] == reports[1]
    assert reports[1]["top1_a"] == a.argmax(axis=1).tolist()  # positions in their order
    assert calls[2] == calls[1] == [(stop, seq) for stop in (2, 4, 6, 8, 10, 11)]


def test_piped_bisect_reports_the_logit_metrics_progress(demo_pair, monkeypatch, capsys):
    monkeypatch.setattr(bisect, "PIPED_PROGRESS_EVERY_S", 0.0)  # a line for every step
    with prepare(demo_pair.model_a, demo_pair.model_b, device="cpu") as plan:
        seq = plan.seq_len
        vocab = plan.a.config.vocab_size
        monkeypatch.setattr(logits_module, "LOGIT_BLOCK_BYTES", 8 * vocab * 2)  # 2 positions
        cells = bisect._collect(plan.run(), plan.expected)
        report, lines = bisect.logits_block(plan.a, plan.b, cells)
    err = capsys.readouterr().err.splitlines()
    assert report is not None and len(report["kl_ab"]) == seq and lines
    assert f"apr-tui bisect: {plan.expected}/{plan.expected} cells (whole model lm_head)" in err
    steps = [line for line in err if "logit metrics" in line]
    assert steps[0] == f"apr-tui bisect: logit metrics 2/{seq} positions"
    assert steps[-1] == f"apr-tui bisect: logit metrics {seq}/{seq} positions"
    assert len(steps) == (seq + 1) // 2
