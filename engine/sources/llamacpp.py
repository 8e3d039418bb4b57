"""llama.cpp as a trace source: its own graph, every stage from the scheduler's eval callback.

A GGUF runs through llama.cpp (the `llama-cpp-python` package, imported only here) in a single
ubatch with logits requested for every position, so one `llama_decode` evaluates one graph that
holds every stage of every layer. The ggml scheduler's eval callback (`cb_eval`, the mechanism
of llama.cpp's `examples/eval-callback`) is asked about each graph node; we say yes to the nodes
that map onto apr stages and copy each one out when it has been computed
(shared/reference/llamacpp-notes.md has the measured facts this module relies on).

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

Settings that change the numbers (`n_threads`, `flash_attn`, `type_k` / `type_v` of the KV
cache) are parameters with llama.cpp's defaults except flash attention (off, because it removes
the score nodes), and are recorded by `record()` and in a dumped trace's `source.json`.

Memory: captures are assembled and handed out one layer at a time (a layer's stages plus the
whole-model ones at the end), from a decode running on a worker thread that waits for the
consumer, so the host never holds more than about one layer of activations besides llama.cpp's
own graph buffers.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import AprTuiError, FormatError, MissingPackageError
from engine.formats.gguf.metadata import config_from_metadata
from engine.formats.gguf.parser import read_header
from engine.formats.row_order import unpermute_rows
from engine.forward import Capture, check_token_ids
from engine.model import ModelConfig
from engine.sources.base import ReplayingSource, TensorCache
from engine.sources.streaming import Emit, run_in_worker
from engine.stages import DENSE_STAGES, STAGES, WHOLE_MODEL_LAYER

LLAMA_CPP_PACKAGE = "llama-cpp-python"
"""The PyPI package that provides `llama_cpp` (a CPU wheel is in ../shared/wheels/)."""

MISSING_PACKAGE_HINT = (
    f"the llama.cpp source needs the {LLAMA_CPP_PACKAGE} package (pip install {LLAMA_CPP_PACKAGE})"
)

KV_CACHE_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "bf16": 30,
}
"""KV cache element types by name → `enum ggml_type` (values from ggml.h). llama.cpp accepts a
quantized V cache only with flash attention on."""

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_ROPE_TYPE_NEOX = 2
"""RoPE mode bit of split-half (NEOX) rotation; without it the rotation pairs adjacent dims."""

CACHE_BYTES = 256 * 1024 * 1024
"""Host bytes of stage tensors kept for `tensor()` drill-down (least recently used dropped)."""

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


# ----------------------------------------------------------------------------------- ctypes


class GgmlTensor(ctypes.Structure):
    """ctypes mirror of `struct ggml_tensor` (ggml.h of the bundled libggml).

    Only read, never written. Its size is checked against `ggml_tensor_overhead()` (the struct
    plus a 32-byte `ggml_object` header on 64-bit) before first use, so a changed layout fails
    loudly instead of reading garbage.
    """

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
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


GGML_OBJECT_HEADER = 32
"""sizeof(struct ggml_object) on 64-bit, included in ggml_tensor_overhead()."""


class _Library:
    """The loaded `llama_cpp` module and the libggml functions this source calls."""

    def __init__(self) -> None:
        try:
            import llama_cpp
            from llama_cpp import _ggml
        except ImportError:
            raise MissingPackageError(MISSING_PACKAGE_HINT) from None
        self.llama = llama_cpp
        self.version = getattr(llama_cpp, "__version__", "unknown")
        ggml = _ggml.libggml
        ggml.ggml_tensor_overhead.restype = ctypes.c_size_t
        ggml.ggml_tensor_overhead.argtypes = []
        ggml.ggml_op_name.restype = ctypes.c_char_p
        ggml.ggml_op_name.argtypes = [ctypes.c_int]
        ggml.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        ggml.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_tensor_get.restype = None
        ggml.ggml_backend_tensor_get.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
        ]
        self.ggml = ggml
        expected = ggml.ggml_tensor_overhead() - GGML_OBJECT_HEADER
        if ctypes.sizeof(GgmlTensor) != expected:
            raise AprTuiError(
                f"llama.cpp source: struct ggml_tensor is {expected} bytes in this "
                f"{LLAMA_CPP_PACKAGE} {self.version}, the mirror expects "
                f"{ctypes.sizeof(GgmlTensor)}; this version is not supported"
            )
        self.op_names: dict[int, str] = {}
        self.errors: deque[str] = deque(maxlen=8)
        """The last error lines llama.cpp logged (quoted in our error messages)."""
        # llama.cpp logs to stderr by default, which would tear the terminal UI: keep its
        # errors for our messages and drop the rest. The logger is process-global.
        self._log_callback = llama_cpp.llama_log_callback(self._log)
        llama_cpp.llama_log_set(self._log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()

    def _log(self, level: int, text: bytes, _user_data: Any) -> None:
        if level == 3 and text:  # GGML_LOG_LEVEL_ERROR
            line = text.decode("utf-8", "replace").strip()
            if line:
                self.errors.append(line)

    def op_name(self, op: int) -> str:
        name = self.op_names.get(op)
        if name is None:
            raw = self.ggml.ggml_op_name(op)
            name = self.op_names[op] = raw.decode() if raw else str(op)
        return name

    def last_error(self) -> str:
        return f": {self.errors[-1]}" if self.errors else ""


_LIBRARY: _Library | None = None
_LIBRARY_LOCK = threading.Lock()


def load_library() -> _Library:
    """The llama.cpp bindings, loaded once; MissingPackageError without the package."""
    global _LIBRARY
    with _LIBRARY_LOCK:
        if _LIBRARY is None:
            _LIBRARY = _Library()
        return _LIBRARY


def llama_cpp_available() -> bool:
    """Whether `llama_cpp` can be imported (without loading it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def copy_tensor(lib: _Library, tensor: GgmlTensor) -> np.ndarray:
    """A float32 host copy of a computed graph tensor in row-major order (ggml's `ne` reversed).

    Host buffers are read in place through the tensor's byte strides `nb` (views included);
    device buffers are fetched with `ggml_backend_tensor_get`, which needs a contiguous tensor.
    """
    dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16}.get(tensor.type)
    name = tensor.name.decode(errors="replace")
    if dtype is None:
        raise AprTuiError(f"llama.cpp node {name!r} has ggml type {tensor.type}, not f32/f16")
    shape = tuple(int(n) for n in reversed(tensor.ne))
    strides = tuple(int(s) for s in reversed(tensor.nb))
    itemsize = np.dtype(dtype).itemsize
    if any(n == 0 for n in shape):
        return np.zeros(shape, dtype=np.float32)
    span = sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + itemsize
    host = not tensor.buffer or lib.ggml.ggml_backend_buffer_is_host(tensor.buffer)
    if host:
        raw = (ctypes.c_char * span).from_address(tensor.data)
        view = np.ndarray(shape, dtype=dtype, buffer=raw, strides=strides)
        return np.array(view, dtype=np.float32, copy=True)
    contiguous = strides == tuple(int(np.prod(shape[i + 1 :])) * itemsize for i in range(4))
    if not contiguous:
        raise AprTuiError(f"llama.cpp node {name!r} is a strided view in device memory")
    out = np.empty(shape, dtype=dtype)
    lib.ggml.ggml_backend_tensor_get(ctypes.addressof(tensor), out.ctypes.data, 0, span)
    return out.astype(np.float32)


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

