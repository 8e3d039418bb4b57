"""Causal self-attention of one prefill, whole or in blocks, and its `[heads, seq, seq]` stages.

Two ways to compute the same numbers:

* whole (`attention_scores`, `causal_softmax`, `attention_context`): every head's full
  `[seq, seq]` score matrix at once; fastest for short prompts, but one layer holds
  ATTENTION_COPIES such arrays at its peak, which grows with seq² (5 × 604 MB for a
  4,096-token SmolLM2 prompt);
* blocked (`blocked_context`, `AttentionStage`): one head and one block of query rows at a
  time, so the working set is a few `[rows, seq]` blocks of at most ATTENTION_BLOCK_BYTES
  whatever the prompt length. The `attn_scores` / `attn_softmax` captures are then
  `AttentionStage` objects that recompute their blocks on demand, in the APRT file's order
  (head-major, then query rows), for streaming statistics and streaming writers; they also
  materialise through `np.asarray` for consumers that need the whole array.

GQA is a reshape, never a copy of K or V: query head h reads KV head h // group, so the
`group` consecutive query heads of one KV head are stacked into one matrix against that KV
head's keys (`[nkv, group·seq, hd] @ [nkv, hd, seq]`).

Every row of every block is the same arithmetic as the whole path (scores = q·kᵀ·scale over
hd, row max subtracted, exp, row sum, divide); tests/forward/test_attention.py checks the two
agree to float32 rounding and HF's oracle tests check both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

Array = Any
"""A numpy or CuPy ndarray."""

ATTENTION_COPIES = 5
"""`[heads, seq, seq]` float32 arrays one layer's whole-path attention holds at its peak: the
raw scores, the masked copy, the shifted copy, the exponentials and the normalised weights."""

ATTENTION_BLOCK_BYTES = 16 * 1024 * 1024
"""Bytes of one `[rows, seq]` float32 block of the blocked path (1,024 query rows at 4,096
tokens). About 4 such blocks are live at once (scores, shifted, exponentials, weights), so the
blocked path's working set is ~64 MiB whatever the prompt length."""

WHOLE_ATTENTION_LIMIT = 64 * 1024 * 1024
"""A layer whose `[heads, seq, seq]` float32 array is larger than this runs the blocked path
(SmolLM2's 9 heads: above 1,365 tokens); below it the whole path is used, byte for byte the
pass of earlier releases."""


def use_blocked(num_heads: int, seq_len: int, limit: int | None = None) -> bool:
    """True when one `[heads, seq, seq]` float32 array exceeds `limit` bytes
    (WHOLE_ATTENTION_LIMIT, read at call time, when None)."""
    limit = WHOLE_ATTENTION_LIMIT if limit is None else limit
    return num_heads * seq_len * seq_len * 4 > limit


def attention_peak_bytes(num_heads: int, seq_len: int, limit: int | None = None) -> int:
    """Bytes of attention working set one layer needs: ATTENTION_COPIES whole arrays on the
    whole path, about 4 blocks on the blocked one."""
    if use_blocked(num_heads, seq_len, limit):
        return 4 * block_rows(seq_len) * seq_len * 4
    return ATTENTION_COPIES * num_heads * seq_len * seq_len * 4


