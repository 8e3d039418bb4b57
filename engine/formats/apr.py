"""APR v2 `.apr` model files (aprender / realizar), read and written per §4 of the format notes.

Layout (§4.1): a 64-byte header, JSON metadata padded to 64, a variable-length tensor index
padded to 64, tensor data (each tensor padded to 64), and a CRC32 footer over everything before
it. The header carries its own CRC32 (bytes 0..40 and 44..64), which the reader checks; the
footer CRC of an uncompressed file is checked at open too (aprender does not), reading the file
once in 16 MiB chunks (about 1 s per GB here), because nothing else covers the index and the
tensor bytes: without it a flipped byte decodes as plausible garbage and the trace exits 0.

Reading is lazy: the header, metadata and index are parsed at open, every offset and size
checked against the file, every tensor start checked to be 64-aligned and no two tensors allowed
to share bytes (as llama.cpp does for GGUF); tensor bytes stay in a memory map until
`get(name)`. Plain integer dtypes are legal APR but never weights, and are refused. Data is located
by each index entry's offset, never by index order (the streaming writer sorts only the index).
Compressed files (§4.7: LZ4 size-prepended block or a zstd frame after the header) are
decompressed into memory at open, capped so a corrupt size cannot demand more than a bounded
multiple of the file.

Writing follows the in-memory aprender writer: tensors sorted by name, data in that order,
metadata keys only in their canonical spelling (never next to an alias, which would make
realizar drop all metadata), and the tokenizer embedded as `tokenizer.vocabulary` +
`tokenizer.merges`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.errors import FormatError, MissingTensorError, UnsupportedModelError, path_text
from engine.fileio import atomic_output, loads_json, open_regular
from engine.formats.common import (
    GEMMA_FAMILY,
    HF_ARCHITECTURE_CLASS,
    HF_MODEL_TYPE,
    MAX_ELEMENTS,
    check_dims,
    check_no_overlap,
    check_weights,
    check_write_dtype,
    family_steps,
    float_field,
    gemma_layer_steps,
    int_field,
    is_supported_moe,
    moe_steps,
    normalize_architecture,
    stored_tensor_names,
)
from engine.formats.gguf import gguf_to_hf_name
from engine.formats.quant import (
    QK_K,
    apr_q4_nbytes,
    can_dequantize,
    dequantize_apr_q4,
    dequantize_apr_q8,
    dequantize_ggml,
    dequantize_k_rows_padded,
    ggml_row_nbytes,
    quantize_apr_q4,
    quantize_apr_q8,
    quantize_ggml,
    quantize_k_rows_padded,
)
from engine.model import Model, ModelConfig, check_row_range
from engine.tokenizer import (
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    BpeTokenizer,
)

HEADER_SIZE = 64
ALIGNMENT = 64
MAGIC = b"APR\x00"
VERSION = (2, 0)
MAX_NAME_LEN = 256
MAX_NDIM = 8
MIN_INDEX_ENTRY = 2 + 1 + 1 + 8 + 8  # name_len, dtype, ndim, offset, size (empty name, no dims)
MAX_DECOMPRESSED_RATIO = 256  # LZ4's own worst case is ~255:1
MAX_DECOMPRESSED_FLOOR = 64 << 20  # what a tiny zstd file may still expand to

# Header flags (§4.2).
FLAG_LZ4 = 0x0001
FLAG_ZSTD = 0x0002
FLAG_ENCRYPTED = 0x0004
FLAG_SIGNED = 0x0008
FLAG_SHARDED = 0x0010
FLAG_QUANTIZED = 0x0020
FLAG_HAS_VOCAB = 0x0200
FLAG_ROW_MAJOR = 0x0400
FLAG_COLUMN_MAJOR = 0x0800

# dtype codes (§4.5).
DT_F32, DT_F16, DT_Q4_0, DT_F64_OR_Q4_1, DT_I32, DT_I64 = 0, 1, 2, 3, 4, 5
DT_I8_OR_Q5_0, DT_U8_OR_Q5_1, DT_LEGACY_Q4, DT_LEGACY_Q8 = 6, 7, 8, 9
DT_Q4_K, DT_Q6_K, DT_BF16, DT_APR_Q4, DT_APR_Q8 = 12, 14, 30, 128, 129
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


def align64(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def header_crc(header: bytes) -> int:
    """CRC32 (zlib) of header bytes 0..40 and 44..64: everything but the checksum field."""
    return zlib.crc32(header[0:40] + header[44:64]) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Header and index


@dataclass(frozen=True)
class AprHeader:
    flags: int
    tensor_count: int
    metadata_offset: int
    metadata_size: int
    tensor_index_offset: int
    data_offset: int
    checksum: int
    version: tuple[int, int]


@dataclass(frozen=True)
class AprIndexEntry:
    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    """Relative to the header's data_offset."""
    size: int

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def pack_header(
    *,
    flags: int,
    tensor_count: int,
    metadata_size: int,
    tensor_index_offset: int,
    data_offset: int,
    metadata_offset: int = HEADER_SIZE,
) -> bytes:
    """The 64-byte header with its CRC filled in."""
    body = bytearray(HEADER_SIZE)
    body[0:4] = MAGIC
    body[4], body[5] = VERSION
    struct.pack_into(
        "<HIQIQQ",
        body,
        6,
        flags,
        tensor_count,
        metadata_offset,
        metadata_size,
        tensor_index_offset,
        data_offset,
    )
    struct.pack_into("<I", body, 40, header_crc(bytes(body)))
    return bytes(body)


