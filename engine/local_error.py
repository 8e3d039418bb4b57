"""Local error: the error one stage adds on its own, by teacher forcing.

A propagated comparison (cosine of A's stage against B's) mixes every error made upstream with
the one made here, so in a noisy but correct runtime (quantized activations, f16 caches, other
weight rounding) every stage after the first looks "diverged" and a real bug drowns in the
noise. Every stage is a known function of earlier stages, so each can be checked alone: take
the checked side's *own* inputs to the stage (its earlier stages of the same layer, the previous
layer's output), recompute the stage exactly, in float64, with the weights of the model file
being traced, and compare with that side's output of the stage. The result is a relative RMS
error, `‖recomputed − output‖ / ‖output‖`:

    exact float32 path         ~1e-7   (rounding of float32 against float64)
    llama.cpp, Q8 activations  ~1e-2   matmuls;  ~5e-8 element-wise ops
    a planted bug              a spike in one layer, far above its stage's other layers

`engine.noise` turns these numbers into a verdict (a floor per stage kind, the origin).

The recipes follow the dense Llama-family block (Llama, Mistral, Qwen2, Qwen3), the same math as
`engine.forward` but in float64; architectures whose blocks differ get no local error (and say
so) rather than a wrong one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from engine.backend import to_host
from engine.causal_stats import causal_block
from engine.forward import Capture, lm_head_row_blocks, lm_head_weight_name, rope_cos_sin
from engine.model import Model, ModelConfig, gather_rows, weight_rows
from engine.stages import WHOLE_MODEL_LAYER

LOCAL_ERROR_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
"""Architectures whose every dense stage has a recipe below."""


@dataclass(frozen=True)
class LocalError:
    """The local error of one cell on the checked side.

    `error` is None when it cannot be computed; `missing` then says why (the reference lacks an
    input, no weights, no recipe for this stage).
    """

    error: float | None
    """Relative RMS error of the recomputed stage against the checked side's output (NaN or Inf
    in either side counts as `math.inf`)."""
    inputs: tuple[str, ...]
    """What the recomputation used: the checked side's stages (`L3 ffn_norm`) and weights."""
    missing: str | None = None


def local_error_supported(config: ModelConfig | None) -> tuple[bool, str | None]:
    """(True, None) when every dense stage of this model has a recipe, else (False, why)."""
    if config is None:
        return True, None
    if config.architecture not in LOCAL_ERROR_ARCHITECTURES:
        return False, f"no local-error recipes for {config.architecture!r} yet"
    window = getattr(config, "sliding_window", None)
    if window:
        return False, "no local-error recipes for sliding-window attention yet"
    return True, None


def relative_error(recomputed: np.ndarray, output: np.ndarray) -> float:
    """‖recomputed − output‖₂ / ‖output‖₂ in float64 (the absolute norm when output is 0)."""
    output = np.asarray(output, dtype=np.float64).reshape(-1)
    recomputed = np.asarray(recomputed, dtype=np.float64).reshape(-1)
    delta = recomputed - output
    delta_sq, scale_sq = float(np.dot(delta, delta)), float(np.dot(output, output))
    # A NaN or Inf anywhere makes a sum of squares non-finite; only then are the arrays scanned
    # (a finite sum of squares can only overflow past 1e154, where they decide alone).
    if not (math.isfinite(delta_sq) and math.isfinite(scale_sq)) and not (
        np.isfinite(output).all() and np.isfinite(recomputed).all()
    ):
        return math.inf
    difference, scale = math.sqrt(delta_sq), math.sqrt(scale_sq)
    return difference / scale if scale > 0.0 else difference


# ------------------------------------------------------------------------------ float64 math


