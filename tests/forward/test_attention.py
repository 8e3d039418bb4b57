"""The blocked attention path (engine.attention) against HF and against the whole path.

The blocked path normally starts above WHOLE_ATTENTION_LIMIT (1,366 SmolLM2 tokens); here the
limit and the block size are lowered so that seeded HF models of every architecture (GQA and
MHA) run it on a short prompt, with ragged query blocks, and are checked stage by stage against
HF transformers' own eager attention (tests/forward/hf_oracle.py), the independent oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

import engine.attention as attention
from engine.forward import trace
from tests.forward.agreement import TINY_MAX_REL_ERR, disagreements
from tests.forward.hf_oracle import build_hf_model, engine_model, hf_stage_captures

TOKENS = [5, 17, 99, 3, 42, 7, 127, 64, 1, 88, 23]


@pytest.fixture
def blocked(monkeypatch):
    """Every prompt takes the blocked path, 3 query rows per block (11 tokens: a ragged tail)."""
    monkeypatch.setattr(attention, "WHOLE_ATTENTION_LIMIT", 0)
    monkeypatch.setattr(attention, "ATTENTION_BLOCK_BYTES", 3 * len(TOKENS) * 4)


@pytest.mark.parametrize(
    "arch, tied", [("llama", False), ("qwen2", False), ("qwen3", True), ("mistral", False)]
)
def test_blocked_path_matches_hf_every_stage(blocked, arch, tied):
    hf_model = build_hf_model(arch, seed=7, tied=tied)
    expected = hf_stage_captures(hf_model, TOKENS)
    model = engine_model(hf_model)
    captures = list(trace(model, TOKENS))
    kinds = {c.stage: type(c.array) for c in captures}
    assert kinds["attn_softmax"] is attention.AttentionStage  # really the blocked path
    assert attention.block_rows(len(TOKENS)) == 3
    got = {(c.layer, c.stage): np.asarray(c.array) for c in captures}
    assert disagreements(got, expected, max_rel=TINY_MAX_REL_ERR) == []


def test_blocked_and_whole_paths_agree_to_float32_rounding(monkeypatch):
    hf_model = build_hf_model("qwen2", seed=3, tied=False)  # GQA: 4 query heads, 2 KV heads
    model = engine_model(hf_model)
    whole = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, TOKENS)}
    monkeypatch.setattr(attention, "WHOLE_ATTENTION_LIMIT", 0)
    monkeypatch.setattr(attention, "ATTENTION_BLOCK_BYTES", 4 * len(TOKENS) * 4)
    captures = list(trace(model, TOKENS))
    for capture in captures:
        ref = whole[(capture.layer, capture.stage)]
        if isinstance(capture.array, attention.AttentionStage):
            stage = capture.array
            assert stage.shape == ref.shape and stage.nbytes == ref.nbytes
            # blocks arrive in APRT file order and tile the payload exactly once
            offsets, flat = [], []
            for offset, block in stage.blocks():
                offsets.append(offset)
                flat.append(np.asarray(block).reshape(-1))
            assert offsets == sorted(offsets) and offsets[0] == 0
            payload = np.concatenate(flat)
            assert payload.size == ref.size
            # float32 rounding: the blocked path sums over the visible keys only
            np.testing.assert_allclose(payload, ref.reshape(-1), rtol=1e-5, atol=1e-6)
            # exact zeros above the diagonal, as apr writes them
            above = np.triu(np.ones(ref.shape[1:], dtype=bool), k=1)
            assert np.all(payload.reshape(ref.shape)[:, above] == 0.0)
        else:
            np.testing.assert_allclose(capture.array, ref, rtol=2e-5, atol=1e-6)


def test_gqa_without_repeat_matches_a_per_head_loop():
    """attention_scores / attention_context against an explicit per-head numpy loop."""
    rng = np.random.default_rng(1)
    seq, nh, nkv, hd = 6, 6, 2, 4
    q = rng.standard_normal((seq, nh, hd)).astype(np.float32)
    k = rng.standard_normal((seq, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((seq, nkv, hd)).astype(np.float32)
    scores = attention.attention_scores(np, q, k, 0.5)
    probs = attention.causal_softmax(np, scores, attention.causal_mask(np, seq))
    context = attention.attention_context(np, probs, v)
    group = nh // nkv
    for h in range(nh):
        expected = (q[:, h, :].astype(np.float64) @ k[:, h // group, :].T.astype(np.float64)) * 0.5
        np.testing.assert_allclose(scores[h], expected, rtol=1e-6, atol=1e-6)
        masked = np.where(np.triu(np.ones((seq, seq), bool), 1), -np.inf, expected)
        p = np.exp(masked - masked.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(probs[h], p, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            context[:, h * hd : (h + 1) * hd], p @ v[:, h // group, :], rtol=1e-5, atol=1e-6
        )


def test_working_set_is_bounded_by_the_block_budget():
    """The documented budget: a 4,096-token SmolLM2 layer needs ~64 MiB blocked, 3 GB whole."""
    assert attention.use_blocked(9, 4096) and not attention.use_blocked(9, 1024)
    assert attention.attention_peak_bytes(9, 4096) <= 4 * attention.ATTENTION_BLOCK_BYTES
    assert attention.attention_peak_bytes(9, 1024) == 5 * 9 * 1024 * 1024 * 4


def test_streamed_statistics_of_a_lazy_attention_capture(blocked):
    """Diff statistics of a lazy capture, block by block, equal the one-array statistics of its
    materialised array exactly (apr's left-to-right float64 sums across blocks)."""
    from engine.stats import diff_stats, streamed_pair_stats, tensor_stats

    model = engine_model(build_hf_model("llama", seed=2))
    stage = next(c.array for c in trace(model, TOKENS, stages=["attn_softmax"], layers=(1, 2)))
    assert isinstance(stage, attention.AttentionStage)
    whole = np.asarray(stage)
    other = (whole * np.float32(1.001)).astype(np.float32)
    stats_a, stats_b, diff = streamed_pair_stats(stage, other)
    assert diff == diff_stats(whole, other)
    assert stats_a.count == whole.size and stats_a.zero_count == tensor_stats(whole).zero_count
    assert stats_b.std == pytest.approx(tensor_stats(other).std, rel=1e-12)
