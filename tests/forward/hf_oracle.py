"""The independent oracle: HF transformers (CPU torch, float32, eager attention) with hooks.

Builds small seeded HF models (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3), hands their weights to the engine as a
`Model`, and records every apr stage from HF's *own* modules:

| stage                | taken from                                                        |
|----------------------|-------------------------------------------------------------------|
| embedding            | output of `model.embed_tokens`                                    |
| attn_norm            | output of `input_layernorm`                                       |
| qkv_matmul / qkv_bias| outputs of q/k/v_proj, concatenated (minus each Linear's bias)     |
| q/k_post_rope        | return value of the modeling module's `apply_rotary_pos_emb`      |
| attn_scores          | the input HF's eager attention hands to softmax (scores + mask)   |
| attn_softmax         | the attention weights HF's `eager_attention_forward` returns      |
| attention            | input of `o_proj` (forward pre-hook)                              |
| attn_out             | output of `o_proj`                                                |
| post_attn_residual   | input of the FFN's input norm (forward pre-hook)                  |
| ffn_norm             | output of `post_attention_layernorm` (Gemma: `pre_feedforward_layernorm`) |
| ffn_gate / ffn_up    | outputs of `mlp.gate_proj` / `mlp.up_proj`                        |
| ffn_silu / ffn_gelu  | output of `mlp.act_fn` (SiLU; Gemma's GELU-tanh)                  |
| ffn_swigl            | input of `mlp.down_proj` (forward pre-hook)                       |
| ffn_out              | output of `mlp.down_proj`                                         |
| post_attn_norm       | Gemma: output of `post_attention_layernorm`                       |
| post_ffn_norm        | Gemma: output of `post_feedforward_layernorm`                     |
| post_ffn_residual    | output of the decoder layer                                       |
| ffn_out (MoE layer)  | output of the sparse MoE block `mlp`                              |
| moe_router / _indices| the router's (`mlp.gate`) top-k weights / expert ids, last token  |
| moe_ffn_out          | the MoE block's output at the last token                          |
| final_norm / lm_head | output of `model.norm`; `lm_head` output at the last position     |

HF's head-major Q/K `[1, heads, seq, hd]` are converted to apr's token-major `[seq, heads*hd]`,
and HF's scores where its additive mask blocks a key (above the diagonal, and outside a sliding
window) are set to 0.0, apr's layout.
Nothing here calls the engine's math.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from engine.model import DictWeightStore, Model, ModelConfig
from engine.stages import WHOLE_MODEL_LAYER

ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3",
)
GEMMA = ("gemma2", "gemma3")

TINY_WINDOW = 4
"""Sliding window of the tiny windowed models: shorter than the 7-token test prompt."""

TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)


def hf_config(arch: str, *, tied: bool = False, **overrides):
    """A transformers config for a tiny model of `arch` (head_dim 16, GQA 4 -> 2 heads)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    dims = dict(TINY_DIMS, **overrides)
    common = dict(
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        attn_implementation="eager",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    if arch == "llama":
        return LlamaConfig(
            **dims, **common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        )
    if arch == "mistral":
        dims.setdefault("sliding_window", None)
        return MistralConfig(
            **dims, **common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        )
    if arch == "qwen3_moe":
        # 8 experts, 2 per token, over 7 tokens: some expert is picked by exactly one token.
        dims = dict(
            dict(
                head_dim=24,
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=48,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            ),
            **dims,
        )
        return Qwen3MoeConfig(
            **dims, **common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}
        )
    if arch == "qwen2_moe":  # Qwen3-MoE's routing plus a sigmoid-gated shared expert
        dims = dict(
            dict(
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=48,
                shared_expert_intermediate_size=80,
                norm_topk_prob=False,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            ),
            **dims,
        )
        return Qwen2MoeConfig(
            **dims, **common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}
        )
    if arch == "gemma2":
        # Soft caps far below Gemma 2's 50 / 30, so tanh bends the tiny model's scores and logits.
        dims = dict(
            dict(
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=TINY_WINDOW,
                attn_logit_softcapping=2.0,
                final_logit_softcapping=3.0,
            ),
            **dims,
        )
        return Gemma2Config(
            **dims,
            **common,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if arch == "gemma3":
        layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        dims = dict(
            dict(
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=TINY_WINDOW,
                layer_types=layer_types[: dims["num_hidden_layers"]],
            ),
            **dims,
        )
        return Gemma3TextConfig(
            **dims,
            **common,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        )
    if arch == "qwen2":
        return Qwen2Config(
            **dims, **common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}
        )
    if arch == "qwen3":
        return Qwen3Config(
            **dims,
            **common,
            head_dim=24,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    raise ValueError(arch)


def build_hf_model(arch: str, *, seed: int = 0, tied: bool = False, **overrides):
    """A seeded HF causal LM whose every parameter is random and O(1)-scaled.

    HF's own init (normal 0.02, norms at exactly 1, biases 0) would leave activations tiny, the
    attention almost uniform and the norm weights untested; instead linears get N(0, 1/fan_in),
    norm scales 1 + N(0, 0.2) (Gemma stores the scale minus 1, so its weights are N(0, 0.2)),
    biases N(0, 0.1), embeddings N(0, 1) (Gemma: N(0, 1/hidden), as it scales them by sqrt(hidden)).
    """
    from transformers import AutoModelForCausalLM

    config = hf_config(arch, tied=tied, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            gemma = arch in GEMMA
            if name.endswith("norm.weight"):
                offset = 0.0 if gemma else 1.0
                param.copy_(offset + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                scale = config.hidden_size**-0.5 if gemma else 1.0
                param.copy_(scale * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
    model.eval()
    return model


def engine_config(hf_model) -> ModelConfig:
    """The engine's normalized config for an HF model (read from HF's config, nothing inferred)."""
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    arch = {"gemma3_text": "gemma3"}.get(config.model_type, config.model_type)
    steps = {}
    if arch in GEMMA:
        rope = config.rope_parameters
        steps = dict(
            norm_weight_offset=1.0,
            embedding_scale=float(hf_model.model.embed_tokens.embed_scale),
            sandwich_norms=True,
            hidden_act="gelu_tanh",
            query_pre_attn_scalar=float(config.query_pre_attn_scalar),
            attn_logit_softcap=config.attn_logit_softcapping,
            final_logit_softcap=config.final_logit_softcapping,
            sliding_window=config.sliding_window,
            layer_types=tuple(config.layer_types),
            rope_local_theta=float(rope["sliding_attention"]["rope_theta"])
            if arch == "gemma3"
            else None,
        )
        rope_theta = (
            rope["full_attention"]["rope_theta"] if arch == "gemma3" else rope["rope_theta"]
        )
    else:
        rope_theta = config.rope_parameters["rope_theta"]
        if arch == "mistral":
            steps = dict(sliding_window=config.sliding_window)
        if arch in ("qwen3_moe", "qwen2_moe"):
            steps = dict(
                shared_expert_intermediate_size=getattr(
                    config, "shared_expert_intermediate_size", 0
                ),
                num_experts=config.num_experts,
                num_experts_per_tok=config.num_experts_per_tok,
                moe_intermediate_size=config.moe_intermediate_size,
                norm_topk_prob=bool(config.norm_topk_prob),
                decoder_sparse_step=config.decoder_sparse_step,
                mlp_only_layers=tuple(config.mlp_only_layers),
            )
    return ModelConfig(
        architecture=arch,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        rope_theta=float(rope_theta),
        rope_pairing="half",
        rms_norm_eps=config.rms_norm_eps,
        qkv_bias=config.model_type == "qwen2"
        or bool(getattr(config, "attention_bias", False))
        or bool(getattr(config, "qkv_bias", False)),
        qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3"),
        tied_embeddings=bool(config.tie_word_embeddings),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        **steps,
    )


def state_dict_arrays(hf_model, *, drop_tied_head: bool = True) -> dict[str, np.ndarray]:
    """HF's weights as float32 numpy arrays under their canonical names."""
    arrays = {
        name: tensor.detach().to(torch.float32).numpy().copy()
        for name, tensor in hf_model.state_dict().items()
    }
    if drop_tied_head and hf_model.config.tie_word_embeddings:
        arrays.pop("lm_head.weight", None)
    for name in [n for n in arrays if n.endswith("mlp.experts.gate_up_proj")]:
        # transformers 5 holds an MoE layer's experts fused: gate_up [E, 2I, H] (the gate is
        # the first I rows, as its `.chunk(2)` reads it) and down [E, H, I]. Split them into
        # the per-expert tensors its checkpoints (and save_pretrained) use.
        prefix = name[: -len("gate_up_proj")]
        gate_up, down = arrays.pop(name), arrays.pop(prefix + "down_proj")
        inter = gate_up.shape[1] // 2
        for expert in range(gate_up.shape[0]):
            arrays[f"{prefix}{expert}.gate_proj.weight"] = gate_up[expert, :inter].copy()
            arrays[f"{prefix}{expert}.up_proj.weight"] = gate_up[expert, inter:].copy()
            arrays[f"{prefix}{expert}.down_proj.weight"] = down[expert].copy()
    return arrays


def engine_model(hf_model, *, drop_tied_head: bool = True) -> Model:
    arrays = state_dict_arrays(hf_model, drop_tied_head=drop_tied_head)
    return Model(
        Path(f"<hf-{hf_model.config.model_type}>"),
        "memory",
        engine_config(hf_model),
        DictWeightStore(arrays),
    )


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).numpy().copy()


def _token_major(heads: torch.Tensor) -> np.ndarray:
    """HF [1, heads, seq, hd] -> apr [seq, heads*hd]."""
    _, n_heads, seq, hd = heads.shape
    return _np(heads[0].transpose(0, 1).reshape(seq, n_heads * hd))


@contextlib.contextmanager
def _patched(module, name: str, replacement) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def hf_stage_captures(hf_model, token_ids: list[int]) -> dict[tuple[int, str], np.ndarray]:
    """Every apr stage of one HF forward over `token_ids`, keyed by (layer, stage).

    Per-layer arrays are `[seq, dim]` (or `[heads, seq, seq]`); `lm_head` is `[vocab]`.
    """
    modeling = importlib.import_module(type(hf_model).__module__)
    captures: dict[tuple[int, str], np.ndarray] = {}
    current = {"layer": -1}
    handles = []

    def output_hook(layer: int, stage: str, transform=lambda t: t):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            captures[(layer, stage)] = _np(transform(value)[0])

        return hook

    def input_hook(layer: int, stage: str):
        def hook(module, args):
            captures[(layer, stage)] = _np(args[0][0])

        return hook

    inner = hf_model.model
    gemma = hasattr(inner.layers[0], "pre_feedforward_layernorm")
    handles.append(inner.embed_tokens.register_forward_hook(output_hook(0, "embedding")))
    for index, decoder in enumerate(inner.layers):
        attn, mlp = decoder.self_attn, decoder.mlp
        ffn_norm = decoder.pre_feedforward_layernorm if gemma else decoder.post_attention_layernorm

        def enter_layer(module, args, index=index):
            current["layer"] = index

        handles.append(decoder.register_forward_pre_hook(enter_layer))
        handles.append(
            decoder.input_layernorm.register_forward_hook(output_hook(index, "attn_norm"))
        )
        projections: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

        def projection_hook(module, args, output, name=None, index=index, projections=projections):
            projections[name] = (output.detach(), module.bias)
            if len(projections) == 3:
                outs = [projections[n] for n in ("q", "k", "v")]
                with_bias = torch.cat([o for o, _ in outs], dim=-1)[0]
                if all(b is not None for _, b in outs):
                    captures[(index, "qkv_bias")] = _np(with_bias)
                    without = torch.cat([o - b for o, b in outs], dim=-1)[0]
                    captures[(index, "qkv_matmul")] = _np(without)
                else:
                    captures[(index, "qkv_matmul")] = _np(with_bias)
                projections.clear()

        for short in ("q", "k", "v"):
            proj = getattr(attn, f"{short}_proj")
            handles.append(
                proj.register_forward_hook(
                    lambda m, a, o, short=short, hook=projection_hook: hook(m, a, o, name=short)
                )
            )
        handles.append(attn.o_proj.register_forward_pre_hook(input_hook(index, "attention")))
        handles.append(attn.o_proj.register_forward_hook(output_hook(index, "attn_out")))
        handles.append(ffn_norm.register_forward_pre_hook(input_hook(index, "post_attn_residual")))
        handles.append(ffn_norm.register_forward_hook(output_hook(index, "ffn_norm")))
        if gemma:
            handles.append(
                decoder.post_attention_layernorm.register_forward_hook(
                    output_hook(index, "post_attn_norm")
                )
            )
            handles.append(
                decoder.post_feedforward_layernorm.register_forward_hook(
                    output_hook(index, "post_ffn_norm")
                )
            )
        if hasattr(mlp, "experts"):  # an MoE layer: its router's and block's own outputs

            def router_hook(module, args, output, index=index):
                _, scores, experts = output  # [seq, k] each, top-k in descending order
                captures[(index, "moe_router")] = _np(scores[-1])
                captures[(index, "moe_router_indices")] = _np(experts[-1].to(torch.float32))

            def moe_hook(module, args, output, index=index):
                captures[(index, "ffn_out")] = _np(output[0])
                captures[(index, "moe_ffn_out")] = _np(output[0, -1])

            handles.append(mlp.gate.register_forward_hook(router_hook))
            handles.append(mlp.register_forward_hook(moe_hook))
        else:
            handles.append(mlp.gate_proj.register_forward_hook(output_hook(index, "ffn_gate")))
            handles.append(mlp.up_proj.register_forward_hook(output_hook(index, "ffn_up")))
            act_stage = "ffn_gelu" if gemma else "ffn_silu"
            handles.append(mlp.act_fn.register_forward_hook(output_hook(index, act_stage)))
            handles.append(mlp.down_proj.register_forward_pre_hook(input_hook(index, "ffn_swigl")))
            handles.append(mlp.down_proj.register_forward_hook(output_hook(index, "ffn_out")))
        handles.append(decoder.register_forward_hook(output_hook(index, "post_ffn_residual")))
    handles.append(inner.norm.register_forward_hook(output_hook(WHOLE_MODEL_LAYER, "final_norm")))

    original_rope = modeling.apply_rotary_pos_emb
    original_attention = modeling.eager_attention_forward
    original_softmax = torch.nn.functional.softmax

    def recording_rope(q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = original_rope(q, k, cos, sin, *args, **kwargs)
        captures[(current["layer"], "q_post_rope")] = _token_major(q_embed)
        captures[(current["layer"], "k_post_rope")] = _token_major(k_embed)
        return q_embed, k_embed

    def recording_attention(module, query, key, value, attention_mask, *args, **kwargs):
        softmax_inputs = []

        def recording_softmax(x, *s_args, **s_kwargs):
            softmax_inputs.append(x.detach().clone())
            return original_softmax(x, *s_args, **s_kwargs)

        with _patched(torch.nn.functional, "softmax", recording_softmax):
            output, weights = original_attention(
                module, query, key, value, attention_mask, *args, **kwargs
            )
        (scores_plus_mask,) = softmax_inputs  # [1, nh, seq, seq]: scores + 0 where visible
        scores = scores_plus_mask[0]
        seq = scores.shape[-1]
        if isinstance(attention_mask, torch.Tensor):  # additive: 0 visible, very negative blocked
            blocked = attention_mask[0, 0, :, -seq:] != 0
        else:
            blocked = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
        captures[(current["layer"], "attn_scores")] = _np(scores.masked_fill(blocked, 0.0))
        captures[(current["layer"], "attn_softmax")] = _np(weights[0])
        return output, weights

    try:
        with (
            _patched(modeling, "apply_rotary_pos_emb", recording_rope),
            _patched(modeling, "eager_attention_forward", recording_attention),
            torch.no_grad(),
        ):
            logits = hf_model(torch.tensor([token_ids]), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    captures[(WHOLE_MODEL_LAYER, "lm_head")] = _np(logits[0, -1])
    return captures
