"""The one in-memory model every file format opens into.

`ModelConfig` holds the normalized architecture facts the forward pass needs; a `WeightStore`
hands out float32 arrays under canonical HF tensor names, dequantizing on each request and
keeping nothing it hands out; `Model` ties them to the file and its tokenizer.

Canonical tensor names (HF):
    model.embed_tokens.weight                      [vocab, hidden]
    model.layers.N.input_layernorm.weight          [hidden]
    model.layers.N.self_attn.{q,k,v}_proj.weight   [n_heads*head_dim | n_kv_heads*head_dim, hidden]
    model.layers.N.self_attn.{q,k,v}_proj.bias     (QKV-bias models, e.g. Qwen2)
    model.layers.N.self_attn.o_proj.weight         [hidden, n_heads*head_dim]
    model.layers.N.self_attn.{q,k}_norm.weight     [head_dim]  (Q/K-norm models, e.g. Qwen3)
    model.layers.N.post_attention_layernorm.weight [hidden]  (Llama: the FFN's input norm;
                                                   Gemma: the norm of the attention output)
    model.layers.N.pre_feedforward_layernorm.weight  [hidden]  (Gemma: the FFN's input norm)
    model.layers.N.post_feedforward_layernorm.weight [hidden]  (Gemma: the norm of the FFN output)
    model.layers.N.mlp.{gate,up}_proj.weight       [intermediate, hidden]
    model.layers.N.mlp.down_proj.weight            [hidden, intermediate]
    model.layers.N.mlp.gate.weight                 [experts, hidden]  (MoE layers: the router)
    model.layers.N.mlp.experts.E.{gate,up}_proj.weight [moe_intermediate, hidden]  (expert E)
    model.layers.N.mlp.experts.E.down_proj.weight  [hidden, moe_intermediate]
    model.layers.N.mlp.shared_expert.{gate,up,down}_proj.weight  (Qwen2-MoE's shared expert)
    model.layers.N.mlp.shared_expert_gate.weight   [1, hidden]
    model.norm.weight                              [hidden]
    lm_head.weight                                 [vocab, hidden]  (absent when tied)

Experts are separate 2-D tensors (HF's checkpoint names), whatever the container: a GGUF store
serves expert E of llama.cpp's merged `ffn_*_exps` tensor by decoding only E's slice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from engine.errors import MissingTensorError
from engine.heads import HeadLayout

Architecture = Literal[
    "llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma2", "gemma3"
]
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "gemma2",
    "gemma3",
)

HiddenAct = Literal["silu", "gelu_tanh"]
"""The gate activation of the gated FFN: SiLU (SwiGLU: Llama, Qwen, Mistral) or the tanh
approximation of GELU (GeGLU: Gemma, HF `gelu_pytorch_tanh`)."""

SLIDING, FULL = "sliding_attention", "full_attention"
"""HF's `layer_types` values: a layer attends to the last `sliding_window` positions, or to all."""