def rms_norm64(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """`w · x / sqrt(mean(x²) + eps)` over the last axis, in float64."""
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope64(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pairing: str) -> np.ndarray:
    """RoPE on x [seq, heads, hd] with float64 cos/sin [seq, hd/2] (pairing as engine.forward)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    if pairing == "half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)


WEIGHT_BLOCK_VALUES = 1 << 19
"""Weight values widened to float64 at a time for a linear recipe (4 MiB): one scratch block
instead of a float64 copy of the whole matrix (a 7B FFN matrix: 360 MiB), large enough that
each matmul call still has the rows to run at full speed. Measured on one SmolLM2 layer's seven
matrices, one thread, min of 7 (bench: the recipe alone): at 1,024 tokens 270 ms with blocks of
32 Ki values, 151 ms with these, 143 ms widening whole matrices; at 37 tokens 11.9 / 11.6 /
11.0 ms. Every block holds whole rows of the weight, so each output is the same dot product."""


def linear64(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """`x @ weight.T` in float64 for x [seq, in] float64 and weight [out, in] (float32 or
    float64): the weight is widened WEIGHT_BLOCK_VALUES at a time into one scratch block."""
    out_features, in_features = weight.shape
    result = np.empty((x.shape[0], out_features), dtype=np.float64)  # [seq, out]
    rows = max(1, WEIGHT_BLOCK_VALUES // max(in_features, 1))
    scratch = np.empty((min(rows, out_features), in_features), dtype=np.float64)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        block = scratch[: stop - start]
        block[...] = weight[start:stop]
        np.matmul(x, block.T, out=result[:, start:stop])
    return result


def silu64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


ATTENTION_BLOCK_VALUES = 1 << 20
"""Values of one `[rows, seq]` float64 block of an attention recipe (8 MiB): the attention
stages are checked a block of query rows of one head at a time, so a 4,096-token prompt never
holds a `[heads, seq, seq]` float64 array (1.2 GB for SmolLM2)."""


def attention_rows(seq: int) -> int:
    """Query rows per block for a prompt of `seq` tokens."""
    return max(1, min(seq, ATTENTION_BLOCK_VALUES // max(seq, 1)))


def attention_row_blocks(array: Any, heads: int, seq: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(head, first query row, float64 block [rows, keys]) of a `[heads, seq, seq]` stage, in
    file order, from an array or a lazy capture with `.blocks(rows)`. Only the keys a causal
    block can see are kept: rows [start, stop) get keys [0, stop), so the future beyond the
    block's last row is never widened, multiplied or compared (half the work of a long
    prompt); what is left above the diagonal is masked by `causal_block`."""
    rows = attention_rows(seq)
    if hasattr(array, "blocks"):
        for offset, block in array.blocks(rows):
            head, rest = divmod(offset, seq * seq)
            start = rest // seq
            square = to_host(block).reshape(-1, seq)  # [rows, seq]
            yield head, start, np.asarray(square[:, : start + square.shape[0]], np.float64)
        return
    square = np.asarray(array).reshape(heads, seq, seq)
    for head in range(heads):
        for start in range(0, seq, rows):
            stop = min(start + rows, seq)
            yield head, start, square[head, start:stop, :stop].astype(np.float64)


class ErrorSum:
    """‖recomputed − reference‖ / ‖reference‖ accumulated over blocks (relative_error's
    definition, float64 sums)."""

    def __init__(self) -> None:
        self.difference = 0.0
        self.scale = 0.0
        self.finite = True

    def add(self, recomputed: np.ndarray, reference: np.ndarray) -> None:
        if not (np.isfinite(recomputed).all() and np.isfinite(reference).all()):
            self.finite = False
            return
        delta = recomputed - reference
        self.difference += float(np.dot(delta.ravel(), delta.ravel()))
        self.scale += float(np.dot(reference.ravel(), reference.ravel()))

    def value(self) -> float:
        if not self.finite:
            return math.inf
        difference = math.sqrt(self.difference)
        return difference / math.sqrt(self.scale) if self.scale > 0 else difference


# ------------------------------------------------------------------------------ the tracker


class _Missing(Exception):
    """A recipe cannot run: the checked side lacks an input, or there are no weights."""


class LocalErrorTracker:
    """Feed it the checked side's captures in computation order; it returns each one's local
    error. It keeps the checked side's captures of the current layer and the previous layer's
    output (its inputs), nothing more: memory is one layer of activations."""

    def __init__(
        self,
        model: Model | None,
        token_ids: tuple[int, ...] | None,
        config: ModelConfig | None,
        depth: int | None = None,
    ) -> None:
        self.model = model
        self.config = model.config if model is not None else config
        self.depth = depth if depth is not None else getattr(self.config, "num_layers", None)
        """Layers of the checked side: final_norm reads the output of the last one."""
        self.token_ids = token_ids
        supported, self.unsupported = local_error_supported(self.config)
        if supported:
            self.unsupported = None
        self.layer: int | None = None
        self.current: dict[str, np.ndarray] = {}
        """The checked side's captures of `self.layer`, host float32, by stage."""
        self.outputs: dict[int, np.ndarray] = {}
        """post_ffn_residual by layer (the previous layer's only), and the embedding at -1."""
        self.final_norm: np.ndarray | None = None
        self._rope_cache: list[tuple[np.ndarray, np.ndarray]] = []
        """cos, sin once computed; shared with the jobs' snapshots (`job`)."""

    # -- inputs --------------------------------------------------------------------------

    def _input(self, layer: int, stage: str) -> np.ndarray:
        if layer == self.layer and stage in self.current:
            return self.current[stage].astype(np.float64)
        raise _Missing(f"the checked side lacks {_where(layer)} {stage}")

    def _raw_input(self, layer: int, stage: str) -> Any:
        """The checked side's capture as stored: an array, or a lazy attention capture."""
        if layer == self.layer and stage in self.current:
            return self.current[stage]
        raise _Missing(f"the checked side lacks {_where(layer)} {stage}")

    def _residual_in(self, layer: int) -> tuple[np.ndarray, str]:
        """The layer's input: the previous layer's post_ffn_residual, or the embedding."""
        key = layer - 1 if layer > 0 else -1
        name = f"{_where(layer - 1)} post_ffn_residual" if layer > 0 else "L0 embedding"
        if key not in self.outputs:
            raise _Missing(f"the checked side lacks {name}")
        return self.outputs[key].astype(np.float64), name

    def _matrix(self, name: str) -> np.ndarray:
        """A weight as stored (float32: `linear64` widens a matrix block by block)."""
        if self.model is None:
            raise _Missing("needs a model file's weights (neither side is one)")
        if not self.model.weights.has(name):  # a deeper checked side: layers A does not have
            raise _Missing(f"{self.model.path.name} has no tensor {name}")
        return np.asarray(self.model.weights.get(name))

    def _weight(self, name: str) -> np.ndarray:
        """A (small) weight widened to float64 whole: norms, biases."""
        return self._matrix(name).astype(np.float64)

    def _optional_weight(self, name: str) -> np.ndarray | None:
        if self.model is None or not self.model.weights.has(name):
            return None
        return self._weight(name)

    def _seq(self) -> int:
        if self.token_ids is None:
            raise _Missing("the token count is unknown")
        return len(self.token_ids)

    def _need_config(self) -> ModelConfig:
        if self.config is None:
            raise _Missing("needs a model's config (neither side is a model file)")
        return self.config

    # -- observe -------------------------------------------------------------------------

    def observe(self, capture: Capture) -> LocalError:
        """Record the capture as an input for later stages and return its own local error."""
        return self.job(capture)()

    def job(self, capture: Capture) -> Callable[[], LocalError]:
        """Record the capture as an input for later stages and return the computation of its
        own local error, to run now or later on any thread.

        Call it in computation order (it keeps the inputs of later stages); the job reads a
        snapshot of the inputs recorded before this capture, so the captures recorded after
        it change nothing, and a comparison runs several stages' jobs at once (a long prompt's
        local error is as much work as a pass)."""
        layer, stage = capture.layer, capture.stage
        array = capture.array
        if not hasattr(array, "blocks"):  # a lazy attention capture stays lazy (long prompts)
            array = np.asarray(to_host(array), dtype=np.float32)
        if layer != WHOLE_MODEL_LAYER and layer != self.layer:
            if self.layer is not None and "post_ffn_residual" in self.current:
                self.outputs = {self.layer: self.current["post_ffn_residual"]}
            elif self.layer is not None:
                self.outputs = {}
            self.layer, self.current = layer, {}
        inputs = copy.copy(self)  # the dicts are copied: the arrays in them are never changed
        inputs.current, inputs.outputs = dict(self.current), dict(self.outputs)
        self._remember(layer, stage, array)
        return partial(inputs._local_error, layer, stage, array)

    def _local_error(self, layer: int, stage: str, array: Any) -> LocalError:
        try:
            return self._compute(layer, stage, array)
        except _Missing as missing:
            return LocalError(None, (), str(missing))

    def _remember(self, layer: int, stage: str, array: np.ndarray) -> None:
        if layer == WHOLE_MODEL_LAYER:
            if stage == "final_norm":
                self.final_norm = array
            return
        if stage == "embedding":
            self.outputs[-1] = array
        self.current[stage] = array
        if stage == "post_ffn_residual":
            self.outputs[layer] = array

    def _compute(self, layer: int, stage: str, output: np.ndarray) -> LocalError:
        if self.unsupported is not None:
            raise _Missing(self.unsupported)
        recipe = RECIPES.get(stage)
        if recipe is None:
            raise _Missing(f"no local-error recipe for {stage}")
        recomputed, reference, inputs = recipe(self, layer, output)
        if reference is None:  # a blockwise recipe measured its error as it went
            return LocalError(float(recomputed), tuple(inputs))
        if stage in ("qkv_matmul", "qkv_bias") and self.config is not None:
            # Q, K and V are three projections: a bug in the small V block must not be diluted
            # by the larger Q block, so each is measured alone and the worst one counts.
            seq, edges = self._seq(), _qkv_edges(self.config)
            recomputed = recomputed.reshape(seq, -1)
            reference = reference.reshape(seq, -1)
            return LocalError(
                max(
                    relative_error(recomputed[:, lo:hi], reference[:, lo:hi])
                    for lo, hi in zip(edges[:-1], edges[1:], strict=True)
                ),
                tuple(inputs),
            )
        return LocalError(relative_error(recomputed, reference), tuple(inputs))

    # -- recipes -------------------------------------------------------------------------
    # Each returns (recomputed, the checked side's output in the same layout, inputs used).

    def _embedding(self, layer: int, output: np.ndarray) -> Recipe:
        if self.model is None:
            raise _Missing("needs a model file's weights (neither side is one)")
        ids = np.asarray(self.token_ids if self.token_ids is not None else [], dtype=np.int64)
        if ids.size == 0:
            raise _Missing("the token ids are unknown")
        rows = gather_rows(self.model.weights, "model.embed_tokens.weight", ids)  # [seq, H]
        return rows.astype(np.float64), output, ["token ids", "W embed_tokens"]

    def _attn_norm(self, layer: int, output: np.ndarray) -> Recipe:
        config = self._need_config()
        x, name = self._residual_in(layer)
        weight = self._weight(f"model.layers.{layer}.input_layernorm.weight")
        return rms_norm64(x, weight, config.rms_norm_eps), output, [name, "W input_layernorm"]

    def _projections(self, layer: int, bias: bool) -> tuple[np.ndarray, list[str]]:
        x = self._input(layer, "attn_norm")  # [seq, H]
        prefix = f"model.layers.{layer}.self_attn."
        parts = [linear64(x, self._matrix(f"{prefix}{p}_proj.weight")) for p in "qkv"]
        if bias:
            parts = [
                part + self._weight(f"{prefix}{p}_proj.bias")
                for part, p in zip(parts, "qkv", strict=True)
            ]
        return np.concatenate(parts, axis=1), [f"{_where(layer)} attn_norm", "W q/k/v_proj"]

    def _qkv_matmul(self, layer: int, output: np.ndarray) -> Recipe:
        recomputed, inputs = self._projections(layer, bias=False)
        return recomputed, output, inputs

    def _qkv_bias(self, layer: int, output: np.ndarray) -> Recipe:
        x = self._input(layer, "qkv_matmul")
        prefix = f"model.layers.{layer}.self_attn."
        bias = np.concatenate([self._weight(f"{prefix}{p}_proj.bias") for p in "qkv"])
        return x + bias, output, [f"{_where(layer)} qkv_matmul", "W q/k/v_proj.bias"]

    def _qkv(self, layer: int) -> tuple[np.ndarray, str]:
        """The checked side's projections after any bias: qkv_bias when present."""
        config = self._need_config()
        name = "qkv_bias" if config.qkv_bias else "qkv_matmul"
        return self._input(layer, name).reshape(self._seq(), -1), f"{_where(layer)} {name}"

    def _rope(self) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [seq, hd/2]: float32 angles as the reference computes them, then float64."""
        if not self._rope_cache:  # two jobs may both compute it: the same values
            config = self._need_config()
            cos, sin = rope_cos_sin(np, self._seq(), config.head_dim, config.rope_theta)
            self._rope_cache.append((cos.astype(np.float64), sin.astype(np.float64)))
        return self._rope_cache[0]

    def _post_rope(self, layer: int, output: np.ndarray, which: str) -> Recipe:
        config = self._need_config()
        qkv, name = self._qkv(layer)
        q_dim, kv_dim, hd = config.q_dim, config.kv_dim, config.head_dim
        start, width = (0, q_dim) if which == "q" else (q_dim, kv_dim)
        x = qkv[:, start : start + width].reshape(self._seq(), -1, hd)  # [seq, heads, hd]
        inputs = [name]
        if config.qk_norm:
            weight = self._weight(f"model.layers.{layer}.self_attn.{which}_norm.weight")
            x = rms_norm64(x, weight, config.rms_norm_eps)
            inputs.append(f"W {which}_norm")
        cos, sin = self._rope()
        rotated = rope64(x, cos, sin, config.rope_pairing).reshape(self._seq(), -1)
        return rotated, output, [*inputs, "RoPE"]

    def _q_post_rope(self, layer: int, output: np.ndarray) -> Recipe:
        return self._post_rope(layer, output, "q")

    def _k_post_rope(self, layer: int, output: np.ndarray) -> Recipe:
        return self._post_rope(layer, output, "k")

    def _heads(self, layer: int, stage: str, count: int) -> np.ndarray:
        """A [seq, count·hd] stage of the checked side as [count, seq, hd]."""
        config = self._need_config()
        x = self._input(layer, stage).reshape(self._seq(), count, config.head_dim)
        return x.transpose(1, 0, 2)

    def _attn_scores(self, layer: int, output: Any) -> Recipe:
        config = self._need_config()
        seq, group = self._seq(), config.num_heads // config.num_kv_heads
        q = self._heads(layer, "q_post_rope", config.num_heads)  # [nh, seq, hd]
        k = self._heads(layer, "k_post_rope", config.num_kv_heads)  # [nkv, seq, hd]
        scale = config.head_dim**-0.5
        error = ErrorSum()
        for head, start, block in attention_row_blocks(output, config.num_heads, seq):
            stop = start + block.shape[0]
            recomputed = (q[head, start:stop] @ k[head // group, :stop].T) * scale  # [rows, stop]
            causal = causal_block(start, stop)
            error.add(recomputed[causal], block[causal])
        inputs = [f"{_where(layer)} q_post_rope", f"{_where(layer)} k_post_rope"]
        return error.value(), None, inputs

    def _attn_softmax(self, layer: int, output: Any) -> Recipe:
        config = self._need_config()
        seq = self._seq()
        scores = self._raw_input(layer, "attn_scores")
        error = ErrorSum()
        pairs = zip(
            attention_row_blocks(scores, config.num_heads, seq),
            attention_row_blocks(output, config.num_heads, seq),
            strict=True,
        )
        for (_, start, score_block), (_, _, block) in pairs:
            stop = start + block.shape[0]
            causal = causal_block(start, stop)
            masked = np.where(causal, score_block, -np.inf)
            weights = np.exp(masked - masked.max(axis=-1, keepdims=True))
            probs = weights / weights.sum(axis=-1, keepdims=True)  # [rows, stop]
            error.add(probs[causal], block[causal])
        return error.value(), None, [f"{_where(layer)} attn_scores"]

    def _attention(self, layer: int, output: Any) -> Recipe:
        config = self._need_config()
        seq, hd = self._seq(), config.head_dim
        group = config.num_heads // config.num_kv_heads
        probs = self._raw_input(layer, "attn_softmax")
        qkv, name = self._qkv(layer)
        v = qkv[:, config.q_dim + config.kv_dim :].reshape(seq, config.num_kv_heads, hd)
        context = np.zeros((seq, config.num_heads * hd))  # [seq, nh*hd]
        for head, start, block in attention_row_blocks(probs, config.num_heads, seq):
            stop = start + block.shape[0]
            # a runtime may leave anything above the diagonal: only the causal weights count
            weights = np.where(causal_block(start, stop), block, 0.0)  # [rows, stop]
            context[start:stop, head * hd : (head + 1) * hd] = weights @ v[:stop, head // group]
        return context, output, [f"{_where(layer)} attn_softmax", f"{name} (V)"]

    def _linear(
        self, layer: int, output: np.ndarray, source: str, weight: str, bias: str | None
    ) -> Recipe:
        x = self._input(layer, source).reshape(self._seq(), -1)
        prefix = f"model.layers.{layer}."
        result = linear64(x, self._matrix(prefix + weight))
        if bias is not None and (b := self._optional_weight(prefix + bias)) is not None:
            result = result + b
        short = weight.rsplit(".", 2)[-2]
        return result, output, [f"{_where(layer)} {source}", f"W {short}"]

    def _attn_out(self, layer: int, output: np.ndarray) -> Recipe:
        return self._linear(
            layer, output, "attention", "self_attn.o_proj.weight", "self_attn.o_proj.bias"
        )

    def _post_attn_residual(self, layer: int, output: np.ndarray) -> Recipe:
        x, name = self._residual_in(layer)
        attn_out = self._input(layer, "attn_out")
        return x + attn_out.reshape(x.shape), output, [name, f"{_where(layer)} attn_out"]

    def _ffn_norm(self, layer: int, output: np.ndarray) -> Recipe:
        config = self._need_config()
        x = self._input(layer, "post_attn_residual")
        weight = self._weight(f"model.layers.{layer}.post_attention_layernorm.weight")
        inputs = [f"{_where(layer)} post_attn_residual", "W post_attention_layernorm"]
        return rms_norm64(x, weight, config.rms_norm_eps), output, inputs

    def _ffn_gate(self, layer: int, output: np.ndarray) -> Recipe:
        return self._linear(layer, output, "ffn_norm", "mlp.gate_proj.weight", "mlp.gate_proj.bias")

    def _ffn_up(self, layer: int, output: np.ndarray) -> Recipe:
        return self._linear(layer, output, "ffn_norm", "mlp.up_proj.weight", "mlp.up_proj.bias")

    def _ffn_silu(self, layer: int, output: np.ndarray) -> Recipe:
        return silu64(self._input(layer, "ffn_gate")), output, [f"{_where(layer)} ffn_gate"]

    def _ffn_swigl(self, layer: int, output: np.ndarray) -> Recipe:
        up = self._input(layer, "ffn_up")
        if "ffn_silu" in self.current and self.layer == layer:
            act, name = self._input(layer, "ffn_silu"), "ffn_silu"
        else:  # llama.cpp fuses the SiLU into its GLU op: derive it from the gate
            act, name = silu64(self._input(layer, "ffn_gate")), "silu(ffn_gate)"
        return act * up, output, [f"{_where(layer)} {name}", f"{_where(layer)} ffn_up"]

    def _ffn_out(self, layer: int, output: np.ndarray) -> Recipe:
        return self._linear(
            layer, output, "ffn_swigl", "mlp.down_proj.weight", "mlp.down_proj.bias"
        )

    def _post_ffn_residual(self, layer: int, output: np.ndarray) -> Recipe:
        x = self._input(layer, "post_attn_residual")
        ffn_out = self._input(layer, "ffn_out")
        inputs = [f"{_where(layer)} post_attn_residual", f"{_where(layer)} ffn_out"]
        return x + ffn_out.reshape(x.shape), output, inputs

    def _final_norm(self, layer: int, output: np.ndarray) -> Recipe:
        config = self._need_config()
        last = (self.depth or config.num_layers) - 1
        if last not in self.outputs:
            raise _Missing(f"the checked side lacks {_where(last)} post_ffn_residual")
        x = self.outputs[last].astype(np.float64)
        weight = self._weight("model.norm.weight")
        inputs = [f"{_where(last)} post_ffn_residual", "W norm"]
        return rms_norm64(x, weight, config.rms_norm_eps), output, inputs

    def _lm_head(self, layer: int, output: np.ndarray) -> Recipe:
        config = self._need_config()
        if self.final_norm is None:
            raise _Missing("the checked side lacks final_norm")
        if self.model is None:
            raise _Missing("needs a model file's weights (neither side is one)")
        last = self.final_norm.astype(np.float64).reshape(-1, config.hidden_size)[-1]  # [H]
        vocab = config.vocab_size
        name = lm_head_weight_name(self.model)
        logits = np.empty(vocab, dtype=np.float64)  # [vocab]
        for start, stop in lm_head_row_blocks(vocab):
            rows = weight_rows(self.model.weights, name, start, stop)  # [rows, H] float32
            logits[start:stop] = rows.astype(np.float64) @ last
        bias = self._optional_weight("lm_head.bias")
        if bias is not None:
            logits = logits + bias
        reference = output.reshape(-1)
        if reference.size != vocab:
            if reference.size % vocab:
                raise _Missing(f"lm_head holds {reference.size} values, not [seq, {vocab}]")
            reference = reference.reshape(-1, vocab)[-1]  # all positions: the last one's
        return logits, reference, ["final_norm (last token)", f"W {name.split('.')[-2]}"]


Recipe = tuple[np.ndarray, np.ndarray, list[str]]

RECIPES: dict[str, Callable[[LocalErrorTracker, int, np.ndarray], Any]] = {
    "embedding": LocalErrorTracker._embedding,
    "attn_norm": LocalErrorTracker._attn_norm,
    "qkv_matmul": LocalErrorTracker._qkv_matmul,
    "qkv_bias": LocalErrorTracker._qkv_bias,
    "q_post_rope": LocalErrorTracker._q_post_rope,
    "k_post_rope": LocalErrorTracker._k_post_rope,
    "attn_scores": LocalErrorTracker._attn_scores,
    "attn_softmax": LocalErrorTracker._attn_softmax,
    "attention": LocalErrorTracker._attention,
    "attn_out": LocalErrorTracker._attn_out,
    "post_attn_residual": LocalErrorTracker._post_attn_residual,
    "ffn_norm": LocalErrorTracker._ffn_norm,
    "ffn_gate": LocalErrorTracker._ffn_gate,
    "ffn_up": LocalErrorTracker._ffn_up,
    "ffn_silu": LocalErrorTracker._ffn_silu,
    "ffn_swigl": LocalErrorTracker._ffn_swigl,
    "ffn_out": LocalErrorTracker._ffn_out,
    "post_ffn_residual": LocalErrorTracker._post_ffn_residual,
    "final_norm": LocalErrorTracker._final_norm,
    "lm_head": LocalErrorTracker._lm_head,
}
"""Stage → its recipe: how to recompute it from the checked side's inputs (one per dense stage;
the MoE stages have none yet and say so)."""


def _qkv_edges(config: ModelConfig) -> list[int]:
    """Column edges of the Q, K and V blocks in a `[seq, q_dim + 2 kv_dim]` stage."""
    return [0, config.q_dim, config.q_dim + config.kv_dim, config.q_dim + 2 * config.kv_dim]


def _where(layer: int) -> str:
    return "model" if layer == WHOLE_MODEL_LAYER else f"L{layer}"
