"""A direct eval-callback dump of every llama.cpp graph node: the oracle for the llama.cpp source.

Written independently of engine.sources.llamacpp, the way llama.cpp's `examples/eval-callback`
works: say yes to *every* node, and when it is computed copy its bytes with
`ggml_backend_tensor_get` (not by strides), keeping name, op, `ne` and the op parameters. The
tests then apply the documented stage mapping themselves and compare with the source.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class _Tensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml.h): only the leading fields up to `name` are read."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


@dataclass
class Node:
    name: str
    op: str
    ne: tuple[int, ...]
    op_params: tuple[int, ...]
    src1: str | None
    values: np.ndarray | None
    """Flat float32 values in ggml order (ne[0] fastest) for contiguous f32 nodes, else None."""


def dump_all_nodes(
    gguf: Path, token_ids: list[int], n_threads: int = 4, ctx_type_k: int = 1
) -> list[Node]:
    """Every node of one whole-prompt decode (all logits), in evaluation order."""
    import llama_cpp as L
    from llama_cpp import _ggml

    ggml = _ggml.libggml
    ggml.ggml_op_name.restype = ctypes.c_char_p
    ggml.ggml_op_name.argtypes = [ctypes.c_int]
    ggml.ggml_nbytes.restype = ctypes.c_size_t
    ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
    ggml.ggml_is_contiguous.restype = ctypes.c_bool
    ggml.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    nodes: list[Node] = []

    def callback(address, ask, _user):
        if ask:
            return True
        t = _Tensor.from_address(address)
        values = None
        if t.type == 0 and ggml.ggml_is_contiguous(address):
            values = np.empty(ggml.ggml_nbytes(address) // 4, dtype=np.float32)
            ggml.ggml_backend_tensor_get(address, values.ctypes.data, 0, values.nbytes)
        src1 = _Tensor.from_address(t.src[1]).name.decode() if t.src[1] else None
        nodes.append(
            Node(
                t.name.decode(),
                ggml.ggml_op_name(t.op).decode(),
                tuple(t.ne),
                tuple(t.op_params),
                src1,
                values,
            )
        )
        return True

    seq = len(token_ids)
    model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
    assert model, f"llama.cpp could not load {gguf}"
    params = L.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = seq
    params.n_threads = params.n_threads_batch = n_threads
    params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.type_k = params.type_v = ctx_type_k
    keep = L.ggml_backend_sched_eval_callback(callback)
    params.cb_eval = keep
    ctx = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(seq, 0, 1)
    try:
        for i, token in enumerate(token_ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = seq
        assert L.llama_decode(ctx, batch) == 0
        logits = np.ctypeslib.as_array(
            L.llama_get_logits(ctx),
            shape=(seq * L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)),),
        ).copy()
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    nodes.append(Node("llama_get_logits", "", (), (), None, logits))
    return nodes
