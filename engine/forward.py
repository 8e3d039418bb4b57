"""The traced forward pass: one prefill, no KV cache, one capture per (layer, stage).

`trace(model, token_ids)` runs the whole prompt through a decoder and yields a `Capture` for every
stage of every layer the moment it exists, in computation order: `embedding` (layer 0), then per
layer `attn_norm` ... `post_ffn_residual`, then the whole-model `final_norm` and `lm_head`. What
each stage holds and its layout follow `apr trace --save-tensor` (shared/reference/
aprender-formats.md §5); the arithmetic follows the HF reference implementations (float32
throughout, RMSNorm as `x * rsqrt(mean(x²) + eps) * w`, RoPE pairing and theta from the model,
GQA by consecutive query heads, causal softmax with max subtraction).

One pass for every architecture. A layer is Llama's, and the model's `ModelConfig` switches on
the named steps other families add, each one line here and one field there:

| step (config field)                     | what it does                                  | who     |
|-----------------------------------------|-----------------------------------------------|---------|
| `embedding_scale`                       | embedding rows times sqrt(hidden)             | Gemma   |
| `norm_weight_offset`                    | every RMSNorm scales by (1 + w)               | Gemma   |
| `qkv_bias`                              | Q/K/V biases (`qkv_bias` stage)               | Qwen2   |
| `qk_norm`                               | per-head RMSNorm of Q and K before RoPE       | Qwen3, Gemma 3 |
| `rope_local_theta` + `layer_types`      | sliding layers rotate with their own base     | Gemma 3 |
| `query_pre_attn_scalar`                 | scores scale by scalar^-1/2, not head_dim^-1/2 | Gemma  |
| `attn_logit_softcap`                    | scores become cap·tanh(scores/cap)            | Gemma 2 |
| `sliding_window` + `layer_types`        | query i sees keys i-window < j <= i           | Mistral, Gemma |
| `sandwich_norms`                        | attention and FFN outputs normed before their residual add (`post_attn_norm`, `post_ffn_norm`) | Gemma |
| `hidden_act`                            | gate activation SiLU (`ffn_silu`) or GELU-tanh (`ffn_gelu`) | Gemma |
| `final_logit_softcap`                   | logits become cap·tanh(logits/cap)            | Gemma 2 |
| `num_experts` + `is_moe_layer`          | the FFN is a routed mixture of gated FFNs (`_moe_ffn`) | Qwen3-MoE, Qwen2-MoE |
| `shared_expert_intermediate_size`       | plus a sigmoid-gated shared FFN every token runs | Qwen2-MoE |

Adding an architecture that is a combination of these is a reader change only (formats/ fill
the fields); a genuinely new step is one field, one line in the layer below, and a stage name
in engine/stages.py if it produces a tensor worth comparing.

Not modelled: RoPE scaling variants (the readers reject them).

Every block is one pure function over an array module `xp` (numpy or CuPy, engine.backend), so
there is one code path for both devices. Weights are fetched from the model's WeightStore when
the block needs them and dropped right after, so peak memory is one weight matrix plus the
activations of one layer, never the whole model in float32. The [vocab, hidden] tables, the
largest matrices of most models, are never dequantized whole: the embedding lookup decodes only
the prompt's rows and the lm_head runs over row blocks of the head (WeightStore `get_rows`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.attention import (  # noqa: F401  (attention_scores & co. stay importable from here)
    AttentionStage,
    attention_context,
    attention_scores,
    blocked_context,
    causal_mask,
    causal_softmax,
    use_blocked,
)
from engine.backend import Backend, resolve_backend
from engine.errors import FormatError, TokenizerError
from engine.model import Model, ModelConfig, gather_rows
from engine.prefetch import WeightPrefetcher  # imported early: its /proc/stat sample
from engine.stages import LOGITS_ALL, STAGES, WHOLE_MODEL_LAYER, Stage, stage

Array = Any
"""A numpy or CuPy ndarray."""


@dataclass
class Capture:
    """One stage tensor as soon as the forward pass has it.

    `array` is a C-contiguous float32 array in apr's token-major layout (§5), on the backend's
    device (numpy or CuPy), already in its logical `shape`, e.g. (seq, hidden), (heads, seq, seq)
    or (vocab,): `array.reshape(-1)` is exactly the payload of the stage's APRT file. The forward
    pass never writes into an array after handing it out. Exceptions, lazy captures that yield
    their payload in blocks (`.blocks()`) and materialise only through `np.asarray`: on a long
    prompt (engine.attention.use_blocked) `attn_scores` / `attn_softmax`
    (`engine.attention.AttentionStage`), and always `logits_all` (`engine.logits.LogitsStage`).
    """

    layer: int
    """Layer index; 0 for `embedding`; WHOLE_MODEL_LAYER for `final_norm` and `lm_head`."""
    stage: str
    array: Any
    shape: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# The blocks. Shapes: seq tokens, H hidden, nh / nkv query / KV heads, hd head_dim, I intermediate.
# --------------------------------------------------------------------------------------------


DIRECT_LINEAR_TOKENS = 256
"""From this many tokens on, `linear` computes `x @ weightᵀ` directly. Below it, `(weight @
xᵀ)ᵀ` is faster (OpenBLAS runs the [out, in] × [in, seq] product up to 2× faster for a short
seq: 16 tokens, [1536, 576], 0.78 vs 1.30 ms), but its result is a transposed view, which every
captured stage then copies into a row-major array: at 1,024 tokens that copy cost more than the
form saved (`[1536, 576]`: 23.5 ms direct vs 23.6 + 17 ms of copy; ~3 s of a 1,024-token
trace). Measured on one core, min of 15: the two forms cross between 192 and 256 tokens. Both
forms give the same dot products (bit-identical with OpenBLAS; the oracle tests check both)."""


def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """`x @ weightᵀ (+ bias)`, HF nn.Linear: x [seq, in], weight [out, in] -> [seq, out]
    (a transposed view for a short prompt, row-major from DIRECT_LINEAR_TOKENS on)."""
    out = x @ weight.T if x.shape[0] >= DIRECT_LINEAR_TOKENS else (weight @ x.T).T
    return out if bias is None else out + bias


def rms_norm(xp: Any, x: Array, weight: Array, eps: float, offset: float = 0.0) -> Array:
    """RMSNorm over the last axis, as HF LlamaRMSNorm: `w * (x * rsqrt(mean(x²) + eps))`.

    `offset` 1.0 is Gemma's RMSNorm, which scales by `(1 + w)` (its weights are stored around 0).
    """
    mean_square = xp.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    scale = weight if offset == 0.0 else weight + xp.float32(offset)
    return scale * (x * (1.0 / xp.sqrt(mean_square + eps)))


def rope_cos_sin(xp: Any, seq_len: int, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos and sin of the rotary angles `position · theta^(-2i/hd)`, each [seq, hd/2], in float32.

    Computed as HF's default rotary embedding does (float32 inverse frequencies, float32 product),
    so positions far into a long prompt round the same way as the reference.
    """
    exponents = xp.arange(0, head_dim, 2, dtype=xp.float32) / xp.float32(head_dim)  # [hd/2]
    inv_freq = 1.0 / (xp.asarray(theta, dtype=xp.float32) ** exponents)  # [hd/2]
    positions = xp.arange(seq_len, dtype=xp.float32)  # [seq]
    angles = positions[:, None] * inv_freq[None, :]  # [seq, hd/2]
    return xp.cos(angles), xp.sin(angles)


