"""HF transformers as a trace source: the model run by transformers itself, in its own dtype.

The FP16/BF16 oracle that bisection sessions need: an HF directory (config.json + safetensors)
or a GGUF transformers can load, run on CPU torch in float32, float16 or bfloat16, with every
dense stage captured in apr's layout (shared/reference/aprender-formats.md §5). Nothing of HF's
math is copied here; the stages come from HF's own modules:

| stage                  | taken from                                                          |
|------------------------|---------------------------------------------------------------------|
| embedding              | output of `model.embed_tokens`                                      |
| attn_norm              | output of `input_layernorm`                                         |
| qkv_matmul / qkv_bias  | outputs of q/k/v_proj, concatenated; without bias: output − bias     |
| q_post_rope / k_post_rope | query / key handed to the attention interface (after RoPE and,   |
|                        | on Qwen3, the Q/K norms), head-major → token-major                  |
| attn_scores            | the tensor HF's eager attention hands to softmax (scores + mask),   |
|                        | its future entries set to 0.0 as apr writes them                    |
| attn_softmax           | the attention weights HF's eager attention returns                  |
| attention / attn_out   | input / output of `o_proj`                                          |
| post_attn_residual     | input of `post_attention_layernorm`; ffn_norm its output            |
| ffn_gate / ffn_up / ffn_silu | outputs of `gate_proj` / `up_proj` / `act_fn`                 |
| ffn_swigl / ffn_out    | input / output of `down_proj`                                       |
| post_ffn_residual      | output of the decoder layer                                         |
| final_norm / lm_head   | output of `model.norm`; `lm_head`'s last position, `[vocab]` like apr |

The attention goes through HF's attention interface: a registered implementation
(`apr_tui_capture`) that calls the architecture's own `eager_attention_forward` and watches the
softmax input with a torch function mode; masks are HF's eager ones. Everything is converted to
float32 on the host as captured; in float16/bfloat16 the `qkv_matmul` of biased models is the
biased output minus the bias in float32 (HF never materialises the unbiased product).

From a GGUF, transformers 5 keeps the weights packed and its kernels compute in float32, casting
inputs and outputs to the chosen dtype; an HF directory runs genuinely in that dtype. Measured on
SmolLM2-135M (10 tokens) against our float32 pass, the worst stage cosine is 0.999987 in
float16 either way (at `attn_out`) and 0.99921 in bfloat16 from an HF directory.

Supported: the Llama family layouts (llama, mistral, qwen2, qwen3); others are refused with a
one-line error. torch and transformers are the optional `[hf]` extra, imported only here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import AprTuiError, FormatError, MissingPackageError, UnsupportedModelError
from engine.forward import Capture
from engine.sources.base import ReplayingSource, TensorCache
from engine.sources.streaming import Emit, run_in_worker
from engine.stages import DENSE_STAGES, STAGE_BY_NAME, STAGES, WHOLE_MODEL_LAYER

HF_EXTRA_HINT = "the HF source needs torch and transformers (pip install 'apr-tui[hf]')"

DTYPES = ("float32", "float16", "bfloat16")
"""The torch dtypes the model can run in."""

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""HF `model_type`s whose module layout the hooks below follow."""

CAPTURE_ATTENTION = "apr_tui_capture"
"""Name under which the capturing attention is registered with transformers."""

CACHE_BYTES = 256 * 1024 * 1024
"""Host bytes of stage tensors kept for `tensor()` drill-down (least recently used dropped)."""

_RECORDER = threading.local()
"""The recorder of the run on this thread (hooks of other threads' runs ignore it)."""


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise MissingPackageError(HF_EXTRA_HINT) from None
    return torch, transformers


_REGISTERED = False
_REGISTER_LOCK = threading.Lock()


