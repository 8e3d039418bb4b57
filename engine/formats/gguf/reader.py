"""Opening a GGUF file: tensors mapped to HF names and checked, and the `GgufWeightStore` that
dequantizes one tensor (or a band of its rows) from the memory map on request, in HF order.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UnsupportedModelError
from engine.formats.common import (
    GEMMA_FAMILY,
    check_weights,
)
from engine.formats.ggml_types import GGMLQuantizationType
from engine.formats.gguf.metadata import (
    config_from_metadata,
    tokenizer_from_metadata,
)
from engine.formats.gguf.names import (
    GEMMA_NORM_SHIFT,
    LLAMA_FAMILY,
    expert_slices,
    gguf_to_hf_name,
)
from engine.formats.gguf.parser import (
    GgufTensorInfo,
    read_header,
)
from engine.formats.quant import can_dequantize, dequantize_ggml, ggml_row_nbytes
from engine.formats.row_order import unpermute_rows
from engine.model import Model, WeightStoreBase, check_row_range


class GgufWeightStore(WeightStoreBase):
    """Canonical-name float32 tensors, dequantized from the memory-mapped file on request."""

    def __init__(
        self,
        path: Path,
        tensors: dict[str, GgufTensorInfo],
        permuted_heads: dict[str, int],
        shifted: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        self.source = str(path)
        self._entries = tensors  # canonical name -> info
        self._permuted_heads = permuted_heads  # canonical name -> head count for unpermute
        self._shifted = shifted  # canonical names stored as 1 + w (Gemma norms)
        self._data: np.memmap | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def qtype(self, name: str) -> GGMLQuantizationType:
        return self._info(name).qtype

    def get(self, name: str) -> np.ndarray:
        info = self._info(name)
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._data[info.start : info.start + info.nbytes]  # [nbytes] uint8, a view
        values = _decode(raw, info).reshape(info.shape)
        if name in self._permuted_heads:
            values = unpermute_rows(values, self._permuted_heads[name])
        if name in self._shifted:
            values = values - np.float32(GEMMA_NORM_SHIFT)
        return np.ascontiguousarray(values, dtype=np.float32)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor, decoding only their bytes: a row of a
        [rows, cols] tensor is `cols` plain values or `cols / block` whole quant blocks. Falls
        back to `get(name)[start:stop]` for Q/K projections (stored head-permuted) and for
        block types whose rows do not end on a block boundary."""
        info = self._info(name)
        start, stop = check_row_range(self.source, name, info.shape, start, stop)
        cols = info.shape[1]
        if info.qtype in _PLAIN_TYPES:
            row_nbytes = cols * np.dtype(_PLAIN_TYPES[info.qtype]).itemsize
        else:
            row_nbytes = ggml_row_nbytes(info.qtype, cols)
        if row_nbytes is None or name in self._permuted_heads or name in self._shifted:
            return super().get_rows(name, start, stop)  # the whole tensor, sliced
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        first = info.start + start * row_nbytes
        raw = self._data[first : first + (stop - start) * row_nbytes]  # [rows' bytes] uint8 view
        rows = replace(info, ggml_dims=(cols, stop - start), nbytes=raw.size)
        values = _decode(raw, rows).reshape(stop - start, cols)  # [stop - start, cols]
        return np.ascontiguousarray(values, dtype=np.float32)

    def close(self) -> None:
        self._data = None

    def _info(self, name: str) -> GgufTensorInfo:
        return self._entry(name)


_PLAIN_TYPES = {
    GGMLQuantizationType.F32: "<f4",
    GGMLQuantizationType.F16: "<f2",
    GGMLQuantizationType.F64: "<f8",
    GGMLQuantizationType.I8: "<i1",
    GGMLQuantizationType.I16: "<i2",
    GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8",
    GGMLQuantizationType.BF16: "<u2",
}


_INTEGER_TYPES = frozenset(
    {
        GGMLQuantizationType.I8,
        GGMLQuantizationType.I16,
        GGMLQuantizationType.I32,
        GGMLQuantizationType.I64,
    }
)
"""GGML's plain integer types: legal GGUF, never a weight of the models we trace."""


def _decode(raw: np.ndarray, info: GgufTensorInfo) -> np.ndarray:
    qtype = info.qtype
    if qtype == GGMLQuantizationType.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if qtype in _PLAIN_TYPES:
        return raw.view(_PLAIN_TYPES[qtype]).astype(np.float32)
    return dequantize_ggml(raw, qtype, info.count)


def open_gguf(path: Path) -> Model:
    """A lazily dequantized `Model` from a GGUF file."""
    source = str(path)
    header = read_header(path)
    config, gguf_arch = config_from_metadata(header.metadata, header.tensors, source)
    canonical: dict[str, GgufTensorInfo] = {}
    for name, info in header.tensors.items():
        hf_name = gguf_to_hf_name(name, config.architecture)
        if hf_name is not None:
            canonical[hf_name] = info
        canonical.update(expert_slices(name, info))
    for name, info in list(canonical.items()):
        if name.endswith("mlp.shared_expert_gate.weight") and len(info.ggml_dims) == 1:
            canonical[name] = replace(info, ggml_dims=(info.ggml_dims[0], 1))  # llama.cpp: [H]
    permuted: dict[str, int] = {}
    if config.architecture in LLAMA_FAMILY:
        for layer in range(config.num_layers):
            permuted[f"model.layers.{layer}.self_attn.q_proj.weight"] = config.num_heads
            permuted[f"model.layers.{layer}.self_attn.k_proj.weight"] = config.num_kv_heads
    for name, info in canonical.items():
        if info.qtype in _INTEGER_TYPES:
            # Integers are never weights: decoding them as floats gives plausible garbage.
            raise UnsupportedModelError(
                f"{source}: tensor {info.name!r} has integer type {info.qtype.name}; weights "
                "must be floating point or quantized"
            )
        if info.qtype not in _PLAIN_TYPES and not can_dequantize(info.qtype):
            raise UnsupportedModelError(
                f"{source}: tensor {name!r} has GGML type {info.qtype.name}, which cannot be dequantized"
            )
    shifted = frozenset(
        name
        for name in canonical
        if config.architecture in GEMMA_FAMILY and name.endswith("norm.weight")
    )
    weights = GgufWeightStore(path, canonical, permuted, shifted)
    check_weights(config, weights, source)

    metadata: dict[str, Any] = {
        "name": header.metadata.get("general.name"),
        "gguf_architecture": gguf_arch,
        "gguf_version": header.version,
        "file_type": header.metadata.get("general.file_type"),
        "tensor_types": _type_counts(canonical),
    }
    tokenizer = None
    try:
        tokenizer = tokenizer_from_metadata(header.metadata, source)
        if tokenizer.vocab_size != config.vocab_size:
            metadata["tokenizer_warning"] = (
                f"tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}"
            )
    except Exception as error:  # a tokenizer problem must not stop the weights from loading
        metadata["tokenizer_error"] = str(error).splitlines()[0]
    if tokenizer is not None and header.metadata.get("tokenizer.chat_template"):
        metadata["chat_template"] = header.metadata["tokenizer.chat_template"]
    return Model(
        path=path,
        format="gguf",
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        metadata=metadata,
    )


def _type_counts(tensors: dict[str, GgufTensorInfo]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in tensors.values():
        counts[info.qtype.name] = counts.get(info.qtype.name, 0) + 1
    return dict(sorted(counts.items()))
