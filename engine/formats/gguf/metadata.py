"""What GGUF metadata means: the `ModelConfig` (with llama.cpp's per-family defaults for what
it does not store, Gemma's and MoE's included) and the `tokenizer.ggml.*` vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engine.errors import FormatError, UnsupportedModelError
from engine.formats.common import (
    GEMMA3_LOCAL_ROPE_THETA,
    GEMMA_FAMILY,
    MOE_FAMILY,
    check_dims,
    family_steps,
    gemma_layer_steps,
    int_field,
    moe_steps,
    normalize_architecture,
    positive_or_none,
)
from engine.formats.gguf.parser import (
    GgufTensorInfo,
    LazyStrings,
)
from engine.model import ModelConfig
from engine.tokenizer import TOKEN_TYPE_NORMAL, BpeTokenizer


def _int_meta(metadata: dict[str, Any], key: str, source: str, default: Any = None) -> Any:
    """An integer metadata value (`common.int_field`); a per-layer array of them is refused."""
    if isinstance(metadata.get(key), np.ndarray):
        raise UnsupportedModelError(f"{source}: per-layer {key} is not supported")
    return int_field(metadata, (key,), source, default)


def config_from_metadata(
    metadata: dict[str, Any], tensors: dict[str, GgufTensorInfo], source: str
) -> tuple[ModelConfig, str]:
    """The `ModelConfig` and the GGUF architecture key prefix from GGUF metadata."""
    gguf_arch = metadata.get("general.architecture")
    if not isinstance(gguf_arch, str):
        raise FormatError(f"{source}: no general.architecture in the GGUF metadata")
    arch = normalize_architecture(gguf_arch, source)
    if arch == "llama":
        label = " ".join(
            str(metadata.get(key, "")) for key in ("general.basename", "general.name")
        ).lower()
        if "mistral" in label:
            arch = "mistral"
    if (_int_meta(metadata, f"{gguf_arch}.expert_count", source, 0) or 0) > 0 and (
        arch not in MOE_FAMILY
    ):
        raise UnsupportedModelError(
            f"{source}: unsupported architecture {gguf_arch!r} with experts (mixture-of-experts)"
        )
    scaling = metadata.get(f"{gguf_arch}.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in tensors:
        raise UnsupportedModelError(
            f"{source}: RoPE scaling {scaling or 'rope_freqs'!r} is not supported"
        )

    def need(key: str) -> int:
        value = _int_meta(metadata, f"{gguf_arch}.{key}", source)
        if value is None:
            raise FormatError(f"{source}: GGUF metadata lacks {gguf_arch}.{key}")
        return value

    hidden = need("embedding_length")
    heads = need("attention.head_count")
    kv_heads = _int_meta(metadata, f"{gguf_arch}.attention.head_count_kv", source, heads)
    head_dim = _int_meta(
        metadata, f"{gguf_arch}.attention.key_length", source, hidden // heads if heads else 0
    )
    rope_dims = _int_meta(metadata, f"{gguf_arch}.rope.dimension_count", source, head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(
            f"{source}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    embed = tensors.get("token_embd.weight")
    vocab = _int_meta(metadata, f"{gguf_arch}.vocab_size", source)
    if vocab is None:
        vocab = embed.shape[0] if embed is not None and embed.shape else len(tokens or ())
    eps = metadata.get(f"{gguf_arch}.attention.layer_norm_rms_epsilon", 1e-6)
    theta = metadata.get(f"{gguf_arch}.rope.freq_base", 10000.0)
    for key, value in (("layer_norm_rms_epsilon", eps), ("rope.freq_base", theta)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FormatError(
                f"{source}: metadata {gguf_arch}.{key} is {value!r}, expected a number"
            )
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    num_layers = need("block_count")
    steps = family_steps(arch, hidden)
    if arch in GEMMA_FAMILY:
        steps.update(
            _gemma_steps(metadata, gguf_arch, arch, num_layers, hidden, heads, head_dim, source)
        )
    elif arch in MOE_FAMILY:
        norm = metadata.get(f"{gguf_arch}.expert_weights_norm", MOE_NORM_DEFAULT[arch])
        steps.update(
            moe_steps(
                num_experts=need("expert_count"),
                per_token=need("expert_used_count"),
                moe_intermediate=need("expert_feed_forward_length"),
                norm_topk_prob=bool(norm),
                mlp_only_layers=tuple(
                    layer
                    for layer in range(min(num_layers, len(tensors)))  # a corrupt count stays cheap
                    if f"blk.{layer}.ffn_gate_inp.weight" not in tensors
                ),
                source=source,
            ),
            shared_expert_intermediate_size=(
                _int_meta(metadata, f"{gguf_arch}.expert_shared_feed_forward_length", source, 0)
                or 0
            )
            if arch == "qwen2_moe"
            else 0,
        )
    elif arch == "mistral":  # llama.cpp's llama graph ignores it; a file that says so is honoured
        steps["sliding_window"] = _int_meta(
            metadata, f"{gguf_arch}.attention.sliding_window", source
        )
    config = ModelConfig(
        architecture=arch,  # type: ignore[arg-type]
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=need("feed_forward_length"),
        vocab_size=vocab,
        context_length=positive_or_none(_int_meta(metadata, f"{gguf_arch}.context_length", source)),
        rope_theta=_shortest_float(theta),
        rope_pairing="half",  # Q/K rows are restored to HF order for llama; qwen is NEOX already
        rms_norm_eps=_shortest_float(eps),
        tied_embeddings="output.weight" not in tensors,
        bos_token_id=int(bos) if isinstance(bos, int) else None,
        eos_token_id=int(eos) if isinstance(eos, int) else None,
        # llama.cpp's default: BOS for SentencePiece vocabularies, none for GPT-2 BPE.
        add_bos=bool(
            metadata.get(
                "tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama"
            )
        ),
        **steps,
    )
    check_dims(config, source)
    return config, gguf_arch


MOE_NORM_DEFAULT = {"qwen3_moe": True, "qwen2_moe": False}
"""Whether llama.cpp renormalizes the top-k weights (its graphs hard-code it per family);
`{arch}.expert_weights_norm` in a file overrides it."""

GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
"""Block counts of the 27B models, whose query scale is (hidden / heads)^-1/2 rather than
head_dim^-1/2 (llama.cpp picks `f_attention_scale` by model size; GGUF stores no scalar)."""


def _gemma_steps(
    metadata: dict[str, Any],
    gguf_arch: str,
    arch: str,
    num_layers: int,
    hidden: int,
    heads: int,
    head_dim: int,
    source: str,
) -> dict[str, Any]:
    """Gemma's per-model steps from llama.cpp's keys, with llama.cpp's defaults for what it
    does not store (the sliding pattern, Gemma 3's local RoPE base, the query scalar)."""

    def number(key: str) -> float | None:
        value = metadata.get(f"{gguf_arch}.{key}")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FormatError(
                f"{source}: metadata {gguf_arch}.{key} is {value!r}, expected a number"
            )
        return _shortest_float(value)

    pattern = metadata.get(f"{gguf_arch}.attention.sliding_window_pattern")
    layer_types = None
    if isinstance(pattern, np.ndarray) and len(pattern) == num_layers:  # per layer: slides?
        layer_types = ["sliding_attention" if bool(x) else "full_attention" for x in pattern]
        pattern = None
    window = _int_meta(metadata, f"{gguf_arch}.attention.sliding_window", source)
    steps = gemma_layer_steps(
        arch,
        num_layers,
        sliding_window=window,
        layer_types=layer_types,
        pattern=pattern if isinstance(pattern, int) and not isinstance(pattern, bool) else None,
        source=source,
    )
    big = num_layers == GEMMA_27B_LAYERS[arch] and heads
    scale = number("attention.scale")  # written by us when the scalar is not llama.cpp's choice
    steps.update(
        query_pre_attn_scalar=scale**-2 if scale else float(hidden // heads if big else head_dim),
        attn_logit_softcap=number("attn_logit_softcapping"),
        final_logit_softcap=number("final_logit_softcapping"),
        rope_local_theta=(number("rope.freq_base_swa") or GEMMA3_LOCAL_ROPE_THETA)
        if arch == "gemma3"
        else None,
    )
    return steps


def _shortest_float(value: float) -> float:
    """GGUF stores these as f32: 1e-05 reads back as 9.99999974e-06; give the f32's shortest
    decimal (what the converter was given), which rounds to the very same f32. A value beyond
    f32 (an f64 key holding 1e300) or not finite is returned as it is, for check_dims to refuse,
    instead of overflowing the cast (a RuntimeWarning on stderr)."""
    if not math.isfinite(value) or abs(value) > _F32_MAX:
        return float(value)
    return float(str(np.float32(value)))


_F32_MAX = float(np.finfo(np.float32).max)


def tokenizer_from_metadata(metadata: dict[str, Any], source: str) -> BpeTokenizer:
    """The GGUF `tokenizer.ggml.*` vocabulary: byte-level BPE (`gpt2`) or SentencePiece (`llama`)."""
    from engine.errors import TokenizerError

    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError("the file has no tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(
            f"tokenizer.ggml.model {model!r} is not supported (only 'gpt2' BPE and 'llama' SentencePiece)"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list | LazyStrings):
        raise TokenizerError("tokenizer.ggml.tokens is missing")
    types = metadata.get("tokenizer.ggml.token_type")
    token_types = (
        types.astype(np.int64).tolist()  # Python ints, in C (~10x a comprehension)
        if isinstance(types, np.ndarray) and len(types) == len(tokens)
        else [TOKEN_TYPE_NORMAL] * len(tokens)
    )
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    common = dict(
        tokens=tokens,
        token_types=token_types,
        bos_token_id=int(bos) if isinstance(bos, int) else None,
        eos_token_id=int(eos) if isinstance(eos, int) else None,
        source=source,
    )
    if model == "llama":
        scores = metadata.get("tokenizer.ggml.scores")
        if not isinstance(scores, np.ndarray) or len(scores) != len(tokens):
            raise TokenizerError("tokenizer.ggml.scores is missing or not one per token")
        return BpeTokenizer(
            merges=[],
            kind="spm",
            scores=[float(x) for x in scores],
            add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
            **common,
        )
    merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges, list | LazyStrings):
        raise TokenizerError("tokenizer.ggml.merges is missing")
    return BpeTokenizer(
        merges=merges, pre=str(metadata.get("tokenizer.ggml.pre", "default")), **common
    )