def apply_rope(xp: Any, x: Array, cos: Array, sin: Array, pairing: str) -> Array:
    """Rotate each head of x [seq, heads, hd] by its position's angles.

    `half` pairs element i with i + hd/2 (HF `rotate_half`, GGML NEOX); `adjacent` pairs 2i with
    2i+1 (GGML NORM, the order of Q/K rows in a Llama GGUF that nobody un-permuted).
    """
    cos = cos[:, None, :]  # [seq, 1, hd/2]
    sin = sin[:, None, :]
    if pairing == "half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if pairing == "adjacent":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = xp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [seq, h, hd/2, 2]
        return rotated.reshape(x.shape)
    raise ValueError(f"unknown RoPE pairing {pairing!r}")


def softcap(xp: Any, x: Array, cap: float) -> Array:
    """Gemma 2's logit soft-capping `cap * tanh(x / cap)`: smooth, bounded by ±cap."""
    return xp.tanh(x / xp.float32(cap)) * xp.float32(cap)


def silu(xp: Any, x: Array) -> Array:
    """`x / (1 + e^-x)`; for x below about -88 e^-x overflows to inf and the result is -0.0."""
    with np.errstate(over="ignore"):
        return x / (1.0 + xp.exp(-x))


GELU_TANH_BETA = 0.7978845608028654
"""sqrt(2/pi), the tanh approximation's slope (PyTorch's `kBeta`), used as a float32."""
GELU_TANH_KAPPA = 0.044715
"""The cubic coefficient of the tanh approximation (PyTorch's `kKappa`)."""


