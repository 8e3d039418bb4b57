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

The package, one job a module: `parser` (the header), `names` (GGUF and HF tensors), `metadata`
(config and tokenizer from the metadata), `reader` (`GgufWeightStore`, `open_gguf`) and `writer`
(`write`). The reader never imports the writer.
"""

from __future__ import annotations

from engine.formats.gguf.metadata import (
    GEMMA_27B_LAYERS,
    MOE_NORM_DEFAULT,
    config_from_metadata,
    tokenizer_from_metadata,
)
from engine.formats.gguf.names import (
    EXPERT_NAME,
    GEMMA_NORM_SHIFT,
    LLAMA_FAMILY,
    MERGED_EXPERTS,
    expert_slices,
    gguf_to_hf_name,
    hf_to_gguf_name,
)
from engine.formats.gguf.parser import (
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    LAZY_STRINGS,
    MAX_DIMS,
    MAX_NESTING,
    SUPPORTED_VERSIONS,
    GgufHeader,
    GgufTensorInfo,
    LazyStrings,
    read_header,
    read_header_size,
)
from engine.formats.gguf.reader import (
    GgufWeightStore,
    open_gguf,
)
from engine.formats.gguf.writer import (
    WRITE_DTYPES,
    tensor_storage_type,
    with_config,
    write,
)
from engine.formats.row_order import permute_rows, unpermute_rows

__all__ = [
    "MOE_NORM_DEFAULT",
    "GEMMA_27B_LAYERS",
    "config_from_metadata",
    "tokenizer_from_metadata",
    "LLAMA_FAMILY",
    "GEMMA_NORM_SHIFT",
    "MERGED_EXPERTS",
    "EXPERT_NAME",
    "gguf_to_hf_name",
    "hf_to_gguf_name",
    "expert_slices",
    "GGUF_MAGIC",
    "SUPPORTED_VERSIONS",
    "DEFAULT_ALIGNMENT",
    "MAX_DIMS",
    "MAX_NESTING",
    "GgufTensorInfo",
    "GgufHeader",
    "LAZY_STRINGS",
    "LazyStrings",
    "read_header",
    "read_header_size",
    "GgufWeightStore",
    "open_gguf",
    "WRITE_DTYPES",
    "tensor_storage_type",
    "write",
    "with_config",
    "permute_rows",
    "unpermute_rows",
]
