"""llama.cpp's graph nodes → apr stages: which node holds which stage, and how it is made to
mean what ours means.

Pure numpy, no llama.cpp: engine.sources.llamacpp's eval callback asks `classify` about each
graph node (its name, op and second source) and hands the copied nodes of a layer to
`assemble_layer`, which slices, scales, concatenates and un-permutes them into apr's stages.

Names → stages (Llama / Qwen2 / Qwen3 graphs of llama.cpp as bundled by llama-cpp-python 0.3.36;
several nodes share a name, so nodes are picked by name *and* op):

    embedding           embd | inp_embd (GET_ROWS)
    attn_norm           attn_norm-N (MUL)
    qkv_matmul          Qcur-N, Kcur-N, Vcur-N (MUL_MAT), concatenated [Q | K | V] per token
    qkv_bias            Qcur-N, Kcur-N, Vcur-N (ADD), only for models with a QKV bias
    q_post_rope         Qcur-N (ROPE)
    k_post_rope         Kcur-N (ROPE)
    attn_scores         kq-N (MUL_MAT) × the scale of the SOFT_MAX that consumes it
    attn_softmax        kq_soft_max-N (SOFT_MAX)
    attention           kqv_out-N (CONT; a RESHAPE of FLASH_ATTN_EXT with flash attention)
    attn_out            the MUL_MAT whose src[1] is kqv_out-N (named attn_out-N on Llama,
                        unnamed on Qwen2)
    post_attn_residual  ffn_inp-N (ADD)
    ffn_norm            ffn_norm-N (MUL)
    ffn_gate / ffn_up   ffn_gate-N / ffn_up-N (MUL_MAT)
    ffn_swigl           ffn_swiglu-N (GLU)
    ffn_out             ffn_out-N (MUL_MAT)
    post_ffn_residual   l_out-N (ADD)
    final_norm          result_norm (MUL)
    lm_head             result_output (MUL_MAT)

Meaning, where llama.cpp's tensors differ from ours (stated, not hidden):
- `attn_scores`: llama.cpp's `kq` is unscaled and unmasked; it is multiplied by the SOFT_MAX
  op's own scale (op_params[0]) so the causal entries mean what ours mean (scaled q·k). The
  future (above-diagonal) entries are llama.cpp's raw products times that scale, not apr's
  zeros: compare causal entries only.
- `attn_scores` / `attn_softmax`: llama.cpp pads the KV cells (to 256 on CPU); the cells past the
  prompt are sliced off, leaving [heads, seq, seq].
- `q_post_rope`, `k_post_rope`, and the Q/K columns of `qkv_matmul` / `qkv_bias`: where the graph
  uses llama.cpp's normal (adjacent-pair) RoPE, the GGUF holds Q/K rows permuted
  (convert_hf_to_gguf.py), so these are un-permuted to HF order per head
  (engine.formats.gguf.unpermute_rows), as our GGUF reader does for the weights.
- `lm_head` is `[seq, vocab]`, the logits of every position (ours is the last row only).
- `ffn_silu` is not produced: llama.cpp fuses the SiLU into the GLU op.
- With flash attention on, the `kq` / `kq_soft_max` nodes do not exist: `attn_scores` and
  `attn_softmax` are then not produced.
- Weights stay quantized and activations are quantized to Q8 blocks before quantized matmuls, so
  agreement with a float32 path is close, not exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engine.formats.row_order import unpermute_rows
from engine.stages import STAGES, WHOLE_MODEL_LAYER

GGML_ROPE_TYPE_NEOX = 2
"""RoPE mode bit of split-half (NEOX) rotation; without it the rotation pairs adjacent dims."""

NOT_PRODUCED: dict[str, str] = {
    "ffn_silu": "llama.cpp fuses the SiLU into the GLU op (ffn_swiglu); no node holds it",
}
"""Stages llama.cpp's graph never holds, whatever the settings, with the reason."""

