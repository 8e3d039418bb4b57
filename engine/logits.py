"""Per-position logit metrics: do two inference paths predict the same next tokens?

apr's `lm_head` stage holds only the last position's logits, so a comparison of it is one
cosine. The verdict users trust most is at the output, position by position: with both sides'
logits for every position (our `logits_all` stage, `[seq, vocab]`, or a runtime's `[seq, vocab]`
`lm_head`) this module computes, for each position i:

* `kl_ab[i]` = KL(softmax(A_i) ‖ softmax(B_i)) and `kl_ba[i]` the other way, in nats;
* `top1_a[i]`, `top1_b[i]`: each side's arg-max (first maximum wins, as numpy's argmax);
* `topk_overlap_5[i]`, `topk_overlap_10[i]`: how many of the k top tokens the sides share
  (0..k; a side's top-k set is its k largest logits, ties at the k-th value broken towards the
  lower token id, as a stable sort descending would);
* `rank_b_of_top1_a[i]`: how many of B's logits are strictly above B's logit for A's top-1
  token (0 means B ranks it first), and `rank_a_of_top1_b[i]` the other way;
* `max_abs_logprob_diff[i]` = max over the vocabulary of |log p_A - log p_B|;
* with the token ids, `logprob_next_a[i]` / `logprob_next_b[i]`: each side's log-probability
  of the token that actually follows position i (None at the last position).

All of it in float64 from float32 logits, with log-sum-exp (subtract the row maximum before
exp), so 100-logit rows neither overflow nor lose the small probabilities. Rows holding NaN or
±Inf give NaN metrics (None in JSON) rather than an exception.

Memory stays bounded for long prompts: positions are processed in blocks of
`block_positions(vocab)` rows (LOGIT_BLOCK_BYTES per float64 `[block, vocab]` array, about 8
such arrays live at once), and the logits themselves come from a `LogitRows` source that
produces row blocks on demand: an in-memory array, a memory-mapped APRT file
(`logits_file_rows`), or a model's final norm times its head (`ModelLogits`), so a 4,096-token
SmolLM2 prompt never holds its 805 MB of logits at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.errors import DiffError
from engine.pipeline import pipeline_blas

LOGIT_BLOCK_BYTES = 8 * 1024 * 1024
"""Bytes of one float64 `[block, vocab]` array: 21 positions of SmolLM2's 49,152-entry
vocabulary, 6 of Qwen2's 152,064. About 8 such arrays are live while a block is measured, and
LOGIT_WORKERS blocks are measured at once, so the metrics' working set is about 128 MiB
whatever the prompt length."""

LOGIT_WORKERS = max(1, min(2, os.cpu_count() or 1))
"""Blocks of positions measured at once, each in its own thread (the metrics are whole-array
numpy work that releases the GIL). Measured on the 2-core machine, 1,024 SmolLM2 positions of
a model and its Q8_0 copy: 10.7 s on one thread, 6.8 s on two (in-process, same machine)."""

TOPK = (5, 10)
"""The top-k overlaps reported."""

TOP_TOKENS = 5
"""How many of each side's top tokens the report lists per position (for the explorer)."""


