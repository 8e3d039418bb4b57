"""llama.cpp as a trace source: its own graph, every stage from the scheduler's eval callback.

A GGUF runs through llama.cpp (the `llama-cpp-python` package, imported only by
engine.sources.llamacpp_lib) in a single ubatch with logits requested for every position, so one
`llama_decode` evaluates one graph that holds every stage of every layer. The ggml scheduler's
eval callback (`cb_eval`, the mechanism of llama.cpp's `examples/eval-callback`) is asked about
each graph node; we say yes to the nodes that map onto apr stages and copy each one out when it
has been computed (shared/reference/llamacpp-notes.md has the measured facts this module relies
on).

Which graph node holds which apr stage, and where its meaning differs from ours, is
engine.sources.llamacpp_graph (pure numpy); loading llama-cpp-python and reading a graph
tensor's memory is engine.sources.llamacpp_lib. This module runs the decode and hands out
the captures.

Settings that change the numbers (`n_threads`, `flash_attn`, `type_k` / `type_v` of the KV
cache) are parameters with llama.cpp's defaults except flash attention (off, because it removes
the score nodes), and are recorded by `record()` and in a dumped trace's `source.json`.

Memory: captures are assembled and handed out one layer at a time (a layer's stages plus the
whole-model ones at the end), from a decode running on a worker thread that waits for the
consumer, so the host never holds more than about one layer of activations besides llama.cpp's
own graph buffers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import AprTuiError, FormatError
from engine.formats.gguf.metadata import config_from_metadata
from engine.formats.gguf.parser import read_header
from engine.forward import Capture, check_token_ids
from engine.model import ModelConfig
from engine.sources.base import ReplayingSource, TensorCache
from engine.sources.llamacpp_graph import (
    CONVENTIONS,
    LAST_ROLE,
    NOT_PRODUCED,
    Node,
    assemble_layer,
    classify,
)
from engine.sources.llamacpp_lib import LLAMA_CPP_PACKAGE, GgmlTensor, copy_tensor, load_library
from engine.sources.streaming import Emit, run_in_worker
from engine.stages import DENSE_STAGES, STAGES, WHOLE_MODEL_LAYER

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

CACHE_BYTES = 256 * 1024 * 1024
"""Host bytes of stage tensors kept for `tensor()` drill-down (least recently used dropped)."""


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
    emit: Callable[[int, dict[str, Node]], bool]
    seq: int
    stop_after: int | None = None
    """The last layer wanted when no whole-model stage is: the graph stops right after it."""
    parts: dict[int, dict[str, Node]] = field(default_factory=dict)
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
                node = Node(copy_tensor(lib, tensor), tuple(tensor.op_params))
                parts = run.parts.setdefault(layer, {})
                parts[role] = node
                # A layer (with the embedding, for layer 0) is complete at l_out; the whole-model
                # stages at result_output. Hand it out; the consumer may ask us to stop.
                complete = role == LAST_ROLE or role == "result_output"
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
            def emit_layer(layer: int, nodes: dict[str, Node]) -> bool:
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
