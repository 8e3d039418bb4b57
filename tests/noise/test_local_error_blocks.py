"""The attention recipes of engine.local_error, checked a block of query rows at a time.

Long prompts hand the attention stages over lazily (objects with `.blocks(rows)`); the recipes
must give the same local error from blocks as from whole arrays, and the same as a plain
float64 formula written here.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import local_error
from engine.forward import Capture
from engine.local_error import LocalErrorTracker
from engine.plan import prepare


class LazyStage:
    """A `[heads, seq, seq]` array handed out only through `.blocks(rows)`, in file order."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape
        self.size = array.size

    def blocks(self, rows: int):
        heads, seq, _ = self.shape
        for head in range(heads):
            for start in range(0, seq, rows):
                block = self.array[head, start : start + rows]
                yield (head * seq + start) * seq, np.ascontiguousarray(block)


def checked_errors(captures: list[Capture], model, ids) -> dict[tuple[int, str], float]:
    tracker = LocalErrorTracker(model, tuple(ids), model.config)
    return {(c.layer, c.stage): tracker.observe(c).error for c in captures}


@pytest.fixture(scope="module")
def captures(demo_pair):
    """The defective demo model's captures of layers 0..1 (side B of the demo pair)."""
    with prepare(demo_pair.model_b, None, device="cpu") as plan:
        ids = plan.token_ids
        return [c for c in plan.a.captures() if c.layer in (0, 1)], ids


def test_blocks_and_whole_arrays_agree(demo_pair, captures, monkeypatch):
    caps, ids = captures
    with prepare(demo_pair.model_a, None, device="cpu") as plan:
        model = plan.a.model
        whole = checked_errors(caps, model, ids)
        lazy = [
            Capture(c.layer, c.stage, LazyStage(np.asarray(c.array)), c.shape)
            if c.stage in ("attn_scores", "attn_softmax")
            else c
            for c in caps
        ]
        monkeypatch.setattr(local_error, "ATTENTION_BLOCK_VALUES", 2 * len(ids))  # 2-row blocks
        blocked = checked_errors(lazy, model, ids)
    for key in ("attn_scores", "attn_softmax", "attention"):
        for layer in (0, 1):
            assert blocked[(layer, key)] == pytest.approx(whole[(layer, key)], rel=1e-9, abs=1e-15)


def test_scores_recipe_against_a_plain_formula(demo_pair, captures):
    """Layer 0 attn_scores of B recomputed here with one einsum over the causal entries."""
    caps, ids = captures
    by_stage = {c.stage: np.asarray(c.array, dtype=np.float64) for c in caps if c.layer == 0}
    with prepare(demo_pair.model_a, None, device="cpu") as plan:
        config = plan.a.config
        errors = checked_errors(caps, plan.a.model, ids)
    seq, nh, nkv, hd = len(ids), config.num_heads, config.num_kv_heads, config.head_dim
    q = by_stage["q_post_rope"].reshape(seq, nh, hd)
    k = by_stage["k_post_rope"].reshape(seq, nkv, hd)
    k = np.repeat(k, nh // nkv, axis=1)
    scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(hd)
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    reference = by_stage["attn_scores"].reshape(nh, seq, seq)
    expected = np.linalg.norm(scores[:, causal] - reference[:, causal]) / np.linalg.norm(
        reference[:, causal]
    )
    assert errors[(0, "attn_scores")] == pytest.approx(expected, rel=1e-6)
    assert expected < 1e-5  # our own float32 scores: rounding only


def test_jobs_run_later_and_out_of_order_give_the_stage_by_stage_errors(demo_pair, captures):
    """`tracker.job` hands out each stage's computation over a snapshot of its inputs: run
    after every later capture was recorded, and last job first, they give what `observe`
    gives stage by stage (a job that read the tracker's live state would see the next layer's
    inputs, or its own output, and measure something else)."""
    caps, ids = captures
    with prepare(demo_pair.model_a, None, device="cpu") as plan:
        model = plan.a.model
        in_order = checked_errors(caps, model, ids)
        tracker = LocalErrorTracker(model, tuple(ids), model.config)
        jobs = [((c.layer, c.stage), tracker.job(c)) for c in caps]
        later = {key: job().error for key, job in reversed(jobs)}
    assert later == in_order
    # the demo's planted defect stands out in both, so the errors compared are not all None
    assert sum(error is not None and error > 0 for error in later.values()) > 20


@pytest.mark.parametrize("block_values", [1, 7 * 96, 1 << 19])
def test_linear64_by_blocks_is_the_float64_product_of_the_widened_weight(monkeypatch, block_values):
    """`linear64` widens the weight a block of rows at a time (WEIGHT_BLOCK_VALUES): whatever
    the block, every output is the float64 dot product of a row of x and a row of the weight,
    checked against numpy's product of the whole widened matrices (one row a block, a block
    that splits the rows unevenly, one block for all)."""
    monkeypatch.setattr(local_error, "WEIGHT_BLOCK_VALUES", block_values)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 96))  # [seq, in] float64
    weight = rng.standard_normal((50, 96)).astype(np.float32)  # [out, in]
    expected = np.einsum("si,oi->so", x, weight.astype(np.float64))  # [seq, out]
    got = local_error.linear64(x, weight)
    assert got.shape == (5, 50) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)
