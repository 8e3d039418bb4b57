"""Flat element indices of a stage tensor as coordinates a person can read.

The drill-down's top-K table lists flat indices into a stage's row-major tensor; this module
turns them back into what the index means for that stage:

- `[seq, hidden]` stages: token position (with its text) and channel;
- the attention projections, when the model's head layout is known (`engine.heads.HeadLayout`,
  the widths the forward pass and the trace directories use too):
  `qkv_matmul` / `qkv_bias` columns are Q (num_heads × head_dim), then K, then V (num_kv_heads ×
  head_dim each), split into the part, head and dim; `q_post_rope` / `attention` are
  (token, head, dim) and `k_post_rope` is (token, kv head, dim);
- `attn_scores` / `attn_softmax` `[heads, seq, seq]`: head, query and key position;
- `lm_head` (last-token logits): vocabulary id and token text.

A trace directory carries no model config, so between two directories the head layout is
unknown and the projections fall back to (token, channel); the stage files are flat there, and
the token count (tokens.json) gives back the `[seq, …]` rows (`decoding_shape`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.heads import FUSED_QKV_STAGES, KEY_HEAD_STAGES, HeadLayout

ATTENTION_MATRIX_STAGES = ("attn_scores", "attn_softmax")
"""`[heads, seq, seq]`: decoded as (head, query position, key position)."""


def channel_words(heads: HeadLayout, stage: str, channel: int) -> str:
    """A column of a head-structured stage in words: `Q head 2, dim 5` / `K kv head 1, dim 0`
    (fused QKV), `head 3, dim 7` (query heads) or `kv head 1, dim 2` (key heads)."""
    if stage in FUSED_QKV_STAGES:
        if channel < heads.q_dim:
            part, offset, head_word = "Q", channel, "head"
        elif channel < heads.q_dim + heads.kv_dim:
            part, offset, head_word = "K", channel - heads.q_dim, "kv head"
        else:
            part, offset, head_word = "V", channel - heads.q_dim - heads.kv_dim, "kv head"
        head, dim = divmod(offset, heads.head_dim)
        return f"{part} {head_word} {head}, dim {dim}"
    head, dim = divmod(channel, heads.head_dim)
    head_word = "kv head" if stage in KEY_HEAD_STAGES else "head"
    return f"{head_word} {head}, dim {dim}"


def decoding_shape(stage: str, shape: tuple[int, ...], n_tokens: int) -> tuple[int, ...]:
    """The shape to decode indices with: `shape` itself, or for a flat tensor (a trace file read
    without a model config) its `[seq, count / seq]` rows (`[heads, seq, seq]` for attention
    matrices) when the token count divides it. `lm_head` is the last token's logits: flat."""
    if len(shape) != 1 or stage == "lm_head" or n_tokens <= 0:
        return shape
    (count,) = shape
    if stage in ATTENTION_MATRIX_STAGES:
        per_head = n_tokens * n_tokens
        if count % per_head == 0 and count > 0:
            return (count // per_head, n_tokens, n_tokens)
        return shape
    if count % n_tokens == 0 and count > 0:
        return (n_tokens, count // n_tokens)
    return shape


def display_token(text: str) -> str:
    """A byte-level BPE vocabulary entry as a person reads it (`Ġ` is a space, `Ċ` a newline)."""
    return text.replace("Ġ", "␣").replace("Ċ", "⏎")


def quoted_token(text: str) -> str:
    return repr(display_token(text))[:14]


def decode_index(
    index: int,
    stage: str,
    shape: tuple[int, ...],
    token_ids: tuple[int, ...],
    token_text: Callable[[int], str] | None,
    heads: HeadLayout | None = None,
) -> str:
    """A flat element index of a `shape` tensor of `stage` as readable coordinates."""

    def token(position: int) -> str:
        if token_text is None or position >= len(token_ids):
            return f"{position}"
        try:
            return f"{position} {quoted_token(token_text(token_ids[position]))}"
        except Exception:  # a tokenizer that cannot show an id must not break the view
            return f"{position}"

    shape = decoding_shape(stage, shape, len(token_ids))
    if not shape or int(np.prod(shape)) <= index:
        return f"[{index}]"
    coords = np.unravel_index(index, shape)
    if stage == "lm_head" and len(shape) == 1:
        vocab_id = int(coords[0])
        if token_text is None:
            return f"vocab {vocab_id}"
        try:
            return f"vocab {vocab_id} {quoted_token(token_text(vocab_id))}"
        except Exception:
            return f"vocab {vocab_id}"
    if stage in ATTENTION_MATRIX_STAGES and len(shape) == 3:
        head, query, key = (int(c) for c in coords)
        return f"head {head}, query {token(query)}, key {token(key)}"
    if len(shape) == 2:
        position, channel = (int(c) for c in coords)
        if heads is not None and heads.stage_width(stage) == shape[1]:
            return f"token {token(position)}, {channel_words(heads, stage, channel)}"
        return f"token {token(position)}, channel {channel}"
    return "[" + ", ".join(str(int(c)) for c in coords) + "]"
