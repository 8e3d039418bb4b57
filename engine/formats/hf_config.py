"""HF config.json ↔ `ModelConfig`, both ways: what a checkpoint says, what transformers loads.

`hf_config_to_model_config` turns an HF config.json object (Llama, Mistral, Qwen2/3, their MoE
variants, Gemma 2/3) into our `ModelConfig`, refusing what the forward pass does not implement
(RoPE scaling, quantized checkpoints, biases it would leave out); `model_config_to_hf_config` is
the way back, for the safetensors writer. The family steps and field readers they use are
engine.formats.common's, shared with the GGUF and APR metadata readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.errors import FormatError, UnsupportedModelError
from engine.formats.common import (
    GELU_TANH_NAMES,
    GEMMA3_LOCAL_ROPE_THETA,
    GEMMA_FAMILY,
    HF_ARCHITECTURE_CLASS,
    HF_MODEL_TYPE,
    MOE_FAMILY,
    UNKNOWN_CONTEXT_LENGTH,
    check_dims,
    family_steps,
    float_field,
    gemma_layer_steps,
    int_field,
    is_supported_moe,
    moe_steps,
    normalize_architecture,
    positive_or_none,
)
from engine.model import FULL, SLIDING, ModelConfig


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
        context_length=positive_or_none(int_field(spec, ("max_position_embeddings",), source)),
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
        "max_position_embeddings": config.context_length or UNKNOWN_CONTEXT_LENGTH,
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