RopePairing = Literal["half", "adjacent"]
"""`half`: HF / NEOX rotate-half, pairs (i, i + head_dim/2). `adjacent`: GGML NORM, pairs (2i, 2i+1)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts, normalized across .apr, .gguf and .safetensors."""

    architecture: Architecture
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_pairing: RopePairing = "half"
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tied_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos: bool = False
    """Whether the model's metadata asks for a BOS token in front of a prompt."""
    context_length: int | None = None
    """The positions the model was trained for (GGUF `{arch}.context_length`, HF
    `max_position_embeddings`); None when the file does not say. A longer prompt still runs
    (RoPE extrapolates), and the commands say so (`context_warning`)."""

    # The steps a layer runs beyond Llama's. Each default is Llama's behaviour; an architecture is
    # described by turning steps on, and engine/forward.py runs whichever the config selects.
    norm_weight_offset: float = 0.0
    """RMSNorm scales by `(offset + w)`: 0 for Llama, 1 for Gemma (weights stored around 0)."""
    embedding_scale: float = 1.0
    """Multiplier of the looked-up embedding rows: Gemma's sqrt(hidden), rounded to float32 as HF
    does (a float32 tensor), 1.0 (no step) otherwise."""
    sandwich_norms: bool = False
    """Gemma 2/3: the attention output and the FFN output are each normed before their residual
    add (`post_attn_norm`, `post_ffn_norm`), and the FFN's input norm is
    `pre_feedforward_layernorm` (Llama's `post_attention_layernorm` is Gemma's post-attention)."""
    hidden_act: HiddenAct = "silu"
    query_pre_attn_scalar: float | None = None
    """Attention scores scale by `query_pre_attn_scalar ** -0.5` (Gemma); None: `head_dim ** -0.5`."""
    attn_logit_softcap: float | None = None
    """Gemma 2: scores become `cap * tanh(scores / cap)` before the softmax."""
    final_logit_softcap: float | None = None
    """Gemma 2: logits become `cap * tanh(logits / cap)`."""
    sliding_window: int | None = None
    """Sliding layers let query i see keys j with `i - window < j <= i` (HF and llama.cpp)."""
    layer_types: tuple[str, ...] = ()
    """Per layer SLIDING or FULL. Empty: every layer slides when `sliding_window` is set (Mistral),
    none otherwise."""
    rope_local_theta: float | None = None
    """RoPE base of the sliding layers (Gemma 3's 10000 beside the global 1e6); None: rope_theta."""

    # Mixture of experts (Qwen3-MoE): a router picks `num_experts_per_tok` of `num_experts`
    # gated FFNs per token, in the layers `is_moe_layer` names; the rest keep the dense FFN.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    """Renormalize the top-k routing weights to sum to 1 (HF `norm_topk_prob`)."""
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: every token also runs a shared gated FFN of this size, scaled by
    sigmoid(shared_expert_gate · x), added to the routed experts' output. 0: none."""

    def is_moe_layer(self, layer: int) -> bool:
        """HF Qwen3-MoE's rule: experts in every `decoder_sparse_step`-th layer not listed dense."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if not self.layer_types:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def layer_rope_theta(self, layer: int) -> float:
        """The RoPE base `layer` rotates with."""
        if (
            self.rope_local_theta is not None
            and self.layer_types
            and self.layer_types[layer] == SLIDING
        ):
            return self.rope_local_theta
        return self.rope_theta

    @property
    def ffn_norm_name(self) -> str:
        """The layer-relative name of the FFN's input norm weight."""
        return "pre_feedforward_layernorm" if self.sandwich_norms else "post_attention_layernorm"

    @property
    def heads(self) -> HeadLayout:
        """The attention head layout (engine.heads): the projections' and head stages' widths."""
        return HeadLayout(self.num_heads, self.num_kv_heads, self.head_dim)

    @property
    def q_dim(self) -> int:
        return self.heads.q_dim

    @property
    def kv_dim(self) -> int:
        return self.heads.kv_dim

    @property
    def layer_weight_count(self) -> int:
        """Elements of one dense layer's matrices: q/k/v/o projections and gate/up/down."""
        hidden = self.hidden_size
        return hidden * (2 * self.q_dim + 2 * self.kv_dim) + 3 * hidden * self.intermediate_size


