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

The package, one job a module: `layout` (constants, header, index, CRCs), `codec` (dtype codes
to float32), `metadata` (config and tokenizer from the metadata), `reader` (`read_structure`,
`AprWeightStore`, `open_apr`) and `writer` (`write`). The reader never imports the writer.
"""

from __future__ import annotations

from engine.formats.apr.codec import (
    INTEGER_KINDS,
    Codec,
    decode,
    resolve_codec,
    row_nbytes,
)
from engine.formats.apr.layout import (
    ALIGNMENT,
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
    DT_Q4_0,
    DT_Q4_K,
    DT_Q6_K,
    DT_U8_OR_Q5_1,
    FLAG_COLUMN_MAJOR,
    FLAG_ENCRYPTED,
    FLAG_HAS_VOCAB,
    FLAG_LZ4,
    FLAG_QUANTIZED,
    FLAG_ROW_MAJOR,
    FLAG_SHARDED,
    FLAG_SIGNED,
    FLAG_ZSTD,
    HEADER_SIZE,
    MAGIC,
    MAX_NAME_LEN,
    MAX_NDIM,
    MIN_INDEX_ENTRY,
    VERSION,
    AprHeader,
    AprIndexEntry,
    align64,
    check_footer,
    header_crc,
    pack_header,
    pack_index_entry,
    parse_header,
    parse_index,
    verify_footer,
)
from engine.formats.apr.metadata import (
    ALL_ALIASES,
    KEY_ALIASES,
    config_from_metadata,
    tokenizer_from_metadata,
)
from engine.formats.apr.reader import (
    MAX_DECOMPRESSED_FLOOR,
    MAX_DECOMPRESSED_RATIO,
    AprFile,
    AprWeightStore,
    open_apr,
    read_structure,
)
from engine.formats.apr.writer import (
    WRITE_DTYPES,
    TensorPlan,
    metadata_json,
    model_metadata,
    plan_tensor,
    write,
    write_file,
)

__all__ = [
    "Codec",
    "INTEGER_KINDS",
    "resolve_codec",
    "decode",
    "row_nbytes",
    "HEADER_SIZE",
    "ALIGNMENT",
    "MAGIC",
    "VERSION",
    "MAX_NAME_LEN",
    "MAX_NDIM",
    "MIN_INDEX_ENTRY",
    "FLAG_LZ4",
    "FLAG_ZSTD",
    "FLAG_ENCRYPTED",
    "FLAG_SIGNED",
    "FLAG_SHARDED",
    "FLAG_QUANTIZED",
    "FLAG_HAS_VOCAB",
    "FLAG_ROW_MAJOR",
    "FLAG_COLUMN_MAJOR",
    "DT_F32",
    "DT_F16",
    "DT_Q4_0",
    "DT_F64_OR_Q4_1",
    "DT_I32",
    "DT_I64",
    "DT_I8_OR_Q5_0",
    "DT_U8_OR_Q5_1",
    "DT_LEGACY_Q4",
    "DT_LEGACY_Q8",
    "DT_Q4_K",
    "DT_Q6_K",
    "DT_BF16",
    "DT_APR_Q4",
    "DT_APR_Q8",
    "align64",
    "header_crc",
    "AprHeader",
    "AprIndexEntry",
    "pack_header",
    "parse_header",
    "pack_index_entry",
    "parse_index",
    "check_footer",
    "verify_footer",
    "KEY_ALIASES",
    "ALL_ALIASES",
    "config_from_metadata",
    "tokenizer_from_metadata",
    "MAX_DECOMPRESSED_RATIO",
    "MAX_DECOMPRESSED_FLOOR",
    "AprWeightStore",
    "AprFile",
    "read_structure",
    "open_apr",
    "TensorPlan",
    "WRITE_DTYPES",
    "plan_tensor",
    "metadata_json",
    "write_file",
    "model_metadata",
    "write",
]