def _register_attention() -> None:
    """Register `apr_tui_capture` (and HF's eager mask for it) with transformers, once."""
    global _REGISTERED
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        torch, _ = _import_torch()
        from torch.overrides import TorchFunctionMode
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        class SoftmaxInputs(TorchFunctionMode):
            """Keeps a copy of what `torch.nn.functional.softmax` is called with."""

            def __init__(self) -> None:
                super().__init__()
                self.inputs: list[Any] = []

            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                if func is torch.nn.functional.softmax:
                    self.inputs.append(args[0].detach().clone())
                return func(*args, **(kwargs or {}))

        def capture_attention(module, query, key, value, attention_mask, *args, **kwargs):  # noqa: ANN001
            eager = importlib.import_module(type(module).__module__).eager_attention_forward
            recorder = getattr(_RECORDER, "current", None)
            if recorder is None:
                return eager(module, query, key, value, attention_mask, *args, **kwargs)
            watch = SoftmaxInputs()
            with watch:
                output, weights = eager(module, query, key, value, attention_mask, *args, **kwargs)
            recorder.attention(module.layer_idx, query, key, watch.inputs, weights)
            return output, weights

        AttentionInterface.register(CAPTURE_ATTENTION, capture_attention)
        AttentionMaskInterface.register(CAPTURE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        _REGISTERED = True


def hf_available() -> bool:
    """Whether torch and transformers can be imported (without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


_NAME_MAP_LOCK = threading.Lock()


@contextlib.contextmanager
def gguf_name_maps_built_once() -> Iterator[None]:
    """gguf-py's `get_tensor_name_map(arch, n_blocks)` memoised while transformers loads a model.

    Loading a GGUF, transformers asks gguf-py for the tensor name map once per module of the
    model (SmolLM2: 397 times), and gguf-py builds it from scratch each time (every tensor
    kind's name patterns for every block, ~35 ms): 14 s of a 25 s SmolLM2 load on the
    development VM. The map is a pure function of its two arguments and transformers only reads
    it, so one map per (arch, n_blocks) is the same map. The module attribute is swapped for the
    duration of one load, under a lock: two GGUF loads at once take turns (each would otherwise
    put back the function the other swapped in)."""
    import gguf  # a dependency of apr-tui

    with _NAME_MAP_LOCK:
        original = gguf.get_tensor_name_map
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
        try:
            yield
        finally:
            gguf.get_tensor_name_map = original


def load_hf_model(path: str | Path, dtype: str, device: str = "cpu") -> Any:
    """transformers' own load of an HF directory or a GGUF, in `dtype`, eval mode, capturing
    attention. Raises one-line errors naming the path."""
    if dtype not in DTYPES:
        raise AprTuiError(f"--dtype {dtype}: the HF source runs in {', '.join(DTYPES)}")
    torch, transformers = _import_torch()
    _register_attention()
    # Progress bars and notices on stderr would tear the terminal UI; errors still raise.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = Path(path)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "attn_implementation": CAPTURE_ATTENTION,
    }
    if path.is_file() and path.suffix.lower() == ".gguf":
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir() and (path / "config.json").is_file():
        where = str(path)
    elif not path.exists():
        raise FormatError(f"{path}: no such HF model directory or GGUF file")
    else:
        raise FormatError(f"{path}: not an HF model directory (config.json) or a .gguf file")
    try:
        config = transformers.AutoConfig.from_pretrained(
            where, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {})
        )
    except Exception as error:  # transformers raises many types; one line is what we show
        raise UnsupportedModelError(
            f"{path}: transformers cannot read its config: {_first_line(error)}"
        ) from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path}: model_type {config.model_type!r}; the HF source follows "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        # transformers' GGUF reader draws its own tqdm bar on sys.stderr: keep it off the terminal.
        # The config read above is handed on, so the file is not parsed for it a second time.
        memo = gguf_name_maps_built_once() if "gguf_file" in kwargs else contextlib.nullcontext()
        with contextlib.redirect_stderr(io.StringIO()), memo:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                where, config=config, **kwargs
            )
    except Exception as error:
        raise UnsupportedModelError(
            f"{path}: transformers cannot load it: {_first_line(error)}"
        ) from None
    model.to(device)
    model.eval()
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class _Stopped(Exception):
    """Raised inside a hook to end a forward pass the consumer no longer needs."""


class _Recorder:
    """Collects one run's stages layer by layer and hands each finished layer out."""

    def __init__(self, emit: Emit, want_layers: range, whole_model: bool, bias: bool) -> None:
        self.emit = emit
        self.want_layers = want_layers
        self.whole_model = whole_model
        self.bias = bias
        self.parts: dict[int, dict[str, np.ndarray]] = {}
        self.projections: dict[int, dict[str, tuple[Any, Any]]] = {}
        self.last_layer = max(want_layers) if len(want_layers) else -1

    def wanted(self, layer: int) -> bool:
        return layer in self.want_layers if layer != WHOLE_MODEL_LAYER else self.whole_model

    def put(self, layer: int, stage_name: str, value: Any) -> None:
        if self.wanted(layer):
            self.parts.setdefault(layer, {})[stage_name] = _host(value)

    def projection(self, layer: int, which: str, output: Any, bias: Any) -> None:
        if not self.wanted(layer):
            return
        got = self.projections.setdefault(layer, {})
        got[which] = (output, bias)
        if len(got) < 3:
            return
        outs = [got.pop(name) for name in ("q", "k", "v")]
        with_bias = np.concatenate([_host(o) for o, _ in outs], axis=-1)  # [seq, q + 2kv]
        if all(b is not None for _, b in outs):
            self.put(layer, "qkv_bias", with_bias)
            biases = np.concatenate([_host(b) for _, b in outs])  # [q + 2kv]
            self.put(layer, "qkv_matmul", with_bias - biases)
        else:
            self.put(layer, "qkv_matmul", with_bias)

    def attention(
        self, layer: int, query: Any, key: Any, softmax_inputs: list[Any], weights: Any
    ) -> None:
        if not self.wanted(layer):
            return
        self.put(layer, "q_post_rope", _token_major(query))
        self.put(layer, "k_post_rope", _token_major(key))
        if softmax_inputs:
            scores = _host(softmax_inputs[0])  # [heads, seq, seq], scores + mask
            seq = scores.shape[-1]
            scores[:, np.triu(np.ones((seq, seq), dtype=bool), k=1)] = 0.0
            self.put(layer, "attn_scores", scores)
        if weights is not None:
            self.put(layer, "attn_softmax", _host(weights))

    def finish(self, layer: int) -> None:
        """Hand out a completed layer (or the whole-model stages) in apr order."""
        parts = self.parts.pop(layer, None)
        if parts:
            order = sorted(parts, key=lambda name: STAGE_BY_NAME[name].index)
            if not self.emit((layer, [(name, parts[name]) for name in order])):
                raise _Stopped
        if layer != WHOLE_MODEL_LAYER and layer >= self.last_layer and not self.whole_model:
            raise _Stopped  # nothing later is wanted


def _host(value: Any) -> np.ndarray:
    """A float32 host copy of a torch tensor without the batch axis: [1, ...] → [...]."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value, dtype=np.float32)
    array = value.detach().to("cpu").float().numpy()
    if array.ndim >= 2 and array.shape[0] == 1:
        array = array[0]
    return np.ascontiguousarray(array, dtype=np.float32)


def _token_major(heads: Any) -> np.ndarray:
    """HF [1, heads, seq, hd] → apr [seq, heads·hd]."""
    _, n_heads, seq, head_dim = heads.shape
    return _host(heads[0].transpose(0, 1).reshape(1, seq, n_heads * head_dim))


class HfSource(ReplayingSource):
    """A model run by HF transformers (CPU torch), captured stage by stage in apr's layout."""

    kind = "hf"

    def __init__(
        self,
        path: str | Path,
        token_ids: list[int],
        *,
        dtype: str = "float32",
        device: str = "cpu",
        prompt: str | None = None,
        model: Any = None,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self.device = device
        self.model = model if model is not None else load_hf_model(self.path, dtype, device)
        self._borrowed_attention: str | None = None
        if model is not None:
            # A model the caller loaded: capture through our attention, give theirs back on close.
            _register_attention()
            self._borrowed_attention = model.config._attn_implementation
            self.model.set_attn_implementation(CAPTURE_ATTENTION)
        torch, transformers = _import_torch()
        self._torch = torch
        config = self.model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{self.path}: model_type {config.model_type!r} is not supported"
            )
        self.token_ids = self._checked(token_ids)
        self.prompt = prompt
        self.num_layers = int(config.num_hidden_layers)
        first = self.model.model.layers[0].self_attn
        self.has_bias = first.q_proj.bias is not None
        self.not_produced = {
            s.name: "dense model: no mixture-of-experts stages" for s in STAGES if s.moe
        }
        if not self.has_bias:
            self.not_produced["qkv_bias"] = "the model has no QKV bias"
        for stage in STAGES:
            if not stage.apr:  # post_attn_norm, ffn_gelu, post_ffn_norm
                self.not_produced[stage.name] = "a Gemma step this model family does not run"
        self.stages = tuple(s.name for s in DENSE_STAGES if s.name not in self.not_produced)
        self.versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
        self.label = f"hf:{self.path.name}"
        self.description = f"{self.path} via HF transformers ({self.versions}, {dtype}, {device})"
        self._cache = TensorCache(cache_bytes)
        self._handles = self._install_hooks()

    def _checked(self, token_ids: list[int]) -> list[int]:
        vocab = int(self.model.config.vocab_size)
        bad = [t for t in token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise AprTuiError(
                f"{self.path}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
            )
        if not token_ids:
            raise AprTuiError(f"{self.path}: the HF source needs at least one token")
        return [int(t) for t in token_ids]

    def adopt_tokens(self, token_ids: list[int], prompt: str | None = None) -> None:
        """Run these ids from now on (e.g. the other side's tokens.json); drops cached stages."""
        self.token_ids, self.prompt = self._checked(token_ids), prompt
        self._cache.clear()

    def record(self) -> dict[str, Any]:
        """What this source is (JSON-ready)."""
        return {
            "engine": "hf-transformers",
            "package": self.versions,
            "model": str(self.path),
            "model_type": self.model.config.model_type,
            "dtype": self.dtype,
            "device": self.device,
            "settings": {"attention": f"{CAPTURE_ATTENTION} (HF eager attention)"},
            "conventions": {
                "attn_scores": "future entries set to 0.0 (apr's layout)",
                "qkv_matmul": "for biased models in float16/bfloat16: biased output − bias in float32",
            },
            "not_produced": dict(self.not_produced),
        }

    # -- hooks ------------------------------------------------------------------------

    def _install_hooks(self) -> list[Any]:
        """Forward hooks on HF's modules; each reports to the recorder of its own thread."""
        handles: list[Any] = []

        def on(module: Any, kind: str, fn: Any) -> None:
            register = (
                module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            )
            handles.append(register(fn))

        def recorder() -> _Recorder | None:
            return getattr(_RECORDER, "current", None)

        def output(layer: int, stage_name: str) -> Any:
            def hook(_module: Any, _args: Any, out: Any) -> None:
                rec = recorder()
                if rec is not None:
                    rec.put(layer, stage_name, out[0] if isinstance(out, tuple) else out)

            return hook

        def inputs(layer: int, stage_name: str) -> Any:
            def hook(_module: Any, args: Any) -> None:
                rec = recorder()
                if rec is not None:
                    rec.put(layer, stage_name, args[0])

            return hook

        def projection(layer: int, which: str) -> Any:
            def hook(module: Any, _args: Any, out: Any) -> None:
                rec = recorder()
                if rec is not None:
                    rec.projection(layer, which, out, module.bias)

            return hook

        def layer_done(layer: int) -> Any:
            def hook(_module: Any, _args: Any, out: Any) -> None:
                rec = recorder()
                if rec is not None:
                    rec.put(layer, "post_ffn_residual", out[0] if isinstance(out, tuple) else out)
                    rec.finish(layer)

            return hook

        def lm_head(_module: Any, _args: Any, out: Any) -> None:
            rec = recorder()
            if rec is not None:
                rec.put(WHOLE_MODEL_LAYER, "lm_head", out[:, -1])  # [1, vocab]: the last position
                rec.finish(WHOLE_MODEL_LAYER)

        inner = self.model.model
        on(inner.embed_tokens, "out", output(0, "embedding"))
        for index, decoder in enumerate(inner.layers):
            attn, mlp = decoder.self_attn, decoder.mlp
            on(decoder.input_layernorm, "out", output(index, "attn_norm"))
            for which in ("q", "k", "v"):
                on(getattr(attn, f"{which}_proj"), "out", projection(index, which))
            on(attn.o_proj, "pre", inputs(index, "attention"))
            on(attn.o_proj, "out", output(index, "attn_out"))
            on(decoder.post_attention_layernorm, "pre", inputs(index, "post_attn_residual"))
            on(decoder.post_attention_layernorm, "out", output(index, "ffn_norm"))
            on(mlp.gate_proj, "out", output(index, "ffn_gate"))
            on(mlp.up_proj, "out", output(index, "ffn_up"))
            on(mlp.act_fn, "out", output(index, "ffn_silu"))
            on(mlp.down_proj, "pre", inputs(index, "ffn_swigl"))
            on(mlp.down_proj, "out", output(index, "ffn_out"))
            on(decoder, "out", layer_done(index))
        on(inner.norm, "out", output(WHOLE_MODEL_LAYER, "final_norm"))
        on(self.model.lm_head, "out", lm_head)
        return handles

    # -- TraceSource ------------------------------------------------------------------

    def _stream(
        self, layers: range, whole_model: bool, cancel: threading.Event | None
    ) -> Iterator[tuple[int, list[tuple[str, np.ndarray]]]]:
        torch = self._torch
        ids = torch.tensor([self.token_ids], device=self.device)

        def run(emit: Emit) -> None:
            rec = _Recorder(emit, layers, whole_model, self.has_bias)
            if rec.last_layer < 0 and not whole_model:
                return
            _RECORDER.current = rec
            try:
                with torch.no_grad():
                    self.model(ids, use_cache=False)
            except _Stopped:
                pass
            finally:
                _RECORDER.current = None

        return run_in_worker(run, cancel, name="hf-forward")

    def captures(
        self,
        layers: range | None = None,
        cancel: threading.Event | None = None,
        whole_model: bool = True,
    ) -> Iterator[Capture]:
        selected = range(self.num_layers) if layers is None else layers
        yield from self._yield_layers(self._stream(selected, whole_model, cancel), cancel)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._borrowed_attention is not None:
            self.model.set_attn_implementation(self._borrowed_attention)
            self._borrowed_attention = None
        self._cache.clear()
