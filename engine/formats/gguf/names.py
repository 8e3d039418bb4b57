"""How GGUF tensors correspond to HF's: names both ways (Llama's and Gemma's layer names), a
merged MoE tensor split into HF's per-expert tensors, and which tensors llama.cpp's converter
stores transformed (Llama-family Q/K rows permuted, Gemma norms shifted by one).
"""

from __future__ import annotations

import re
from dataclasses import replace

from engine.errors import FormatError
from engine.formats.common import (
    GEMMA_FAMILY,
)
from engine.formats.gguf.parser import (
    GgufTensorInfo,
)

LLAMA_FAMILY = ("llama", "mistral")  # stored with Q/K rows permuted by convert_hf_to_gguf.py
_GGUF_TO_HF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # the MoE router
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",  # Qwen2-MoE's shared expert
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    # Biases the forward pass does not apply: mapped so that check_weights names and refuses them
    # instead of the model silently loading without them.
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_HF_TO_GGUF_LAYER = {hf: gg for gg, hf in _GGUF_TO_HF_LAYER.items()}
_GEMMA_LAYER = {
    # llama.cpp's Gemma 2/3 names where they differ from Llama's: Gemma's HF
    # `post_attention_layernorm` normalizes the attention output, and its FFN input norm is
    # `pre_feedforward_layernorm`, which llama.cpp calls ffn_norm as it does Llama's.
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GGUF_TO_HF_GEMMA_LAYER = {**_GGUF_TO_HF_LAYER, **_GEMMA_LAYER}
_HF_TO_GGUF_GEMMA_LAYER = {hf: gg for gg, hf in _GGUF_TO_HF_GEMMA_LAYER.items()}
MERGED_EXPERTS = {
    # llama.cpp stacks the experts of an MoE layer into one 3-D tensor per projection,
    # [experts, rows, cols] (ggml dims cols, rows, experts): expert E's matrix is the E-th
    # contiguous slab of it.
    "ffn_gate_exps.weight": "gate_proj.weight",
    "ffn_up_exps.weight": "up_proj.weight",
    "ffn_down_exps.weight": "down_proj.weight",
}
EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+_proj\.weight)$")
GEMMA_NORM_SHIFT = 1.0
"""llama.cpp's converter stores Gemma's norm weights as `1 + w` (its RMSNorm multiplies by the
stored weight); the reader subtracts it back to HF's `w`, as transformers' GGUF loader does, and
the writer adds it."""
_GGUF_TO_HF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "output.bias": "lm_head.bias",
}
_HF_TO_GGUF_GLOBAL = {hf: gg for gg, hf in _GGUF_TO_HF_GLOBAL.items()}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """The canonical HF name of a GGUF tensor name, or None for tensors we do not use."""
    if name in _GGUF_TO_HF_GLOBAL:
        return _GGUF_TO_HF_GLOBAL[name]
    layer_names = _GGUF_TO_HF_GEMMA_LAYER if arch in GEMMA_FAMILY else _GGUF_TO_HF_LAYER
    match = _LAYER_NAME.match(name)
    if match and match.group(2) in layer_names:
        return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}"
    return None


def hf_to_gguf_name(name: str, arch: str = "llama") -> str:
    if name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[name]
    layer_names = _HF_TO_GGUF_GEMMA_LAYER if arch in GEMMA_FAMILY else _HF_TO_GGUF_LAYER
    match = _HF_LAYER_NAME.match(name)
    if match and match.group(2) in layer_names:
        return f"blk.{match.group(1)}.{layer_names[match.group(2)]}"
    raise ValueError(f"no GGUF name for tensor {name!r}")


def expert_slices(name: str, info: GgufTensorInfo) -> dict[str, GgufTensorInfo]:
    """Expert E's [rows, cols] of a merged `blk.N.ffn_*_exps.weight`, as its own 2-D tensor
    under HF's per-expert name: the E-th equal, contiguous slab of the 3-D tensor's bytes, so
    reading one expert decodes only its slab. Empty for any other tensor."""
    match = _LAYER_NAME.match(name)
    if match is None or match.group(2) not in MERGED_EXPERTS or len(info.ggml_dims) != 3:
        return {}
    cols, rows, experts = info.ggml_dims
    if experts <= 0 or info.nbytes % experts:
        raise FormatError(f"{name}: {info.nbytes} bytes do not split into {experts} experts")
    slab = info.nbytes // experts
    proj = MERGED_EXPERTS[match.group(2)]
    return {
        f"model.layers.{match.group(1)}.mlp.experts.{e}.{proj}": replace(
            info, ggml_dims=(cols, rows), start=info.start + e * slab, nbytes=slab
        )
        for e in range(experts)
    }