class WeightStore(Protocol):
    """Float32 weights by canonical name, produced on request and not retained."""

    def names(self) -> list[str]: ...

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray:
        """A fresh float32 array in HF orientation (`[out_features, in_features]` for linears)."""
        ...

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Float32 rows [start, stop) of a 2-D tensor, bit for bit `get(name)[start:stop]`. A
        store decodes only those rows' bytes where its format allows (the embedding lookup and
        the blocked lm_head use it so a [vocab, hidden] table is never dequantized whole);
        `WeightStoreBase.get_rows` is the generic version, the whole tensor sliced."""
        ...

    def close(self) -> None: ...


def check_row_range(
    source: str, name: str, shape: tuple[int, ...], start: int, stop: int
) -> tuple[int, int]:
    """(start, stop) as ints when they name rows of a 2-D tensor, `0 <= start <= stop <= rows`."""
    if len(shape) != 2:
        raise ValueError(f"{source}: tensor {name!r} has shape {list(shape)}, rows need 2-D")
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"{source}: rows [{start}, {stop}) outside {name!r} {list(shape)}")
    return start, stop


class WeightStoreBase(ABC):
    """What the stores share: their tensors by canonical name in `_entries` (whatever each
    format keeps per tensor) behind `names`, `has` and `_entry` (a `MissingTensorError` naming
    `source` for an unknown name), the generic `get_rows`, and a `close` with nothing to release.
    A store implements `shape` and `get`, and overrides `get_rows` where its bytes let it decode
    only the rows asked for."""

    source: str
    _entries: Mapping[str, Any]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def has(self, name: str) -> bool:
        return name in self._entries

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def get(self, name: str) -> np.ndarray: ...

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor: the whole tensor decoded and sliced (the same
        values as a row decode, without the memory saving)."""
        start, stop = check_row_range(self.source, name, tuple(self.shape(name)), start, stop)
        return self.get(name)[start:stop].copy()  # a copy: the whole tensor is freed at once

    def close(self) -> None:  # noqa: B027 (a no-op by default, not abstract)
        pass

    def _entry(self, name: str) -> Any:
        try:
            return self._entries[name]
        except KeyError:
            raise MissingTensorError(f"{self.source}: missing tensor {name!r}") from None


def weight_rows(store: WeightStore, name: str, start: int, stop: int) -> np.ndarray:
    """Float32 rows [start, stop) of a 2-D weight (`store.get_rows`)."""
    return store.get_rows(name, start, stop)


def gather_rows(store: WeightStore, name: str, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` [n] of a 2-D weight, [n, cols] float32 (an embedding lookup). Only the distinct
    ids' rows are decoded, one `get_rows` per run of consecutive ids."""
    ordered = np.sort(np.asarray(ids))  # not np.unique: it imports numpy.ma (15 ms)
    first = np.ones(ordered.size, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    distinct = ordered[first]  # [n_distinct], sorted
    runs = np.split(distinct, np.flatnonzero(np.diff(distinct) != 1) + 1)  # consecutive ids
    table_rows = np.concatenate(
        [store.get_rows(name, int(run[0]), int(run[-1]) + 1) for run in runs if run.size]
        or [np.empty((0, store.shape(name)[1]), dtype=np.float32)]
    )  # [n_distinct, cols]
    return table_rows[np.searchsorted(distinct, ids)]  # [n, cols]


class Tokenizer(Protocol):
    """Prompt text to token ids, and ids back to readable text."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry for one id, for display."""
        ...


@dataclass
class DictWeightStore(WeightStoreBase):
    """A WeightStore over arrays already in memory (tests, generated models, conversions)."""

    arrays: dict[str, np.ndarray]
    source: str = "<memory>"

    @property
    def _entries(self) -> dict[str, np.ndarray]:
        return self.arrays

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name).shape)

    def get(self, name: str) -> np.ndarray:
        return np.array(self._entry(name), dtype=np.float32, copy=True)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        array = self._entry(name)
        start, stop = check_row_range(self.source, name, tuple(array.shape), start, stop)
        return np.array(array[start:stop], dtype=np.float32, copy=True)


@dataclass
class Model:
    """An opened model file: config, lazy weights and (when the file carries one) its tokenizer."""

    path: Path
    format: str
    """`apr`, `gguf`, `safetensors` or `memory`."""
    config: ModelConfig
    weights: WeightStore
    tokenizer: Tokenizer | None = None
    metadata: dict = field(default_factory=dict)
    """Raw format metadata worth showing (name, quantization, ...); never needed for compute."""

    @property
    def name(self) -> str:
        return self.path.name

    def layer_weight_names(self, layer: int) -> list[str]:
        prefix = f"model.layers.{layer}."
        return [name for name in self.weights.names() if name.startswith(prefix)]

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def context_warning(config: ModelConfig, seq_len: int, label: str) -> str | None:
    """A one-line warning when a prompt of `seq_len` tokens runs past the positions `config`'s
    model was trained for; None when it does not, or when the file does not say."""
    limit = config.context_length
    if not limit or seq_len <= limit:
        return None
    return (
        f"warning: {label}: {seq_len} tokens exceed the model's context length {limit}: "
        f"positions {limit} and on are past what it was trained for"
    )