def parse_header(raw: bytes, source: str) -> AprHeader:
    """Check magic, version and CRC of the first 64 bytes; no offsets are trusted yet."""
    if len(raw) < HEADER_SIZE:
        raise FormatError(f"{source}: truncated APR file ({len(raw)} bytes, header needs 64)")
    magic = raw[0:4]
    if magic[0:3] != b"APR":
        raise FormatError(f"{source}: wrong magic {magic!r}, expected b'APR\\x00'")
    if magic[3:4] == b"1":
        raise UnsupportedModelError(
            f"{source}: APR1 (v1 layout) files are not supported, only APR v2"
        )
    if magic[3:4] not in (b"\x00", b"2"):
        raise FormatError(f"{source}: wrong magic {magic!r}, expected b'APR\\x00'")
    if raw[4] != 2:
        raise UnsupportedModelError(
            f"{source}: APR format version {raw[4]}.{raw[5]} is not supported (only 2.x)"
        )
    flags, count, meta_off, meta_size, index_off, data_off = struct.unpack_from("<HIQIQQ", raw, 6)
    (stored,) = struct.unpack_from("<I", raw, 40)
    computed = header_crc(raw[:HEADER_SIZE])
    if stored != computed:
        raise FormatError(
            f"{source}: APR header CRC mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"
        )
    return AprHeader(
        flags, count, meta_off, meta_size, index_off, data_off, stored, (raw[4], raw[5])
    )


def pack_index_entry(entry: AprIndexEntry) -> bytes:
    name = entry.name.encode("utf-8")
    return (
        struct.pack("<H", len(name))
        + name
        + struct.pack("<BB", entry.dtype, len(entry.shape))
        + struct.pack(f"<{len(entry.shape)}Q", *entry.shape)
        + struct.pack("<QQ", entry.offset, entry.size)
    )


def parse_index(buf: Any, start: int, end: int, count: int, source: str) -> list[AprIndexEntry]:
    """`count` entries from `buf[start:end]`, each bounds-checked."""
    if count > (end - start) // MIN_INDEX_ENTRY:
        raise FormatError(
            f"{source}: header claims {count} tensors, but the index holds {end - start} bytes"
        )
    entries: list[AprIndexEntry] = []
    pos = start
    for index in range(count):
        if pos + 2 > end:
            raise FormatError(f"{source}: tensor index truncated at entry {index} (offset {pos})")
        (name_len,) = struct.unpack_from("<H", buf, pos)
        if pos + 2 + name_len + 18 > end:
            raise FormatError(
                f"{source}: tensor index entry {index} (name length {name_len}) runs past the index end"
            )
        name = bytes(buf[pos + 2 : pos + 2 + name_len]).decode("utf-8", errors="replace")
        pos += 2 + name_len
        dtype, ndim = struct.unpack_from("<BB", buf, pos)
        pos += 2
        if ndim > MAX_NDIM:
            raise FormatError(
                f"{source}: tensor {name!r} claims {ndim} dimensions (max {MAX_NDIM})"
            )
        if pos + 8 * ndim + 16 > end:
            raise FormatError(f"{source}: tensor index entry {name!r} runs past the index end")
        shape = struct.unpack_from(f"<{ndim}Q", buf, pos)
        pos += 8 * ndim
        offset, size = struct.unpack_from("<QQ", buf, pos)
        pos += 16
        elements = 1
        for dim in shape:
            elements *= dim
            if elements > MAX_ELEMENTS:
                raise FormatError(
                    f"{source}: tensor {name!r} shape {list(shape)} is absurdly large"
                )
        entries.append(AprIndexEntry(name, dtype, tuple(shape), offset, size))
    return entries


