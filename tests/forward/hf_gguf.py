"""HF transformers' own load of a real GGUF, without the minute gguf-py spends on its vocabulary.

`from_pretrained(gguf_file=...)` parses the file with gguf-py's `GGUFReader` twice (once for
the config, once for the weights), and that reader builds a numpy view per item of every
string array: Gemma 3's 262,144 tokens and their scores, types and merges took ~30 s a parse
on the development VM (67 s for the Gemma 3 fixture, of which 6 s dequantizing), SmolLM2's
49,152 tokens and 48,900 merges ~10 s. A model needs none of them: only the vocabulary's size.

So the oracle loads a copy of the file without the four tokenizer arrays, made here with no
engine code: the header with a smaller key count, every other key/value record copied byte for
byte, the tensor descriptions byte for byte, padding to the file's alignment, and the tensor
data byte for byte (tensor offsets count from the start of the data, so they stay right). The
vocabulary size, which transformers would otherwise take from the token list, is passed as
`vocab_size`. What HF dequantizes and how it reads every model key is unchanged; a copy made
wrong (a record boundary missed) fails to load, it cannot agree by accident.

The load also builds gguf-py's tensor name map once instead of once per module (14 s of a 25 s
SmolLM2 load), with the product's own memo (engine.sources.hf.gguf_name_maps_built_once): it
caches a gguf-py function of two arguments and computes nothing itself.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from engine.sources.hf import gguf_name_maps_built_once

VOCABULARY_ARRAYS = frozenset(
    {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}
    | {"tokenizer.ggml.merges"}
)
"""The key/value records left out of the copy: the per-token arrays (and BPE merges)."""

_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Byte sizes of GGUF's fixed-width value types (uint8 … float64, by type code)."""
_STRING, _ARRAY = 8, 9


class _Reader:
    """Sequential little-endian reads from a file's bytes."""

    def __init__(self, data: bytes | memoryview, offset: int) -> None:
        self.data, self.offset = data, offset

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def skip_value(self, kind: int) -> int:
        """Skip one value of type `kind`; return the item count when it is an array."""
        if kind in _FIXED_SIZES:
            self.offset += _FIXED_SIZES[kind]
            return 0
        if kind == _STRING:
            length = self.take("<Q")
            self.offset += length
            return 0
        if kind != _ARRAY:
            raise ValueError(f"GGUF value type {kind} at byte {self.offset}")
        item_kind, count = self.take("<I"), self.take("<Q")
        if item_kind in _FIXED_SIZES:
            self.offset += _FIXED_SIZES[item_kind] * count
        else:
            for _ in range(count):
                self.skip_value(item_kind)
        return count


def write_without_vocabulary(source: Path, target: Path) -> int:
    """Write `source` to `target` without VOCABULARY_ARRAYS; return the vocabulary size (the
    length of `tokenizer.ggml.tokens`)."""
    with source.open("rb") as handle:
        head = handle.read(1 << 26)  # the key/values and tensor descriptions (SmolLM2: 2 MiB)
    magic, version = head[:4], struct.unpack_from("<I", head, 4)[0]
    if magic != b"GGUF" or version != 3:
        raise ValueError(f"{source}: not a GGUF v3 file")
    reader = _Reader(memoryview(head), offset=8)  # after the magic and the version
    tensor_count, kv_count = reader.take("<Q"), reader.take("<Q")
    kept: list[bytes] = []
    vocabulary_size, alignment = 0, 32
    for _ in range(kv_count):
        start = reader.offset
        key_length = reader.take("<Q")
        key = bytes(head[reader.offset : reader.offset + key_length]).decode()
        reader.offset += key_length
        kind = reader.take("<I")
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", head, reader.offset)[0]
        count = reader.skip_value(kind)
        if key == "tokenizer.ggml.tokens":
            vocabulary_size = count
        if key not in VOCABULARY_ARRAYS:
            kept.append(bytes(head[start : reader.offset]))
    infos_start = reader.offset
    for _ in range(tensor_count):
        name_length = reader.take("<Q")
        reader.offset += name_length
        n_dims = reader.take("<I")
        reader.offset += 8 * n_dims + 4 + 8  # dims, type, offset
    infos = bytes(head[infos_start : reader.offset])
    data_start = -(-reader.offset // alignment) * alignment
    header = struct.pack("<4sIQQ", b"GGUF", 3, tensor_count, len(kept)) + b"".join(kept) + infos
    with source.open("rb") as handle, target.open("wb") as out:
        out.write(header + b"\0" * (-len(header) % alignment))
        handle.seek(data_start)
        shutil.copyfileobj(handle, out, 1 << 24)
    return vocabulary_size


def hf_model_from_gguf(gguf_path: Path, scratch: Path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` of the GGUF's weights (float32, eager attention
    unless `kwargs` say otherwise), through a copy without the vocabulary in `scratch`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    copy = scratch / gguf_path.name
    vocab_size = write_without_vocabulary(gguf_path, copy)
    options = dict(dtype=torch.float32, attn_implementation="eager", vocab_size=vocab_size)
    # transformers warns that it found no token list to size the vocabulary by: vocab_size is
    # given, so the warning says nothing here (errors still raise).
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        # gguf-py's tensor name map built once, not once per module (engine.sources.hf)
        with gguf_name_maps_built_once():
            return AutoModelForCausalLM.from_pretrained(
                str(scratch), gguf_file=copy.name, **{**options, **kwargs}
            )
    finally:
        transformers_logging.set_verbosity(verbosity)
