"""GGUF model files: a bounds-checked header parser, lazy dequantization, and a writer.

Reading: the header (metadata key/values and tensor infos) is parsed here with `struct` over a
memory map, every count and length checked against the bytes that remain, so a corrupt file is a
one-line `FormatError` and never a hang or a huge allocation. (`gguf.GGUFReader` loops over an
array's claimed length even past the end of the file, and spends ~2.4 s building per-string numpy
views for a 49k-token vocabulary; this parser opens the same file in tens of milliseconds.) Tensor
data stays in the memory map until `get(name)`, which dequantizes that one tensor with
`gguf.quants.dequantize` (or the faster Q8_0 / Q4_0 / Q4_1 paths of `quant.py`).

Layout: GGML lists dims innermost first (`ne0` = columns), so `[ne0, ne1]` is the row-major HF
`[ne1, ne0]` without moving data. llama.cpp's converter permutes the Q and K rows of Llama-family
models for its adjacent-pair RoPE; the reader undoes that (`unpermute_rows`) so weights come out in
HF order, and the writer applies it (`permute_rows`) so files we write are what llama.cpp expects.
Qwen2 and Qwen3 files are stored unpermuted (NEOX RoPE).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.errors import FormatError, MissingTensorError, UnsupportedModelError
from engine.fileio import atomic_output, open_regular
from engine.formats.common import (
    GEMMA3_LOCAL_ROPE_THETA,
    GEMMA_FAMILY,
    MAX_ELEMENTS,
    MOE_FAMILY,
    check_dims,
    check_no_overlap,
    check_weights,
    check_write_dtype,
    family_steps,
    gemma_layer_steps,
    hf_ordered,
    int_field,
    moe_steps,
    normalize_architecture,
    stored_tensor_names,
)
from engine.formats.quant import can_dequantize, dequantize_ggml, ggml_row_nbytes, quantize_ggml
from engine.formats.row_order import permute_rows, unpermute_rows  # noqa: F401 (re-exported)
from engine.model import Model, ModelConfig, check_row_range
from engine.tokenizer import TOKEN_TYPE_NORMAL, BpeTokenizer

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8
MAX_NESTING = 2

# GGUF metadata value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = range(10)
_UINT64, _INT64, _FLOAT64 = 10, 11, 12
_SCALAR_FORMATS: dict[int, str] = {
    _UINT8: "<B",
    _INT8: "<b",
    _UINT16: "<H",
    _INT16: "<h",
    _UINT32: "<I",
    _INT32: "<i",
    _FLOAT32: "<f",
    _BOOL: "<?",
    _UINT64: "<Q",
    _INT64: "<q",
    _FLOAT64: "<d",
}
_SCALAR_DTYPES: dict[int, str] = {
    _UINT8: "<u1",
    _INT8: "<i1",
    _UINT16: "<u2",
    _INT16: "<i2",
    _UINT32: "<u4",
    _INT32: "<i4",
    _FLOAT32: "<f4",
    _BOOL: "<u1",
    _UINT64: "<u8",
    _INT64: "<i8",
    _FLOAT64: "<f8",
}

_LLAMA_FAMILY = ("llama", "mistral")  # stored with Q/K rows permuted by convert_hf_to_gguf.py
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
_MERGED_EXPERTS = {
    # llama.cpp stacks the experts of an MoE layer into one 3-D tensor per projection,
    # [experts, rows, cols] (ggml dims cols, rows, experts): expert E's matrix is the E-th
    # contiguous slab of it.
    "ffn_gate_exps.weight": "gate_proj.weight",
    "ffn_up_exps.weight": "up_proj.weight",
    "ffn_down_exps.weight": "down_proj.weight",
}
_EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+_proj\.weight)$")
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
    if match is None or match.group(2) not in _MERGED_EXPERTS or len(info.ggml_dims) != 3:
        return {}
    cols, rows, experts = info.ggml_dims
    if experts <= 0 or info.nbytes % experts:
        raise FormatError(f"{name}: {info.nbytes} bytes do not split into {experts} experts")
    slab = info.nbytes // experts
    proj = _MERGED_EXPERTS[match.group(2)]
    return {
        f"model.layers.{match.group(1)}.mlp.experts.{e}.{proj}": replace(
            info, ggml_dims=(cols, rows), start=info.start + e * slab, nbytes=slab
        )
        for e in range(experts)
    }


# ---------------------------------------------------------------------------------------------
# Header parsing


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    ggml_dims: tuple[int, ...]
    """Innermost first, as stored (`ne0, ne1, ...`)."""
    qtype: GGMLQuantizationType
    start: int
    """Absolute byte offset of the data in the file."""
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (HF) shape: the GGML dims reversed."""
        return tuple(reversed(self.ggml_dims))

    @property
    def count(self) -> int:
        total = 1
        for dim in self.ggml_dims:
            total *= dim
        return total


