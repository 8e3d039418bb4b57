"""What APR metadata means to the reader: the `ModelConfig` (realizar's key aliases and
AprTransformer's defaults, §4.3) and the embedded tokenizer.
"""

from __future__ import annotations

from typing import Any

from engine.errors import UnsupportedModelError
from engine.formats.common import (
    GEMMA_FAMILY,
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
from engine.model import ModelConfig
from engine.tokenizer import (
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    BpeTokenizer,
)

# Metadata keys realizar accepts, canonical first (§4.3).
KEY_ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_dim", "d_model", "n_embd"),
    "num_layers": ("n_layers", "num_hidden_layers", "n_layer"),
    "num_heads": ("n_heads", "num_attention_heads", "n_head"),
    "num_kv_heads": ("n_kv_heads", "num_key_value_heads"),
    "vocab_size": ("n_vocab",),
    "intermediate_size": ("ffn_dim", "intermediate_dim", "n_inner"),
    "max_position_embeddings": ("max_seq_len", "context_length", "n_ctx"),
    "rms_norm_eps": ("layer_norm_eps", "norm_eps"),
}
ALL_ALIASES = {alias for aliases in KEY_ALIASES.values() for alias in aliases}


def _keys(canonical: str) -> tuple[str, ...]:
    return (canonical, *KEY_ALIASES.get(canonical, ()))


def config_from_metadata(meta: dict[str, Any], names: set[str], source: str) -> ModelConfig:
    """`ModelConfig` from APR metadata: realizar's aliases and AprTransformer's defaults (§4.3)."""
    found = None
    for key in ("architecture", "model_type", "hf_model_type"):
        value = meta.get(key)
        if isinstance(value, str) and value.strip() and value.strip().lower() != "auto":
            found = value
            break
    if (int_field(meta, ("num_experts",), source, 0) or 0) > 0 and not is_supported_moe(found):
        raise UnsupportedModelError(
            f"{source}: unsupported architecture {found!r} with experts (mixture-of-experts)"
        )
    arch = normalize_architecture(found, source)

    def get_int(canonical: str, default: Any) -> Any:
        return int_field(meta, _keys(canonical), source, default)

    hidden = get_int("hidden_size", 64)
    heads = get_int("num_heads", 4)
    head_dim = int_field(meta, ("head_dim",), source)  # an explicit 0 is refused, not defaulted
    if head_dim is None:
        head_dim = hidden // heads if heads else 0
    rope_type = int_field(meta, ("rope_type",), source)
    if rope_type not in (None, 0, 2):
        raise UnsupportedModelError(f"{source}: rope_type {rope_type} is not supported (0 or 2)")
    tied = meta.get("tied_embeddings")
    if not isinstance(tied, bool):
        tied = "lm_head.weight" not in names
    bos = meta.get("tokenizer.bos_token_id")
    eos = meta.get("tokenizer.eos_token_id")
    num_layers = get_int("num_layers", 1)
    steps = family_steps(arch, hidden if isinstance(hidden, int) else 0)
    steps.pop("qkv_bias")  # an APR file says by its tensors
    steps["qk_norm"] = steps["qk_norm"] or "model.layers.0.self_attn.q_norm.weight" in names
    if arch in GEMMA_FAMILY:  # HF config.json's names, as custom metadata keys
        steps.update(
            gemma_layer_steps(
                arch,
                num_layers,
                sliding_window=int_field(meta, ("sliding_window",), source),
                layer_types=meta.get("layer_types"),
                pattern=None,
                source=source,
            ),
            query_pre_attn_scalar=float_field(meta, ("query_pre_attn_scalar",), source, 256.0),
            attn_logit_softcap=float_field(meta, ("attn_logit_softcapping",), source),
            final_logit_softcap=float_field(meta, ("final_logit_softcapping",), source),
            rope_local_theta=float_field(meta, ("rope_local_base_freq",), source),
        )
    elif arch == "mistral":
        steps["sliding_window"] = int_field(meta, ("sliding_window",), source)
    elif arch in ("qwen3_moe", "qwen2_moe"):  # apr's MoE keys (§4.3); dense layers: no router
        steps.update(
            moe_steps(
                num_experts=int_field(meta, ("num_experts",), source, 0),
                per_token=int_field(meta, ("num_experts_per_tok",), source, 0),
                moe_intermediate=int_field(meta, ("moe_intermediate_size",), source, 0),
                norm_topk_prob=meta.get("norm_topk_prob") is True,
                mlp_only_layers=tuple(
                    layer
                    for layer in range(
                        min(num_layers, len(names)) if isinstance(num_layers, int) else 0
                    )
                    if f"model.layers.{layer}.mlp.gate.weight" not in names
                ),
                source=source,
            ),
            shared_expert_intermediate_size=int_field(
                meta, ("shared_expert_intermediate_size",), source, 0
            ),
        )
    config = ModelConfig(
        architecture=arch,  # type: ignore[arg-type]
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=get_int("num_kv_heads", heads),
        head_dim=head_dim,
        intermediate_size=get_int(
            "intermediate_size", 4 * hidden if isinstance(hidden, int) else 0
        ),
        vocab_size=get_int("vocab_size", 32000),
        context_length=positive_or_none(get_int("max_position_embeddings", None)),
        rope_theta=float_field(meta, ("rope_theta",), source, 10000.0),
        rope_pairing="adjacent" if rope_type == 0 else "half",
        rms_norm_eps=float_field(meta, _keys("rms_norm_eps"), source, 1e-6),
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in names,
        tied_embeddings=tied,
        bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
        eos_token_id=eos if isinstance(eos, int) and not isinstance(eos, bool) else None,
        add_bos=meta.get("tokenizer.add_bos_token") is True,
        **steps,
    )
    check_dims(config, source)
    return config