def block_positions(vocab: int, budget: int | None = None) -> int:
    """Positions per block so that one float64 `[block, vocab]` array fits `budget` bytes
    (LOGIT_BLOCK_BYTES, read at call time, when None)."""
    budget = LOGIT_BLOCK_BYTES if budget is None else budget
    return max(1, budget // (8 * max(vocab, 1)))


# --------------------------------------------------------------------------------- sources


class LogitRows(Protocol):
    """Row blocks of a `[seq, vocab]` logits table, produced on demand."""

    shape: tuple[int, int]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) as a host float32 array [stop - start, vocab]."""
        ...


@dataclass
class ArrayLogits:
    """A `[seq, vocab]` array (numpy, or a read-only memmap) as a LogitRows source."""

    array: Any

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop], dtype=np.float32)


def logits_file_rows(path: str | os.PathLike[str], seq_len: int) -> ArrayLogits:
    """An APRT file of `seq_len × vocab` logits (our `logits_all.bin`, or a runtime's
    `[seq, vocab]` `lm_head.bin`), memory-mapped: only the rows being measured are read."""
    from engine.aprt import HEADER_SIZE, read_aprt_header

    header = read_aprt_header(path)
    count = header.dim_product
    if seq_len <= 0 or count % seq_len != 0:
        raise DiffError(
            f"{path}: {count} logits do not divide into {seq_len} positions; "
            "not a [seq, vocab] logits file for this prompt"
        )
    table = np.memmap(
        path, dtype="<f4", mode="r", offset=HEADER_SIZE, shape=(seq_len, count // seq_len)
    )
    return ArrayLogits(table)


HEAD_CACHE_BYTES = 256 * 1024 * 1024
"""A head whose float32 copy fits this is decoded once and kept while the logits of every
position block are computed (SmolLM2's [49152, 576]: 113 MB); a larger head (Qwen2-7B's
[152064, 3584]: 2.2 GB) is decoded a row block at a time for each position block instead."""


KEEP_TABLE_BYTES = 128 * 1024 * 1024
"""A prompt whose every-position logits fit this (SmolLM2: up to 682 tokens) gets them computed
by the lm_head stage from the head rows it decodes anyway and kept with the model
(`TableKeeper`), so the logit metrics after a comparison decode no weight a second time. The
table is smaller than the decoded head that computing it later would hold (SmolLM2: 113 MB):
at 512 tokens, 100 MB a side, a bisect's peak RSS went from 931 to 861 MB (64 MiB kept up to
341 tokens only)."""

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""weight store -> (final_norm [seq, hidden], logits [seq, vocab]) of its latest pass (the
store, not the Model, is the key: a Model dataclass is unhashable)."""


class TableKeeper:
    """Collects `final_norm @ head_rowsᵀ` block by block during the lm_head stage (host float32,
    the same product `ModelLogits` computes), and keeps the table for `ModelLogits`."""

    def __init__(self, model: Any, final_norm: Any) -> None:
        from engine.backend import to_host

        seq, vocab = int(final_norm.shape[0]), int(model.config.vocab_size)
        self.model = model
        self.table = None
        if seq * vocab * 4 <= KEEP_TABLE_BYTES:
            self.final_norm = np.array(to_host(final_norm), dtype=np.float32)  # [seq, hidden]
            self.table = np.empty((seq, vocab), dtype=np.float32)  # [seq, vocab]

    def add(self, start: int, stop: int, head_rows: Any) -> None:
        if self.table is not None:
            from engine.backend import to_host

            rows = np.asarray(to_host(head_rows), dtype=np.float32)  # [stop - start, hidden]
            self.table[:, start:stop] = (rows @ self.final_norm.T).T

    def done(self, bias: np.ndarray | None) -> None:
        if self.table is not None:
            table = self.table if bias is None else self.table + bias
            cap = self.model.config.final_logit_softcap
            if cap is not None:  # Gemma 2, as the lm_head stage
                table = np.tanh(table / np.float32(cap)) * np.float32(cap)
            with contextlib.suppress(TypeError):  # an unhashable store: nothing is kept
                _KEPT[self.model.weights] = (self.final_norm, table)


