"""What every container shares: architecture names, HF config.json facts, expected tensors.

Each reader turns its own metadata into the same `ModelConfig`, and checks the weights it found
against the tensors that config calls for, so that a file missing a tensor (or holding one of
the wrong shape) fails at open with a one-line error instead of halfway through a trace.
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


def hf_config_to_model_config(spec: Mapping[str, Any], source: str) -> ModelConfig:
    """A `ModelConfig` from an HF config.json object (Llama, Mistral, Qwen2, Qwen3)."""
    found = spec.get("model_type")
    if not found and isinstance(spec.get("architectures"), list) and spec["architectures"]:
        found = spec["architectures"][0]
    experts = spec.get("num_local_experts") or spec.get("num_experts")
    if experts and not is_supported_moe(found):
        raise UnsupportedModelError(
            f"{source}: unsupported architecture {found!r} with experts (mixture-of-experts)"
        )
    arch = normalize_architecture(found if isinstance(found, str) else None, source)
    _check_rope_scaling(spec, source)
    quantization = spec.get("quantization_config")
    if isinstance(quantization, dict):
        method = quantization.get("quant_method", "unknown")
        raise UnsupportedModelError(f"{source}: quantized checkpoints ({method}) are not supported")
    if arch != "qwen2" and spec.get("attention_bias"):
        # HF Llama/Qwen3 attention_bias also adds an o_proj bias, which the forward pass lacks.
        raise UnsupportedModelError(f"{source}: attention_bias=true is not supported for {arch}")
    hidden = int_field(spec, ("hidden_size",), source)
    heads = int_field(spec, ("num_attention_heads",), source)
    if hidden is None or heads is None:
        raise FormatError(f"{source}: config.json lacks hidden_size or num_attention_heads")
    kv_heads = int_field(spec, ("num_key_value_heads",), source, heads)
    # An explicit 0 is a value (refused by check_dims), not an absent key: only None defaults.
    head_dim = int_field(spec, ("head_dim",), source)
    if head_dim is None:
        head_dim = hidden // heads if heads else 0
    rope = spec.get("rope_parameters") if isinstance(spec.get("rope_parameters"), dict) else {}
    rope_theta = float_field(spec, ("rope_theta",), source)
    if rope_theta is None:
        rope_theta = float_field(rope, ("rope_theta",), source, 10000.0)
    eos = spec.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    num_layers = int_field(spec, ("num_hidden_layers",), source, 0)
    steps = family_steps(arch, hidden)
    if arch in GEMMA_FAMILY:
        rope_theta, local_theta = _gemma_rope_bases(spec, rope, arch, source)
        steps.update(
            gemma_layer_steps(
                arch,
                num_layers,
                sliding_window=int_field(spec, ("sliding_window",), source),
                layer_types=spec.get("layer_types"),
                pattern=int_field(spec, ("sliding_window_pattern",), source),
                source=source,
            ),
            query_pre_attn_scalar=float_field(spec, ("query_pre_attn_scalar",), source, 256.0),
            attn_logit_softcap=float_field(spec, ("attn_logit_softcapping",), source),
            final_logit_softcap=float_field(spec, ("final_logit_softcapping",), source),
            rope_local_theta=local_theta,
        )
        if spec.get("hidden_activation", "gelu_pytorch_tanh") not in GELU_TANH_NAMES:
            raise UnsupportedModelError(
                f"{source}: hidden_activation {spec.get('hidden_activation')!r} is not supported"
            )
    elif arch == "mistral" and spec.get("sliding_window") is not None:
        steps["sliding_window"] = int_field(spec, ("sliding_window",), source)
    elif arch in MOE_FAMILY:
        only = spec.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise FormatError(f"{source}: mlp_only_layers is not a list of layer indices")
        steps.update(
            moe_steps(
                num_experts=int_field(spec, ("num_experts", "num_local_experts"), source, 0),
                per_token=int_field(spec, ("num_experts_per_tok",), source, 0),
                moe_intermediate=int_field(spec, ("moe_intermediate_size",), source, 0),
                norm_topk_prob=bool(spec.get("norm_topk_prob", False)),
                sparse_step=int_field(spec, ("decoder_sparse_step",), source, 1),
                mlp_only_layers=tuple(only),
                source=source,
            ),
            shared_expert_intermediate_size=int_field(
                spec, ("shared_expert_intermediate_size",), source, 0
            )
            if arch == "qwen2_moe"
            else 0,
        )
    config = ModelConfig(
        architecture=arch,  # type: ignore[arg-type]
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int_field(spec, ("intermediate_size",), source, 0),
        vocab_size=int_field(spec, ("vocab_size",), source, 0),
        rope_theta=rope_theta,
        rope_pairing="half",
        rms_norm_eps=float_field(spec, ("rms_norm_eps",), source, 1e-6),
        tied_embeddings=bool(spec.get("tie_word_embeddings", arch in GEMMA_FAMILY)),
        bos_token_id=spec.get("bos_token_id")
        if isinstance(spec.get("bos_token_id"), int)
        else None,
        eos_token_id=eos if isinstance(eos, int) else None,
        add_bos=False,
        **steps,
    )
    check_dims(config, source)
    return config


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


def _gemma_rope_bases(
    spec: Mapping[str, Any], rope: Mapping[str, Any], arch: str, source: str
) -> tuple[float, float | None]:
    """(global theta, sliding-layer theta or None) from a Gemma config.json: transformers 5's
    per-layer-type `rope_parameters`, or the older `rope_theta` + `rope_local_base_freq`."""
    full = rope.get(FULL) if isinstance(rope.get(FULL), dict) else None
    sliding = rope.get(SLIDING) if isinstance(rope.get(SLIDING), dict) else None
    for params in (full, sliding):
        if params is not None and params.get("rope_type", "default") != "default":
            raise UnsupportedModelError(
                f"{source}: RoPE scaling {params.get('rope_type')!r} is not supported"
            )
    default_global = 1000000.0 if arch == "gemma3" else 10000.0
    theta = float_field(spec, ("rope_theta",), source) or float_field(
        full or rope, ("rope_theta",), source, default_global
    )
    if arch != "gemma3":
        return theta, None
    local = float_field(spec, ("rope_local_base_freq",), source) or float_field(
        sliding or {}, ("rope_theta",), source, GEMMA3_LOCAL_ROPE_THETA
    )
    return theta, local


def _check_rope_scaling(spec: Mapping[str, Any], source: str) -> None:
    """RoPE scaling changes the rotation angles; the forward pass implements plain RoPE only."""
    scaling = spec.get("rope_scaling")
    if scaling is None and isinstance(spec.get("rope_parameters"), dict):
        scaling = spec["rope_parameters"]
    if not isinstance(scaling, dict):
        return
    if any(key in scaling for key in (FULL, SLIDING)):
        return  # Gemma's per-layer-type parameters: checked by _gemma_rope_bases
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in (None, "default"):
        raise UnsupportedModelError(f"{source}: RoPE scaling {kind!r} is not supported")


def _integral(value: float | None) -> float | int | None:
    """`24.0` as `24` (transformers' strict config wants an int where the value is one)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


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


def model_config_to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The HF config.json object transformers loads for `config` (float32 weights)."""
    arch = config.architecture
    spec: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE_CLASS[arch]],
        "model_type": HF_MODEL_TYPE.get(arch, arch),
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tied_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch in ("llama", "qwen3"):
        spec["attention_bias"] = bool(config.qkv_bias)
    if arch == "llama":
        spec["mlp_bias"] = False
        spec["pretraining_tp"] = 1
    if arch == "mistral":
        spec["sliding_window"] = config.sliding_window
    if arch in GEMMA_FAMILY:
        spec.pop("hidden_act")
        spec.pop("rope_theta")
        spec.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=_integral(config.query_pre_attn_scalar),
            sliding_window=config.sliding_window,
            layer_types=list(config.layer_types),
            attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap,
            attention_bias=False,
        )
        full = {"rope_type": "default", "rope_theta": config.rope_theta}
        if arch == "gemma3":
            local = config.rope_local_theta or config.rope_theta
            spec["rope_parameters"] = {
                FULL: full,
                SLIDING: {"rope_type": "default", "rope_theta": local},
            }
        else:
            spec["rope_parameters"] = full
    if arch in MOE_FAMILY:
        spec.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=config.decoder_sparse_step,
            mlp_only_layers=list(config.mlp_only_layers),
            attention_bias=False,
        )
        if arch == "qwen2_moe":
            spec["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
            spec["qkv_bias"] = config.qkv_bias
            spec.pop("attention_bias")
    if arch in ("qwen2", "qwen3", *MOE_FAMILY):
        spec["use_sliding_window"] = False
        spec["sliding_window"] = None
        spec["max_window_layers"] = config.num_layers
    return spec


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
