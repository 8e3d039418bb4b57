"""Writing an APR v2 file: each tensor planned in its stored dtype, the metadata in
AprV2Metadata's order with canonical keys only, and the file streamed out one tensor at a time
with every section aligned and both CRCs set.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UnsupportedModelError, path_text
from engine.fileio import atomic_output
from engine.formats.apr.layout import (
    DT_APR_Q4,
    DT_APR_Q8,
    DT_F16,
    DT_F32,
    DT_LEGACY_Q4,
    DT_Q4_K,
    DT_Q6_K,
    FLAG_HAS_VOCAB,
    FLAG_QUANTIZED,
    FLAG_ROW_MAJOR,
    HEADER_SIZE,
    MAX_NAME_LEN,
    AprIndexEntry,
    align64,
    pack_header,
    pack_index_entry,
)
from engine.formats.apr.metadata import (
    ALL_ALIASES,
)
from engine.formats.common import (
    GEMMA_FAMILY,
    HF_ARCHITECTURE_CLASS,
    HF_MODEL_TYPE,
    UNKNOWN_CONTEXT_LENGTH,
    check_write_dtype,
    stored_tensor_names,
)
from engine.formats.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType
from engine.formats.quant import (
    QK_K,
    apr_q4_nbytes,
    quantize_apr_q4,
    quantize_apr_q8,
    quantize_ggml,
    quantize_k_rows_padded,
)
from engine.model import Model
from engine.tokenizer import (
    BpeTokenizer,
)


@dataclass
class TensorPlan:
    """One tensor to write: its index fields and a function producing its exact bytes."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    size: int
    encode: Callable[[], bytes]


WRITE_DTYPES = ("f32", "f16", "q8_0", "q4_k", "q6_k", "q4", "q8")


