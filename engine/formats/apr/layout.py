"""APR v2 byte layout: the constants, header flags and dtype codes of §4.1-4.5, the 64-byte header
and the tensor index (packed, and parsed with every field bounds-checked), and the two CRC32s:
the header's own and the footer's over everything before it. Nothing here decodes a tensor or
interprets metadata (see the package docstring for the whole format).
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import FormatError, UnsupportedModelError
from engine.fileio import open_regular
from engine.formats.common import (
    MAX_ELEMENTS,
)

HEADER_SIZE = 64
ALIGNMENT = 64
MAGIC = b"APR\x00"
VERSION = (2, 0)
MAX_NAME_LEN = 256
MAX_NDIM = 8
MIN_INDEX_ENTRY = 2 + 1 + 1 + 8 + 8  # name_len, dtype, ndim, offset, size (empty name, no dims)

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
# Footer


_CRC_CHUNK = 1 << 20
"""Bytes read per step of the footer check (one buffer per thread, reused): memory stays flat
whatever the file's size, and the buffer stays in cache between the read and the sum. 16 MiB
buffers were slower: 127 vs 106 ms for SmolLM2's 138 MiB Q8_0 copy on one thread."""

PARALLEL_CRC_BYTES = 64 << 20
"""From this many bytes on the footer check is shared among engine.parallel's threads, which
claim the file's CRC_PART_BYTES parts one at a time (`crc32_combine` joins the parts' CRCs):
zlib's CRC32 runs at ~1-1.5 GB/s on one core, so a 7B APR file (~4-8 GB) held every command
that opened it for seconds. Measured on the 2-core machine, min of 7 (file in the page cache),
one thread → two fixed halves → claimed parts: SmolLM2's 138 MiB Q8_0 copy 127 → 65 → 51 ms,
a 1 GiB file 778 → 414 → 341 ms."""

CRC_PART_BYTES = 32 << 20
"""Bytes of one part of a large file's footer check: the unit the threads claim and the step
of its progress reports (engine.progress), 1% of a 4 GB file. Joining a part costs 6 us, the
shorter last one 0.13 ms (`crc32_combine` with the cached powers of the zero-byte operator)."""

_CRC32_POLYNOMIAL = 0xEDB88320
"""CRC-32's polynomial, bit-reversed (zlib's)."""


def _gf2_times(operator: list[int], vector: int) -> int:
    """A 32×32 matrix over GF(2) (its 32 columns as ints) times a 32-bit vector."""
    result, column = 0, 0
    while vector:
        if vector & 1:
            result ^= operator[column]
        vector >>= 1
        column += 1
    return result


def _gf2_squared(operator: list[int]) -> list[int]:
    """The operator applied twice."""
    return [_gf2_times(operator, column) for column in operator]


_ZERO_POWERS: list[list[int]] = []
"""_ZERO_POWERS[k]: the operator that carries a CRC through 2**k zero bytes, built on demand
(one squaring each) and kept: joining many parts of a file then costs one matrix-vector
product per set bit of a part's length, not 30-odd squarings per part."""

_ZERO_POWERS_LOCK = threading.Lock()


def _zero_power(k: int) -> list[int]:
    with _ZERO_POWERS_LOCK:  # two files checked at once (both sides of a bisect) share it
        if not _ZERO_POWERS:
            zero_bit = [_CRC32_POLYNOMIAL] + [1 << bit for bit in range(31)]  # by column
            _ZERO_POWERS.append(_gf2_squared(_gf2_squared(_gf2_squared(zero_bit))))  # 1 byte
        while len(_ZERO_POWERS) <= k:
            _ZERO_POWERS.append(_gf2_squared(_ZERO_POWERS[-1]))
        return _ZERO_POWERS[k]


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """`zlib.crc32(a + b)` from `zlib.crc32(a)`, `zlib.crc32(b)` and `len(b)`.

    CRC-32 is linear over GF(2): the CRC of a + b is the CRC of a carried through len(b) zero
    bytes, XOR the CRC of b (zlib's conditioning of both ends cancels). Carrying a CRC through
    zero bytes is a fixed 32×32 matrix; through len(b) bytes it is that matrix's power, the
    product of its cached powers of two (_ZERO_POWERS) for the set bits of len(b)."""
    k = 0
    while length_b:
        if length_b & 1:
            crc_a = _gf2_times(_zero_power(k), crc_a)
        length_b >>= 1
        k += 1
    return crc_a ^ crc_b


def _crc32_of_range(path: Path, start: int, stop: int, source: str) -> int:
    """zlib.crc32 of bytes [start, stop) of the file, read _CRC_CHUNK at a time on its own
    handle (zlib releases the GIL: threads sum their parts at once)."""
    crc = 0
    remaining = stop - start
    chunk = bytearray(min(_CRC_CHUNK, remaining) or 1)
    view = memoryview(chunk)
    try:
        with open_regular(path) as handle:
            handle.seek(start)
            while remaining:
                got = handle.readinto(view[: min(len(chunk), remaining)])
                if not got:
                    raise FormatError(f"{source}: the file shrank while it was read")
                crc = zlib.crc32(view[:got], crc)
                remaining -= got
    except OSError as error:
        raise FormatError(f"{source}: cannot read: {error.strerror or error}") from None
    return crc


def check_footer(path: Path, size: int, source: str) -> None:
    """The trailing CRC32 against every byte before it, read in chunks (about 1 s per GB on a
    core; a large file's parts on several at once, PARALLEL_CRC_BYTES).

    aprender does not check the footer, but without it a flipped byte in the tensor data or
    the index (which the header CRC does not cover) decodes as plausible garbage.
    """
    from engine.parallel import parallel_chunks
    from engine.progress import listener

    if size < HEADER_SIZE + 4:
        raise FormatError(f"{source}: truncated APR file ({size} bytes)")
    body = size - 4
    part = CRC_PART_BYTES if body >= PARALLEL_CRC_BYTES else max(body, 1)
    ranges = [(start, min(start + part, body)) for start in range(0, body, part)]  # file order
    crcs: dict[int, int] = {}
    report = listener() if len(ranges) > 1 else None  # the parts run on other threads too
    label = f"checking {path.name}"
    done = [0]
    done_lock = threading.Lock()

    def work(group: list[tuple[int, int]]) -> None:
        for start, stop in group:
            crcs[start] = _crc32_of_range(path, start, stop, source)
            if report is not None:
                with done_lock:
                    done[0] += stop - start
                    report(label, done[0], body)

    try:
        parallel_chunks(work, ranges)
    finally:
        if report is not None and done[0] < body:  # failed part-way: the step has ended
            report(label, body, body)
    crc = 0
    for start, stop in ranges:
        crc = crc32_combine(crc, crcs[start], stop - start)
    try:
        with open_regular(path) as handle:
            handle.seek(body)
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


def verify_footer(path: Path) -> None:
    """Check the trailing CRC32 of an uncompressed APR file against every byte before it
    (`read_structure` does this for every uncompressed file it opens)."""
    path = Path(path)
    check_footer(path, path.stat().st_size, str(path))
