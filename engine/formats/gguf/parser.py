"""The GGUF header, parsed with `struct` over the bytes: the metadata key/values and the tensor
infos, every count, length and offset checked against what remains of the file, so a corrupt
file is a one-line `FormatError` and never a hang or a huge allocation. Tensor data is not read
here (see the package docstring).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import FormatError, UnsupportedModelError
from engine.fileio import open_regular
from engine.formats.common import (
    MAX_ELEMENTS,
    check_no_overlap,
)
from engine.formats.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

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

    def __init__(self, raw: bytes, starts: np.ndarray) -> None:
        self._raw: bytes | None = raw
        self._starts: np.ndarray | None = starts
        """[count] int64: where each string's length field begins in `raw`."""
        self._count = len(starts)
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            self._items = _decode_strings(self._raw, self._starts)
            self._raw = self._starts = None
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


SHOWN_NAME_CHARS = 60
"""Characters of a key or tensor name an error message quotes: a name whose length field lies
runs on into the bytes after it (2 KB of binary in one error line, seen); its start and its
length are what identify it."""


def shown_name(name: str) -> str:
    """`name` quoted for an error message, cut to SHOWN_NAME_CHARS with its length when longer."""
    if len(name) <= SHOWN_NAME_CHARS:
        return repr(name)
    return f"{name[:SHOWN_NAME_CHARS]!r}… ({len(name)} characters)"


def _decode_strings(raw: bytes, starts: np.ndarray) -> list[str]:
    """The length-prefixed strings (u64 length, UTF-8 bytes) of `raw`, whose length fields
    begin at `starts` (found and checked by the parse).

    Decoding 10^5 strings one by one costs ~0.1 s (a slice and a decode call each). Instead each
    8-byte length becomes one NUL separator, the whole array is decoded once and split on NUL:
    ~10 ms. Equal item for item to decoding each string alone with errors="replace" (a NUL is
    never part of a multi-byte sequence, so an invalid tail is cut where the string ends; tested
    on every short tail of invalid bytes). A vocabulary that holds a NUL inside a string is
    decoded one string at a time."""
    pos = len(raw)
    data = np.frombuffer(raw, dtype=np.uint8)
    length_bytes = (starts[:, None] + np.arange(1, 8)).reshape(-1)  # [count * 7]
    keep = np.ones(pos, dtype=bool)
    keep[length_bytes] = False  # the first byte of each length field stays: the separator
    keep[starts] = False
    if np.count_nonzero(data[keep] == 0):  # a NUL inside a string: one at a time
        unpack = struct.Struct("<Q").unpack_from
        return [
            raw[at + 8 : at + 8 + unpack(raw, at)[0]].decode("utf-8", errors="replace")
            for at in starts.tolist()
        ]
    separated = data.copy()
    separated[starts] = 0
    keep[starts] = True
    text = separated[keep].tobytes().decode("utf-8", errors="replace")
    return text.split("\x00")[1:]


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

    def _walk(self, offsets: list[int], what: str) -> int:
        """Walk len(offsets) length-prefixed strings from the cursor, every length checked
        against the bytes left: `offsets[i]` = where item i's length field begins; returns
        the end of the last item and moves the cursor there.

        The loop is the whole cost of opening a GGUF vocabulary (~10^5 items), so it does the
        least per item: one unpack and one comparison, the length field past the buffer's end
        raising struct.error; what exactly went wrong is worked out after the loop."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack_length = struct.Struct("<Q").unpack_from
        index = 0
        try:
            for index in range(len(offsets)):
                offsets[index] = pos
                pos += 8 + unpack_length(buf, pos)[0]
                if pos > size:
                    break
            else:
                self.pos = pos
                return pos
        except struct.error:
            pass  # the length field runs past the buffer
        field_end = offsets[index] + 8
        if field_end > size:
            raise FormatError(f"{self.source}: truncated GGUF file inside {what} item {index}")
        raise FormatError(
            f"{self.source}: {what} item {index} claims {pos - field_end} bytes, only "
            f"{size - field_end} remain in the file"
        )

    def _strings(self, count: int, what: str) -> list[str] | LazyStrings:
        """`count` strings, every length checked by one walk (`_walk`). Arrays of at least
        LAZY_STRINGS items (a vocabulary holds ~10^5) are only copied as bytes and decoded
        when first read (`LazyStrings`); shorter ones are decoded at once."""
        buf, start = self.buf, self.pos
        offsets = [0] * count
        end = self._walk(offsets, what)
        if count >= LAZY_STRINGS:
            starts = np.array(offsets, dtype=np.int64)  # [count]
            starts -= start
            return LazyStrings(bytes(buf[start:end]), starts)
        ends = [*offsets[1:], end]
        return [
            bytes(buf[at + 8 : stop]).decode("utf-8", errors="replace")
            for at, stop in zip(offsets, ends, strict=True)
        ]


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
        vtype = cursor.scalar("<I", f"type of {shown_name(key)}")
        if key in metadata:
            raise FormatError(f"{source}: duplicate metadata key {shown_name(key)}")
        metadata[key] = cursor.value(vtype, f"metadata {shown_name(key)}")

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for index in range(tensor_count):
        name = cursor.string(f"tensor {index} name")
        n_dims = cursor.scalar("<I", f"tensor {shown_name(name)} dim count")
        if n_dims > MAX_DIMS:
            raise FormatError(
                f"{source}: tensor {shown_name(name)} claims {n_dims} dimensions (max {MAX_DIMS})"
            )
        cursor.need(8 * n_dims, f"tensor {shown_name(name)} dims")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, cursor.pos)
        cursor.pos += 8 * n_dims
        raw_type = cursor.scalar("<I", f"tensor {shown_name(name)} type")
        offset = cursor.scalar("<Q", f"tensor {shown_name(name)} offset")
        infos.append((name, tuple(dims), raw_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{source}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cursor.pos // alignment) * alignment

    tensors: dict[str, GgufTensorInfo] = {}
    for name, dims, raw_type, offset in infos:
        if name in tensors:
            raise FormatError(f"{source}: duplicate tensor {shown_name(name)}")
        if offset % alignment:
            # llama.cpp (gguf_init_from_file) refuses this too: a shifted offset decodes the
            # neighbouring bytes as plausible garbage.
            raise FormatError(
                f"{source}: tensor {shown_name(name)} has data offset {offset}, not a multiple of the "
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
            f"{source}: tensor {shown_name(name)} has unknown GGML type {raw_type}"
        ) from None
    if qtype not in GGML_QUANT_SIZES:
        raise UnsupportedModelError(
            f"{source}: tensor {shown_name(name)} has unsupported GGML type {qtype.name}"
        )
    count = 1
    for dim in dims:
        count *= dim
        if count > MAX_ELEMENTS:
            raise FormatError(
                f"{source}: tensor {shown_name(name)} dims {list(dims)} are absurdly large"
            )
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    row_length = dims[0] if dims else 1  # a 0-d tensor is one value
    if row_length % block:
        raise FormatError(
            f"{source}: tensor {shown_name(name)} row length {row_length} is not a multiple of the "
            f"{qtype.name} block size {block}"
        )
    nbytes = count // block * block_bytes
    start = data_offset + offset
    if start + nbytes > size:
        raise FormatError(
            f"{source}: tensor {shown_name(name)} data [{start}, {start + nbytes}) lies past the end of "
            f"the file ({size} bytes)"
        )
    return GgufTensorInfo(name, dims, qtype, start, nbytes)