class ModelLogits:
    """The logits of every position, `final_norm @ headᵀ (+ bias)`, computed a block at a time.

    final_norm [seq, hidden] (host or device array). Each row is the same dot products as the
    model's `lm_head` stage; the last row equals that stage to float32 rounding (BLAS may sum a
    matrix-matrix product in another order than the matrix-vector one).
    """

    def __init__(self, model: Any, final_norm: Any) -> None:
        from engine.backend import to_host
        from engine.forward import lm_head_weight_name

        self.model = model
        self.final_norm = np.ascontiguousarray(to_host(final_norm), dtype=np.float32)
        config = model.config
        self.shape = (int(self.final_norm.shape[0]), int(config.vocab_size))
        self.name = lm_head_weight_name(model)
        self._head: np.ndarray | None = None
        self._table: np.ndarray | None = None
        try:
            kept = _KEPT.get(model.weights)
        except TypeError:
            kept = None
        if kept is not None and np.array_equal(kept[0], self.final_norm):
            self._table = kept[1]  # computed by the lm_head stage of this very pass
            return
        head_bytes = config.vocab_size * config.hidden_size * 4
        if head_bytes <= HEAD_CACHE_BYTES:
            self._head = np.asarray(model.weights.get(self.name), dtype=np.float32)
        bias = model.weights.get("lm_head.bias") if model.weights.has("lm_head.bias") else None
        self._bias = None if bias is None else np.asarray(bias, dtype=np.float32)

    def rows(self, start: int, stop: int) -> np.ndarray:
        from engine.forward import lm_head_row_blocks
        from engine.model import weight_rows

        if self._table is not None:
            return self._table[start:stop]
        x = self.final_norm[start:stop]  # [n, hidden]
        if self._head is not None:
            out = (self._head @ x.T).T  # [n, vocab]
        else:
            out = np.empty((x.shape[0], self.shape[1]), dtype=np.float32)  # [n, vocab]
            for row_start, row_stop in lm_head_row_blocks(self.shape[1]):
                head_rows = weight_rows(self.model.weights, self.name, row_start, row_stop)
                out[:, row_start:row_stop] = (head_rows @ x.T).T
        out = np.ascontiguousarray(out, dtype=np.float32)
        out = out if self._bias is None else out + self._bias
        cap = self.model.config.final_logit_softcap
        if cap is not None:  # Gemma 2, as the lm_head stage
            out = np.tanh(out / np.float32(cap)) * np.float32(cap)
        return out


class LogitsStage:
    """The `logits_all` capture of a pass: `[seq, vocab]`, produced a block of positions at a
    time (`blocks()`, in APRT payload order) so that a writer or a statistics pass never holds
    the whole table (805 MB for 4,096 SmolLM2 positions); `np.asarray` materialises it."""

    def __init__(self, table: ModelLogits) -> None:
        self.table = table
        self.shape = tuple(table.shape)
        self.size = self.shape[0] * self.shape[1]
        self.nbytes = 4 * self.size
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def blocks(self) -> Any:
        seq, vocab = self.shape
        step = block_positions(vocab)
        for start in range(0, seq, step):
            yield start * vocab, self.table.rows(start, min(start + step, seq))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.table.rows(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype)

    def reshape(self, *shape: Any) -> np.ndarray:
        return np.asarray(self).reshape(*shape)


# --------------------------------------------------------------------------------- metrics


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 with the row maximum subtracted first. [n, vocab]"""
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        top = x.max(axis=1, keepdims=True)  # [n, 1]
        shifted = x - top
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def topk_masks(x: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """k -> bool [n, vocab]: each row's k largest entries, ties at the k-th value going to the
    lower indices (the first k of a stable sort descending). Exact, O(vocab) per row: one
    partition finds every k-th largest value at once, and the running count that breaks ties
    runs only over the rows that have more ties at their k-th value than places left (rare:
    equal logits), not over every [n, vocab] entry."""
    n, vocab = x.shape
    inside = sorted({vocab - k for k in ks if k < vocab})
    parted = np.partition(x, inside, axis=1) if inside else x
    masks: dict[int, np.ndarray] = {}
    for k in ks:
        if k >= vocab:
            masks[k] = np.ones_like(x, dtype=bool)
            continue
        kth = parted[:, vocab - k][:, None]  # [n, 1] the k-th largest
        above = x > kth
        tied = x == kth
        need = k - above.sum(axis=1, keepdims=True)  # [n, 1] ties still to take
        mask = above | tied
        crowded = np.flatnonzero(tied.sum(axis=1) > need[:, 0])  # rows with excess ties
        if crowded.size:
            ties = tied[crowded]
            mask[crowded] = above[crowded] | (ties & (np.cumsum(ties, axis=1) <= need[crowded]))
        masks[k] = mask
    return masks


def topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Bool [n, vocab]: each row's k largest entries (`topk_masks` for one k)."""
    return topk_masks(x, [k])[k]


