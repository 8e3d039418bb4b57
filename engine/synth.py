"""Small seeded random models in memory, for tests, oracles and the demo.

A synthesized model is a real model in every way the engine cares about: the canonical HF
tensor names and shapes of its architecture, weights scaled so activations stay O(1) through
the layers (linears ~ N(0, 1/fan_in), norm scales near 1: Gemma stores the scale minus 1, so
its norm weights are near 0), and a working byte-level BPE tokenizer, so it can be written to
any container, loaded by HF transformers, and traced. Gemma models get their family's steps
(engine/formats/common.py `family_steps`) and a sliding window shorter than a test prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import UnsupportedModelError
from engine.model import FULL, SLIDING, SUPPORTED_ARCHITECTURES, DictWeightStore, Model, ModelConfig
from engine.tokenizer import (
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_USER_DEFINED,
    BpeTokenizer,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Ids 0, 1, 2 as in SmolLM2: 1 is BOS, 2 is EOS."""

# Hand-picked merges so that the default prompt and a chat turn use multi-byte tokens.
_MERGES = (
    ("W", "h"),
    ("Wh", "a"),
    ("Wha", "t"),
    ("Ġ", "i"),
    ("Ġi", "s"),
    ("h", "e"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("r", "e"),
    ("a", "t"),
    ("u", "s"),
    ("us", "er"),
    ("Ġ", "w"),
    ("Ċ", "Ċ"),
)

SYNTH_CONTEXT_LENGTH = 2048
"""The context length a synthetic model states (what every writer recorded before models
carried their own), so that a written and re-read synthetic model is the same config."""

_DEFAULT_ROPE_THETA = {
    "llama": 10000.0,
    "mistral": 10000.0,
    "qwen2": 1000000.0,
    "qwen3": 1000000.0,
    "qwen3_moe": 1000000.0,
    "gemma2": 10000.0,
    "gemma3": 1000000.0,
}
_DEFAULT_RMS_EPS = {
    "llama": 1e-5,
    "mistral": 1e-5,
    "qwen2": 1e-6,
    "qwen3": 1e-6,
    "qwen3_moe": 1e-6,
    "gemma2": 1e-6,
    "gemma3": 1e-6,
}
SYNTH_WINDOW = 4
"""Sliding window of synthesized Gemma models: shorter than most test prompts, so it cuts."""


def _gemma_steps(arch: str, num_layers: int, head_dim: int) -> dict:
    """Gemma's per-model steps for a synthesized model: every other layer global (Gemma 2's
    pattern, so even 2 layers have both kinds), a query scalar unlike head_dim (so the scale
    step shows), Gemma 2's soft caps set low enough to bend, Gemma 3's local RoPE base."""
    from engine.formats.common import GEMMA3_LOCAL_ROPE_THETA

    return dict(
        sliding_window=SYNTH_WINDOW,
        layer_types=tuple(SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)),
        query_pre_attn_scalar=float(head_dim + 8),
        attn_logit_softcap=2.0 if arch == "gemma2" else None,
        final_logit_softcap=3.0 if arch == "gemma2" else None,
        rope_local_theta=GEMMA3_LOCAL_ROPE_THETA if arch == "gemma3" else None,
    )


