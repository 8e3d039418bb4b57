"""engine.drill: a long attention cell's drill-down views, a block at a time, equal to what the
small-cell path computes from whole arrays (checked here on a small lazy capture that can also
be materialised), and a lazy capture saved as APRT a block at a time."""

from __future__ import annotations

import numpy as np
import pytest

from aprtui.widgets.token_strip import per_token_cosine, per_token_rows
from engine.aprt import read_aprt, write_aprt
from engine.attention import AttentionStage
from engine.drill import decade_histogram, streamed_details
from engine.stats import diff_stats

HEADS, SEQ, KV, HD = 4, 40, 2, 8


def lazy_pair(stage: str, seed: int) -> tuple[AttentionStage, AttentionStage]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((SEQ, HEADS, HD)).astype(np.float32)
    k = rng.standard_normal((SEQ, KV, HD)).astype(np.float32)
    q_b = (q + np.float32(0.01) * rng.standard_normal(q.shape)).astype(np.float32)
    return (
        AttentionStage(np, stage, q, k, HD**-0.5),
        AttentionStage(np, stage, q_b, k, HD**-0.5),
    )


class SmallBlocks:
    """A lazy capture whose blocks are 7 query rows: many blocks, some crossing no head edge."""

    def __init__(self, stage: AttentionStage) -> None:
        self.stage, self.shape, self.size = stage, stage.shape, stage.size

    def blocks(self, rows=None):
        return self.stage.blocks(rows or 7)

    def whole(self) -> np.ndarray:
        """The values the blocks hold, flat (a matmul's last bits depend on the block shape,
        so the reference is built from the same blocks)."""
        return np.concatenate([block.ravel() for _, block in self.blocks()])


@pytest.mark.parametrize("stage", ["attn_scores", "attn_softmax"])
def test_streamed_details_equal_the_whole_array_views(stage):
    lazy_a, lazy_b = (SmallBlocks(x) for x in lazy_pair(stage, seed=5))
    a, b = lazy_a.whole(), lazy_b.whole()  # [heads * seq * seq]
    streamed = streamed_details(lazy_a, lazy_b, top_k=20)
    # the small-cell path's own functions, on the whole arrays
    rows_a, rows_b = (per_token_rows(x, (HEADS, SEQ, SEQ), SEQ) for x in (a, b))
    np.testing.assert_allclose(streamed.per_token, per_token_cosine(rows_a, rows_b), rtol=1e-12)
    assert streamed.histogram == decade_histogram(np.abs(a - b))
    assert streamed.top == diff_stats(a, b, limit=20).top_diffs
    assert streamed.cosine and streamed.histogram_title == "|A-B| per decade"


def test_streamed_details_without_a_reference_show_side_a():
    lazy_a = SmallBlocks(lazy_pair("attn_scores", seed=6)[0])
    a = lazy_a.whole()
    streamed = streamed_details(lazy_a, None, top_k=5)
    rows = per_token_rows(a, (HEADS, SEQ, SEQ), SEQ).astype(np.float64)
    np.testing.assert_allclose(streamed.per_token, np.sqrt(np.mean(rows**2, axis=1)), rtol=1e-12)
    largest = np.argsort(-np.abs(a), kind="stable")[:5]
    assert [t.index for t in streamed.top] == largest.tolist()
    assert all(np.isnan(t.b) for t in streamed.top)
    assert streamed.histogram == decade_histogram(np.abs(a))


def test_streamed_details_pair_a_lazy_side_with_an_array_in_apr_convention():
    # A runtime's array keeps -inf (or anything) above the diagonal; the comparison's
    # convention sets it to 0.0, so only the causal entries differ.
    lazy_a, lazy_b = (SmallBlocks(x) for x in lazy_pair("attn_scores", seed=7))
    b = lazy_b.whole().reshape(HEADS, SEQ, SEQ)
    b[:, np.triu(np.ones((SEQ, SEQ), dtype=bool), k=1)] = -1e4
    streamed = streamed_details(lazy_a, b, top_k=3)
    reference = streamed_details(lazy_a, lazy_b, top_k=3)
    assert streamed.top == reference.top
    assert streamed.histogram == reference.histogram


def test_a_lazy_capture_is_saved_block_by_block_as_its_whole_array(tmp_path):
    lazy_a = SmallBlocks(lazy_pair("attn_softmax", seed=8)[0])
    path = write_aprt(tmp_path / "softmax.bin", 3, lazy_a)
    saved = read_aprt(path)
    assert saved.layer == 3
    np.testing.assert_array_equal(saved.values, lazy_a.whole())
