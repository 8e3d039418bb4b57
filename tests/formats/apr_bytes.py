"""Hand assembly of APR v2 bytes for tests, written from §4 directly (struct + zlib), so that
reader tests do not depend on our writer."""

from __future__ import annotations

import json
import struct
import zlib

ROW_MAJOR = 0x0400


def pad64(data: bytes) -> bytes:
    return data + bytes(-len(data) % 64)


def header(
    *,
    flags: int,
    tensor_count: int,
    metadata_size: int,
    index_offset: int,
    data_offset: int,
    metadata_offset: int = 64,
    magic: bytes = b"APR\x00",
    version: tuple[int, int] = (2, 0),
    crc: int | None = None,
) -> bytes:
    body = bytearray(64)
    body[0:4] = magic
    body[4], body[5] = version
    struct.pack_into("<H", body, 6, flags)
    struct.pack_into("<I", body, 8, tensor_count)
    struct.pack_into("<Q", body, 12, metadata_offset)
    struct.pack_into("<I", body, 20, metadata_size)
    struct.pack_into("<Q", body, 24, index_offset)
    struct.pack_into("<Q", body, 32, data_offset)
    checksum = zlib.crc32(bytes(body[0:40]) + bytes(body[44:64])) if crc is None else crc
    struct.pack_into("<I", body, 40, checksum)
    return bytes(body)


def index_entry(name: str, dtype: int, shape: tuple[int, ...], offset: int, size: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack("<H", len(raw))
        + raw
        + bytes([dtype, len(shape)])
        + b"".join(struct.pack("<Q", d) for d in shape)
        + struct.pack("<QQ", offset, size)
    )


def apr_file(
    metadata: dict | bytes,
    tensors: list[tuple[str, int, tuple[int, ...], bytes]],
    *,
    flags: int = ROW_MAJOR,
    data_order: list[int] | None = None,
    index_order: list[int] | None = None,
    footer: bool = True,
) -> bytes:
    """A complete APR v2 file. `data_order` lays the data out in another order than the index."""
    meta = (
        metadata
        if isinstance(metadata, bytes)
        else json.dumps(metadata, separators=(",", ":")).encode()
    )
    order = data_order if data_order is not None else list(range(len(tensors)))
    offsets: dict[int, int] = {}
    data = b""
    for i in order:
        offsets[i] = len(data)
        data += pad64(tensors[i][3])
    listed = (
        index_order
        if index_order is not None
        else sorted(range(len(tensors)), key=lambda i: tensors[i][0])
    )
    index = b"".join(
        index_entry(tensors[i][0], tensors[i][1], tensors[i][2], offsets[i], len(tensors[i][3]))
        for i in listed
    )
    index_offset = 64 + len(pad64(meta))
    data_offset = index_offset + len(pad64(index))
    head = header(
        flags=flags,
        tensor_count=len(tensors),
        metadata_size=len(meta),
        index_offset=index_offset,
        data_offset=data_offset,
    )
    body = head + pad64(meta) + pad64(index) + data
    return body + struct.pack("<I", zlib.crc32(body)) if footer else body
