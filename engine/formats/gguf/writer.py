"""Writing a GGUF file as llama.cpp's converter lays it out (through `gguf.GGUFWriter`): the
architecture keys, Gemma's extra keys, the tokenizer, and each tensor in its storage type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.fileio import atomic_output
from engine.formats.common import (
    GEMMA3_LOCAL_ROPE_THETA,
    GEMMA_FAMILY,
    UNKNOWN_CONTEXT_LENGTH,
    check_write_dtype,
    hf_ordered,
    stored_tensor_names,
)
from engine.formats.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType
from engine.formats.gguf.metadata import (
    GEMMA_27B_LAYERS,
    MOE_NORM_DEFAULT,
)
from engine.formats.gguf.names import (
    EXPERT_NAME,
    GEMMA_NORM_SHIFT,
    LLAMA_FAMILY,
    MERGED_EXPERTS,
    hf_to_gguf_name,
)
from engine.formats.quant import quantize_ggml
from engine.formats.row_order import permute_rows
from engine.model import Model, ModelConfig
from engine.tokenizer import BpeTokenizer

WRITE_DTYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
    "q4_k": GGMLQuantizationType.Q4_K,
    "q6_k": GGMLQuantizationType.Q6_K,
}
# llama.cpp `llama_ftype` for general.file_type.
_FILE_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q4_k": 15,
    "q6_k": 18,
    "bf16": 32,
}


def tensor_storage_type(name: str, shape: tuple[int, ...], dtype: str) -> GGMLQuantizationType:
    """What the writer stores a tensor as: norms and biases F32 (as llama.cpp), and any matrix
    whose rows do not fill whole blocks of the requested type F32 too."""
    qtype = WRITE_DTYPES[dtype]
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else GGMLQuantizationType.F32


def write(
    model: Model,
    path: Path | str,
    dtype: str = "f32",
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """A GGUF file of `model` as llama.cpp's converter would lay it out; temp name, then rename."""
    import gguf

    check_write_dtype(path, "GGUF", dtype, WRITE_DTYPES)
    path = Path(path)
    config = model.config
    gguf_arch = {"mistral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}.get(
        config.architecture, config.architecture
    )
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf_arch)
        writer.add_name(str(model.metadata.get("name") or model.name))
        if config.architecture == "mistral":
            writer.add_basename("mistral")
        writer.add_block_count(config.num_layers)
        writer.add_context_length(config.context_length or UNKNOWN_CONTEXT_LENGTH)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_heads)
        writer.add_head_count_kv(config.num_kv_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        if config.architecture in GEMMA_FAMILY:
            _write_gemma_keys(writer, gguf_arch, config)
        elif config.sliding_window is not None:
            writer.add_sliding_window(config.sliding_window)
        if config.num_experts:
            writer.add_expert_count(config.num_experts)
            writer.add_expert_used_count(config.num_experts_per_tok)
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
            if config.norm_topk_prob != MOE_NORM_DEFAULT[config.architecture]:
                writer.add_bool(f"{gguf_arch}.expert_weights_norm", config.norm_topk_prob)
            if config.shared_expert_intermediate_size:
                writer.add_uint32(
                    f"{gguf_arch}.expert_shared_feed_forward_length",
                    config.shared_expert_intermediate_size,
                )
        writer.add_file_type(_FILE_TYPES[dtype])
        _write_tokenizer(writer, model)

        names = stored_tensor_names(model)
        for index, name in enumerate(names):
            expert = EXPERT_NAME.match(name)
            if expert is not None and expert.group(2) != "0":
                continue  # written stacked with expert 0
            if expert is not None:  # llama.cpp's merged [experts, rows, cols] tensor
                layer, proj = expert.group(1), expert.group(3)
                values = np.stack(
                    [
                        model.weights.get(f"model.layers.{layer}.mlp.experts.{e}.{proj}")
                        for e in range(config.num_experts)
                    ]
                )  # [E, rows, cols]
                merged = {hf: gg for gg, hf in MERGED_EXPERTS.items()}[proj]
                _add_tensor(writer, f"blk.{layer}.{merged}", values, dtype)
                if progress is not None:
                    progress(index + 1, len(names), name)
                continue
            values = hf_ordered(config, name, model.weights.get(name))  # [out, in] HF order
            if config.architecture in LLAMA_FAMILY and name.endswith(
                ("self_attn.q_proj.weight", "self_attn.k_proj.weight")
            ):
                heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
                values = permute_rows(values, heads)
            if config.architecture in GEMMA_FAMILY and name.endswith("norm.weight"):
                values = values + np.float32(GEMMA_NORM_SHIFT)
            _add_tensor(writer, hf_to_gguf_name(name, config.architecture), values, dtype)
            if progress is not None:
                progress(index + 1, len(names), name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add_tensor(writer: Any, gguf_name: str, values: np.ndarray, dtype: str) -> None:
    """One tensor in the storage type `tensor_storage_type` picks for it."""
    qtype = tensor_storage_type(gguf_name, values.shape, dtype)
    if qtype == GGMLQuantizationType.F32:
        writer.add_tensor(gguf_name, np.ascontiguousarray(values, dtype=np.float32))
    elif qtype == GGMLQuantizationType.F16:
        writer.add_tensor(gguf_name, values.astype(np.float16))
    else:
        blocks = quantize_ggml(values, qtype).reshape(*values.shape[:-1], -1)  # [..., bytes]
        writer.add_tensor(gguf_name, blocks, raw_dtype=qtype)


def _write_gemma_keys(writer: Any, gguf_arch: str, config: ModelConfig) -> None:
    """What llama.cpp's converter writes for Gemma beyond Llama's keys. The sliding pattern is
    written only when it is not the family default that readers assume."""
    from engine.formats.common import GEMMA_SLIDING_PATTERN

    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    every = GEMMA_SLIDING_PATTERN[config.architecture]
    default = tuple(
        "sliding_attention" if (i + 1) % every else "full_attention"
        for i in range(config.num_layers)
    )
    if config.layer_types and config.layer_types != default:
        writer.add_array(
            f"{gguf_arch}.attention.sliding_window_pattern",
            [kind == "sliding_attention" for kind in config.layer_types],
        )
    big = config.num_layers == GEMMA_27B_LAYERS[config.architecture]
    implied = config.hidden_size // config.num_heads if big else config.head_dim
    if config.query_pre_attn_scalar not in (None, implied):
        writer.add_float32(f"{gguf_arch}.attention.scale", config.query_pre_attn_scalar**-0.5)
    if config.attn_logit_softcap is not None:
        writer.add_float32(f"{gguf_arch}.attn_logit_softcapping", config.attn_logit_softcap)
    if config.final_logit_softcap is not None:
        writer.add_float32(f"{gguf_arch}.final_logit_softcapping", config.final_logit_softcap)
    if config.rope_local_theta is not None and config.rope_local_theta != GEMMA3_LOCAL_ROPE_THETA:
        writer.add_float32(f"{gguf_arch}.rope.freq_base_swa", config.rope_local_theta)


def _write_tokenizer(writer: Any, model: Model) -> None:
    tokenizer = model.tokenizer
    if not isinstance(tokenizer, BpeTokenizer):
        return
    if tokenizer.kind == "spm":
        writer.add_tokenizer_model("llama")
        writer.add_token_list(list(tokenizer.tokens))
        writer.add_token_scores(tokenizer.piece_scores())
        writer.add_token_types(tokenizer.token_types)
        writer.add_add_space_prefix(tokenizer.add_space_prefix)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer.pre)
        writer.add_token_list(list(tokenizer.tokens))
        writer.add_token_types(tokenizer.token_types)
        writer.add_token_merges(list(tokenizer.merges))
    config = model.config
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if config.eos_token_id is not None:
        writer.add_eos_token_id(config.eos_token_id)
    writer.add_add_bos_token(config.add_bos)


def with_config(model: Model, **changes: Any) -> Model:
    """A copy of `model` with some config fields changed (tests build variants this way, e.g. an
    unsupported architecture string to check the reader's refusal)."""
    return replace(model, config=replace(model.config, **changes))