# ---------------------------------------------------------------------------------------------
# dtype decoding


@dataclass(frozen=True)
class _Codec:
    """How one index entry's bytes turn into float32 values."""

    kind: str
    qtype: GGMLQuantizationType | None = None


def resolve_codec(entry: AprIndexEntry, source: str) -> _Codec:
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
        return _expect(entry, source, _Codec(kind), size == n * width, f"{n * width}")
    if code in _SIZE_DECIDES:  # aprender's plain type vs realizar's GGML block type
        kind, width, label, qtype = _SIZE_DECIDES[code]
        if size == n * width:
            return _Codec(kind)
        return _expect_blocks(entry, source, qtype, alternative=f"{n * width} ({label})")
    if code == DT_LEGACY_Q4:  # AprTransformer: Q8_0 when the size says so, else APR Q4
        if size == blocks(32, 34):
            return _ggml(GGMLQuantizationType.Q8_0)
        return _expect(
            entry,
            source,
            _Codec("apr_q4"),
            size == apr_q4_nbytes(n),
            f"{blocks(32, 34)} (Q8_0) or {apr_q4_nbytes(n)} (Q4)",
        )
    if code in (DT_LEGACY_Q8, DT_APR_Q8):
        return _expect(entry, source, _Codec("apr_q8"), size == 4 + n, f"{4 + n}")
    if code == DT_APR_Q4:
        return _expect(
            entry, source, _Codec("apr_q4"), size == apr_q4_nbytes(n), f"{apr_q4_nbytes(n)}"
        )
    if code in _K_QUANT_CODES and len(entry.shape) == 2 and entry.shape[1] % QK_K:
        qtype = _K_QUANT_CODES[code]
        rows, cols = entry.shape
        if size == rows * -(-cols // QK_K) * GGML_QUANT_SIZES[qtype][1]:
            return _Codec("k_rows", qtype)  # APR's per-row padding (GH-202)
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
) -> _Codec:
    """GGML blocks of `qtype` when the entry's size is whole blocks for its count, else an error
    naming the size expected (after `alternative`, the other reading of an ambiguous code)."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    wanted = -(-entry.count // block) * block_bytes
    text = f"{alternative} or {wanted} ({qtype.name})" if alternative else f"{wanted}"
    return _expect(entry, source, _ggml(qtype), entry.size == wanted, text)


def _ggml(qtype: GGMLQuantizationType) -> _Codec:
    return _Codec("ggml", qtype)


def _expect(entry: AprIndexEntry, source: str, codec: _Codec, ok: bool, wanted: str) -> _Codec:
    if not ok:
        raise FormatError(
            f"{source}: tensor {entry.name!r} (dtype {entry.dtype}, shape {list(entry.shape)}) is "
            f"{entry.size} bytes, expected {wanted}"
        )
    return codec


def decode(raw: np.ndarray, entry: AprIndexEntry, codec: _Codec) -> np.ndarray:
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


_INTEGER_KINDS = frozenset({"i32", "i64", "i8", "u8"})
"""Plain integer dtypes (§4.5): legal in APR, but never a weight of the models we trace."""

_PLAIN_WIDTHS = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i32": 4, "i64": 8, "i8": 1, "u8": 1}


def row_nbytes(codec: _Codec, cols: int) -> int | None:
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


# ---------------------------------------------------------------------------------------------
# Reader


class AprWeightStore:
    """Canonical-name float32 tensors from an APR buffer (memory map or decompressed bytes)."""

    def __init__(
        self,
        source: str,
        buf: np.ndarray,
        data_offset: int,
        entries: dict[str, tuple[AprIndexEntry, _Codec]],
    ) -> None:
        self.source = source
        self._buf = buf
        self._data_offset = data_offset
        self._entries = entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def has(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[0].shape

    def dtype_code(self, name: str) -> int:
        return self._entry(name)[0].dtype

    def get(self, name: str) -> np.ndarray:
        entry, codec = self._entry(name)
        if self._buf is None:
            raise FormatError(f"{self.source}: the model is closed")
        start = self._data_offset + entry.offset
        raw = self._buf[start : start + entry.size]  # [size] uint8 view
        return np.ascontiguousarray(decode(raw, entry, codec), dtype=np.float32)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor, decoding only their bytes (see `row_nbytes`);
        `get(name)[start:stop]` where the codec's blocks straddle rows."""
        entry, codec = self._entry(name)
        start, stop = check_row_range(self.source, name, entry.shape, start, stop)
        cols = entry.shape[1]
        width = row_nbytes(codec, cols)
        if width is None:
            return self.get(name)[start:stop].copy()  # a copy: the whole tensor is freed
        if self._buf is None:
            raise FormatError(f"{self.source}: the model is closed")
        base = self._data_offset + entry.offset
        head = 4 if codec.kind == "apr_q8" else 0  # APR Q8: the tensor's f32 scale
        first = base + head + start * width
        raw = self._buf[first : first + (stop - start) * width]  # [rows' bytes] uint8 view
        if head:
            raw = np.concatenate([self._buf[base : base + head], raw])  # scale + rows
        rows = replace(entry, shape=(stop - start, cols), size=raw.size)
        return np.ascontiguousarray(decode(raw, rows, codec), dtype=np.float32)

    def close(self) -> None:
        self._buf = None

    def _entry(self, name: str) -> tuple[AprIndexEntry, _Codec]:
        try:
            return self._entries[name]
        except KeyError:
            raise MissingTensorError(f"{self.source}: missing tensor {name!r}") from None