def _only(values: list, *kinds: type) -> bool:
    """Whether every item's type is one of `kinds` (exactly: JSON makes no subclasses, bool
    aside). One `map` in C over a 49,152-entry vocabulary (~1 ms) where an `all(isinstance(...))`
    generator took ~8 ms, three times per opened APR file."""
    return set(map(type, values)) <= set(kinds)


def tokenizer_from_metadata(meta: dict[str, Any], source: str) -> BpeTokenizer:
    """The embedded tokenizer: BPE from `tokenizer.vocabulary` + `tokenizer.merges` (realizar needs
    both), or SentencePiece from `tokenizer.vocabulary` + `tokenizer.scores`."""
    from engine.errors import TokenizerError

    vocabulary = meta.get("tokenizer.vocabulary")
    merges = meta.get("tokenizer.merges")
    scores = meta.get("tokenizer.scores")
    if vocabulary is None:
        raise TokenizerError("the metadata has no tokenizer.vocabulary")
    if not (isinstance(vocabulary, list) and _only(vocabulary, str)):
        raise TokenizerError("tokenizer.vocabulary is not a list of strings")
    spm = merges is None and scores is not None
    if merges is None and not spm:
        raise TokenizerError(
            "the metadata has tokenizer.vocabulary but neither tokenizer.merges nor tokenizer.scores"
        )
    if not spm and not (isinstance(merges, list) and _only(merges, str)):
        raise TokenizerError("tokenizer.merges is not a list of strings")
    if spm and not (
        isinstance(scores, list) and len(scores) == len(vocabulary) and _only(scores, int, float)
    ):
        raise TokenizerError("tokenizer.scores is not one number per vocabulary entry")
    types = meta.get("tokenizer.token_type")
    if isinstance(types, list) and len(types) == len(vocabulary) and _only(types, int, bool):
        token_types = list(types)
    else:
        # realizar extracts special tokens from the vocabulary itself: <|...|>, <s>, </s>, <unk>.
        token_types = [_guess_token_type(token) for token in vocabulary]
    bos = meta.get("tokenizer.bos_token_id")
    eos = meta.get("tokenizer.eos_token_id")
    common = dict(
        tokens=vocabulary,
        token_types=token_types,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_id=eos if isinstance(eos, int) else None,
        source=source,
    )
    if spm:
        return BpeTokenizer(
            merges=[],
            kind="spm",
            scores=[float(x) for x in scores],
            add_space_prefix=meta.get("tokenizer.add_space_prefix") is not False,
            **common,
        )
    return BpeTokenizer(merges=merges, pre=str(meta.get("tokenizer.pre", "default")), **common)


def _guess_token_type(token: str) -> int:
    if token == "<unk>":
        return TOKEN_TYPE_UNKNOWN
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return TOKEN_TYPE_BYTE
    return TOKEN_TYPE_CONTROL if _looks_special(token) else TOKEN_TYPE_NORMAL


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>") and len(token) > 4) or token in (
        "<s>",
        "</s>",
        "<unk>",
        "<pad>",
    )