def top_tokens(x: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """The k ids a `topk_mask` selected per row, ordered by value descending then id. [n, k]"""
    k = min(k, x.shape[1])  # a vocabulary smaller than k: every id
    ids = np.nonzero(mask)[1].reshape(x.shape[0], k)  # row-major: ascending id per row
    values = np.take_along_axis(x, ids, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")  # ties keep ascending id
    return np.take_along_axis(ids, order, axis=1)


def _nan_rows(values: np.ndarray, bad: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    values[bad] = np.nan
    return values


def block_metrics(a: np.ndarray, b: np.ndarray, next_ids: np.ndarray | None) -> dict[str, Any]:
    """Every per-position metric for one block of positions.

    a, b: float32 [n, vocab]; next_ids: [n] int, the token after each position, -1 where there
    is none (the last position), or None without token ids. Returns arrays of length n.
    """
    bad = ~(np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1))  # [n]
    logp_a, logp_b = log_softmax64(a), log_softmax64(b)  # [n, vocab] float64 each
    delta = logp_a - logp_b  # [n, vocab]
    with np.errstate(invalid="ignore", over="ignore"):
        kl_ab = (np.exp(logp_a) * delta).sum(axis=1)  # [n]
        kl_ba = (np.exp(logp_b) * -delta).sum(axis=1)
        max_abs = np.abs(delta).max(axis=1)
    del delta
    top1_a, top1_b = a.argmax(axis=1), b.argmax(axis=1)  # [n]
    rows = np.arange(a.shape[0])
    rank_b = (b > b[rows, top1_a][:, None]).sum(axis=1)  # B's rank of A's top-1
    rank_a = (a > a[rows, top1_b][:, None]).sum(axis=1)
    out: dict[str, Any] = {
        "kl_ab": _nan_rows(kl_ab, bad),
        "kl_ba": _nan_rows(kl_ba, bad),
        "top1_a": top1_a,
        "top1_b": top1_b,
        "rank_b_of_top1_a": rank_b,
        "rank_a_of_top1_b": rank_a,
        "max_abs_logprob_diff": _nan_rows(max_abs, bad),
    }
    masks_a, masks_b = topk_masks(a, TOPK), topk_masks(b, TOPK)
    for k in TOPK:
        mask_a, mask_b = masks_a[k], masks_b[k]
        out[f"topk_overlap_{k}"] = (mask_a & mask_b).sum(axis=1)
        if k == TOP_TOKENS:
            out["top_a"] = top_tokens(a, mask_a, k)
            out["top_b"] = top_tokens(b, mask_b, k)
    if next_ids is not None:
        has_next = next_ids >= 0
        safe = np.where(has_next, next_ids, 0)
        for side, logp in (("a", logp_a), ("b", logp_b)):
            picked = logp[rows, safe]
            out[f"logprob_next_{side}"] = np.where(has_next & ~bad, picked, np.nan)
    return out


def _as_rows(logits: Any) -> LogitRows:
    return logits if hasattr(logits, "rows") else ArrayLogits(np.asarray(logits))


def logit_report(
    logits_a: Any,
    logits_b: Any,
    token_ids: Sequence[int] | None = None,
    *,
    block: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Per-position logit metrics of two `[seq, vocab]` logit tables and their summaries.

    `logits_a` / `logits_b`: arrays or LogitRows sources (measured a block of positions at a
    time). `token_ids`: the traced ids, for the next-token log-likelihoods. Returns a JSON-ready
    dict: per-position lists (see the module docstring; NaN as None) and the summaries
    `mean_kl` / `max_kl` / `max_kl_position` (KL(A‖B)), `mean_kl_ba` / `max_kl_ba`,
    `top1_agreement` (fraction of positions), `disagreeing_positions`, the mean top-k overlaps,
    `max_logprob_diff` (the largest |Δ log p| anywhere) and `mean_logprob_next_a` / `_b`.
    `progress(done, total)` is called after each block.
    """
    rows_a, rows_b = _as_rows(logits_a), _as_rows(logits_b)
    if tuple(rows_a.shape) != tuple(rows_b.shape) or len(rows_a.shape) != 2:
        raise DiffError(
            f"logits tables differ in shape: {list(rows_a.shape)} vs {list(rows_b.shape)}"
        )
    seq, vocab = rows_a.shape
    if token_ids is not None and len(token_ids) != seq:
        raise DiffError(f"{len(token_ids)} token ids for {seq} positions of logits")
    ids = None if token_ids is None else np.asarray(list(token_ids), dtype=np.int64)
    step = block or block_positions(vocab)
    spans = [(start, min(start + step, seq)) for start in range(0, seq, step)]

    def measure(span: tuple[int, int]) -> dict[str, Any]:
        start, stop = span
        next_ids = None
        if ids is not None:
            next_ids = np.full(stop - start, -1, dtype=np.int64)
            follow = ids[start + 1 : stop + 1]
            next_ids[: follow.size] = follow
        return block_metrics(rows_a.rows(start, stop), rows_b.rows(start, stop), next_ids)

    parts: list[dict[str, Any]] = []
    # Each task computes its own rows when it runs: at most LOGIT_WORKERS blocks are held at
    # once; the per-position results kept from each are small. In order, whatever finishes first.
    with pipeline_blas(), ThreadPoolExecutor(LOGIT_WORKERS, "logit-metrics") as pool:
        for (_, stop), part in zip(spans, pool.map(measure, spans), strict=True):
            parts.append(part)
            if progress is not None:
                progress(stop, seq)
    per = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else {}
    return _summarise(per, seq, vocab)


def _json_list(values: np.ndarray) -> list[Any]:
    if values.dtype.kind == "f":
        return [None if not math.isfinite(v) else v for v in values.tolist()]
    return values.tolist()


def _finite_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _summarise(per: dict[str, np.ndarray], seq: int, vocab: int) -> dict[str, Any]:
    report: dict[str, Any] = {"positions": seq, "vocab": vocab}
    if seq == 0:
        return report
    kl = per["kl_ab"]
    finite = np.isfinite(kl)
    worst = int(np.argmax(np.where(finite, kl, -np.inf))) if finite.any() else None
    agree = per["top1_a"] == per["top1_b"]
    report.update(
        mean_kl=_finite_mean(kl),
        max_kl=float(kl[worst]) if worst is not None else None,
        max_kl_position=worst,
        nonfinite_positions=np.flatnonzero(~finite).tolist(),
        mean_kl_ba=_finite_mean(per["kl_ba"]),
        max_kl_ba=float(np.nanmax(per["kl_ba"])) if np.isfinite(per["kl_ba"]).any() else None,
        top1_agreement=float(agree.mean()),
        disagreeing_positions=np.flatnonzero(~agree).tolist(),
        **{f"mean_topk_overlap_{k}": float(per[f"topk_overlap_{k}"].mean()) for k in TOPK},
    )
    report["max_logprob_diff"] = (
        float(np.nanmax(per["max_abs_logprob_diff"]))
        if np.isfinite(per["max_abs_logprob_diff"]).any()
        else None
    )
    if "logprob_next_a" in per:
        report["mean_logprob_next_a"] = _finite_mean(per["logprob_next_a"])
        report["mean_logprob_next_b"] = _finite_mean(per["logprob_next_b"])
    for key, values in per.items():
        report[key] = values.tolist() if values.ndim == 2 else _json_list(values)
    return report


# --------------------------------------------------------------------------------- text


def _number(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def format_logit_report(
    report: dict[str, Any],
    token_text: Callable[[int], str] | None = None,
    *,
    limit: int = 8,
    listed_elsewhere: str | None = None,
) -> list[str]:
    """The report as a few plain text lines (the bisect summary's logits block).

    `token_text(id)` names tokens in the list of disagreeing positions (ids only without it);
    at most `limit` positions are listed, the worst KL first. `listed_elsewhere`: where the
    caller lists them instead (the explorer's logits screen has a table), said in place of the
    list.
    """
    seq = report.get("positions", 0)
    if not seq:
        return ["Logits: no positions to compare"]

    def name(token: int) -> str:
        return f"{token} {token_text(token)!r}" if token_text is not None else str(token)

    agree = report["top1_agreement"]
    # One fact a line, each under 80 columns (the explorer's logits screen shows these lines).
    lines = [
        f"Logits, every position ({seq} positions, vocabulary {report['vocab']}):",
        f"  KL(A‖B) mean {_number(report['mean_kl'])}, max {_number(report['max_kl'])} "
        f"at position {report['max_kl_position']} (nats)",
        f"  KL(B‖A) mean {_number(report['mean_kl_ba'])}, max {_number(report['max_kl_ba'])} "
        "(nats)",
        f"  top-1 agreement {round(agree * seq)}/{seq} ({agree:.1%}); top-5 overlap mean "
        f"{report['mean_topk_overlap_5']:.2f}/5, top-10 {report['mean_topk_overlap_10']:.2f}/10",
        f"  max |Δ log p| {_number(report['max_logprob_diff'])} (nats)",
    ]
    if report.get("mean_logprob_next_a") is not None:
        lines.append(
            f"  next-token log-likelihood (mean of {seq - 1}): "
            f"A {_number(report['mean_logprob_next_a'], '.4f')}, "
            f"B {_number(report['mean_logprob_next_b'], '.4f')} (nats)"
        )
    if report.get("nonfinite_positions"):
        lines.append(f"  NaN/Inf logits at {len(report['nonfinite_positions'])} position(s)")
    disagree = report["disagreeing_positions"]
    if not disagree:
        lines.append("  every position predicts the same next token")
        return lines
    if listed_elsewhere is not None:
        lines.append(f"  {len(disagree)} position(s) predict another token ({listed_elsewhere})")
        return lines
    kl = report["kl_ab"]
    worst = sorted(disagree, key=lambda i: -(kl[i] if kl[i] is not None else math.inf))
    shown = ", ".join(
        f"{i} (A {name(report['top1_a'][i])} / B {name(report['top1_b'][i])})"
        for i in worst[:limit]
    )
    more = f", and {len(disagree) - limit} more" if len(disagree) > limit else ""
    lines.append(f"  {len(disagree)} position(s) predict another token: {shown}{more}")
    return lines


# --------------------------------------------------------------------------------- sources


def source_logits(source: Any, vocab: int | None = None) -> LogitRows | None:
    """Every-position logits of one side of a comparison, or None when it has none.

    A model run: its final norm (the source's cached capture, or recomputed) times the head,
    block by block (`ModelLogits`). A trace directory: its `logits_all.bin`, or, when `vocab` is
    known (from the other side), an `lm_head.bin` of exactly `seq × vocab` values (what a
    runtime that keeps every position writes), memory-mapped. apr's last-token `lm_head.bin`
    alone is never taken for a table: its size can divide by seq too. Sources are recognised by
    what they hold (`model` / `trace_dir`), not by class.
    """
    from engine.stages import LOGITS_ALL, WHOLE_MODEL_LAYER

    ids = getattr(source, "token_ids", None)
    model = getattr(source, "model", None)
    if model is not None and ids:
        final_norm = source.tensor(WHOLE_MODEL_LAYER, "final_norm")
        return None if final_norm is None else ModelLogits(model, final_norm)
    trace_dir = getattr(source, "trace_dir", None)
    if trace_dir is None or not ids:
        return None
    from engine.aprt import read_aprt_header

    seq = len(ids)
    path = trace_dir.entries.get((WHOLE_MODEL_LAYER, LOGITS_ALL))
    if path is None:
        path = trace_dir.entries.get((WHOLE_MODEL_LAYER, "lm_head"))
        if path is None or vocab is None or seq < 2:
            return None
        if read_aprt_header(path).dim_product != seq * vocab:
            return None
    try:
        return logits_file_rows(path, seq)
    except DiffError:
        return None


def pair_logit_report(
    a: Any,
    b: Any,
    token_ids: Sequence[int] | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict | None:
    """`logit_report` of two trace sources when both have every-position logits of one shape
    (after the comparison ran, while the sources are open); None otherwise. `progress(done,
    total)` after each block of positions."""
    rows_a, rows_b = source_logits(a), source_logits(b)
    if rows_a is None and rows_b is not None:
        rows_a = source_logits(a, vocab=rows_b.shape[1])
    if rows_b is None and rows_a is not None:
        rows_b = source_logits(b, vocab=rows_a.shape[1])
    if rows_a is None or rows_b is None or tuple(rows_a.shape) != tuple(rows_b.shape):
        return None
    ids = token_ids if token_ids is not None else getattr(a, "token_ids", None)
    return logit_report(rows_a, rows_b, ids, progress=progress)