CONVENTIONS: dict[str, str] = {
    "attn_scores": (
        "kq × the SOFT_MAX scale; causal entries are scaled scores like apr's, future entries "
        "are llama.cpp's raw (unmasked) products × scale, not zeros; padded KV cells sliced"
    ),
    "attn_softmax": "causal mask applied by llama.cpp; padded KV cells (mass 0) sliced",
    "lm_head": "[seq, vocab]: the logits of every position (apr's is the last row)",
    "q_post_rope": "un-permuted to HF order when the graph uses adjacent-pair RoPE",
    "k_post_rope": "un-permuted to HF order when the graph uses adjacent-pair RoPE",
    "qkv_matmul": "[Q | K | V] per token; Q/K un-permuted like q_post_rope / k_post_rope",
}
"""How this source's tensors differ in meaning from apr's, stage by stage (also in record())."""


# ------------------------------------------------------------------------------ the mapping

_LAYER_NAME = re.compile(r"(?P<base>[A-Za-z_]+)-(?P<layer>[0-9]+)")

_ROLES_BY_NAME_OP: dict[tuple[str, str], str] = {
    ("attn_norm", "MUL"): "attn_norm",
    ("Qcur", "MUL_MAT"): "q_mm",
    ("Kcur", "MUL_MAT"): "k_mm",
    ("Vcur", "MUL_MAT"): "v_mm",
    ("Qcur", "ADD"): "q_bias",
    ("Kcur", "ADD"): "k_bias",
    ("Vcur", "ADD"): "v_bias",
    ("Qcur", "ROPE"): "q_rope",
    ("Kcur", "ROPE"): "k_rope",
    ("kq", "MUL_MAT"): "kq",
    ("kq_soft_max", "SOFT_MAX"): "softmax",
    ("kqv_out", "CONT"): "kqv_out",
    ("kqv_out", "RESHAPE"): "kqv_out",  # with flash attention: a view of FLASH_ATTN_EXT's output
    ("ffn_inp", "ADD"): "ffn_inp",
    ("ffn_norm", "MUL"): "ffn_norm",
    ("ffn_gate", "MUL_MAT"): "ffn_gate",
    ("ffn_up", "MUL_MAT"): "ffn_up",
    ("ffn_swiglu", "GLU"): "ffn_swiglu",
    ("ffn_out", "MUL_MAT"): "ffn_out",
    ("l_out", "ADD"): "l_out",
}
"""(llama.cpp base name, op) → internal role of a per-layer node."""

_WHOLE_MODEL_ROLES: dict[tuple[str, str], str] = {
    ("embd", "GET_ROWS"): "embd",
    ("inp_embd", "GET_ROWS"): "embd",
    ("result_norm", "MUL"): "result_norm",
    ("result_output", "MUL_MAT"): "result_output",
}
"""(node name, op) → role of the nodes without a layer suffix."""

LAST_ROLE = "l_out"
"""The node that completes a layer: its stages are handed out once it has been copied."""


def classify(name: str, op: str, src1_name: str | None) -> tuple[int, str] | None:
    """(layer, role) of a graph node we want, or None. Layer is WHOLE_MODEL_LAYER for the
    result nodes and 0 for the embedding. `src1_name` names the node's second source, which
    identifies the attention output projection however the graph names it."""
    whole = _WHOLE_MODEL_ROLES.get((name, op))
    if whole is not None:
        return (0 if whole == "embd" else WHOLE_MODEL_LAYER), whole
    if op == "MUL_MAT" and src1_name is not None:
        source = _LAYER_NAME.fullmatch(src1_name)
        if source is not None and source.group("base") == "kqv_out":
            return int(source.group("layer")), "attn_out"
    match = _LAYER_NAME.fullmatch(name)
    if match is None:
        return None
    role = _ROLES_BY_NAME_OP.get((match.group("base"), op))
    return None if role is None else (int(match.group("layer")), role)


@dataclass
class Node:
    """One copied graph node: its values (row-major) and the op parameters we interpret."""

    values: np.ndarray
    op_params: tuple[int, ...]