def gelu_tanh(xp: Any, x: Array) -> Array:
    """GELU, tanh approximation (HF `gelu_pytorch_tanh`): `x/2 · (1 + tanh(β(x + κx³)))`."""
    inner = xp.float32(GELU_TANH_BETA) * (x + xp.float32(GELU_TANH_KAPPA) * (x * x * x))
    return xp.float32(0.5) * x * (xp.float32(1.0) + xp.tanh(inner))


ACTIVATIONS: dict[str, tuple[str, Callable[[Any, Array], Array]]] = {
    "silu": ("ffn_silu", silu),
    "gelu_tanh": ("ffn_gelu", gelu_tanh),
}
"""`ModelConfig.hidden_act` -> (the stage that holds the activated gate, the function)."""


# --------------------------------------------------------------------------------------------
# The traced pass.
# --------------------------------------------------------------------------------------------


class _Cancelled(Exception):
    """Raised inside the pass when the caller's cancel event is set; ends the generator."""


def _stage_filter(stages: Iterable[str | Stage] | None) -> frozenset[str]:
    if stages is None:
        return frozenset(s.name for s in STAGES)
    names = set()
    for item in stages:
        if isinstance(item, Stage):
            names.add(item.name)
            continue
        try:
            names.add(stage(item).name)
        except KeyError:
            raise ValueError(f"unknown stage {item!r}") from None
    return frozenset(names)


def layer_range(layers: range | tuple[int, int] | None, num_layers: int) -> range:
    """The layers to capture, clipped to the model: a range, a (start, end) pair or None (all)."""
    if layers is None:
        return range(num_layers)
    if not isinstance(layers, range):
        start, end = layers
        layers = range(start, end)
    return range(max(layers.start, 0), min(layers.stop, num_layers))


def check_token_ids(token_ids: Iterable[int], config: ModelConfig, source: str) -> list[int]:
    """The ids as a list, or TokenizerError naming the first id outside the vocabulary."""
    ids = [int(t) for t in token_ids]
    if not ids:
        raise TokenizerError(f"{source}: no tokens to trace (empty prompt or token list)")
    for token in ids:
        if not 0 <= token < config.vocab_size:
            raise TokenizerError(
                f"{source}: token id {token} is outside the vocabulary (0..{config.vocab_size - 1})"
            )
    return ids


