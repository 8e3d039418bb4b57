"""How an APR index entry's bytes become float32 values: the codec its dtype code means (using
the entry's byte size where §4.5 gives one code two meanings), the decoding itself, and the
bytes of one row where rows can be sliced out of a tensor's data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import FormatError, UnsupportedModelError
from engine.formats.apr.layout import (
    DT_APR_Q4,
    DT_APR_Q8,
    DT_BF16,
    DT_F16,
    DT_F32,
    DT_F64_OR_Q4_1,
    DT_I8_OR_Q5_0,
    DT_I32,
    DT_I64,
    DT_LEGACY_Q4,
    DT_LEGACY_Q8,
    DT_U8_OR_Q5_1,
    AprIndexEntry,
)
from engine.formats.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType
from engine.formats.quant import (
    QK_K,
    apr_q4_nbytes,
    can_dequantize,
    dequantize_apr_q4,
    dequantize_apr_q8,
    dequantize_ggml,
    dequantize_k_rows_padded,
    ggml_row_nbytes,
)

# Codes aprender and realizar read differently (§4.5); the entry's byte size tells them apart.
_SIZE_DECIDES: dict[int, tuple[str, int, str, GGMLQuantizationType]] = {
    DT_F64_OR_Q4_1: ("f64", 8, "F64", GGMLQuantizationType.Q4_1),
    DT_I8_OR_Q5_0: ("i8", 1, "I8", GGMLQuantizationType.Q5_0),
    DT_U8_OR_Q5_1: ("u8", 1, "U8", GGMLQuantizationType.Q5_1),
}
_K_QUANT_CODES = {
    10: GGMLQuantizationType.Q2_K,
    11: GGMLQuantizationType.Q3_K,
    12: GGMLQuantizationType.Q4_K,
    13: GGMLQuantizationType.Q5_K,
    14: GGMLQuantizationType.Q6_K,
}


@dataclass(frozen=True)
class Codec:
    """How one index entry's bytes turn into float32 values."""

    kind: str
    qtype: GGMLQuantizationType | None = None