def _f32_param(bits: int) -> float:
    """A float stored bit-for-bit in an int32 op parameter."""
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def _unpermute_cols(values: np.ndarray, heads: int) -> np.ndarray:
    """[seq, heads·hd] columns in llama.cpp's adjacent-pair order → HF rotate-half order."""
    return np.ascontiguousarray(unpermute_rows(values.T, heads).T)  # [seq, heads * hd]


def _heads_seq_cells(values: np.ndarray) -> np.ndarray:
    """A kq-shaped node (ggml ne = [cells, seq, heads, 1]) as [heads, seq, cells]."""
    return values.reshape(values.shape[-3:])


def assemble_layer(nodes: dict[str, Node], seq: int) -> list[tuple[str, np.ndarray]]:
    """The apr stages of one layer, in apr order, from its copied nodes (missing ones skipped).

    Pure numpy: slicing, reshaping, scaling by the softmax's own scale and un-permuting.
    """
    out: dict[str, np.ndarray] = {}

    def flat(role: str) -> np.ndarray | None:
        node = nodes.get(role)
        return None if node is None else node.values.reshape(seq, -1)  # [seq, width]

    q_heads = kv_heads = None
    permuted = False
    for role in ("q_rope", "k_rope"):
        node = nodes.get(role)
        if node is not None:
            heads = int(node.values.shape[-2])  # ROPE output ne = [hd, heads, seq]
            if role == "q_rope":
                q_heads = heads
            else:
                kv_heads = heads
            permuted = not (node.op_params[2] & GGML_ROPE_TYPE_NEOX)

    def hf_order(values: np.ndarray | None, heads: int | None) -> np.ndarray | None:
        if values is None or not permuted or heads is None:
            return values
        return _unpermute_cols(values, heads)

    if "embd" in nodes:
        out["embedding"] = flat("embd")
    if "attn_norm" in nodes:
        out["attn_norm"] = flat("attn_norm")
    for stage_name, roles in (("qkv_matmul", "mm"), ("qkv_bias", "bias")):
        q, k, v = flat(f"q_{roles}"), flat(f"k_{roles}"), flat(f"v_{roles}")
        if q is not None and k is not None and v is not None:
            out[stage_name] = np.concatenate(
                [hf_order(q, q_heads), hf_order(k, kv_heads), v], axis=1
            )  # [seq, q_dim + 2 * kv_dim]
    if "q_rope" in nodes:
        out["q_post_rope"] = hf_order(flat("q_rope"), q_heads)  # [seq, q_dim]
    if "k_rope" in nodes:
        out["k_post_rope"] = hf_order(flat("k_rope"), kv_heads)  # [seq, kv_dim]
    softmax = nodes.get("softmax")
    if "kq" in nodes and softmax is not None:
        scale = _f32_param(softmax.op_params[0])
        kq = _heads_seq_cells(nodes["kq"].values)  # [heads, seq, cells]
        out["attn_scores"] = np.ascontiguousarray(kq[:, :, :seq] * np.float32(scale))
    if softmax is not None:
        probs = _heads_seq_cells(softmax.values)  # [heads, seq, cells]
        out["attn_softmax"] = np.ascontiguousarray(probs[:, :, :seq])
    for stage_name, role in (
        ("attention", "kqv_out"),
        ("attn_out", "attn_out"),
        ("post_attn_residual", "ffn_inp"),
        ("ffn_norm", "ffn_norm"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_up", "ffn_up"),
        ("ffn_swigl", "ffn_swiglu"),
        ("ffn_out", "ffn_out"),
        ("post_ffn_residual", "l_out"),
    ):
        if role in nodes:
            out[stage_name] = flat(role)
    if "result_norm" in nodes:
        out["final_norm"] = flat("result_norm")  # [seq, hidden]
    if "result_output" in nodes:
        out["lm_head"] = flat("result_output")  # [seq, vocab]
    order = {s.name: s.index for s in STAGES}
    return sorted(out.items(), key=lambda item: order[item[0]])