_LAST_ROLE = "l_out"
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
class _Node:
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


def assemble_layer(nodes: dict[str, _Node], seq: int) -> list[tuple[str, np.ndarray]]:
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


# ------------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class LlamaCppSettings:
    """The llama.cpp settings that change numbers. Defaults are llama.cpp's, except flash
    attention, which is off so that the `kq` / `kq_soft_max` nodes exist."""

    n_threads: int | None = None
    """Threads for the (batch) decode; None keeps llama.cpp's default."""
    flash_attn: bool = False
    type_k: str = "f16"
    """KV cache K type (a key of KV_CACHE_TYPES); llama.cpp's default is f16."""
    type_v: str = "f16"

    def __post_init__(self) -> None:
        for key in ("type_k", "type_v"):
            value = getattr(self, key)
            if value not in KV_CACHE_TYPES:
                known = ", ".join(KV_CACHE_TYPES)
                raise AprTuiError(f"llama.cpp {key} {value!r}: expected one of {known}")
        if self.n_threads is not None and not 1 <= int(self.n_threads) <= 1024:
            raise AprTuiError(f"llama.cpp n_threads {self.n_threads}: expected 1..1024")


@dataclass
class _Run:
    """State of one decode: which nodes to copy and where the per-layer parts go."""

    want: Callable[[int, str], bool]
    emit: Callable[[int, dict[str, _Node]], bool]
    seq: int
    stop_after: int | None = None
    """The last layer wanted when no whole-model stage is: the graph stops right after it."""
    parts: dict[int, dict[str, _Node]] = field(default_factory=dict)
    stopped: bool = False
    error: BaseException | None = None