class _LayerWeights:
    """Fetches one weight at a time onto the device, checking its shape against the config."""

    def __init__(
        self,
        model: Model,
        backend: Backend,
        run_layers: int | None = None,
        *,
        head: bool = False,
        decode_ahead: bool = False,
    ) -> None:
        """`run_layers`: the layers the pass runs; `head`: whether it ends with the lm_head;
        `decode_ahead`: whether a child process may decode ahead (engine.prefetch)."""
        self.model = model
        self.backend = backend
        config = model.config
        tail = []
        if head:  # the lm_head's row blocks come after the layers
            name = lm_head_weight_name(model)
            tail = [(name, *rows) for rows in lm_head_row_blocks(config.vocab_size)]
        layers = config.num_layers if run_layers is None else run_layers
        self.prefetch = WeightPrefetcher(model.weights, layers, tail, child=decode_ahead)

    def get(self, name: str, shape: tuple[int, ...]) -> Array:
        self._check(name, shape)
        return self.backend.asarray(self.prefetch.get(name))  # the next one decodes meanwhile

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        actual = tuple(self.model.weights.shape(name))
        if actual != shape:
            raise FormatError(
                f"{self.model.path}: tensor {name!r} has shape {list(actual)}, "
                f"the model config implies {list(shape)}"
            )

    def host_rows(self, name: str, shape: tuple[int, ...], ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D weight as a host float32 array (the embedding lookup)."""
        self._check(name, shape)
        return gather_rows(self.model.weights, name, ids)

    def rows(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> Array:
        """Rows [start, stop) of a 2-D weight on the device; only those rows are dequantized."""
        self._check(name, shape)
        return self.backend.asarray(self.prefetch.rows(name, start, stop))

    def optional(self, name: str, shape: tuple[int, ...]) -> Array | None:
        return self.get(name, shape) if self.model.weights.has(name) else None


def _decoder_layer(
    xp: Any,
    config: ModelConfig,
    weights: _LayerWeights,
    layer: int,
    hidden: Array,
    rope: tuple[Array, Array],
    future: Array,
    capture_scores: bool,
) -> Generator[tuple[str, Array], None, Array]:
    """One decoder layer: yields (stage, array) for every stage it produces, returns its output.

    hidden [seq, H]; `rope` is this layer's (cos, sin), `future` its mask (causal, windowed for a
    sliding layer). Each weight is fetched just before its matmul and dropped after it. The
    steps `config` leaves off (module docstring) cost nothing and yield nothing.
    """
    prefix = f"model.layers.{layer}."
    H, nh, nkv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    seq_len = hidden.shape[0]

    def norm(x: Array, name: str, size: int = H) -> Array:
        weight = weights.get(prefix + name + ".weight", (size,))
        return rms_norm(xp, x, weight, config.rms_norm_eps, config.norm_weight_offset)

    attn_norm = norm(hidden, "input_layernorm")
    yield "attn_norm", attn_norm  # [seq, H]

    projections = []
    for name, width in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
        weight = weights.get(f"{prefix}self_attn.{name}.weight", (width, H))
        projections.append(linear(attn_norm, weight))  # [seq, width]
        del weight
    yield "qkv_matmul", xp.concatenate(projections, axis=1)  # [seq, nh*hd + 2*nkv*hd]

    if config.qkv_bias:
        for index, (name, width) in enumerate(
            (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd))
        ):
            projections[index] = projections[index] + weights.get(
                f"{prefix}self_attn.{name}.bias", (width,)
            )
        yield "qkv_bias", xp.concatenate(projections, axis=1)  # [seq, nh*hd + 2*nkv*hd]

    q = projections[0].reshape(seq_len, nh, hd)
    k = projections[1].reshape(seq_len, nkv, hd)
    v = projections[2].reshape(seq_len, nkv, hd)
    if config.qk_norm:  # Qwen3, Gemma 3: per-head RMSNorm over head_dim, before RoPE
        q = norm(q, "self_attn.q_norm", hd)
        k = norm(k, "self_attn.k_norm", hd)
    cos, sin = rope
    q = apply_rope(xp, q, cos, sin, config.rope_pairing)  # [seq, nh, hd]
    k = apply_rope(xp, k, cos, sin, config.rope_pairing)  # [seq, nkv, hd]
    yield "q_post_rope", q.reshape(seq_len, nh * hd)
    yield "k_post_rope", k.reshape(seq_len, nkv * hd)

    scale = (config.query_pre_attn_scalar or hd) ** -0.5
    if future is None:  # a long prompt: blocks of query rows, lazy [nh, seq, seq] captures
        yield "attn_scores", AttentionStage(xp, "attn_scores", q, k, scale)
        yield "attn_softmax", AttentionStage(xp, "attn_softmax", q, k, scale)
        context = blocked_context(xp, q, k, v, scale)  # [seq, nh*hd]
    else:
        scores = attention_scores(xp, q, k, scale)  # [nh, seq, seq]
        if config.attn_logit_softcap is not None:  # Gemma 2
            scores = softcap(xp, scores, config.attn_logit_softcap)
        yield "attn_scores", xp.where(future, xp.float32(0.0), scores) if capture_scores else None
        probs = causal_softmax(xp, scores, future)  # [nh, seq, seq], 0.0 at every blocked key
        del scores
        yield "attn_softmax", probs
        context = attention_context(xp, probs, v)  # [seq, nh*hd]
        del probs
    yield "attention", context

    attn_out = linear(
        context,
        weights.get(prefix + "self_attn.o_proj.weight", (H, nh * hd)),
        weights.optional(prefix + "self_attn.o_proj.bias", (H,)),
    )
    yield "attn_out", attn_out  # [seq, H]
    if config.sandwich_norms:  # Gemma: the attention output is normed before the residual add
        attn_out = norm(attn_out, "post_attention_layernorm")
        yield "post_attn_norm", attn_out  # [seq, H]
    hidden = hidden + attn_out
    yield "post_attn_residual", hidden

    ffn_norm = norm(hidden, config.ffn_norm_name)
    yield "ffn_norm", ffn_norm  # [seq, H]
    routing = None
    if config.is_moe_layer(layer):
        ffn_out, routing = _moe_ffn(xp, config, weights, prefix, ffn_norm)  # [seq, H]
        yield "ffn_out", ffn_out
    else:
        ffn_out = yield from _gated_ffn(xp, config, weights, prefix, ffn_norm)  # [seq, H]
    if config.sandwich_norms:  # Gemma: the FFN output is normed before the residual add
        ffn_out = norm(ffn_out, "post_feedforward_layernorm")
        yield "post_ffn_norm", ffn_out  # [seq, H]
    hidden = hidden + ffn_out
    yield "post_ffn_residual", hidden
    if routing is not None:  # apr's MoE stages: the last token's routing and expert output
        weights_k, experts_k = routing
        yield "moe_router", weights_k[-1]  # [k]
        yield "moe_ffn_out", ffn_out[-1]  # [H]
        yield "moe_router_indices", experts_k[-1].astype(xp.float32)  # [k], ids as f32
    return hidden


def route(xp: Any, logits: Array, k: int, renormalize: bool) -> tuple[Array, Array]:
    """Top-k routing, HF Qwen3-MoE's: softmax over all experts, the k largest probabilities in
    descending order (ties: the lower expert id first), renormalized to sum to 1 when asked.

    logits [seq, E] -> (weights [seq, k] float32, expert ids [seq, k] int).
    """
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = xp.exp(shifted)
    probs = probs / probs.sum(axis=-1, keepdims=True)  # [seq, E]
    experts = xp.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [seq, k]
    top = xp.take_along_axis(probs, experts, axis=-1)  # [seq, k]
    if renormalize:
        top = top / top.sum(axis=-1, keepdims=True)
    return top, experts


def _moe_ffn(
    xp: Any, config: ModelConfig, weights: _LayerWeights, prefix: str, x: Array
) -> tuple[Array, tuple[Array, Array]]:
    """The mixture-of-experts FFN: route each token (`route`), run each expert some token routed
    to on just those tokens, and add its output times the token's routing weight.

    x [seq, H] -> (out [seq, H], (weights [seq, k], expert ids [seq, k])). An expert no token
    picked is never fetched; a picked one is fetched one matrix at a time (a GGUF store decodes
    only that expert's slice of llama.cpp's merged tensor). Contributions are added in
    ascending expert order, as HF does.
    """
    H, E, inter = config.hidden_size, config.num_experts, config.moe_intermediate_size
    logits = linear(x, weights.get(prefix + "mlp.gate.weight", (E, H)))  # [seq, E]
    top, experts = route(xp, logits, config.num_experts_per_tok, config.norm_topk_prob)
    out = xp.zeros_like(x)  # [seq, H]
    for expert in sorted({int(e) for e in experts.ravel().tolist()}):
        tokens, slot = xp.nonzero(experts == expert)  # the tokens that picked it, and where
        name = f"{prefix}mlp.experts.{expert}."
        picked = x[tokens]  # [n, H]
        gate = linear(picked, weights.get(name + "gate_proj.weight", (inter, H)))  # [n, inter]
        up = linear(picked, weights.get(name + "up_proj.weight", (inter, H)))  # [n, inter]
        _, activation = ACTIVATIONS[config.hidden_act]
        expert_out = linear(
            activation(xp, gate) * up, weights.get(name + "down_proj.weight", (H, inter))
        )  # [n, H]
        out[tokens] += expert_out * top[tokens, slot][:, None]
    shared = config.shared_expert_intermediate_size
    if shared:  # Qwen2-MoE: every token's shared expert, scaled by its sigmoid gate
        name = prefix + "mlp.shared_expert."
        gate = linear(x, weights.get(name + "gate_proj.weight", (shared, H)))  # [seq, S]
        up = linear(x, weights.get(name + "up_proj.weight", (shared, H)))  # [seq, S]
        _, activation = ACTIVATIONS[config.hidden_act]
        shared_out = linear(
            activation(xp, gate) * up, weights.get(name + "down_proj.weight", (H, shared))
        )  # [seq, H]
        share = linear(x, weights.get(prefix + "mlp.shared_expert_gate.weight", (1, H)))
        out = out + (1.0 / (1.0 + xp.exp(-share))) * shared_out  # sigmoid [seq, 1]
    return out, (top, experts)


def _gated_ffn(
    xp: Any, config: ModelConfig, weights: _LayerWeights, prefix: str, x: Array
) -> Generator[tuple[str, Array], None, Array]:
    """The dense gated FFN `down(act(gate(x)) * up(x))`, act SiLU (SwiGLU) or GELU-tanh (GeGLU).

    x [seq, H]; yields `ffn_gate`, `ffn_up`, the activation's stage, `ffn_swigl` (the gated
    product, whatever the activation) and `ffn_out`; returns ffn_out [seq, H].
    """
    H, inter = config.hidden_size, config.intermediate_size
    gate = linear(
        x,
        weights.get(prefix + "mlp.gate_proj.weight", (inter, H)),
        weights.optional(prefix + "mlp.gate_proj.bias", (inter,)),
    )
    yield "ffn_gate", gate  # [seq, I]
    up = linear(
        x,
        weights.get(prefix + "mlp.up_proj.weight", (inter, H)),
        weights.optional(prefix + "mlp.up_proj.bias", (inter,)),
    )
    yield "ffn_up", up  # [seq, I]
    act_stage, activation = ACTIVATIONS[config.hidden_act]
    gate_act = activation(xp, gate)
    yield act_stage, gate_act  # [seq, I]
    gated = gate_act * up
    yield "ffn_swigl", gated  # [seq, I]
    ffn_out = linear(
        gated,
        weights.get(prefix + "mlp.down_proj.weight", (H, inter)),
        weights.optional(prefix + "mlp.down_proj.bias", (H,)),
    )
    yield "ffn_out", ffn_out  # [seq, H]
    return ffn_out


def trace(
    model: Model,
    token_ids: Iterable[int],
    *,
    backend: str | Backend = "numpy",
    stages: Iterable[str | Stage] | None = None,
    layers: range | tuple[int, int] | None = None,
    cancel: threading.Event | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    keep_logits: bool = False,
    decode_ahead: bool = True,
) -> Iterator[Capture]:
    """Run one prefill pass over `token_ids` and yield each requested capture as soon as it exists.

    `stages`: stage names (or Stage records) to capture; None means every stage the model
    produces. `layers`: the layers whose per-layer stages are captured (a range or (start, end),
    END exclusive, clipped to the model); `embedding` counts as layer 0, as in apr. Whole-model
    stages are captured whenever requested. All the math runs regardless of the filter (each
    layer needs the one before it); the pass stops after the last requested layer when no
    whole-model stage is requested. `cancel` is checked between stages; once set, the generator
    ends without raising. `on_layer(done, total)` is called after each layer the pass runs
    (also the ones it does not capture), for progress bars. `keep_logits`: the lm_head stage
    also computes every position's logits from the head rows it decodes and keeps them with
    the model (engine.logits.TableKeeper) for a comparison's logit metrics; a plain trace has
    no use for them (they double the arithmetic of SmolLM2's short prompts). `decode_ahead`:
    a child process may decode the next weights meanwhile (engine.prefetch; only when a core is
    idle and the model big enough); a comparison turns it off, its local error has that core.
    """
    be = resolve_backend(backend)
    xp = be.xp
    config = model.config
    ids = check_token_ids(token_ids, config, str(model.path))
    wanted = _stage_filter(stages)
    captured_layers = layer_range(layers, config.num_layers)
    whole_model_wanted = bool(wanted & {"final_norm", "lm_head", LOGITS_ALL})
    run_to = config.num_layers if whole_model_wanted else captured_layers.stop
    head = whole_model_wanted and "lm_head" in wanted
    # The CuPy path keeps to one process: a child forked after CUDA started is not tested here.
    ahead = decode_ahead and be.name == "numpy"
    weights = _LayerWeights(model, be, run_to, head=head, decode_ahead=ahead)

    def checkpoint() -> None:
        if cancel is not None and cancel.is_set():
            raise _Cancelled

    def capture(layer: int, stage_name: str, array: Array) -> Capture:
        if hasattr(array, "blocks"):  # lazy: computed block by block when consumed
            return Capture(layer=layer, stage=stage_name, array=array, shape=array.shape)
        array = xp.ascontiguousarray(array, dtype=xp.float32)
        return Capture(layer=layer, stage=stage_name, array=array, shape=tuple(array.shape))

    try:
        checkpoint()
        hidden = be.asarray(
            weights.host_rows(
                "model.embed_tokens.weight",
                (config.vocab_size, config.hidden_size),
                np.asarray(ids),
            )
        )  # [seq, H]: only the prompt's rows of the table are dequantized
        if config.embedding_scale != 1.0:  # Gemma: rows times sqrt(hidden), a float32 scalar
            hidden = hidden * xp.float32(config.embedding_scale)
        if "embedding" in wanted and 0 in captured_layers:
            yield capture(0, "embedding", hidden)

        seq_len = len(ids)
        ropes: dict[float, tuple[Array, Array]] = {}  # theta -> (cos, sin), one per base
        masks: dict[int | None, Array | None] = {}  # window -> mask, one per window size
        # The blocked path (long prompts) knows the causal mask only: a model with a sliding
        # window or a score soft cap runs the whole path at any length.
        plain = config.sliding_window is None and config.attn_logit_softcap is None
        blocked = plain and use_blocked(config.num_heads, seq_len)
        for layer in range(run_to):
            checkpoint()
            keep_layer = layer in captured_layers
            theta, window = config.layer_rope_theta(layer), config.window(layer)
            if theta not in ropes:
                ropes[theta] = rope_cos_sin(xp, seq_len, config.head_dim, theta)
            if window not in masks:  # None: the blocked path
                masks[window] = None if blocked else causal_mask(xp, seq_len, window)
            steps = _decoder_layer(
                xp,
                config,
                weights,
                layer,
                hidden,
                ropes[theta],
                masks[window],
                capture_scores=keep_layer and "attn_scores" in wanted,
            )
            while True:
                try:
                    stage_name, array = next(steps)
                except StopIteration as done:
                    hidden = done.value
                    break
                if keep_layer and stage_name in wanted and array is not None:
                    yield capture(layer, stage_name, array)
                checkpoint()
            if on_layer is not None:
                on_layer(layer + 1, run_to)

        if not whole_model_wanted:
            return
        final_norm = rms_norm(
            xp,
            hidden,
            weights.get("model.norm.weight", (config.hidden_size,)),
            config.rms_norm_eps,
            config.norm_weight_offset,
        )
        if "final_norm" in wanted:
            yield capture(WHOLE_MODEL_LAYER, "final_norm", final_norm)  # [seq, H]
        checkpoint()
        if "lm_head" in wanted:
            keep = keep_logits or LOGITS_ALL in wanted
            logits = lm_head_logits(model, weights, final_norm, keep_table=keep)
            yield capture(WHOLE_MODEL_LAYER, "lm_head", logits)
        if LOGITS_ALL in wanted:  # apr-tui's every-position logits, only when asked for
            from engine.logits import LogitsStage, ModelLogits

            checkpoint()
            yield capture(
                WHOLE_MODEL_LAYER, LOGITS_ALL, LogitsStage(ModelLogits(model, final_norm))
            )
    except _Cancelled:
        return
    finally:
        weights.prefetch.close()  # no decode may outlive the pass (the model may close next)


def lm_head_weight_name(model: Model) -> str:
    """`lm_head.weight`, or the embedding table when the model ties them (or has no head)."""
    if model.config.tied_embeddings or not model.weights.has("lm_head.weight"):
        return "model.embed_tokens.weight"
    return "lm_head.weight"


LM_HEAD_BLOCK_ROWS = 4096
"""Rows of the head dequantized at a time: 16 MiB of float32 at hidden 4096, against 500 MiB for
a whole 32000-row head (2.2 GB for Qwen2-7B's 152064 rows)."""

LM_HEAD_MIN_TAIL_ROWS = 64
"""A last block shorter than this joins the block before it: numpy computes a 1-row product as a
dot product, which rounds differently from the matrix-vector product over the whole head."""


def lm_head_row_blocks(vocab: int, block_rows: int = LM_HEAD_BLOCK_ROWS) -> list[tuple[int, int]]:
    """[start, stop) row blocks covering [0, vocab), each `block_rows` long but the last, which
    is at least LM_HEAD_MIN_TAIL_ROWS long unless it is the only block."""
    edges = list(range(0, vocab, block_rows)) + [vocab]
    if len(edges) > 2 and edges[-1] - edges[-2] < LM_HEAD_MIN_TAIL_ROWS:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:], strict=True))


