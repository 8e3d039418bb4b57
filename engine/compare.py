"""Pairing of two capture streams into cells, the conventions that make them comparable, and the
propagated verdicts (first cosine divergence, first std-ratio divergence).

Both streams are ordered the same way (layer, then canonical stage index, whole-model stages
last), so an ordered merge pairs them by (layer, stage); two model runs therefore advance in
lock-step and cells complete in computation order. Which streams, which layers and which tokens
is decided before anything runs, by `engine.plan`; the local error and the noise floor that say
whether a disagreement is noise or a bug live in `engine.local_error` and `engine.noise`.

Only statistics leave a cell; full tensors stay with their source (`TraceSource.tensor`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.backend import to_host
from engine.forward import Capture
from engine.stages import STAGE_BY_NAME
from engine.stats import DiffStats, IndexDiff, TensorStats, diff_stats, index_diff, tensor_stats

if TYPE_CHECKING:
    from engine.local_error import LocalError
    from engine.sources.base import TraceSource

from engine.defaults import DEFAULT_STD_BAND, DEFAULT_THRESHOLD  # noqa: E402  (re-exported)

CAUSAL_STAGES = frozenset({"attn_scores", "attn_softmax"})
"""`[heads, seq, seq]` stages compared on their causal entries only. apr and we write 0.0 above
the diagonal; llama.cpp's `kq` holds raw scores there and other runtimes write -inf or the
masked value: a convention, not an error. Both sides get apr's 0.0 above the diagonal before any
statistic, which keeps every index meaning what it means in apr's file."""


@dataclass(frozen=True)
class Cell:
    """The comparison of one (layer, stage) between side A and side B.

    A side that does not produce the stage has `stats_x is None`; `diff` is None unless both
    sides have it with the same element count (after the conventions of `comparable`).
    """

    layer: int
    """Layer index, or WHOLE_MODEL_LAYER for `final_norm` / `lm_head`."""
    stage: str
    shape: tuple[int, ...]
    stats_a: TensorStats | None
    stats_b: TensorStats | None
    diff: DiffStats | None
    local: LocalError | None = None
    """The error this stage adds on its own on the checked side (engine.local_error); None when
    no local error is computed in this run (single-model mode)."""
    index_diff: IndexDiff | None = None
    """For an index payload (`moe_router_indices`) on both sides: the ids compared as ids."""


def stage_order_key(layer: int, stage_name: str) -> tuple[int, int]:
    """Computation order: by layer (whole-model last), then apr's canonical stage index."""
    return (layer, STAGE_BY_NAME[stage_name].index)


# --------------------------------------------------------------------------------- conventions


def future_to_zero(array: np.ndarray, seq_len: int | None) -> np.ndarray:
    """A `[heads, seq, seq]` attention tensor (or its flat payload) with 0.0 above the diagonal,
    apr's convention; returned unchanged when its size does not fit `heads × seq × seq`."""
    if seq_len is None or seq_len < 2 or array.size % (seq_len * seq_len):
        return array
    heads = array.size // (seq_len * seq_len)
    square = array.reshape(heads, seq_len, seq_len)
    future = np.triu(np.ones((seq_len, seq_len), dtype=bool), k=1)  # [seq, seq]
    if not square[:, future].any():
        return array
    return np.where(future, np.float32(0.0), square).reshape(array.shape)


def last_row_logits(array: np.ndarray, vocab: int) -> np.ndarray:
    """The last position's logits `[vocab]` of an all-position `[seq, vocab]` lm_head."""
    return array.reshape(-1, vocab)[-1]