def resolve_codec(entry: AprIndexEntry, source: str) -> Codec:
    """The decoding of `entry`, using its size where §4.5 lists two meanings for one code."""
    n, size, code = entry.count, entry.size, entry.dtype

    def blocks(block: int, nbytes: int) -> int:
        return -(-n // block) * nbytes

    plain = {
        DT_F32: ("f32", 4),
        DT_F16: ("f16", 2),
        DT_BF16: ("bf16", 2),
        DT_I32: ("i32", 4),
        DT_I64: ("i64", 8),
    }
    if code in plain:
        kind, width = plain[code]
        return _expect(entry, source, Codec(kind), size == n * width, f"{n * width}")
    if code in _SIZE_DECIDES:  # aprender's plain type vs realizar's GGML block type
        kind, width, label, qtype = _SIZE_DECIDES[code]
        if size == n * width:
            return Codec(kind)
        return _expect_blocks(entry, source, qtype, alternative=f"{n * width} ({label})")
    if code == DT_LEGACY_Q4:  # AprTransformer: Q8_0 when the size says so, else APR Q4
        if size == blocks(32, 34):
            return _ggml(GGMLQuantizationType.Q8_0)
        return _expect(
            entry,
            source,
            Codec("apr_q4"),
            size == apr_q4_nbytes(n),
            f"{blocks(32, 34)} (Q8_0) or {apr_q4_nbytes(n)} (Q4)",
        )
    if code in (DT_LEGACY_Q8, DT_APR_Q8):
        return _expect(entry, source, Codec("apr_q8"), size == 4 + n, f"{4 + n}")
    if code == DT_APR_Q4:
        return _expect(
            entry, source, Codec("apr_q4"), size == apr_q4_nbytes(n), f"{apr_q4_nbytes(n)}"
        )
    if code in _K_QUANT_CODES and len(entry.shape) == 2 and entry.shape[1] % QK_K:
        qtype = _K_QUANT_CODES[code]
        rows, cols = entry.shape
        if size == rows * -(-cols // QK_K) * GGML_QUANT_SIZES[qtype][1]:
            return Codec("k_rows", qtype)  # APR's per-row padding (GH-202)
    try:
        qtype = GGMLQuantizationType(code)
    except ValueError:
        qtype = None
    if qtype is not None and qtype in GGML_QUANT_SIZES and code < 64:
        if not can_dequantize(qtype):
            raise UnsupportedModelError(
                f"{source}: tensor {entry.name!r} has dtype {code} (GGML {qtype.name}), which cannot "
                "be dequantized"
            )
        return _expect_blocks(entry, source, qtype)
    raise UnsupportedModelError(f"{source}: tensor {entry.name!r} has unknown dtype {code}")


def _expect_blocks(
    entry: AprIndexEntry, source: str, qtype: GGMLQuantizationType, alternative: str = ""
) -> Codec:
    """GGML blocks of `qtype` when the entry's size is whole blocks for its count, else an error
    naming the size expected (after `alternative`, the other reading of an ambiguous code)."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    wanted = -(-entry.count // block) * block_bytes
    text = f"{alternative} or {wanted} ({qtype.name})" if alternative else f"{wanted}"
    return _expect(entry, source, _ggml(qtype), entry.size == wanted, text)


def _ggml(qtype: GGMLQuantizationType) -> Codec:
    return Codec("ggml", qtype)


def _expect(entry: AprIndexEntry, source: str, codec: Codec, ok: bool, wanted: str) -> Codec:
    if not ok:
        raise FormatError(
            f"{source}: tensor {entry.name!r} (dtype {entry.dtype}, shape {list(entry.shape)}) is "
            f"{entry.size} bytes, expected {wanted}"
        )
    return codec


def decode(raw: np.ndarray, entry: AprIndexEntry, codec: Codec) -> np.ndarray:
    """float32 values of `entry` (row-major, its shape) from its bytes `raw` (uint8)."""
    n = entry.count
    kind = codec.kind
    views = {
        "f32": "<f4",
        "f16": "<f2",
        "f64": "<f8",
        "i32": "<i4",
        "i64": "<i8",
        "i8": "<i1",
        "u8": "<u1",
    }
    if kind in views:
        values = raw.view(views[kind]).astype(np.float32)
    elif kind == "bf16":
        values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif kind == "apr_q4":
        values = dequantize_apr_q4(raw, n)
    elif kind == "apr_q8":
        values = dequantize_apr_q8(raw, n)
    elif kind == "k_rows":
        return dequantize_k_rows_padded(raw, codec.qtype, *entry.shape)
    else:
        values = dequantize_ggml(raw, codec.qtype, n)
    return values.reshape(entry.shape)


INTEGER_KINDS = frozenset({"i32", "i64", "i8", "u8"})
"""Plain integer dtypes (§4.5): legal in APR, but never a weight of the models we trace."""

_PLAIN_WIDTHS = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i32": 4, "i64": 8, "i8": 1, "u8": 1}


def row_nbytes(codec: Codec, cols: int) -> int | None:
    """Bytes of one row of a row-major [rows, cols] tensor in `codec`, or None when rows cannot
    be sliced out of the bytes (quant blocks that straddle rows). APR Q8's rows follow its one
    4-byte tensor scale."""
    if codec.kind in _PLAIN_WIDTHS:
        return cols * _PLAIN_WIDTHS[codec.kind]
    if codec.kind == "apr_q8":
        return cols
    if codec.kind == "apr_q4":
        return apr_q4_nbytes(cols) if cols % 32 == 0 else None
    if codec.kind == "k_rows":  # per-row padded: ceil(cols / 256) whole blocks a row
        return -(-cols // QK_K) * GGML_QUANT_SIZES[codec.qtype][1]
    return ggml_row_nbytes(codec.qtype, cols)