@dataclass
class AprFile:
    """The parsed structure of an APR file (tests and tools inspect it)."""

    header: AprHeader
    metadata: dict[str, Any]
    entries: list[AprIndexEntry]
    buf: np.ndarray
    """uint8 view of the (decompressed) file."""


def read_structure(path: Path) -> AprFile:
    """Header, metadata and index of an APR file, every offset checked; data untouched."""
    source = str(path)
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(HEADER_SIZE)
    except IsADirectoryError:
        raise FormatError(f"{source}: is a directory, expected an .apr file") from None
    except OSError as error:
        raise FormatError(f"{source}: cannot read: {error.strerror or error}") from None
    header = parse_header(head, source)
    if header.flags & FLAG_ENCRYPTED:
        raise UnsupportedModelError(f"{source}: encrypted .apr files are not supported")
    if header.flags & FLAG_COLUMN_MAJOR:
        raise UnsupportedModelError(f"{source}: column-major .apr files are not supported")
    if header.flags & (FLAG_LZ4 | FLAG_ZSTD):
        buf = _decompress(path, head, header.flags, size, source)
    else:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    total = buf.shape[0]

    meta_end = header.metadata_offset + header.metadata_size
    if header.metadata_offset < HEADER_SIZE or meta_end > total:
        raise FormatError(
            f"{source}: metadata [{header.metadata_offset}, {meta_end}) lies outside the file ({total} bytes)"
        )
    if not (meta_end <= header.tensor_index_offset <= header.data_offset <= total):
        raise FormatError(
            f"{source}: tensor index offset {header.tensor_index_offset} and data offset "
            f"{header.data_offset} are out of order or past the end of the file ({total} bytes)"
        )
    try:
        metadata = loads_json(bytes(buf[header.metadata_offset : meta_end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{source}: APR metadata is not valid JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise FormatError(f"{source}: APR metadata is not a JSON object")
    entries = parse_index(
        buf, header.tensor_index_offset, header.data_offset, header.tensor_count, source
    )
    data_size = total - header.data_offset
    if not header.flags & (FLAG_LZ4 | FLAG_ZSTD):
        data_size = max(0, data_size - 4)  # the footer CRC is not tensor data
    for entry in entries:
        if entry.offset > data_size or entry.size > data_size - entry.offset:
            raise FormatError(
                f"{source}: tensor {entry.name!r} data [{entry.offset}, {entry.offset + entry.size}) "
                f"lies past the end of the data section ({data_size} bytes)"
            )
        if entry.offset % ALIGNMENT:
            raise FormatError(
                f"{source}: tensor {entry.name!r} data offset {entry.offset} is not a multiple of "
                f"{ALIGNMENT} (APR aligns every tensor)"
            )
    check_no_overlap(((e.offset, e.offset + e.size, e.name) for e in entries), source)
    if not header.flags & (FLAG_LZ4 | FLAG_ZSTD):
        _check_footer(path, size, source)
    return AprFile(header, metadata, entries, buf)


_CRC_CHUNK = 16 << 20
"""Bytes read per step of the footer check: memory stays flat whatever the file's size."""


def _check_footer(path: Path, size: int, source: str) -> None:
    """The trailing CRC32 against every byte before it, read in chunks (about 1 s per GB).

    aprender does not check the footer, but without it a flipped byte in the tensor data or
    the index (which the header CRC does not cover) decodes as plausible garbage.
    """
    if size < HEADER_SIZE + 4:
        raise FormatError(f"{source}: truncated APR file ({size} bytes)")
    crc = 0
    remaining = size - 4
    chunk = bytearray(min(_CRC_CHUNK, remaining) or 1)
    view = memoryview(chunk)
    try:
        with open_regular(path) as handle:
            while remaining:
                got = handle.readinto(view[: min(len(chunk), remaining)])
                if not got:
                    raise FormatError(f"{source}: the file shrank while it was read")
                crc = zlib.crc32(view[:got], crc)
                remaining -= got
            stored_bytes = handle.read(4)
    except OSError as error:
        raise FormatError(f"{source}: cannot read: {error.strerror or error}") from None
    if len(stored_bytes) != 4:
        raise FormatError(f"{source}: the file shrank while it was read")
    (stored,) = struct.unpack("<I", stored_bytes)
    if stored != crc & 0xFFFFFFFF:
        raise FormatError(
            f"{source}: APR footer CRC mismatch (stored 0x{stored:08x}, computed "
            f"0x{crc & 0xFFFFFFFF:08x}): the file is corrupt or was cut short"
        )


def _decompress(path: Path, head: bytes, flags: int, size: int, source: str) -> np.ndarray:
    """Header + decompressed payload (§4.7).

    LZ4 blocks expand at most ~255:1, so a declared size beyond that is corrupt and is refused
    before anything is allocated. zstd (whose frames can expand far more) is streamed in 1 MiB
    chunks straight into the result, so memory grows only with real output, up to
    max(64 MiB, 256 x the file): a 32 KiB zstd bomb is refused at 64 MiB, not after 1 GiB.
    """
    payload = memoryview(path.read_bytes())[HEADER_SIZE:]
    kind = "LZ4" if flags & FLAG_LZ4 else "zstd"
    try:
        if flags & FLAG_LZ4:
            import lz4.block

            if len(payload) < 4:
                raise FormatError(f"{source}: truncated LZ4 payload ({len(payload)} bytes)")
            (declared,) = struct.unpack_from("<I", payload, 0)
            limit = 255 * (len(payload) - 4) + 64
            if declared > limit:
                raise FormatError(
                    f"{source}: LZ4 payload claims {declared} bytes, more than "
                    f"{len(payload) - 4} compressed bytes can hold"
                )
            buf = bytearray(head)
            buf += lz4.block.decompress(payload[4:], uncompressed_size=declared)
        else:
            import zstandard

            limit = max(MAX_DECOMPRESSED_FLOOR, size * MAX_DECOMPRESSED_RATIO)
            buf = bytearray(head)
            with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
                while chunk := reader.read(1 << 20):
                    if len(buf) - HEADER_SIZE + len(chunk) > limit:
                        raise FormatError(
                            f"{source}: zstd payload decompresses beyond {limit} bytes"
                        )
                    buf += chunk
    except FormatError:
        raise
    except ImportError as error:
        raise UnsupportedModelError(
            f"{source}: compressed .apr needs the Python package {error.name!r}"
        ) from None
    except Exception as error:  # lz4 / zstandard raise their own error types on corrupt data
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FormatError(f"{source}: corrupt {kind} payload: {detail}") from None
    decompressed = np.frombuffer(buf, dtype=np.uint8)  # no copy
    decompressed.flags.writeable = False
    return decompressed


def verify_footer(path: Path) -> None:
    """Check the trailing CRC32 of an uncompressed APR file against every byte before it
    (`read_structure` does this for every uncompressed file it opens)."""
    path = Path(path)
    _check_footer(path, path.stat().st_size, str(path))


def _canonical_name(name: str) -> str:
    if name.startswith(("model.", "lm_head.")):
        return name
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    return gguf_to_hf_name(name) or name


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


def tokenizer_from_metadata(meta: dict[str, Any], source: str) -> BpeTokenizer:
    """The embedded tokenizer: BPE from `tokenizer.vocabulary` + `tokenizer.merges` (realizar needs
    both), or SentencePiece from `tokenizer.vocabulary` + `tokenizer.scores`."""
    from engine.errors import TokenizerError

    vocabulary = meta.get("tokenizer.vocabulary")
    merges = meta.get("tokenizer.merges")
    scores = meta.get("tokenizer.scores")
    if vocabulary is None:
        raise TokenizerError("the metadata has no tokenizer.vocabulary")
    if not (isinstance(vocabulary, list) and all(isinstance(t, str) for t in vocabulary)):
        raise TokenizerError("tokenizer.vocabulary is not a list of strings")
    spm = merges is None and scores is not None
    if merges is None and not spm:
        raise TokenizerError(
            "the metadata has tokenizer.vocabulary but neither tokenizer.merges nor tokenizer.scores"
        )
    if not spm and not (isinstance(merges, list) and all(isinstance(m, str) for m in merges)):
        raise TokenizerError("tokenizer.merges is not a list of strings")
    if spm and not (
        isinstance(scores, list)
        and len(scores) == len(vocabulary)
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in scores)
    ):
        raise TokenizerError("tokenizer.scores is not one number per vocabulary entry")
    types = meta.get("tokenizer.token_type")
    if (
        isinstance(types, list)
        and len(types) == len(vocabulary)
        and all(isinstance(t, int) for t in types)
    ):
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


def open_apr(path: Path) -> Model:
    """A lazily decoded `Model` from an APR v2 file."""
    source = str(path)
    apr = read_structure(path)
    entries: dict[str, tuple[AprIndexEntry, _Codec]] = {}
    for entry in apr.entries:
        name = _canonical_name(entry.name)
        if name in entries:
            raise FormatError(f"{source}: tensor {name!r} appears twice in the index")
        codec = resolve_codec(entry, source)
        if codec.kind in _INTEGER_KINDS:
            # Integers are never weights: decoding them as floats gives plausible garbage.
            raise UnsupportedModelError(
                f"{source}: tensor {entry.name!r} has integer dtype {codec.kind} "
                f"(code {entry.dtype}); weights must be floating point or quantized"
            )
        entries[name] = (entry, codec)
    config = config_from_metadata(apr.metadata, set(entries), source)
    weights = AprWeightStore(source, apr.buf, apr.header.data_offset, entries)
    check_weights(config, weights, source)
    metadata: dict[str, Any] = {
        key: apr.metadata[key]
        for key in (
            "name",
            "model_type",
            "architecture",
            "source",
            "original_format",
            "quantization",
        )
        if key in apr.metadata
    }
    metadata["flags"] = apr.header.flags
    metadata["dtypes"] = sorted({entry.dtype for entry, _ in entries.values()})
    tokenizer = None
    try:
        tokenizer = tokenizer_from_metadata(apr.metadata, source)
    except Exception as error:  # the weights are still usable with --tokens
        metadata["tokenizer_error"] = str(error).splitlines()[0]
    return Model(
        path=path,
        format="apr",
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        metadata=metadata,
    )


# ---------------------------------------------------------------------------------------------
# Writer


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
            "max_position_embeddings": 2048,
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