def lm_head_logits(
    model: Model, weights: _LayerWeights, final_norm: Array, *, keep_table: bool = False
) -> Array:
    """Logits of the last token only, [vocab]: the last normed row times the head (+ bias).
    With `keep_table`, every position's logits are computed from the same head rows and kept
    for engine.logits.ModelLogits (`TableKeeper`).

    Computed a row block of the head at a time (`logits[block] = last @ head[block]ᵀ`), so the
    peak is one block, not the [vocab, H] head.
    Each logit is the same dot product as in one whole-head product, but BLAS kernels sum a row
    in an order that depends on where the row falls in their row groups and thread chunks. With
    OpenBLAS 0.3.31 on 2 threads (measured) the bits match the whole-head product for every
    common vocabulary (32000, 32064, 49152, 128256, 151936, 152064; tests/forward/test_rows.py
    checks 32000); an odd one (32001, 50257) differed in 1-2 logits by under 1.4e-6 relative,
    float32 rounding of a different summation order.
    """
    config = model.config
    xp = weights.backend.xp
    name, shape = lm_head_weight_name(model), (config.vocab_size, config.hidden_size)
    last = final_norm[-1:]  # [1, H]
    logits = xp.empty(config.vocab_size, dtype=xp.float32)  # [vocab]
    from engine.logits import TableKeeper  # every position's logits while the head is decoded

    keeper = TableKeeper(model, final_norm) if keep_table else None
    for start, stop in lm_head_row_blocks(config.vocab_size):
        head_rows = weights.rows(name, shape, start, stop)  # [stop - start, H]
        logits[start:stop] = linear(last, head_rows)[0]
        if keeper is not None:
            keeper.add(start, stop, head_rows)
        del head_rows
    bias = weights.optional("lm_head.bias", (config.vocab_size,))
    if keeper is not None:
        keeper.done(None if bias is None else weights.backend.to_host(bias))
    if bias is not None:
        logits = logits + bias
    if config.final_logit_softcap is not None:  # Gemma 2
        logits = softcap(xp, logits, config.final_logit_softcap)
    return logits


def produced_stages(config: ModelConfig) -> tuple[str, ...]:
    """The stages a trace of this model produces, in canonical order: the dense stages, `qkv_bias`
    only with a QKV bias, the activation's own stage (`ffn_silu` or `ffn_gelu`), the two
    post-block norms only with sandwich norms, the MoE stages only with MoE layers (and the
    dense FFN's inner stages only when some layer is dense)."""
    layers = range(config.num_layers)
    moe = any(config.is_moe_layer(layer) for layer in layers)
    dense = not all(config.is_moe_layer(layer) for layer in layers)
    skip = {"qkv_bias"} if not config.qkv_bias else set()
    skip |= {name for act, (name, _) in ACTIVATIONS.items() if act != config.hidden_act}
    if not config.sandwich_norms:
        skip |= {"post_attn_norm", "post_ffn_norm"}
    if not dense:
        skip |= {"ffn_gate", "ffn_up", "ffn_silu", "ffn_gelu", "ffn_swigl"}
    return tuple(s.name for s in STAGES if s.name not in skip and (moe or not s.moe))