@dataclass
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensorInfo]
    data_offset: int


LAZY_STRINGS = 1024
"""String arrays at least this long (a vocabulary, a merge list) are decoded on first use:
walking 10^5 length-prefixed strings costs ~8 ms, decoding them ~70 ms more, and a trace given
`--tokens` never needs them (issue 13: vocabulary decoded only to tokenize or name tokens)."""


class LazyStrings(Sequence):
    """A GGUF string array, validated at parse time, decoded (UTF-8, invalid bytes replaced)
    the first time an item, a slice, an iteration or a comparison needs it."""

    def __init__(self, raw: bytes, count: int) -> None:
        self._raw: bytes | None = raw
        self._count = count
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            raw, out, pos = self._raw, [], 0
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(self._count):
                (length,) = unpack(raw, pos)
                pos += 8
                out.append(raw[pos : pos + length].decode("utf-8", errors="replace"))
                pos += length
            self._items, self._raw = out, None
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        return self._decoded()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __eq__(self, other: object) -> bool:
        items = other._decoded() if isinstance(other, LazyStrings) else other
        return self._decoded() == items

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LazyStrings({self._count} strings)"


class _Cursor:
    """Reads little-endian values from a buffer, every read checked against its end."""

    def __init__(self, buf: Any, size: int, source: str) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.source = source

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(
                f"{self.source}: truncated GGUF file: {what} at offset {self.pos} needs {n} bytes, "
                f"{max(self.remaining(), 0)} remain"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"{what} length")
        if length > self.remaining():
            raise FormatError(
                f"{self.source}: {what} at offset {self.pos - 8} claims {length} bytes, "
                f"only {self.remaining()} remain in the file"
            )
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise FormatError(f"{self.source}: {what} has unknown GGUF value type {vtype}")

    def array(self, what: str, depth: int) -> Any:
        if depth >= MAX_NESTING:
            raise FormatError(f"{self.source}: {what} nests arrays deeper than {MAX_NESTING}")
        item_type = self.scalar("<I", f"{what} item type")
        count = self.scalar("<Q", f"{what} length")
        if item_type in _SCALAR_DTYPES:
            dtype = np.dtype(_SCALAR_DTYPES[item_type])
            if count > self.remaining() // dtype.itemsize:
                raise FormatError(
                    f"{self.source}: {what} claims {count} items, more than the file holds"
                )
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return values.astype(bool) if item_type == _BOOL else values
        min_item = {_STRING: 8, _ARRAY: 12}.get(item_type)
        if min_item is None:
            raise FormatError(f"{self.source}: {what} has unknown GGUF item type {item_type}")
        if count > self.remaining() // min_item:
            raise FormatError(
                f"{self.source}: {what} claims {count} items, more than the file holds"
            )
        if item_type == _STRING:
            return self._strings(count, what)
        return [self.array(what, depth + 1) for _ in range(count)]

    def _strings(self, count: int, what: str) -> list[str] | LazyStrings:
        """`count` strings; a tight loop, since a vocabulary holds ~10^5 of them. Arrays of at
        least LAZY_STRINGS items are only walked (every length checked) and copied as bytes;
        they are decoded when first read (`LazyStrings`)."""
        buf, pos, size = self.buf, self.pos, self.size
        if count >= LAZY_STRINGS:
            unpack_length = struct.Struct("<Q").unpack_from
            start = pos
            for index in range(count):
                if pos + 8 > size:
                    raise FormatError(
                        f"{self.source}: truncated GGUF file inside {what} item {index}"
                    )
                (length,) = unpack_length(buf, pos)
                pos += 8
                if length > size - pos:
                    raise FormatError(
                        f"{self.source}: {what} item {index} claims {length} bytes, only "
                        f"{size - pos} remain in the file"
                    )
                pos += length
            self.pos = pos
            return LazyStrings(bytes(buf[start:pos]), count)
        unpack = struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        for index in range(count):
            if pos + 8 > size:
                raise FormatError(f"{self.source}: truncated GGUF file inside {what} item {index}")
            (length,) = unpack(buf, pos)
            pos += 8
            if length > size - pos:
                raise FormatError(
                    f"{self.source}: {what} item {index} claims {length} bytes, only "
                    f"{size - pos} remain in the file"
                )
            append(bytes(buf[pos : pos + length]).decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return out


def read_header(path: Path) -> GgufHeader:
    """Metadata and tensor infos of a GGUF file, without touching tensor data."""
    source = str(path)
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                raise FormatError(f"{source}: truncated GGUF file ({size} bytes, header needs 24)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_header(buf, size, source)
    except IsADirectoryError:
        raise FormatError(f"{source}: is a directory, expected a .gguf file") from None
    except OSError as error:
        raise FormatError(f"{source}: cannot read: {error.strerror or error}") from None


def read_header_size(data: bytes) -> int:
    """Where the tensor data of GGUF bytes starts (tests mutate only what comes before)."""
    return _parse_header(data, len(data), "<bytes>").data_offset


def _parse_header(buf: Any, size: int, source: str) -> GgufHeader:
    cursor = _Cursor(buf, size, source)
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise FormatError(f"{source}: wrong magic {magic!r}, expected b'GGUF'")
    cursor.pos = 4
    version = cursor.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedModelError(
            f"{source}: GGUF version {version} is not supported (only versions 2 and 3)"
        )
    tensor_count = cursor.scalar("<Q", "tensor count")
    kv_count = cursor.scalar("<Q", "metadata count")
    # Each key/value needs >= 13 bytes (key length, type, one byte); each tensor info >= 24.
    if kv_count > cursor.remaining() // 13:
        raise FormatError(
            f"{source}: header claims {kv_count} metadata entries, more than the file holds"
        )
    if tensor_count > cursor.remaining() // 24:
        raise FormatError(
            f"{source}: header claims {tensor_count} tensors, more than the file holds"
        )

    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = cursor.string(f"metadata key {index}")
        vtype = cursor.scalar("<I", f"type of {key!r}")
        if key in metadata:
            raise FormatError(f"{source}: duplicate metadata key {key!r}")
        metadata[key] = cursor.value(vtype, f"metadata {key!r}")

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for index in range(tensor_count):
        name = cursor.string(f"tensor {index} name")
        n_dims = cursor.scalar("<I", f"tensor {name!r} dim count")
        if n_dims > MAX_DIMS:
            raise FormatError(
                f"{source}: tensor {name!r} claims {n_dims} dimensions (max {MAX_DIMS})"
            )
        cursor.need(8 * n_dims, f"tensor {name!r} dims")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, cursor.pos)
        cursor.pos += 8 * n_dims
        raw_type = cursor.scalar("<I", f"tensor {name!r} type")
        offset = cursor.scalar("<Q", f"tensor {name!r} offset")
        infos.append((name, tuple(dims), raw_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{source}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cursor.pos // alignment) * alignment

    tensors: dict[str, GgufTensorInfo] = {}
    for name, dims, raw_type, offset in infos:
        if name in tensors:
            raise FormatError(f"{source}: duplicate tensor {name!r}")
        if offset % alignment:
            # llama.cpp (gguf_init_from_file) refuses this too: a shifted offset decodes the
            # neighbouring bytes as plausible garbage.
            raise FormatError(
                f"{source}: tensor {name!r} has data offset {offset}, not a multiple of the "
                f"alignment {alignment}"
            )
        tensors[name] = _tensor_info(source, size, data_offset, name, dims, raw_type, offset)
    check_no_overlap(((i.start, i.start + i.nbytes, n) for n, i in tensors.items()), source)
    return GgufHeader(version, metadata, tensors, data_offset)


def _tensor_info(
    source: str,
    size: int,
    data_offset: int,
    name: str,
    dims: tuple[int, ...],
    raw_type: int,
    offset: int,
) -> GgufTensorInfo:
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise UnsupportedModelError(
            f"{source}: tensor {name!r} has unknown GGML type {raw_type}"
        ) from None
    if qtype not in GGML_QUANT_SIZES:
        raise UnsupportedModelError(
            f"{source}: tensor {name!r} has unsupported GGML type {qtype.name}"
        )
    count = 1
    for dim in dims:
        count *= dim
        if count > MAX_ELEMENTS:
            raise FormatError(f"{source}: tensor {name!r} dims {list(dims)} are absurdly large")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    row_length = dims[0] if dims else 1  # a 0-d tensor is one value
    if row_length % block:
        raise FormatError(
            f"{source}: tensor {name!r} row length {row_length} is not a multiple of the "
            f"{qtype.name} block size {block}"
        )
    nbytes = count // block * block_bytes
    start = data_offset + offset
    if start + nbytes > size:
        raise FormatError(
            f"{source}: tensor {name!r} data [{start}, {start + nbytes}) lies past the end of "
            f"the file ({size} bytes)"
        )
    return GgufTensorInfo(name, dims, qtype, start, nbytes)


# ---------------------------------------------------------------------------------------------
# The model


class GgufWeightStore:
    """Canonical-name float32 tensors, dequantized from the memory-mapped file on request."""

    def __init__(
        self,
        path: Path,
        tensors: dict[str, GgufTensorInfo],
        permuted_heads: dict[str, int],
        shifted: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        self._tensors = tensors  # canonical name -> info
        self._permuted_heads = permuted_heads  # canonical name -> head count for unpermute
        self._shifted = shifted  # canonical names stored as 1 + w (Gemma norms)
        self._data: np.memmap | None = None

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

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
        start, stop = check_row_range(str(self.path), name, info.shape, start, stop)
        cols = info.shape[1]
        if info.qtype in _PLAIN_TYPES:
            row_nbytes = cols * np.dtype(_PLAIN_TYPES[info.qtype]).itemsize
        else:
            row_nbytes = ggml_row_nbytes(info.qtype, cols)
        if row_nbytes is None or name in self._permuted_heads or name in self._shifted:
            return self.get(name)[start:stop].copy()  # a copy: the whole tensor is freed
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
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingTensorError(f"{self.path}: missing tensor {name!r}") from None


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
        [int(t) for t in types]
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
    if config.architecture in _LLAMA_FAMILY:
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


# ---------------------------------------------------------------------------------------------
# Writer

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
        writer.add_context_length(2048)
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
            expert = _EXPERT_NAME.match(name)
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
                merged = {hf: gg for gg, hf in _MERGED_EXPERTS.items()}[proj]
                _add_tensor(writer, f"blk.{layer}.{merged}", values, dtype)
                if progress is not None:
                    progress(index + 1, len(names), name)
                continue
            values = hf_ordered(config, name, model.weights.get(name))  # [out, in] HF order
            if config.architecture in _LLAMA_FAMILY and name.endswith(
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