def synth_tokenizer(vocab_size: int | None = None) -> BpeTokenizer:
    """A deterministic byte-level BPE: 3 specials, 256 byte tokens, a few merges, padding tokens.

    `vocab_size` beyond the natural size appends user-defined `<|extra_N|>` tokens so that the
    tokenizer covers every embedding row (GGUF and APR readers expect one token per row).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    byte_tokens = sorted(ByteLevel.alphabet(), key=_byte_of)
    merged = [left + right for left, right in _MERGES]
    tokens = [*SPECIAL_TOKENS, *byte_tokens, *merged]
    token_types = [TOKEN_TYPE_CONTROL] * len(SPECIAL_TOKENS) + [TOKEN_TYPE_NORMAL] * (
        len(byte_tokens) + len(merged)
    )
    natural = len(tokens)
    if vocab_size is not None:
        if vocab_size < natural:
            raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {natural} tokens")
        extra = vocab_size - natural
        tokens += [f"<|extra_{i}|>" for i in range(extra)]
        token_types += [TOKEN_TYPE_USER_DEFINED] * extra
    return BpeTokenizer(
        tokens=tokens,
        merges=[f"{left} {right}" for left, right in _MERGES],
        token_types=token_types,
        pre="default",
        bos_token_id=1,
        eos_token_id=2,
        source="<synth>",
    )


def _byte_of(char: str) -> int:
    """The byte a GPT-2 byte-level character stands for (printable bytes map to themselves)."""
    code = ord(char)
    printable = (*range(33, 127), *range(161, 173), *range(174, 256))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def synthesize(
    arch: str,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    tied_embeddings: bool = False,
    rope_theta: float | None = None,
    rms_norm_eps: float | None = None,
    add_bos: bool = False,
    name: str | None = None,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    norm_topk_prob: bool = True,
) -> Model:
    """A small random model of `arch` (llama | mistral | qwen2 | qwen3 | gemma2 | gemma3), the
    same for the same seed. A Qwen3-MoE model routes every layer through `num_experts` experts
    of half the intermediate size, `num_experts_per_tok` per token."""
    from engine.formats.common import GEMMA_FAMILY, family_steps, moe_steps

    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"synthesize: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    head_dim = head_dim if head_dim is not None else hidden_size // num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for RoPE")
    tokenizer = synth_tokenizer(vocab_size)
    steps = family_steps(arch, hidden_size)
    if arch in GEMMA_FAMILY:
        steps.update(_gemma_steps(arch, num_layers, head_dim))
    if arch == "qwen3_moe":
        steps.update(
            moe_steps(
                num_experts=num_experts,
                per_token=num_experts_per_tok,
                moe_intermediate=max(intermediate_size // 2, 2),
                norm_topk_prob=norm_topk_prob,
                source="synthesize",
            )
        )
    config = ModelConfig(
        architecture=arch,  # type: ignore[arg-type]
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_size=tokenizer.vocab_size,
        context_length=SYNTH_CONTEXT_LENGTH,
        rope_theta=rope_theta if rope_theta is not None else _DEFAULT_ROPE_THETA[arch],
        rope_pairing="half",
        rms_norm_eps=rms_norm_eps if rms_norm_eps is not None else _DEFAULT_RMS_EPS[arch],
        tied_embeddings=tied_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        add_bos=add_bos,
        **steps,
    )
    arrays = random_weights(config, np.random.default_rng(seed))
    label = name or f"synth-{arch}-s{seed}"
    return Model(
        path=Path(label),
        format="memory",
        config=config,
        weights=DictWeightStore(arrays, source=label),
        tokenizer=tokenizer,
        metadata={"name": label, "seed": seed},
    )


def random_weights(config: ModelConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every tensor `config` calls for, float32, in a fixed draw order so a seed pins them all."""
    hidden, inter = config.hidden_size, config.intermediate_size

    def linear(out_features: int, in_features: int) -> np.ndarray:
        # [out, in]; std 1/sqrt(in) keeps each projection's output on the scale of its input.
        return (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(
            np.float32
        )

    def norm(size: int) -> np.ndarray:
        # [size]; the scale is offset + w, so w is drawn around 1 - offset (Gemma: around 0)
        center = 1.0 - config.norm_weight_offset
        return (center + 0.1 * rng.standard_normal(size)).astype(np.float32)

    def bias(size: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(size)).astype(np.float32)  # [size]

    arrays: dict[str, np.ndarray] = {
        # [vocab, hidden]; rows N(0, 1) after the embedding scale (Gemma's sqrt(hidden))
        "model.embed_tokens.weight": (
            rng.standard_normal((config.vocab_size, hidden)) / config.embedding_scale
        ).astype(np.float32),
    }
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        arrays[prefix + "input_layernorm.weight"] = norm(hidden)
        arrays[prefix + "self_attn.q_proj.weight"] = linear(config.q_dim, hidden)
        arrays[prefix + "self_attn.k_proj.weight"] = linear(config.kv_dim, hidden)
        arrays[prefix + "self_attn.v_proj.weight"] = linear(config.kv_dim, hidden)
        if config.qkv_bias:
            arrays[prefix + "self_attn.q_proj.bias"] = bias(config.q_dim)
            arrays[prefix + "self_attn.k_proj.bias"] = bias(config.kv_dim)
            arrays[prefix + "self_attn.v_proj.bias"] = bias(config.kv_dim)
        if config.qk_norm:
            arrays[prefix + "self_attn.q_norm.weight"] = norm(config.head_dim)
            arrays[prefix + "self_attn.k_norm.weight"] = norm(config.head_dim)
        arrays[prefix + "self_attn.o_proj.weight"] = linear(hidden, config.q_dim)
        arrays[prefix + "post_attention_layernorm.weight"] = norm(hidden)
        if config.sandwich_norms:
            arrays[prefix + "pre_feedforward_layernorm.weight"] = norm(hidden)
            arrays[prefix + "post_feedforward_layernorm.weight"] = norm(hidden)
        if config.is_moe_layer(layer):
            moe_inter = config.moe_intermediate_size
            arrays[prefix + "mlp.gate.weight"] = linear(config.num_experts, hidden)  # router
            for expert in range(config.num_experts):
                name = f"{prefix}mlp.experts.{expert}."
                arrays[name + "gate_proj.weight"] = linear(moe_inter, hidden)
                arrays[name + "up_proj.weight"] = linear(moe_inter, hidden)
                arrays[name + "down_proj.weight"] = linear(hidden, moe_inter)
            continue
        arrays[prefix + "mlp.gate_proj.weight"] = linear(inter, hidden)
        arrays[prefix + "mlp.up_proj.weight"] = linear(inter, hidden)
        arrays[prefix + "mlp.down_proj.weight"] = linear(hidden, inter)
    arrays["model.norm.weight"] = norm(hidden)
    if not config.tied_embeddings:
        arrays["lm_head.weight"] = linear(config.vocab_size, hidden)
    return arrays
