"""The memory plan of a comparison (engine.memory): what a run holds, not the whole-attention
figure, and a refusal only when that does not fit."""

from __future__ import annotations

import re

import pytest

from engine import memory
from engine.errors import TokenizerError
from engine.plan import plan_for
from engine.sources.opening import open_pair

GIB = 1024**3


def test_smollm2_at_4096_tokens_is_planned_within_2_gib(smollm2_gguf, monkeypatch):
    # Whole attention would be 5 x [9, 4096, 4096] float32 = 2.8 GiB per layer and side, the
    # figure this plan used to refuse by; blocks bring a side to ~0.55 GiB.
    monkeypatch.setattr(memory, "available_memory", lambda: 2 * GIB)
    tokens = [10 + i % 4000 for i in range(4096)]
    a, b = open_pair(smollm2_gguf, smollm2_gguf, token_ids=tokens, device="cpu")
    with plan_for(a, b) as plan:
        assert plan.seq_len == 4096
    need = 2 * memory.comparison_peak_bytes(a.config, 4096)
    assert 0.8 * GIB < need < 1.5 * GIB


def test_a_comparison_that_cannot_fit_is_refused_naming_both_models(smollm2_gguf, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 1 * GIB)
    tokens = [10 + i % 4000 for i in range(4096)]
    a, b = open_pair(smollm2_gguf, smollm2_gguf, token_ids=tokens, device="cpu")
    with pytest.raises(TokenizerError, match=r"4096 tokens need about 1\.\d GiB to compare"):
        plan_for(a, b)
    a.close(), b.close()


def test_the_budget_grows_linearly_past_the_whole_path(smollm2_gguf):
    from engine.formats import open_model

    config = open_model(smollm2_gguf).config
    at = {n: memory.comparison_peak_bytes(config, n) for n in (2048, 4096, 8192)}
    # blocked attention: only the dense captures grow, so doubling the prompt less than
    # doubles the need (quadratic growth would quadruple it)
    assert at[4096] < 2 * at[2048] and at[8192] < 2 * at[4096]
    assert at[8192] > 1.5 * at[4096]


def test_a_long_bisect_says_what_it_costs_before_it_runs(apr_tui, smollm2_gguf):
    import subprocess

    tokens = ",".join(str(10 + i % 4000) for i in range(2048))
    result = subprocess.run(
        [*apr_tui, "bisect", str(smollm2_gguf), str(smollm2_gguf), "--layers", "0..1",
         "--tokens", tokens],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr
    first = result.stderr.splitlines()[0]
    # two SmolLM2 sides at 2,048 tokens: blocked attention (~64 MiB) and two layers of dense
    # captures (~250 MiB) each; the whole-attention figure would be 2 x 1.4 GiB
    match = re.match(
        r"apr-tui bisect: 2048 tokens, \d+ cells: about ([\d,]+) MiB of working memory", first
    )
    assert match, first
    assert 400 < int(match.group(1).replace(",", "")) < 900