def comparable(
    stage_name: str, a: np.ndarray | None, b: np.ndarray | None, seq_len: int | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Both sides of one stage brought to apr's conventions, so that their elements pair up.

    - `attn_scores` / `attn_softmax`: future entries set to 0.0 (CAUSAL_STAGES).
    - `lm_head`: a runtime that keeps every position's logits (`[seq, vocab]`, llama.cpp with
      all outputs requested) is paired with apr's last-token `[vocab]` by its last row.
    """
    if stage_name in CAUSAL_STAGES:
        a = None if a is None else future_to_zero(a, seq_len)
        b = None if b is None else future_to_zero(b, seq_len)
    elif stage_name == "lm_head" and a is not None and b is not None and a.size != b.size:
        small, large = sorted((a.size, b.size))
        if large % small == 0 and (seq_len is None or large == small * seq_len):
            if a.size == large:
                a = last_row_logits(a, small)
            else:
                b = last_row_logits(b, small)
    return a, b


# --------------------------------------------------------------------------------- pairing


def make_cell(
    capture_a: Capture | None,
    capture_b: Capture | None,
    *,
    seq_len: int | None = None,
    local: LocalError | None = None,
) -> Cell:
    """Statistics of both sides and of their difference, under the conventions of `comparable`."""
    present = capture_a if capture_a is not None else capture_b
    assert present is not None
    x = None if capture_a is None else capture_a.array
    y = None if capture_b is None else capture_b.array
    lazy = any(hasattr(v, "blocks") for v in (x, y) if v is not None)
    if x is not None and y is not None and type(x) is not type(y) and not lazy:
        x, y = to_host(x), to_host(y)
    causal = None
    if present.stage in CAUSAL_STAGES or present.stage == "lm_head":
        # A lazy attention capture (a long prompt) already holds 0.0 above its diagonal.
        x = x if x is None or hasattr(x, "blocks") else np.asarray(to_host(x))
        y = y if y is None or hasattr(y, "blocks") else np.asarray(to_host(y))
        if present.stage in CAUSAL_STAGES and x is not None and y is not None:
            causal = _causal_stats(x, y, seq_len, lazy)  # None: the plain path decides
        if causal is None and not lazy:
            x, y = comparable(present.stage, x, y, seq_len)
        elif causal is None and present.stage in CAUSAL_STAGES:
            x = x if x is None or hasattr(x, "blocks") else future_to_zero(x, seq_len)
            y = y if y is None or hasattr(y, "blocks") else future_to_zero(y, seq_len)
    shape = present.shape
    if capture_a is not None and capture_b is not None:
        if len(capture_b.shape) > len(shape):
            shape = capture_b.shape  # prefer the logical shape over a directory's flat one
        if present.stage == "lm_head" and x is not None and x.size != math.prod(shape):
            shape = (int(x.size),)
    if causal is not None:
        stats_a, stats_b, diff = causal
    elif lazy:  # one block per side at a time (engine.stats' exact streaming sums)
        stats_a, stats_b, diff = _streamed(x, y)
    else:
        stats_a = tensor_stats(x) if x is not None else None
        stats_b = tensor_stats(y) if y is not None else None
        diff = diff_stats(x, y) if x is not None and y is not None and x.size == y.size else None
    ids = None
    if x is not None and y is not None and STAGE_BY_NAME[present.stage].index_payload:
        ids = index_diff(x, y)  # expert ids compared as ids, never by cosine
    return Cell(present.layer, present.stage, tuple(shape), stats_a, stats_b, diff, local, ids)


def _causal_stats(
    x: Any, y: Any, seq_len: int | None, lazy: bool
) -> tuple[TensorStats, TensorStats, DiffStats] | None:
    """Both sides' statistics and their diff from an attention pair's causal entries alone
    (engine.causal_stats; block by block when a side is lazy), or None when the plain path
    must decide."""
    from engine.causal_stats import causal_pair_stats, causal_streamed_pair_stats

    if seq_len is None:
        return None
    if lazy:
        return causal_streamed_pair_stats(x, y, seq_len)
    flat_x = np.asarray(x, dtype=np.float32).reshape(-1)
    flat_y = np.asarray(y, dtype=np.float32).reshape(-1)
    return causal_pair_stats(flat_x, flat_y, seq_len)


def _streamed(x, y) -> tuple[TensorStats | None, TensorStats | None, DiffStats | None]:
    """Statistics of a pair where a side is a lazy capture (`.blocks()`), block by block."""
    from engine.stats import streamed_pair_stats, streamed_stats

    if x is not None and y is not None:
        return streamed_pair_stats(x, y)
    return (
        None if x is None else streamed_stats(x),
        None if y is None else streamed_stats(y),
        None,
    )


def merged(
    stream_a: Iterator[Capture], stream_b: Iterator[Capture] | None
) -> Iterator[tuple[Capture | None, Capture | None]]:
    """Ordered merge of two computation-ordered capture streams into pairs by (layer, stage)."""
    if stream_b is None:
        for capture in stream_a:
            yield capture, None
        return
    head_a = next(stream_a, None)
    head_b = next(stream_b, None)
    while head_a is not None or head_b is not None:
        key_a = stage_order_key(head_a.layer, head_a.stage) if head_a is not None else None
        key_b = stage_order_key(head_b.layer, head_b.stage) if head_b is not None else None
        if key_b is None or (key_a is not None and key_a < key_b):
            yield head_a, None
            head_a = next(stream_a, None)
        elif key_a is None or key_b < key_a:
            yield None, head_b
            head_b = next(stream_b, None)
        else:
            yield head_a, head_b
            head_a = next(stream_a, None)
            head_b = next(stream_b, None)


def compare(
    a: TraceSource,
    b: TraceSource | None,
    *,
    layers: range | tuple[int, int] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[Cell]:
    """Plan and run a comparison of two open sources: `engine.plan.plan_for(a, b).run()`.

    Every refusal (token mismatch, shapes, layers) is raised before the first cell.
    """
    from engine.plan import plan_for

    yield from plan_for(a, b, layers=layers).run(cancel)


# --------------------------------------------------------------------------------- verdicts


def std_ratio(cell: Cell) -> float | None:
    """std(A) / std(B); inf when only B is flat, 1.0 when both are; None if a side is absent."""
    if cell.stats_a is None or cell.stats_b is None:
        return None
    std_a, std_b = cell.stats_a.std, cell.stats_b.std
    if std_b == 0.0:
        return 1.0 if std_a == 0.0 else math.inf
    return std_a / std_b


def cosine_diverged(cell: Cell, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """Both sides present and they disagree in direction (or in size, or as index payloads).

    Identical tensors never diverge (an all-zero stage has cosine 0.0 by apr's rule, but equal
    sides are equal). NaN anywhere gives cosine 0.0 and so diverges.
    """
    if cell.stats_a is None or cell.stats_b is None:
        return False
    if cell.diff is None:
        return True  # both present, different element counts
    if cell.diff.max_abs_diff == 0.0 and cell.stats_a.nan_count == cell.stats_b.nan_count == 0:
        return False
    if cell.index_diff is not None:
        return not cell.index_diff.equal  # expert ids must match exactly
    if STAGE_BY_NAME[cell.stage].index_payload:
        return True  # expert ids must match exactly
    return not cell.diff.cosine_sim >= threshold


def std_diverged(cell: Cell, band: tuple[float, float] = DEFAULT_STD_BAND) -> bool:
    ratio = std_ratio(cell)
    if ratio is None or STAGE_BY_NAME[cell.stage].index_payload:
        return False
    return not band[0] <= ratio <= band[1]


def first_divergence(cells: Iterable[Cell], threshold: float = DEFAULT_THRESHOLD) -> Cell | None:
    """The first cell in computation order whose cosine is below `threshold`."""
    return next((cell for cell in cells if cosine_diverged(cell, threshold)), None)


def first_std_divergence(
    cells: Iterable[Cell], band: tuple[float, float] = DEFAULT_STD_BAND
) -> Cell | None:
    """The first cell in computation order whose std ratio A/B leaves `band`."""
    return next((cell for cell in cells if std_diverged(cell, band)), None)