def block_rows(seq_len: int, budget: int | None = None) -> int:
    """Query rows per block so that one `[rows, seq]` float32 block fits `budget` bytes
    (ATTENTION_BLOCK_BYTES, read at call time, when None)."""
    budget = ATTENTION_BLOCK_BYTES if budget is None else budget
    return max(1, min(seq_len, budget // (4 * max(seq_len, 1))))


# ------------------------------------------------------------------------------ whole path


def _grouped_queries(xp: Any, q: Array, nkv: int) -> Array:
    """q [seq, nh, hd] as [nkv, group·seq, hd]: each KV head's query heads stacked (a copy of
    q only, which is seq × nh × hd; K and V are never repeated)."""
    seq, nh, hd = q.shape
    heads = xp.ascontiguousarray(q.transpose(1, 0, 2))  # [nh, seq, hd]
    return heads.reshape(nkv, (nh // nkv) * seq, hd)


def attention_scores(xp: Any, q: Array, k: Array, scale: float) -> Array:
    """`q·kᵀ·scale` for every query head, [nh, seq, seq], over all positions (mask applied later).

    q [seq, nh, hd], k [seq, nkv, hd]. GQA as HF `repeat_kv`: query head h reads KV head
    h // (nh / nkv), so consecutive query heads share one KV head.
    """
    seq, nh, _ = q.shape
    nkv = k.shape[1]
    keys = k.transpose(1, 2, 0)  # [nkv, hd, seq], a view
    scores = _grouped_queries(xp, q, nkv) @ keys  # [nkv, group·seq, seq]
    scores *= xp.float32(scale)
    return scores.reshape(nh, seq, k.shape[0])


def causal_mask(xp: Any, seq_len: int, window: int | None = None) -> Array:
    """True where query i may not see key j: the future (j > i) and, with a sliding `window`,
    keys `window` or more positions back (j <= i - window, HF's `sliding_window_overlay` and
    llama.cpp's SWA mask). [seq, seq] bool."""
    blocked = xp.triu(xp.ones((seq_len, seq_len), dtype=bool), k=1)
    if window is not None:
        blocked |= xp.tril(xp.ones((seq_len, seq_len), dtype=bool), k=-window)
    return blocked


def causal_softmax(xp: Any, scores: Array, future: Array) -> Array:
    """Row softmax of scores [..., seq, seq] over the keys `future` leaves visible
    (`causal_mask`: j <= i, within a window); exactly 0.0 at every blocked key.

    In place on one new array: the same operations in the same order as four out-of-place
    steps, bit for bit, without three more `[nh, seq, seq]` arrays to allocate and fault in
    (at 1,024 tokens 1.8x faster)."""
    weights = xp.where(future, -xp.inf, scores)  # [..., seq, seq]
    weights -= weights.max(axis=-1, keepdims=True)  # the diagonal is always finite
    xp.exp(weights, out=weights)  # exp(-inf) = 0 for future keys
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights


def attention_context(xp: Any, probs: Array, v: Array) -> Array:
    """`probs · v` per head, laid out token-major as o_proj reads it: [seq, nh * hd].

    probs [nh, seq, seq], v [seq, nkv, hd], with the same GQA grouping as `attention_scores`.
    """
    nh, seq, _ = probs.shape
    nkv, hd = v.shape[1], v.shape[2]
    grouped = probs.reshape(nkv, (nh // nkv) * seq, seq)  # a view: heads are consecutive
    context = grouped @ v.transpose(1, 0, 2)  # [nkv, group·seq, hd]
    context = context.reshape(nh, seq, hd)
    return xp.ascontiguousarray(context.transpose(1, 0, 2)).reshape(seq, nh * hd)


# ---------------------------------------------------------------------------- blocked path


def _row_block(
    xp: Any, q: Array, k: Array, head: int, start: int, stop: int, scale: float, want: str
) -> Array:
    """Query rows [start, stop) of one head against the keys they may see, [0, stop):
    `want` = "scores" (q·kᵀ·scale) or "probs" (the causal softmax), [rows, stop] float32.

    Keys at or past `stop` are in every row's future, so they are not computed at all (on
    average half the work of a full-width block); `AttentionStage` pads them with the 0.0 the
    captures hold there. The row sums of the softmax run over `stop` entries instead of `seq`,
    which can round the last bit differently from the whole path (the tests allow float32
    rounding).
    """
    kv_head = head // (q.shape[1] // k.shape[1])
    scores = q[start:stop, head, :] @ k[:stop, kv_head, :].T  # [rows, stop]
    scores *= xp.float32(scale)
    future = xp.arange(stop)[None, :] > xp.arange(start, stop)[:, None]  # [rows, stop]
    if want == "scores":
        scores[future] = 0.0
        return scores
    masked = xp.where(future, -xp.inf, scores)
    del scores
    masked -= masked.max(axis=-1, keepdims=True)  # the diagonal is always finite
    xp.exp(masked, out=masked)  # exp(-inf) = 0 for future keys
    masked /= masked.sum(axis=-1, keepdims=True)
    return masked


def blocked_context(xp: Any, q: Array, k: Array, v: Array, scale: float) -> Array:
    """The attention output [seq, nh * hd] computed one head and one query block at a time;
    the same numbers as `attention_context(causal_softmax(attention_scores(...)))` to float32
    rounding."""
    seq, nh, hd = q.shape
    group = nh // k.shape[1]
    out = xp.empty((seq, nh, hd), dtype=xp.float32)  # [seq, nh, hd]
    rows = block_rows(seq)
    for head in range(nh):
        values = v[:, head // group, :]  # [seq, hd]
        for start in range(0, seq, rows):
            stop = min(start + rows, seq)
            probs = _row_block(xp, q, k, head, start, stop, scale, "probs")  # [rows, stop]
            out[start:stop, head, :] = probs @ values[:stop]
    return out.reshape(seq, nh * hd)


class LazyAttention:
    """A `[heads, seq, seq]` attention tensor read a block at a time (`blocks()`: (flat offset,
    `[rows, seq]` block) in APRT file order), with what code written for arrays needs on top.
    Subclasses: AttentionStage (recomputed from q and k), and a trace directory's long
    attention file (engine.sources.trace_dir.AttentionFile)."""

    xp: Any = np
    shape: tuple[int, int, int]

    def blocks(self, rows: int | None = None) -> Iterator[tuple[int, Array]]:
        raise NotImplementedError

    def materialize(self) -> Array:
        """The whole [nh, seq, seq] float32 array (on the pass's device for a pass's capture)."""
        out = self.xp.empty(self.shape, dtype=self.xp.float32)
        flat = out.reshape(-1)
        for offset, block in self.blocks():
            flat[offset : offset + block.size] = block.reshape(-1)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        from engine.backend import to_host

        host = to_host(self.materialize())
        return host if dtype is None else host.astype(dtype)

    def reshape(self, *shape: Any) -> np.ndarray:
        """`np.asarray(self).reshape(...)`: materialises (for code written for arrays)."""
        return np.asarray(self).reshape(*shape)


class AttentionStage(LazyAttention):
    """A lazy `[heads, seq, seq]` attention capture (`attn_scores` or `attn_softmax`).

    Holds only q [seq, nh, hd] and k [seq, nkv, hd]; `blocks()` recomputes the tensor a
    `[rows, seq]` block at a time in APRT file order (head by head, query rows ascending), so a
    statistics pass or a file writer never holds more than one block. `np.asarray(stage)`
    materialises it whole for consumers that need the array.
    """

    def __init__(self, xp: Any, stage: str, q: Array, k: Array, scale: float) -> None:
        if stage not in ("attn_scores", "attn_softmax"):
            raise ValueError(f"not an attention stage: {stage!r}")
        self.xp, self.stage, self.q, self.k, self.scale = xp, stage, q, k, scale
        seq, nh, _ = q.shape
        self.shape = (nh, seq, seq)
        self.size = nh * seq * seq
        self.nbytes = 4 * self.size
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def blocks(self, rows: int | None = None) -> Iterator[tuple[int, Array]]:
        """(flat offset, C-contiguous float32 block [n_rows, seq]) in file order."""
        nh, seq, _ = self.shape
        step = rows or block_rows(seq)
        want = "scores" if self.stage == "attn_scores" else "probs"
        xp = self.xp
        for head in range(nh):
            for start in range(0, seq, step):
                stop = min(start + step, seq)
                block = xp.zeros((stop - start, seq), dtype=xp.float32)  # [rows, seq]
                block[:, :stop] = _row_block(
                    xp, self.q, self.k, head, start, stop, self.scale, want
                )
                yield (head * seq + start) * seq, block
