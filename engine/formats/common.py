"""What every container shares: architecture names, family steps, config fields, expected tensors.

Each reader turns its own metadata into the same `ModelConfig`, and checks the weights it found
against the tensors that config calls for, so that a file missing a tensor (or holding one of
the wrong shape) fails at open with a one-line error instead of halfway through a trace.

HF's config.json, in both directions, is engine.formats.hf_config's job; it builds on the
family steps and field readers here, as the GGUF and APR metadata readers do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from engine.errors import FormatError, MissingTensorError, UnsupportedModelError
from engine.model import FULL, SLIDING, SUPPORTED_ARCHITECTURES, Model, ModelConfig, WeightStore

# HF `model_type` / GGUF `general.architecture` / APR `architecture` spellings of our families.
ARCHITECTURE_ALIASES: dict[str, str] = {
    "llama": "llama",
    "llama2": "llama",
    "llama3": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen": "qwen2",
    "qwen2.5": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "qwen3moe": "qwen3_moe",
    "qwen2_moe": "qwen2_moe",
    "qwen2moe": "qwen2_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}

HF_ARCHITECTURE_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
HF_MODEL_TYPE = {"gemma3": "gemma3_text"}
"""HF `model_type` where it differs from our family name (Gemma3ForCausalLM's text config)."""
_HF_CLASS_TO_ARCH = {cls.lower(): arch for arch, cls in HF_ARCHITECTURE_CLASS.items()}

# Words in an architecture string that mean "not a dense decoder": named in the error.
_UNSUPPORTED_HINTS = ("moe", "mixtral", "bert", "t5", "encoder", "whisper", "clip", "vit")

# Element count of any model we accept: far above any real checkpoint, far below overflow.
MAX_ELEMENTS = 1 << 40


MOE_FAMILY = ("qwen3_moe", "qwen2_moe")
"""The mixture-of-experts families the forward pass runs."""


def is_supported_moe(found: object) -> bool:
    """Whether an architecture string (HF model_type or class, GGUF or APR name) is one of
    MOE_FAMILY."""
    key = found.strip().lower() if isinstance(found, str) else ""
    return ARCHITECTURE_ALIASES.get(key, _HF_CLASS_TO_ARCH.get(key)) in MOE_FAMILY


def normalize_architecture(found: str | None, source: str) -> str:
    """Our family name for an architecture string, or "unsupported architecture" naming it."""
    key = (found or "").strip().lower()
    if key in ARCHITECTURE_ALIASES:
        return ARCHITECTURE_ALIASES[key]
    if key in _HF_CLASS_TO_ARCH:
        return _HF_CLASS_TO_ARCH[key]
    detail = ""
    if any(hint in key for hint in _UNSUPPORTED_HINTS):
        detail = " (mixture-of-experts and encoder models are not supported)"
    shown = found if found else "none"
    raise UnsupportedModelError(
        f"{source}: unsupported architecture {shown!r}{detail}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def iter_expected_tensors(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Canonical name and shape of every tensor the forward pass reads for `config`, in order.

    A generator, so a corrupt layer count fails at the first missing layer instead of
    materializing billions of names.
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    yield "model.embed_tokens.weight", (config.vocab_size, hidden)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        yield prefix + "input_layernorm.weight", (hidden,)
        yield prefix + "self_attn.q_proj.weight", (config.q_dim, hidden)
        yield prefix + "self_attn.k_proj.weight", (config.kv_dim, hidden)
        yield prefix + "self_attn.v_proj.weight", (config.kv_dim, hidden)
        if config.qkv_bias:
            yield prefix + "self_attn.q_proj.bias", (config.q_dim,)
            yield prefix + "self_attn.k_proj.bias", (config.kv_dim,)
            yield prefix + "self_attn.v_proj.bias", (config.kv_dim,)
        if config.qk_norm:
            yield prefix + "self_attn.q_norm.weight", (config.head_dim,)
            yield prefix + "self_attn.k_norm.weight", (config.head_dim,)
        yield prefix + "self_attn.o_proj.weight", (hidden, config.q_dim)
        yield prefix + "post_attention_layernorm.weight", (hidden,)
        if config.sandwich_norms:
            yield prefix + "pre_feedforward_layernorm.weight", (hidden,)
            yield prefix + "post_feedforward_layernorm.weight", (hidden,)
        if config.is_moe_layer(layer):
            moe_inter = config.moe_intermediate_size
            yield prefix + "mlp.gate.weight", (config.num_experts, hidden)
            for expert in range(config.num_experts):
                yield f"{prefix}mlp.experts.{expert}.gate_proj.weight", (moe_inter, hidden)
                yield f"{prefix}mlp.experts.{expert}.up_proj.weight", (moe_inter, hidden)
                yield f"{prefix}mlp.experts.{expert}.down_proj.weight", (hidden, moe_inter)
            shared = config.shared_expert_intermediate_size
            if shared:
                yield prefix + "mlp.shared_expert.gate_proj.weight", (shared, hidden)
                yield prefix + "mlp.shared_expert.up_proj.weight", (shared, hidden)
                yield prefix + "mlp.shared_expert.down_proj.weight", (hidden, shared)
                yield prefix + "mlp.shared_expert_gate.weight", (1, hidden)
            continue
        yield prefix + "mlp.gate_proj.weight", (inter, hidden)
        yield prefix + "mlp.up_proj.weight", (inter, hidden)
        yield prefix + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    if not config.tied_embeddings:
        yield "lm_head.weight", (config.vocab_size, hidden)


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor the forward pass reads for `config`."""
    return dict(iter_expected_tensors(config))


def check_write_dtype(path: object, container: str, dtype: str, supported: Iterable[str]) -> None:
    """A writer's `dtype` argument, checked before anything is written (one line naming it)."""
    choices = tuple(supported)
    if dtype not in choices:
        raise UnsupportedModelError(
            f"{path}: {container} dtype {dtype!r} is not supported (choose from {', '.join(choices)})"
        )


def stored_tensor_names(model: Model) -> list[str]:
    """The tensors a writer stores: every weight, except `lm_head` when it is tied to the
    embedding (the readers restore it from `model.embed_tokens`)."""
    tied = model.config.tied_embeddings
    return [name for name in model.weights.names() if not (tied and name == "lm_head.weight")]


def check_weights(config: ModelConfig, weights: WeightStore, source: str) -> None:
    """Every tensor the config needs is present with its shape, and no bias is there that the
    forward pass would silently leave out (an o_proj or MLP bias, a Llama Q/K/V bias); one-line
    error otherwise."""
    for name, shape in iter_expected_tensors(config):
        if not weights.has(name):
            raise MissingTensorError(f"{source}: missing tensor {name!r}")
        found = tuple(weights.shape(name))
        if found != shape:
            raise FormatError(
                f"{source}: tensor {name!r} has shape {list(found)}, the config implies {list(shape)}"
            )
    # Every expected tensor exists, so this set is no larger than the file's own tensor list.
    expected = {name for name, _ in iter_expected_tensors(config)}
    for name in weights.names():
        if name.endswith(".bias") and name not in expected:
            raise UnsupportedModelError(
                f"{source}: tensor {name!r} is a bias the {config.architecture} forward pass does "
                "not apply; models with it are not supported"
            )


def check_dims(config: ModelConfig, source: str) -> None:
    """Positive, mutually consistent sizes (a corrupt config must not reach the forward pass)."""
    for field_name in (
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
    ):
        value = getattr(config, field_name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value > (1 << 31):
            raise FormatError(f"{source}: {field_name} is {value!r}, expected a positive integer")
    if config.num_heads % config.num_kv_heads:
        raise FormatError(
            f"{source}: {config.num_heads} attention heads are not a multiple of "
            f"{config.num_kv_heads} KV heads"
        )
    if config.head_dim % 2:
        raise FormatError(f"{source}: head_dim {config.head_dim} is odd; RoPE needs pairs")
    if not (math.isfinite(config.rope_theta) and config.rope_theta > 0):
        raise FormatError(f"{source}: rope_theta {config.rope_theta!r} is not a positive number")
    if not (math.isfinite(config.rms_norm_eps) and config.rms_norm_eps >= 0):
        raise FormatError(f"{source}: rms_norm_eps {config.rms_norm_eps!r} is not a valid epsilon")


def int_field(
    meta: Mapping[str, Any], keys: tuple[str, ...], source: str, default: Any = None
) -> Any:
    """The first of `keys` present in `meta` as an integer (JSON or GGUF), else `default`.

    A float is accepted when it is integral (`64.0`); NaN, ±Inf and `1.5` are errors.
    """
    key, value = _first_number(meta, keys, source, "an integer")
    if key is None:
        return default
    if isinstance(value, float) and not value.is_integer():
        raise FormatError(f"{source}: {key} is {value!r}, expected an integer")
    return int(value)


UNKNOWN_CONTEXT_LENGTH = 2048
"""The context length our writers record for a model whose source did not say (what they
recorded for every model before `ModelConfig.context_length` existed)."""


def positive_or_none(value: int | None) -> int | None:
    """`value` when it is a positive integer, else None (a context length of 0 or less says
    nothing)."""
    return value if isinstance(value, int) and value > 0 else None


def float_field(
    meta: Mapping[str, Any], keys: tuple[str, ...], source: str, default: Any = None
) -> Any:
    """The first of `keys` present in `meta` as a float, else `default`."""
    key, value = _first_number(meta, keys, source, "a number")
    return default if key is None else float(value)


def _first_number(
    meta: Mapping[str, Any], keys: tuple[str, ...], source: str, expected: str
) -> tuple[str | None, Any]:
    """The first of `keys` that `meta` holds (not null), checked to be a number (not a bool)."""
    for key in keys:
        value = meta.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FormatError(f"{source}: {key} is {value!r}, expected {expected}")
            return key, value
    return None, None


GEMMA_FAMILY = ("gemma2", "gemma3")
GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")
"""HF activation names of the tanh-approximated GELU."""
GEMMA_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}
"""Every Nth layer attends globally, the others slide (HF's default `layer_types`, llama.cpp's
`set_swa_pattern`)."""
GEMMA3_LOCAL_ROPE_THETA = 10000.0
"""Gemma 3's RoPE base on sliding layers (HF `rope_local_base_freq`; llama.cpp hard-codes it)."""


def moe_steps(
    *,
    num_experts: int,
    per_token: int,
    moe_intermediate: int,
    norm_topk_prob: bool,
    sparse_step: int = 1,
    mlp_only_layers: tuple[int, ...] = (),
    source: str,
) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config, checked (a corrupt count must not reach the pass)."""
    if not 0 < per_token <= num_experts <= (1 << 16):
        raise FormatError(
            f"{source}: {per_token} experts per token of {num_experts} is not a valid routing"
        )
    if moe_intermediate <= 0 or sparse_step <= 0:
        raise FormatError(f"{source}: moe_intermediate_size {moe_intermediate} is not positive")
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=per_token,
        moe_intermediate_size=moe_intermediate,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=sparse_step,
        mlp_only_layers=mlp_only_layers,
    )


def family_steps(arch: str, hidden: int) -> dict[str, Any]:
    """The `ModelConfig` step fields every model of a family has (engine/forward.py's table):
    Qwen2's QKV bias, Qwen3's Q/K norm, Gemma's (1 + w) norms, sqrt(hidden) embedding scale,
    sandwich norms and GELU-tanh (with Gemma 3's Q/K norm)."""
    steps: dict[str, Any] = {
        "qkv_bias": arch in ("qwen2", "qwen2_moe"),
        "qk_norm": arch in ("qwen3", "qwen3_moe", "gemma3"),
    }
    if arch in GEMMA_FAMILY:
        steps.update(
            norm_weight_offset=1.0,
            # HF multiplies by torch.tensor(hidden ** 0.5): a float32 scalar.
            embedding_scale=float(np.float32(math.sqrt(hidden))) if hidden else 1.0,
            sandwich_norms=True,
            hidden_act="gelu_tanh",
        )
    return steps


def gemma_layer_steps(
    arch: str,
    num_layers: int,
    *,
    sliding_window: int | None,
    layer_types: Any,
    pattern: int | None,
    source: str,
) -> dict[str, Any]:
    """`sliding_window` and per-layer `layer_types` of a Gemma model: the file's list when it
    has one, else every `pattern`-th layer global (the family default when absent)."""
    if layer_types is None:
        every = pattern or GEMMA_SLIDING_PATTERN[arch]
        layer_types = [SLIDING if (i + 1) % every else FULL for i in range(num_layers)]
    if not isinstance(layer_types, list | tuple) or len(layer_types) != num_layers:
        raise FormatError(f"{source}: layer_types is not a list of {num_layers} layer kinds")
    if any(kind not in (SLIDING, FULL) for kind in layer_types):
        raise UnsupportedModelError(f"{source}: layer_types {sorted(set(layer_types))} unsupported")
    if sliding_window is not None and sliding_window <= 0:
        raise FormatError(f"{source}: sliding_window {sliding_window} is not positive")
    return {"sliding_window": sliding_window, "layer_types": tuple(layer_types)}


def hf_ordered(config: ModelConfig, name: str, values: np.ndarray) -> np.ndarray:
    """`values` of tensor `name` in HF rotate-half order, whatever the model's RoPE pairing.

    A model with adjacent-pair RoPE (an APR file with rope_type 0, typically imported from a
    GGUF) holds Q/K rows in llama.cpp's permuted order; HF-order writers (safetensors, GGUF
    with its own permutation) need them un-permuted first. Q/K norms act per head_dim channel,
    so they move the same way within one head.
    """
    if config.rope_pairing != "adjacent":
        return values
    from engine.formats.row_order import unpermute_rows

    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return unpermute_rows(values, config.num_heads)
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return unpermute_rows(values, config.num_kv_heads)
    if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
        return unpermute_rows(values, 1)
    return values


def check_no_overlap(spans: Iterable[tuple[int, int, str]], source: str) -> None:
    """No two tensors share bytes: `spans` are (start, end, name) of each tensor's data. A
    corrupt offset pointing into another tensor would otherwise decode that tensor's bytes as
    garbage, silently (llama.cpp refuses such files too)."""
    previous_end, previous_name = 0, None
    for start, end, name in sorted(spans):
        if end == start:
            continue  # an empty tensor occupies no bytes
        if start < previous_end:
            raise FormatError(
                f"{source}: tensor {name!r} data [{start}, {end}) overlaps tensor "
                f"{previous_name!r} (which ends at {previous_end})"
            )
        previous_end, previous_name = end, name
