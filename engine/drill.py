"""What a drill-down shows of one cell, computed a block at a time when the cell is large.

A 4,096-token SmolLM2 attention cell is `[9, 4096, 4096]`: 604 MB a side, and |A-B|, float64
copies and a transposed per-token view would each cost as much again. When either side is a
lazy capture (`.blocks()`: engine.attention.AttentionStage for our pass, a directory's
engine.sources.trace_dir.AttentionFile), `streamed_details` walks the two sides block by block
in file order, holding one block of each (16 MiB), and accumulates:

* the |A-B| histogram per decade (`DecadeCounts`; |A| without a reference);
* per query position, the cosine of A and B over all heads and keys (or the RMS of A), from
  float64 sums of products per row, added across heads;
* the top-K differences, exactly those of engine.stats.diff_stats (its streamed accumulator).

`decade_histogram` is the same histogram for an array in memory (the small cells).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.compare import future_to_zero
from engine.stats import DiffAccumulator, TopDiff, blocks_of

DECADE_OFFSET = 400
"""Decades are counted in a fixed array from 1e-400 up (float64 spans 1e-324 to 1e308)."""


class DecadeCounts:
    """Counts of |x| per decade (log10 bins), exact zeros and non-finite values, fed in blocks."""

    def __init__(self) -> None:
        self.counts = np.zeros(2 * DECADE_OFFSET, dtype=np.int64)  # [decade + offset]
        self.zeros = 0
        self.nonfinite = 0

    def add(self, magnitudes: Any) -> None:
        values = np.abs(np.asarray(magnitudes, dtype=np.float64).ravel())
        finite = np.isfinite(values)
        self.zeros += int(np.count_nonzero(values == 0))
        self.nonfinite += int(values.size - np.count_nonzero(finite))
        positive = values[finite & (values > 0)]
        if positive.size:
            decades = np.floor(np.log10(positive)).astype(np.int64) + DECADE_OFFSET
            self.counts += np.bincount(decades, minlength=self.counts.size)

    def bins(self) -> list[tuple[str, int]]:
        """(label, count): "0", then `1eN` from the smallest to the largest decade present (empty
        decades between included), then "NaN/Inf"."""
        bins: list[tuple[str, int]] = []
        if self.zeros:
            bins.append(("0", self.zeros))
        present = np.flatnonzero(self.counts)
        if present.size:
            low, high = int(present[0]), int(present[-1])
            bins += [
                (f"1e{decade - DECADE_OFFSET}", int(self.counts[decade]))
                for decade in range(low, high + 1)
            ]
        if self.nonfinite:
            bins.append(("NaN/Inf", self.nonfinite))
        return bins


def decade_histogram(magnitudes: Any) -> list[tuple[str, int]]:
    """(bin label, count) per decade of |magnitudes|, plus exact zeros and non-finite values."""
    counts = DecadeCounts()
    counts.add(magnitudes)
    return counts.bins()


@dataclass(frozen=True)
class StreamedDetails:
    """A large cell's drill-down views (see the module docstring)."""

    histogram: list[tuple[str, int]]
    histogram_title: str
    per_token: np.ndarray | None
    """[seq]: cosine of A and B per query position (RMS of A without a reference)."""
    cosine: bool
    top: tuple[TopDiff, ...]


def is_lazy(values: Any) -> bool:
    """True for a lazy capture (read by `.blocks()`), False for an array."""
    return hasattr(values, "blocks")


def streamed_details(a: Any, b: Any | None, top_k: int) -> StreamedDetails:
    """The drill-down views of a `[heads, seq, seq]` attention cell where a side is lazy.

    `b` None: no reference (|A|, RMS of A per position, the largest |A|). A side that is an
    array is brought to apr's convention (0.0 above the diagonal) and sliced at the lazy
    side's block offsets.
    """
    guide = a if is_lazy(a) else b
    heads, seq, _ = guide.shape
    if b is not None and int(a.size) != int(b.size):
        b = None  # sizes differ: side A alone, as the small-cell view does
    a = a if is_lazy(a) else future_to_zero(np.asarray(a, dtype=np.float32).ravel(), seq)
    if b is not None and not is_lazy(b):
        b = future_to_zero(np.asarray(b, dtype=np.float32).ravel(), seq)
    counts = DecadeCounts()
    top = DiffAccumulator(top_k)
    dot = np.zeros(seq)  # [seq] float64 sums per query position over heads and keys
    norm_a = np.zeros(seq)
    norm_b = np.zeros(seq)
    pairs = zip(blocks_of(a, guide), blocks_of(b if b is not None else a, guide), strict=True)
    for (offset, block_a), (_, block_b) in pairs:
        start = offset % (seq * seq) // seq  # first query row of this block
        rows_a = np.asarray(block_a, dtype=np.float32).reshape(-1, seq)  # [rows, seq]
        stop = start + rows_a.shape[0]
        a64 = rows_a.astype(np.float64)
        norm_a[start:stop] += np.einsum("ij,ij->i", a64, a64)
        if b is None:
            counts.add(rows_a)
            top.add(offset, rows_a, np.zeros_like(rows_a))  # d = |a|: the largest |A|
            continue
        rows_b = np.asarray(block_b, dtype=np.float32).reshape(-1, seq)
        counts.add(np.abs(rows_a - rows_b))
        top.add(offset, rows_a, rows_b)
        b64 = rows_b.astype(np.float64)
        dot[start:stop] += np.einsum("ij,ij->i", a64, b64)
        norm_b[start:stop] += np.einsum("ij,ij->i", b64, b64)
    entries = top.result().top_diffs
    if b is None:
        rms = np.sqrt(norm_a / (heads * seq))
        largest = tuple(TopDiff(t.index, t.a, float("nan"), t.abs_diff) for t in entries)
        return StreamedDetails(counts.bins(), "|A| per decade", rms, False, largest)
    norms = np.sqrt(norm_a * norm_b)
    cosine = np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)
    return StreamedDetails(counts.bins(), "|A-B| per decade", cosine, True, entries)