class LlamaCppSource(ReplayingSource):
    """A GGUF run through llama.cpp's own graph, captured stage by stage."""

    kind = "llama.cpp"

    def __init__(
        self,
        gguf_path: str | Path,
        token_ids: list[int],
        *,
        prompt: str | None = None,
        settings: LlamaCppSettings | None = None,
        cache_bytes: int = CACHE_BYTES,
        **setting_overrides: Any,
    ) -> None:
        self.path = Path(gguf_path)
        self.settings = settings or LlamaCppSettings(**setting_overrides)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: not a GGUF file (llama.cpp runs .gguf models)")
        header = read_header(self.path)
        self.config: ModelConfig
        self.config, self.gguf_architecture = config_from_metadata(
            header.metadata, header.tensors, str(self.path)
        )
        self.token_ids = check_token_ids(token_ids, self.config, str(self.path))
        if not self.token_ids:
            raise AprTuiError(f"{self.path}: llama.cpp needs at least one token")
        self.prompt = prompt
        self.num_layers = self.config.num_layers
        self.not_produced = self._not_produced()
        self.stages = tuple(
            s.name
            for s in DENSE_STAGES
            if s.name not in self.not_produced and (s.name != "qkv_bias" or self.config.qkv_bias)
        )
        self.lib = load_library()
        self._model: Any = None
        self._model_lock = threading.Lock()
        self._resolved_threads: int | None = None
        self._cache = TensorCache(cache_bytes)
        self.label = f"llama.cpp:{self.path.name}"
        self.description = self._describe()

    def adopt_tokens(self, token_ids: list[int], prompt: str | None = None) -> None:
        """Run these ids from now on (e.g. the other side's tokens.json); drops cached stages."""
        ids = check_token_ids(token_ids, self.config, str(self.path))
        if not ids:
            raise AprTuiError(f"{self.path}: llama.cpp needs at least one token")
        self.token_ids, self.prompt = ids, prompt
        self._cache.clear()

    # -- what it is ---------------------------------------------------------------------

    def _not_produced(self) -> dict[str, str]:
        reasons = dict(NOT_PRODUCED)
        if not self.config.qkv_bias:
            reasons["qkv_bias"] = "the model has no QKV bias"
        if self.settings.flash_attn:
            for name in ("attn_scores", "attn_softmax"):
                reasons[name] = "flash attention fuses the scores and softmax (no kq nodes)"
        for stage in STAGES:
            if stage.moe:
                reasons[stage.name] = "dense model: no mixture-of-experts stages"
            elif not stage.apr:  # post_attn_norm, ffn_gelu, post_ffn_norm
                reasons[stage.name] = "a Gemma step: this graph mapping covers Llama and Qwen2"
        return reasons

    def _threads(self) -> int:
        if self.settings.n_threads is not None:
            return int(self.settings.n_threads)
        if self._resolved_threads is None:
            self._resolved_threads = int(self.lib.llama.llama_context_default_params().n_threads)
        return self._resolved_threads

    def _describe(self) -> str:
        s = self.settings
        return (
            f"{self.path} via llama.cpp ({LLAMA_CPP_PACKAGE} {self.lib.version}, CPU, "
            f"{self._threads()} threads, flash attention {'on' if s.flash_attn else 'off'}, "
            f"KV cache {s.type_k}/{s.type_v})"
        )

    def record(self) -> dict[str, Any]:
        """What this source is and every setting that changes its numbers (JSON-ready)."""
        s = self.settings
        return {
            "engine": "llama.cpp",
            "package": f"{LLAMA_CPP_PACKAGE} {self.lib.version}",
            "model": str(self.path),
            "gguf_architecture": self.gguf_architecture,
            "device": "cpu",
            "settings": {
                "n_threads": self._threads(),
                "n_threads_batch": self._threads(),
                "flash_attn": s.flash_attn,
                "type_k": s.type_k,
                "type_v": s.type_v,
                "n_ubatch": len(self.token_ids),
                "logits": "all positions",
            },
            "conventions": {k: v for k, v in CONVENTIONS.items() if k in self.stages},
            "not_produced": dict(self.not_produced),
        }

    # -- running llama.cpp --------------------------------------------------------------

    def _load_model(self) -> Any:
        with self._model_lock:
            if self._model is None:
                llama = self.lib.llama
                params = llama.llama_model_default_params()
                params.n_gpu_layers = 0
                model = llama.llama_model_load_from_file(str(self.path).encode(), params)
                if not model:
                    raise FormatError(
                        f"{self.path}: llama.cpp could not load this GGUF{self.lib.last_error()}"
                    )
                self._model = model
            return self._model

    def _decode(self, run: _Run) -> None:
        """One llama_decode of the whole prompt with a fresh context, copying wanted nodes.

        A context per decode (cheap next to the decode itself) lets runs overlap: a drill-down
        `tensor()` while a `captures()` iteration is paused runs its own decode on the shared
        model instead of waiting for the paused one.
        """
        llama, lib = self.lib.llama, self.lib
        model = self._load_model()
        seq = len(self.token_ids)
        params = llama.llama_context_default_params()
        params.n_ctx = seq
        params.n_batch = seq
        params.n_ubatch = seq
        params.n_seq_max = 1
        params.n_threads = self._threads()
        params.n_threads_batch = self._threads()
        params.flash_attn_type = (
            llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self.settings.flash_attn
            else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.type_k = KV_CACHE_TYPES[self.settings.type_k]
        params.type_v = KV_CACHE_TYPES[self.settings.type_v]
        params.no_perf = True

        def ask_or_copy(address: int, ask: bool, _user: Any) -> bool:
            try:
                if run.stopped:
                    return False
                tensor = GgmlTensor.from_address(address)
                src1 = tensor.src[1]
                src1_name = (
                    GgmlTensor.from_address(src1).name.decode(errors="replace") if src1 else None
                )
                name = tensor.name.decode(errors="replace")
                found = classify(name, lib.op_name(tensor.op), src1_name)
                if found is None or not run.want(*found):
                    return not ask  # not wanted: skip it when asked, carry on otherwise
                if ask:
                    return True
                layer, role = found
                node = _Node(copy_tensor(lib, tensor), tuple(tensor.op_params))
                parts = run.parts.setdefault(layer, {})
                parts[role] = node
                # A layer (with the embedding, for layer 0) is complete at l_out; the whole-model
                # stages at result_output. Hand it out; the consumer may ask us to stop.
                complete = role == _LAST_ROLE or role == "result_output"
                if complete and not run.emit(layer, run.parts.pop(layer)):
                    run.stopped = True
                    return False
                if complete and layer == run.stop_after:
                    run.stopped = True  # nothing later is wanted: skip the rest of the graph
                    return False
                return True
            except BaseException as error:  # never let an exception cross into C
                run.error = run.error or error
                run.stopped = True
                return False

        callback = llama.ggml_backend_sched_eval_callback(ask_or_copy)
        params.cb_eval = callback
        params.cb_eval_user_data = None
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            raise AprTuiError(
                f"{self.path}: llama.cpp could not create a context with these settings "
                f"({self._describe()}){self.lib.last_error()}"
            )
        batch = llama.llama_batch_init(seq, 0, 1)
        try:
            for i, token in enumerate(self.token_ids):
                batch.token[i] = token
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = seq
            status = llama.llama_decode(ctx, batch)
        finally:
            llama.llama_batch_free(batch)
            llama.llama_free(ctx)
        if run.error is not None:
            raise run.error
        if status != 0 and not run.stopped:
            raise AprTuiError(
                f"{self.path}: llama_decode failed with status {status}{self.lib.last_error()}"
            )

    def _stream(
        self,
        want: Callable[[int, str], bool],
        cancel: threading.Event | None,
        stop_after: int | None = None,
    ) -> Iterator[tuple[int, list[tuple[str, np.ndarray]]]]:
        """(layer, stages) as each layer completes, from a decode on a worker thread
        (engine.sources.streaming): at most one assembled layer waits at a time, and leaving
        the iterator early stops the decode."""
        seq = len(self.token_ids)

        def run(emit: Emit) -> None:
            def emit_layer(layer: int, nodes: dict[str, _Node]) -> bool:
                return emit((layer, assemble_layer(nodes, seq)))

            self._decode(_Run(want=want, emit=emit_layer, seq=seq, stop_after=stop_after))

        return run_in_worker(run, cancel, name="llama.cpp-decode")

    # -- TraceSource --------------------------------------------------------------------

    def captures(
        self,
        layers: range | None = None,
        cancel: threading.Event | None = None,
        whole_model: bool = True,
    ) -> Iterator[Capture]:
        selected = range(self.num_layers) if layers is None else layers

        def want(layer: int, role: str) -> bool:
            if layer == WHOLE_MODEL_LAYER:
                return whole_model
            if role == "embd":
                return 0 in selected
            return layer in selected

        wanted = [n for n in selected if 0 <= n < self.num_layers]
        stop_after = None if whole_model or not wanted else max(wanted)
        yield from self._yield_layers(self._stream(want, cancel, stop_after), cancel)

    def close(self) -> None:
        self._cache.clear()
        with self._model_lock:
            if self._model is not None:
                self.lib.llama.llama_model_free(self._model)
                self._model = None


# ------------------------------------------------------------------------------- dumping


def dump_llamacpp_trace(
    gguf_path: str | Path,
    token_ids: list[int],
    out_dir: str | Path,
    *,
    prompt: str | None = None,
    layers: range | None = None,
    **settings: Any,
) -> Path:
    """Run `gguf_path` through llama.cpp and write every stage as an APRT trace directory
    (engine.sources.dump.write_trace: stage files, `tokens.json`, `source.json` with the
    settings). Refuses a directory that already holds files. Returns the directory."""
    from engine.sources.dump import write_trace

    with LlamaCppSource(gguf_path, token_ids, prompt=prompt, **settings) as source:
        return write_trace(source, out_dir, prompt=prompt, layers=layers)