def plan_tensor(
    name: str, shape: tuple[int, ...], dtype: str, load: Callable[[], np.ndarray]
) -> TensorPlan:
    """How `dtype` stores one tensor. 1-D tensors (norms, biases) stay F32, as in llama.cpp."""
    n = math.prod(shape)
    if dtype == "f32" or len(shape) < 2:
        return TensorPlan(name, DT_F32, shape, n * 4, lambda: load().astype("<f4").tobytes())
    if dtype == "f16":
        return TensorPlan(name, DT_F16, shape, n * 2, lambda: load().astype("<f2").tobytes())
    if dtype == "q8_0":
        if shape[-1] % 32:
            return plan_tensor(name, shape, "f32", load)
        return TensorPlan(
            name,
            DT_LEGACY_Q4,
            shape,
            n // 32 * 34,
            lambda: quantize_ggml(load(), GGMLQuantizationType.Q8_0).tobytes(),
        )
    if dtype in ("q4_k", "q6_k"):
        qtype = GGMLQuantizationType.Q4_K if dtype == "q4_k" else GGMLQuantizationType.Q6_K
        code = DT_Q4_K if dtype == "q4_k" else DT_Q6_K
        rows, cols = math.prod(shape[:-1]), shape[-1]
        block_bytes = GGML_QUANT_SIZES[qtype][1]
        size = rows * -(-cols // QK_K) * block_bytes
        return TensorPlan(
            name,
            code,
            shape,
            size,
            lambda: quantize_k_rows_padded(load().reshape(rows, cols), qtype),
        )
    if dtype == "q4":
        return TensorPlan(name, DT_APR_Q4, shape, apr_q4_nbytes(n), lambda: quantize_apr_q4(load()))
    if dtype == "q8":
        return TensorPlan(name, DT_APR_Q8, shape, 4 + n, lambda: quantize_apr_q8(load()))
    raise UnsupportedModelError(
        f"APR dtype {dtype!r} is not supported (choose from {', '.join(WRITE_DTYPES)})"
    )


def metadata_json(metadata: dict[str, Any]) -> bytes:
    """Compact JSON, keys in the given order (serde's), aliases refused."""
    clash = [key for key in metadata if key in ALL_ALIASES]
    if clash:
        raise ValueError(f"APR metadata must use canonical keys, not aliases: {clash}")
    return json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def write_file(
    path: Path,
    metadata: dict[str, Any],
    tensors: Iterable[TensorPlan],
    *,
    flags: int = FLAG_ROW_MAJOR,
    progress: Callable[[int, int, str], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an APR v2 file: tensors sorted by name, every section aligned to 64, CRCs set.

    Streams: sizes come from each plan, so only one tensor's bytes exist at a time. Writes to
    a temporary name beside `path`, published when complete (engine.fileio.atomic_output; with
    `overwrite=False` a file that appeared at `path` meanwhile is never replaced).
    """
    plans = sorted(tensors, key=lambda plan: plan.name.encode("utf-8"))
    meta = metadata_json(metadata)
    entries: list[AprIndexEntry] = []
    offset = 0
    for plan in plans:
        if len(plan.name.encode("utf-8")) > MAX_NAME_LEN:
            raise ValueError(f"tensor name longer than {MAX_NAME_LEN} bytes: {plan.name!r}")
        entries.append(AprIndexEntry(plan.name, plan.dtype, plan.shape, offset, plan.size))
        offset += align64(plan.size)
    index = b"".join(pack_index_entry(entry) for entry in entries)
    index_offset = HEADER_SIZE + align64(len(meta))
    data_offset = index_offset + align64(len(index))
    header = pack_header(
        flags=flags,
        tensor_count=len(plans),
        metadata_size=len(meta),
        tensor_index_offset=index_offset,
        data_offset=data_offset,
    )
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as temp, open(temp, "wb") as out:
        crc = 0

        def emit(chunk: bytes) -> None:
            nonlocal crc
            out.write(chunk)
            crc = zlib.crc32(chunk, crc)

        emit(header)
        emit(meta + bytes(align64(len(meta)) - len(meta)))
        emit(index + bytes(align64(len(index)) - len(index)))
        for number, plan in enumerate(plans, start=1):
            data = plan.encode()
            if len(data) != plan.size:
                raise AssertionError(f"{plan.name}: encoded {len(data)} bytes, planned {plan.size}")
            emit(data + bytes(align64(len(data)) - len(data)))
            if progress is not None:
                progress(number, len(plans), plan.name)
        out.write(struct.pack("<I", crc & 0xFFFFFFFF))
    return path


def model_metadata(model: Model, dtype: str, plans: list[TensorPlan]) -> dict[str, Any]:
    """APR metadata for `model`, in AprV2Metadata's serialization order, canonical keys only."""
    config = model.config
    meta: dict[str, Any] = {
        "model_type": config.architecture,
        "name": path_text(str(model.metadata.get("name") or model.name)),
        "license": None,
        "data_source": None,
        "data_license": None,
        "source": path_text(model.path.name),
        "original_format": model.format,
        "total_size": sum(plan.size for plan in plans),
        "param_count": sum(math.prod(plan.shape) for plan in plans),
    }
    if dtype != "f32":
        bits = {"f16": 16, "q8_0": 8, "q8": 8, "q4_k": 4, "q6_k": 6, "q4": 4}[dtype]
        block = {"f16": 1, "q8_0": 32, "q8": 0, "q4_k": 256, "q6_k": 256, "q4": 32}[dtype]
        meta["quantization"] = {
            "quant_type": dtype,
            "bits": bits,
            "block_size": block,
            "symmetric": dtype in ("q8_0", "q8", "q4", "q6_k"),
        }
    meta.update(
        {
            "architecture": config.architecture,
            "hf_architecture": HF_ARCHITECTURE_CLASS[config.architecture],
            "hf_model_type": HF_MODEL_TYPE.get(config.architecture, config.architecture),
            "hidden_size": config.hidden_size,
            "num_layers": config.num_layers,
            "num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "vocab_size": config.vocab_size,
            "intermediate_size": config.intermediate_size,
            "max_position_embeddings": config.context_length or UNKNOWN_CONTEXT_LENGTH,
            "rope_theta": config.rope_theta,
            "rope_type": 0 if config.rope_pairing == "adjacent" else 2,
            "rms_norm_eps": config.rms_norm_eps,
            "head_dim": config.head_dim,
            "tied_embeddings": config.tied_embeddings,
        }
    )
    if config.num_experts:
        meta.update(
            {
                "num_experts": config.num_experts,
                "num_experts_per_tok": config.num_experts_per_tok,
                "moe_intermediate_size": config.moe_intermediate_size,
                "norm_topk_prob": config.norm_topk_prob,
            }
        )
        if config.shared_expert_intermediate_size:
            meta["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    if config.architecture == "mistral" and config.sliding_window is not None:
        meta["sliding_window"] = config.sliding_window
    if config.architecture in GEMMA_FAMILY:  # custom keys, named as in HF's config.json
        meta.update(
            {
                "query_pre_attn_scalar": config.query_pre_attn_scalar,
                "sliding_window": config.sliding_window,
                "layer_types": list(config.layer_types),
                "attn_logit_softcapping": config.attn_logit_softcap,
                "final_logit_softcapping": config.final_logit_softcap,
                "rope_local_base_freq": config.rope_local_theta,
            }
        )
    tokenizer = model.tokenizer
    if isinstance(tokenizer, BpeTokenizer):
        if tokenizer.kind == "spm":  # GGUF's vocabulary names: `llama` SentencePiece, `gpt2` BPE
            pieces = {
                "tokenizer.model_type": "llama",
                "tokenizer.scores": [_json_score(x) for x in tokenizer.piece_scores()],
            }
            if not tokenizer.add_space_prefix:
                pieces["tokenizer.add_space_prefix"] = False
        else:
            pieces = {"tokenizer.model_type": "gpt2", "tokenizer.merges": list(tokenizer.merges)}
        meta.update(
            {
                "tokenizer.vocabulary": list(tokenizer.tokens),
                **pieces,
                "tokenizer.vocab_size": tokenizer.vocab_size,
                "tokenizer.token_type": list(tokenizer.token_types),
                "tokenizer.pre": tokenizer.pre,
            }
        )
        if config.bos_token_id is not None:
            meta["tokenizer.bos_token_id"] = config.bos_token_id
        if config.eos_token_id is not None:
            meta["tokenizer.eos_token_id"] = config.eos_token_id
        if config.add_bos:
            meta["tokenizer.add_bos_token"] = True
    return meta


_F32_MAX = float(np.finfo(np.float32).max)


def _json_score(score: float) -> float:
    """A SentencePiece score as JSON can hold it: ±Inf (GGUF allows it; JSON does not) becomes
    ±f32 max, which keeps every comparison the merge order depends on (the scores were f32)."""
    if math.isinf(score):
        return math.copysign(_F32_MAX, score)
    return score


def write(
    model: Model,
    path: Path | str,
    dtype: str = "f32",
    *,
    progress: Callable[[int, int, str], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """`model` as an APR v2 file at `path` (HF tensor names, HF row order)."""
    check_write_dtype(path, "APR", dtype, WRITE_DTYPES)
    plans = [
        plan_tensor(name, tuple(model.weights.shape(name)), dtype, _loader(model, name))
        for name in stored_tensor_names(model)
    ]
    flags = FLAG_ROW_MAJOR
    if dtype not in ("f32", "f16"):
        flags |= FLAG_QUANTIZED
    if isinstance(model.tokenizer, BpeTokenizer):
        flags |= FLAG_HAS_VOCAB
    return write_file(
        Path(path),
        model_metadata(model, dtype, plans),
        plans,
        flags=flags,
        progress=progress,
        overwrite=overwrite,
    )


def _loader(model: Model, name: str) -> Callable[[], np.ndarray]:
    return lambda: model.weights.get(name)
