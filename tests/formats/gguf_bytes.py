"""Hand assembly of GGUF bytes for bad-input tests, from the GGUF spec (struct only)."""

from __future__ import annotations

import struct

U32, I32, F32, BOOL, STRING, ARRAY, U64 = 4, 5, 6, 7, 8, 9, 10


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def kv_f32(key: str, value: float) -> bytes:
    return kv(key, F32, struct.pack("<f", value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, STRING, gstr(value))


def tensor_info(name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return (
        gstr(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def gguf_file(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes = b"",
    *,
    version: int = 3,
    tensor_count: int | None = None,
    kv_count: int | None = None,
    magic: bytes = b"GGUF",
) -> bytes:
    head = magic + struct.pack(
        "<IQQ",
        version,
        len(infos) if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count,
    )
    body = head + b"".join(kvs) + b"".join(infos)
    body += bytes(-len(body) % 32)
    return body + data


def tiny_llama_kvs(arch: str = "llama", hidden: int = 32, layers: int = 1) -> list[bytes]:
    return [
        kv_str("general.architecture", arch),
        kv_u32(f"{arch}.block_count", layers),
        kv_u32(f"{arch}.embedding_length", hidden),
        kv_u32(f"{arch}.feed_forward_length", 64),
        kv_u32(f"{arch}.attention.head_count", 2),
        kv_u32(f"{arch}.attention.head_count_kv", 1),
        kv_f32(f"{arch}.rope.freq_base", 10000.0),
        kv_f32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
    ]
