"""Opening an APR file: its structure read and checked (offsets, alignment, overlaps, footer),
compressed payloads inflated within a bound, and the lazily decoding `AprWeightStore` behind
`open_apr`'s `Model`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import FormatError, UnsupportedModelError
from engine.fileio import loads_json, open_regular
from engine.formats.apr.codec import (
    INTEGER_KINDS,
    Codec,
    decode,
    resolve_codec,
    row_nbytes,
)
from engine.formats.apr.layout import (
    ALIGNMENT,
    FLAG_COLUMN_MAJOR,
    FLAG_ENCRYPTED,
    FLAG_LZ4,
    FLAG_ZSTD,
    HEADER_SIZE,
    AprHeader,
    AprIndexEntry,
    check_footer,
    parse_header,
    parse_index,
)
from engine.formats.apr.metadata import (
    config_from_metadata,
    tokenizer_from_metadata,
)
from engine.formats.common import (
    check_no_overlap,
    check_weights,
)
from engine.formats.gguf.names import gguf_to_hf_name
from engine.model import Model, WeightStoreBase, check_row_range

MAX_DECOMPRESSED_RATIO = 256  # LZ4's own worst case is ~255:1
MAX_DECOMPRESSED_FLOOR = 64 << 20  # what a tiny zstd file may still expand to


class AprWeightStore(WeightStoreBase):
    """Canonical-name float32 tensors from an APR buffer (memory map or decompressed bytes)."""

    def __init__(
        self,
        source: str,
        buf: np.ndarray,
        data_offset: int,
        entries: dict[str, tuple[AprIndexEntry, Codec]],
    ) -> None:
        self.source = source
        self._buf = buf
        self._data_offset = data_offset
        self._entries = entries

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
            return super().get_rows(name, start, stop)  # the whole tensor, sliced
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
        check_footer(path, size, source)
    return AprFile(header, metadata, entries, buf)


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


def _canonical_name(name: str) -> str:
    if name.startswith(("model.", "lm_head.")):
        return name
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    return gguf_to_hf_name(name) or name


def open_apr(path: Path) -> Model:
    """A lazily decoded `Model` from an APR v2 file."""
    source = str(path)
    apr = read_structure(path)
    entries: dict[str, tuple[AprIndexEntry, Codec]] = {}
    for entry in apr.entries:
        name = _canonical_name(entry.name)
        if name in entries:
            raise FormatError(f"{source}: tensor {name!r} appears twice in the index")
        codec = resolve_codec(entry, source)
        if codec.kind in INTEGER_KINDS:
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
