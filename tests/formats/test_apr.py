"""APR v2: hand-made byte vectors pin the layout rules of §4; our writer reproduces the golden file."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from engine.errors import FormatError, MissingTensorError, UnsupportedModelError
from engine.formats import apr, open_model
from engine.synth import synthesize

from .apr_bytes import ROW_MAJOR, apr_file, header, index_entry, pad64

GOLDEN_JSON = (
    b'{"model_type":"linear_regression","name":"golden-v2","license":null,"data_source":null,'
    b'"data_license":null,"version":"0.0.0-golden","created_at":"1700000000","total_size":0,'
    b'"param_count":8}'
)
GOLDEN_WEIGHTS = [1, 2, 0.5, -0.5, 4, -2, 0.25, 8]


def golden_expected_bytes() -> bytes:
    """§4.8 laid out by hand: header 64 + metadata 192 + index 128 + data 128 + footer 4."""
    assert len(GOLDEN_JSON) == 189
    head = (
        b"APR\x00"
        + bytes([2, 0])
        + struct.pack("<H", 0x0400)
        + struct.pack("<I", 2)  # tensor count
        + struct.pack("<Q", 64)  # metadata offset
        + struct.pack("<I", 189)  # metadata size, unpadded
        + struct.pack("<Q", 256)  # index offset = 64 + 192
        + struct.pack("<Q", 384)  # data offset = 256 + 128
        + struct.pack("<I", 0x3BC08C02)  # the header CRC §4.8 states
        + bytes(20)
    )
    meta = GOLDEN_JSON + bytes(3)
    bias_entry = (
        struct.pack("<H", 4)
        + b"bias"
        + bytes([0, 1])
        + struct.pack("<Q", 1)
        + struct.pack("<QQ", 0, 4)
    )
    weights_entry = (
        struct.pack("<H", 7)
        + b"weights"
        + bytes([0, 1])
        + struct.pack("<Q", 8)
        + struct.pack("<QQ", 64, 32)
    )
    index = bias_entry + weights_entry + bytes(128 - 67)
    data = struct.pack("<f", 0.125) + bytes(60) + struct.pack("<8f", *GOLDEN_WEIGHTS) + bytes(32)
    body = head + meta + index + data
    return body + struct.pack("<I", zlib.crc32(body))


def test_golden_facts_are_self_consistent():
    expected = golden_expected_bytes()
    assert len(expected) == 516
    assert zlib.crc32(expected[0:40] + expected[44:64]) == 0x3BC08C02


def test_writer_reproduces_the_516_byte_golden_file(tmp_path):
    metadata = json.loads(GOLDEN_JSON)  # key order preserved
    weights = np.array(GOLDEN_WEIGHTS, dtype=np.float32)
    bias = np.array([0.125], dtype=np.float32)
    plans = [
        apr.plan_tensor("weights", (8,), "f32", lambda: weights),
        apr.plan_tensor("bias", (1,), "f32", lambda: bias),
    ]
    path = apr.write_file(tmp_path / "golden_v2_current.apr", metadata, plans)
    assert path.read_bytes() == golden_expected_bytes()


def test_golden_file_structure_reads_back(tmp_path):
    path = tmp_path / "golden.apr"
    path.write_bytes(golden_expected_bytes())
    structure = apr.read_structure(path)
    assert structure.header.flags == ROW_MAJOR
    assert structure.header.checksum == 0x3BC08C02
    assert structure.metadata["name"] == "golden-v2"
    assert [(e.name, e.dtype, e.shape, e.offset, e.size) for e in structure.entries] == [
        ("bias", 0, (1,), 0, 4),
        ("weights", 0, (8,), 64, 32),
    ]
    entry = structure.entries[1]
    values = apr.decode(structure.buf[384 + 64 : 384 + 96], entry, apr.resolve_codec(entry, "x"))
    assert values.tolist() == GOLDEN_WEIGHTS
    apr.verify_footer(path)


def test_golden_file_is_not_a_language_model(tmp_path):
    path = tmp_path / "golden.apr"
    path.write_bytes(golden_expected_bytes())
    with pytest.raises(
        UnsupportedModelError, match=r"golden\.apr: unsupported architecture 'linear_regression'"
    ):
        open_model(path)


def test_header_packing_matches_hand_layout():
    packed = apr.pack_header(
        flags=0x0601, tensor_count=3, metadata_size=100, tensor_index_offset=192, data_offset=320
    )
    assert packed == header(
        flags=0x0601, tensor_count=3, metadata_size=100, index_offset=192, data_offset=320
    )
    assert packed[44:] == bytes(20)


def test_index_entry_packing_matches_hand_layout():
    entry = apr.AprIndexEntry("model.norm.weight", 30, (2, 3), 128, 12)
    assert apr.pack_index_entry(entry) == index_entry("model.norm.weight", 30, (2, 3), 128, 12)
    assert len(apr.pack_index_entry(entry)) == 2 + 17 + 1 + 1 + 16 + 16


# --- dtypes (§4.5), each from hand-made bytes -------------------------------------------------


def decode_one(tmp_path, dtype: int, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    path = tmp_path / "t.apr"
    path.write_bytes(apr_file({"model_type": "x"}, [("t", dtype, shape, raw)]))
    structure = apr.read_structure(path)
    entry = structure.entries[0]
    start = structure.header.data_offset + entry.offset
    return apr.decode(
        structure.buf[start : start + entry.size], entry, apr.resolve_codec(entry, str(path))
    )


def q4_k_block(d: int, nibble: int) -> bytes:
    """A Q4_K block: f16 d, dmin 0, every 6-bit scale 1, every min 0, all 256 nibbles `nibble`."""
    scales = bytes([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    return struct.pack("<HH", d, 0) + scales + bytes([nibble | nibble << 4]) * 128


CASES = [
    ("f32", 0, (3,), struct.pack("<3f", 1.5, -2.0, 1e-3), [1.5, -2.0, np.float32(1e-3)]),
    ("f16", 1, (3,), struct.pack("<3H", 0x3C00, 0xC000, 0x3800), [1.0, -2.0, 0.5]),
    ("bf16", 30, (2,), struct.pack("<2H", 0x3F80, 0x4049), [1.0, 3.140625]),
    ("f64 (code 3 by size)", 3, (2,), struct.pack("<2d", 0.25, -8.0), [0.25, -8.0]),
    ("i8 (code 6 by size)", 6, (3,), bytes([1, 0xFF, 0x80]), [1.0, -1.0, -128.0]),
    ("u8 (code 7 by size)", 7, (2,), bytes([1, 0xFF]), [1.0, 255.0]),
    ("i32", 4, (2,), struct.pack("<2i", -7, 9), [-7.0, 9.0]),
    (
        "apr q8 (129)",
        129,
        (3,),
        struct.pack("<f", 0.5) + struct.pack("<3b", 2, -4, 127),
        [1.0, -2.0, 63.5],
    ),
    ("legacy q8 (9)", 9, (2,), struct.pack("<f", 2.0) + struct.pack("<2b", 3, -1), [6.0, -2.0]),
    # APR Q4: f16 scale 1.0; nibble = q + 8, even element low: [3, -8, 7, 0] -> 0x0B, 0x8F.
    (
        "apr q4 (128)",
        128,
        (4,),
        struct.pack("<H", 0x3C00) + bytes([0x0B, 0x8F]) + bytes([0x88] * 14),
        [3.0, -8.0, 7.0, 0.0],
    ),
    (
        "legacy 8 as apr q4",
        8,
        (2,),
        struct.pack("<H", 0x4000) + bytes([0x7A]) + bytes([0x88] * 15),
        [4.0, -2.0],
    ),
    # Legacy 8 sized as Q8_0 (34 bytes per 32): f16 d 0.5, int8 2 -> 1.0.
    ("legacy 8 as q8_0", 8, (32,), struct.pack("<H", 0x3800) + bytes([2] * 32), [1.0] * 32),
    ("q4_0 (2)", 2, (32,), struct.pack("<H", 0x3C00) + bytes([0x9A] * 16), [2.0] * 16 + [1.0] * 16),
    (
        "q4_1 (code 3 by size)",
        3,
        (32,),
        struct.pack("<HH", 0x3C00, 0x3C00) + bytes([0x21] * 16),
        [2.0] * 16 + [3.0] * 16,
    ),
    ("q4_k flat (12)", 12, (256,), q4_k_block(0x3C00, 5), [5.0] * 256),
]


@pytest.mark.parametrize(
    ("label", "code", "shape", "raw", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_dtype_decoding(tmp_path, label, code, shape, raw, expected):
    values = decode_one(tmp_path, code, shape, raw)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values.reshape(-1), np.array(expected, dtype=np.float32))


def test_q4_k_per_row_padded_rows(tmp_path):
    """GH-202: a [2, 100] tensor stored as one padded 256-block per row (288 bytes, not 144)."""
    raw = q4_k_block(0x3C00, 5) + q4_k_block(0x4000, 3)  # row 0: 5.0, row 1: 2 * 3 = 6.0
    values = decode_one(tmp_path, 12, (2, 100), raw)
    assert values.shape == (2, 100)
    np.testing.assert_array_equal(values[0], np.full(100, 5.0, dtype=np.float32))
    np.testing.assert_array_equal(values[1], np.full(100, 6.0, dtype=np.float32))


def test_q6_k_block(tmp_path):
    """Q6_K: ql 0x11 and qh 0xAA make every q = 33; d 1.0, scales 1 -> every value 1.0."""
    raw = bytes([0x11] * 128) + bytes([0xAA] * 64) + bytes([1] * 16) + struct.pack("<H", 0x3C00)
    np.testing.assert_array_equal(
        decode_one(tmp_path, 14, (256,), raw), np.ones(256, dtype=np.float32)
    )


def test_apr_q4_nan_and_subnormal_scales_read_as_zero(tmp_path):
    nan_block = struct.pack("<H", 0x7E00) + bytes([0x99] * 16)
    subnormal_block = struct.pack("<H", 0x0001) + bytes([0x99] * 16)
    values = decode_one(tmp_path, 128, (64,), nan_block + subnormal_block)
    np.testing.assert_array_equal(values, np.zeros(64, dtype=np.float32))


def test_unknown_dtype(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"t\.apr: tensor 't' has unknown dtype 77"):
        decode_one(tmp_path, 77, (2,), b"\0" * 8)


def test_ggml_type_without_a_dequantizer(tmp_path):
    with pytest.raises(
        UnsupportedModelError,
        match=r"tensor 't' has dtype 15 \(GGML Q8_K\), which cannot be dequantized",
    ):
        decode_one(tmp_path, 15, (256,), b"\0" * 292)


def test_size_that_fits_no_reading_of_the_dtype(tmp_path):
    with pytest.raises(
        FormatError,
        match=r"tensor 't' \(dtype 8, shape \[64\]\) is 40 bytes, expected 68 \(Q8_0\) or 36 \(Q4\)",
    ):
        decode_one(tmp_path, 8, (64,), b"\0" * 40)


# --- whole models -------------------------------------------------------------------------------

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)


def tensors_of(model) -> list[tuple[str, int, tuple[int, ...], bytes]]:
    return [
        (n, 0, model.weights.shape(n), model.weights.get(n).astype("<f4").tobytes())
        for n in model.weights.names()
    ]


def tokenizer_keys(model) -> dict:
    return {
        "tokenizer.vocabulary": model.tokenizer.tokens,
        "tokenizer.merges": model.tokenizer.merges,
    }


def test_every_metadata_alias_is_read(tmp_path):
    model = synthesize("qwen2", seed=1, **TINY)
    metadata = {
        "model_type": "Qwen2",
        "hidden_dim": 16,
        "n_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "n_vocab": model.config.vocab_size,
        "ffn_dim": 32,
        "context_length": 4096,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        **tokenizer_keys(model),
    }
    path = tmp_path / "alias.apr"
    path.write_bytes(apr_file(metadata, tensors_of(model)))
    config = open_model(path).config
    assert (config.architecture, config.hidden_size, config.num_layers) == ("qwen2", 16, 1)
    assert (config.num_heads, config.num_kv_heads, config.intermediate_size) == (2, 1, 32)
    assert (config.rms_norm_eps, config.rope_theta, config.vocab_size) == (1e-5, 500000.0, 277)
    assert config.qkv_bias and not config.tied_embeddings


@pytest.mark.parametrize(
    "aliases",
    [
        {
            "d_model": 16,
            "n_layer": 1,
            "n_head": 2,
            "n_kv_heads": 1,
            "intermediate_dim": 32,
            "layer_norm_eps": 1e-4,
        },
        {
            "n_embd": 16,
            "num_hidden_layers": 1,
            "n_heads": 2,
            "num_key_value_heads": 1,
            "n_inner": 32,
        },
    ],
)
def test_other_alias_spellings(tmp_path, aliases):
    model = synthesize("llama", seed=1, **TINY)
    metadata = {"architecture": "llama", "vocab_size": 277, **aliases}
    path = tmp_path / "alias.apr"
    path.write_bytes(apr_file(metadata, tensors_of(model)))
    config = open_model(path).config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size) == (
        16,
        1,
        2,
        32,
    )


def test_defaults_when_keys_are_absent(tmp_path):
    """AprTransformer's defaults: kv heads = heads, eps 1e-6, theta 10000, no rope_type = half."""
    model = synthesize(
        "llama",
        seed=1,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=64,
    )
    metadata = {
        "architecture": "llama",
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "vocab_size": 277,
    }
    path = tmp_path / "defaults.apr"
    path.write_bytes(apr_file(metadata, tensors_of(model)))
    config = open_model(path).config
    assert config.num_kv_heads == 2
    assert config.intermediate_size == 64  # 4 * hidden
    assert config.rms_norm_eps == 1e-6 and config.rope_theta == 10000.0
    assert config.rope_pairing == "half"
    assert config.head_dim == 8


@pytest.mark.parametrize(("rope_type", "pairing"), [(0, "adjacent"), (2, "half")])
def test_rope_type_is_honoured(tmp_path, rope_type, pairing):
    model = synthesize("llama", seed=1, **TINY)
    metadata = {
        "architecture": "llama",
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 32,
        "vocab_size": 277,
        "rope_type": rope_type,
    }
    path = tmp_path / "rope.apr"
    path.write_bytes(apr_file(metadata, tensors_of(model)))
    assert open_model(path).config.rope_pairing == pairing


def test_gguf_tensor_names_and_tied_embeddings(tmp_path):
    from engine.formats.gguf import hf_to_gguf_name

    model = synthesize("llama", seed=1, tied_embeddings=True, **TINY)
    tensors = [(hf_to_gguf_name(n), d, s, b) for n, d, s, b in tensors_of(model)]
    assert not any(name == "output.weight" for name, *_ in tensors)
    metadata = {
        "architecture": "llama",
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 32,
        "vocab_size": 277,
    }
    path = tmp_path / "gguf-names.apr"
    path.write_bytes(apr_file(metadata, tensors))
    loaded = open_model(path)
    assert loaded.config.tied_embeddings
    np.testing.assert_array_equal(
        loaded.weights.get("model.layers.0.mlp.gate_proj.weight"),
        model.weights.get("model.layers.0.mlp.gate_proj.weight"),
    )


def test_data_is_located_by_offset_not_index_order(tmp_path):
    """The streaming writer sorts only the index; here the data runs in reverse."""
    model = synthesize("llama", seed=1, **TINY)
    tensors = tensors_of(model)
    order = sorted(range(len(tensors)), key=lambda i: tensors[i][0], reverse=True)
    metadata = {
        "architecture": "llama",
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 32,
        "vocab_size": 277,
    }
    path = tmp_path / "reversed.apr"
    path.write_bytes(apr_file(metadata, tensors, data_order=order))
    loaded = open_model(path)
    for name in model.weights.names():
        np.testing.assert_array_equal(loaded.weights.get(name), model.weights.get(name))


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compressed_payloads(tmp_path, codec):
    model = synthesize("llama", seed=1, **TINY)
    metadata = {
        "architecture": "llama",
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 32,
        "vocab_size": 277,
        **tokenizer_keys(model),
    }
    plain = apr_file(metadata, tensors_of(model))
    flag = 0x0001 if codec == "lz4" else 0x0002
    fields = struct.unpack_from("<HIQIQQ", plain, 6)
    head = header(
        flags=fields[0] | flag,
        tensor_count=fields[1],
        metadata_size=fields[3],
        index_offset=fields[4],
        data_offset=fields[5],
    )
    rest = plain[64:]
    if codec == "lz4":
        import lz4.block

        payload = struct.pack("<I", len(rest)) + lz4.block.compress(rest, store_size=False)
    else:
        import zstandard

        payload = zstandard.ZstdCompressor().compress(rest)
    path = tmp_path / f"{codec}.apr"
    path.write_bytes(head + payload)
    assert path.stat().st_size < len(plain)
    loaded = open_model(path)
    np.testing.assert_array_equal(
        loaded.weights.get("lm_head.weight"), model.weights.get("lm_head.weight")
    )
    assert loaded.tokenizer.encode("What is 2+2?") == model.tokenizer.encode("What is 2+2?")


# --- our writer -----------------------------------------------------------------------------------


def test_written_file_follows_the_layout_rules(llama_files, llama):
    raw = llama_files["apr"].read_bytes()
    assert raw[0:6] == b"APR\x00\x02\x00"
    flags, count, meta_off, meta_size, index_off, data_off = struct.unpack_from("<HIQIQQ", raw, 6)
    assert flags == 0x0400 | 0x0200  # row-major, has vocab
    assert (meta_off, index_off % 64, data_off % 64) == (64, 0, 0)
    assert index_off == 64 + -(-meta_size // 64) * 64
    assert struct.unpack_from("<I", raw, 40)[0] == zlib.crc32(raw[0:40] + raw[44:64])
    assert struct.unpack_from("<I", raw, len(raw) - 4)[0] == zlib.crc32(raw[:-4])
    entries = apr.parse_index(raw, index_off, data_off, count, "x")
    names = [e.name for e in entries]
    assert names == sorted(names) == llama.weights.names()
    assert all(e.offset % 64 == 0 for e in entries)
    assert [e.offset for e in entries] == sorted(e.offset for e in entries)  # data in index order
    assert raw[meta_off + meta_size : index_off] == bytes(index_off - meta_off - meta_size)


def test_written_metadata_has_canonical_keys_only(llama_files, llama):
    structure = apr.read_structure(llama_files["apr"])
    meta = structure.metadata
    aliases = {
        "hidden_dim",
        "d_model",
        "n_embd",
        "n_layers",
        "num_hidden_layers",
        "n_layer",
        "n_heads",
        "num_attention_heads",
        "n_head",
        "n_kv_heads",
        "num_key_value_heads",
        "n_vocab",
        "ffn_dim",
        "intermediate_dim",
        "n_inner",
        "max_seq_len",
        "context_length",
        "n_ctx",
        "layer_norm_eps",
        "norm_eps",
    }
    assert not aliases & set(meta)
    assert (meta["architecture"], meta["hidden_size"], meta["num_layers"], meta["num_heads"]) == (
        "llama",
        256,
        2,
        4,
    )
    assert (
        meta["num_kv_heads"],
        meta["intermediate_size"],
        meta["vocab_size"],
        meta["head_dim"],
    ) == (2, 512, 277, 64)
    assert meta["rope_type"] == 2 and meta["tied_embeddings"] is False
    assert list(meta)[:5] == ["model_type", "name", "license", "data_source", "data_license"]
    assert meta["tokenizer.vocabulary"] == llama.tokenizer.tokens
    assert meta["tokenizer.merges"][0] == "W h"
    assert (meta["tokenizer.bos_token_id"], meta["tokenizer.eos_token_id"]) == (1, 2)


def test_metadata_writer_refuses_aliases():
    with pytest.raises(ValueError, match=r"canonical keys, not aliases: \['num_hidden_layers'\]"):
        apr.metadata_json({"model_type": "llama", "num_hidden_layers": 2})


def test_round_trip_every_architecture(any_arch, tmp_path):
    loaded = open_model(apr.write(any_arch, tmp_path / "m.apr"))
    assert loaded.format == "apr"
    assert loaded.config == any_arch.config
    for name in any_arch.weights.names():
        if any_arch.config.tied_embeddings and name == "lm_head.weight":
            assert not loaded.weights.has(name)
            continue
        np.testing.assert_array_equal(loaded.weights.get(name), any_arch.weights.get(name))
    assert loaded.tokenizer.encode("<|im_start|>What is 2+2?") == any_arch.tokenizer.encode(
        "<|im_start|>What is 2+2?"
    )


@pytest.mark.parametrize(
    ("dtype", "code", "bound"),
    [
        ("f16", 1, lambda x, q: np.abs(x) * 2**-11 + 2**-24),
        (
            "q8_0",
            8,
            lambda x, q: (
                np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True).repeat(32, 1).reshape(x.shape)
                / 127
                * 0.57
            ),
        ),
        ("q8", 129, lambda x, q: np.full(x.shape, np.abs(x).max() / 127 * 0.5 * (1 + 1e-6))),
        (
            "q4",
            128,
            lambda x, q: (
                np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True).repeat(32, 1).reshape(x.shape)
                / 7
                * 0.5
                * 1.01
            ),
        ),
    ],
)
def test_quantized_apr_within_bounds(tmp_path, dtype, code, bound):
    # q8: one scale amax/127 per tensor -> half a step. q4: per 32 values amax/7 -> half a step (f16
    # scale, +1%). q8_0: per 32 values amax/127, half a step plus the f16 scale's rounding (*127).
    model = synthesize(
        "llama",
        seed=3,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )
    loaded = open_model(apr.write(model, tmp_path / f"{dtype}.apr", dtype))
    store = loaded.weights
    assert store.dtype_code("model.layers.0.mlp.up_proj.weight") == code
    assert store.dtype_code("model.norm.weight") == 0
    for name in model.weights.names():
        source, got = model.weights.get(name), store.get(name)
        if source.ndim == 2:
            assert np.all(np.abs(got - source) <= bound(source, dtype)), name


@pytest.mark.parametrize("dtype", ["q4_k", "q6_k"])
def test_k_quant_rows_are_padded_to_256(tmp_path, dtype):
    from .test_gguf import bound_q4_k, bound_q6_k

    model = synthesize("llama", seed=3, **TINY)  # rows of 16 and 32 columns
    path = apr.write(model, tmp_path / f"{dtype}.apr", dtype)
    structure = apr.read_structure(path)
    block = 144 if dtype == "q4_k" else 210
    for entry in structure.entries:
        if len(entry.shape) == 2:
            assert entry.size == entry.shape[0] * block, entry.name  # one padded block per row
    loaded = open_model(path)
    bound = bound_q4_k if dtype == "q4_k" else bound_q6_k
    for name in model.weights.names():
        source = model.weights.get(name)
        if source.ndim != 2:
            continue
        padded = np.zeros((source.shape[0], 256), dtype=np.float32)
        padded[:, : source.shape[1]] = source
        limit = bound(padded.reshape(-1)).reshape(padded.shape)[:, : source.shape[1]]
        assert np.all(np.abs(loaded.weights.get(name) - source) <= limit), name


def test_writer_replaces_target_atomically_and_leaves_no_temp(tmp_path, llama):
    target = tmp_path / "out.apr"
    apr.write(llama, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.apr"]


# --- bad input --------------------------------------------------------------------------------------


def bad(tmp_path, data: bytes):
    path = tmp_path / "bad.apr"
    path.write_bytes(data)
    return path


def valid_tiny() -> bytes:
    model = synthesize("llama", seed=1, **TINY)
    metadata = {
        "architecture": "llama",
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 32,
        "vocab_size": 277,
    }
    return apr_file(metadata, tensors_of(model))


def with_header(data: bytes, **changes) -> bytes:
    flags, count, meta_off, meta_size, index_off, data_off = struct.unpack_from("<HIQIQQ", data, 6)
    fields = dict(
        flags=flags,
        tensor_count=count,
        metadata_offset=meta_off,
        metadata_size=meta_size,
        index_offset=index_off,
        data_offset=data_off,
    )
    fields.update(changes)
    return header(**fields) + data[64:]


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (
            lambda d: d[:40],
            FormatError,
            r"bad\.apr: truncated APR file \(40 bytes, header needs 64\)",
        ),
        (
            lambda d: b"APX\x00" + d[4:],
            FormatError,
            r"bad\.apr: wrong magic b'APX\\x00' for a \.apr file",
        ),
        (
            lambda d: b"APR1" + d[4:],
            UnsupportedModelError,
            r"bad\.apr: APR1 \(v1 layout\) files are not supported",
        ),
        (
            lambda d: d[:4] + b"\x01" + d[5:],
            UnsupportedModelError,
            r"APR format version 1\.0 is not supported",
        ),
        (
            lambda d: d[:8] + b"\x07" + d[9:],
            FormatError,
            r"bad\.apr: APR header CRC mismatch \(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\)",
        ),
        (
            lambda d: with_header(d, flags=0x0404),
            UnsupportedModelError,
            r"bad\.apr: encrypted \.apr files are not supported",
        ),
        (
            lambda d: with_header(d, flags=0x0800),
            UnsupportedModelError,
            r"column-major \.apr files are not supported",
        ),
        (
            lambda d: with_header(d, metadata_size=1 << 31),
            FormatError,
            r"metadata \[64, 2147483712\) lies outside the file",
        ),
        (
            lambda d: with_header(d, data_offset=1 << 62),
            FormatError,
            r"data offset 4611686018427387904 are out of order or past the end",
        ),
        (
            lambda d: with_header(d, tensor_count=0xFFFFFFFF),
            FormatError,
            r"header claims 4294967295 tensors, but the index holds \d+ bytes",
        ),
        (
            lambda d: d[: len(d) // 2],
            FormatError,
            r"tensor '.*' data \[\d+, \d+\) lies past the end of the data section",
        ),
        (
            lambda d: with_header(d[:64] + b"{not json" + d[73:]),
            FormatError,
            r"APR metadata is not valid JSON",
        ),
    ],
)
def test_bad_files(tmp_path, mutate, error, message):
    with pytest.raises(error, match=message):
        open_model(bad(tmp_path, mutate(valid_tiny())))


def test_index_entry_running_past_the_index(tmp_path):
    meta = b'{"architecture":"llama"}'
    entry = struct.pack("<H", 60000) + b"x" * 10
    data = header(
        flags=ROW_MAJOR,
        tensor_count=1,
        metadata_size=len(meta),
        index_offset=64 + 64,
        data_offset=64 + 128,
    )
    path = bad(tmp_path, data + pad64(meta) + pad64(entry) + bytes(64))
    with pytest.raises(
        FormatError,
        match=r"bad\.apr: tensor index entry 0 \(name length 60000\) runs past the index end",
    ):
        open_model(path)


def test_absurd_shape(tmp_path):
    path = bad(
        tmp_path, apr_file({"architecture": "llama"}, [("t", 0, (1 << 30, 1 << 30, 1 << 30), b"")])
    )
    with pytest.raises(
        FormatError,
        match=r"tensor 't' shape \[1073741824, 1073741824, 1073741824\] is absurdly large",
    ):
        open_model(path)


def test_missing_tensor(tmp_path):
    model = synthesize("llama", seed=1, **TINY)
    tensors = [t for t in tensors_of(model) if t[0] != "model.layers.0.self_attn.o_proj.weight"]
    metadata = {
        "architecture": "llama",
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 32,
        "vocab_size": 277,
    }
    with pytest.raises(
        MissingTensorError,
        match=r"bad\.apr: missing tensor 'model\.layers\.0\.self_attn\.o_proj\.weight'",
    ):
        open_model(bad(tmp_path, apr_file(metadata, tensors)))


def test_layer_count_beyond_the_tensors_fails_fast(tmp_path):
    model = synthesize("llama", seed=1, **TINY)
    metadata = {
        "architecture": "llama",
        "hidden_size": 16,
        "num_layers": 2_000_000_000,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 32,
        "vocab_size": 277,
    }
    with pytest.raises(
        MissingTensorError, match=r"missing tensor 'model\.layers\.1\.input_layernorm\.weight'"
    ):
        open_model(bad(tmp_path, apr_file(metadata, tensors_of(model))))


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (
            {"architecture": "mixtral", "num_experts": 8},
            r"unsupported architecture 'mixtral' with experts",
        ),
        (
            {"model_type": "whisper"},
            r"unsupported architecture 'whisper' \(mixture-of-experts and encoder",
        ),
        ({"model_type": "auto"}, r"unsupported architecture 'none'"),
        ({"architecture": "llama", "rope_type": 3}, r"rope_type 3 is not supported"),
    ],
)
def test_unsupported_models(tmp_path, metadata, message):
    with pytest.raises(UnsupportedModelError, match=message):
        open_model(bad(tmp_path, apr_file(metadata, [])))


def test_corrupt_lz4_payload(tmp_path):
    data = header(
        flags=ROW_MAJOR | 0x0001, tensor_count=0, metadata_size=2, index_offset=128, data_offset=128
    )
    path = bad(tmp_path, data + struct.pack("<I", 500) + b"\xff" * 40)
    with pytest.raises(FormatError, match=r"bad\.apr: corrupt LZ4 payload"):
        open_model(path)


def test_lz4_size_beyond_the_limit(tmp_path):
    data = header(
        flags=ROW_MAJOR | 0x0001, tensor_count=0, metadata_size=2, index_offset=128, data_offset=128
    )
    path = bad(tmp_path, data + struct.pack("<I", 0xFFFFFFFF) + b"\x00" * 8)
    with pytest.raises(
        FormatError,
        match=r"LZ4 payload claims 4294967295 bytes, more than 8 compressed bytes can hold",
    ):
        open_model(path)


def test_corrupt_zstd_payload(tmp_path):
    data = header(
        flags=ROW_MAJOR | 0x0002, tensor_count=0, metadata_size=2, index_offset=128, data_offset=128
    )
    path = bad(tmp_path, data + b"\x28\xb5\x2f\xfd" + b"\xff" * 30)
    with pytest.raises(FormatError, match=r"bad\.apr: corrupt zstd payload"):
        open_model(path)


def test_footer_crc_mismatch(tmp_path, llama_files):
    data = bytearray(llama_files["apr"].read_bytes())
    data[-100] ^= 0xFF
    path = bad(tmp_path, bytes(data))
    with pytest.raises(FormatError, match=r"bad\.apr: APR footer CRC mismatch"):
        apr.verify_footer(path)


def test_sentencepiece_tokenizer_is_embedded_with_scores(tmp_path):
    from dataclasses import replace

    from .test_tokenizer import spm_tokenizer

    tok = spm_tokenizer()
    model = replace(synthesize("llama", seed=2, vocab_size=tok.vocab_size, **TINY), tokenizer=tok)
    path = apr.write(model, tmp_path / "spm.apr")
    meta = apr.read_structure(path).metadata
    assert "tokenizer.merges" not in meta
    assert meta["tokenizer.model_type"] == "llama"
    assert meta["tokenizer.scores"][259:262] == [0.0, -1.0, -2.0]
    loaded = open_model(path)
    assert loaded.tokenizer.kind == "spm"
    assert loaded.tokenizer.encode("héllo world</s>") == tok.encode("héllo world</s>")


def test_sentencepiece_without_token_types_guesses_them(tmp_path):
    from .test_tokenizer import spm_tokenizer

    tok = spm_tokenizer()
    meta = {"tokenizer.vocabulary": tok.tokens, "tokenizer.scores": tok.piece_scores()}
    guessed = apr.tokenizer_from_metadata(meta, "x")
    assert guessed.token_types[:4] == [2, 3, 3, 6]  # <unk>, <s>, </s>, <0x00>
    assert guessed.encode("hé</s>") == tok.encode("hé</s>")


def test_crc32_combine_joins_parts_as_zlib_sums_the_whole():
    """`crc32_combine` against zlib's CRC of the concatenation (the independent oracle), for
    empty, one-byte, odd and block-sized parts."""
    import random

    from engine.formats.apr.layout import crc32_combine

    rng = random.Random(3)
    lengths = [0, 1, 2, 3, 7, 64, 255, 4096, 65537]
    for length_a in lengths:
        for length_b in lengths:
            a, b = rng.randbytes(length_a), rng.randbytes(length_b)
            combined = crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b))
            assert combined == zlib.crc32(a + b), (length_a, length_b)


@pytest.mark.parametrize("where", ["first part", "middle part", "last part"])
def test_footer_check_in_parallel_parts_finds_every_flipped_byte(
    tmp_path, llama_files, monkeypatch, where
):
    """A file above PARALLEL_CRC_BYTES is summed in parts on several threads: the intact file
    passes (the parts' CRCs joined right), and a byte flipped in any part is a mismatch."""
    import engine.formats.apr.layout as layout
    import engine.parallel as parallel

    monkeypatch.setattr(layout, "PARALLEL_CRC_BYTES", 1024)  # the test model: parts
    monkeypatch.setattr(layout, "CRC_PART_BYTES", 1000)  # many, the last one shorter
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 3)
    data = bytearray(llama_files["apr"].read_bytes())
    assert len(data) > 3 * 1024 and (len(data) - 4) % 1000
    intact = tmp_path / "intact.apr"
    intact.write_bytes(bytes(data))
    apr.verify_footer(intact)
    body = len(data) - 4
    position = {"first part": 70, "middle part": body // 2, "last part": body - 10}[where]
    data[position] ^= 0x01
    path = bad(tmp_path, bytes(data))
    with pytest.raises(FormatError, match=r"bad\.apr: APR footer CRC mismatch"):
        apr.verify_footer(path)


def test_footer_check_of_a_large_file_reports_its_progress(tmp_path, llama_files, monkeypatch):
    """engine.progress: the parts' bytes as they are summed (on any thread), rising to the
    whole body; nothing when no listener is installed; an end report when a part fails."""
    import engine.formats.apr.layout as layout
    from engine.progress import listening

    monkeypatch.setattr(layout, "PARALLEL_CRC_BYTES", 1024)
    monkeypatch.setattr(layout, "CRC_PART_BYTES", 1000)
    path = llama_files["apr"]
    body = path.stat().st_size - 4
    reports: list[tuple[str, int, int]] = []
    with listening(lambda *report: reports.append(report)):
        apr.verify_footer(path)
    assert {label for label, _, _ in reports} == {f"checking {path.name}"}
    done = [d for _, d, _ in reports]
    assert done == sorted(done) and done[-1] == body and len(done) == -(-body // 1000)
    assert {total for _, _, total in reports} == {body}

    reports.clear()
    apr.verify_footer(path)  # no listener: nothing to report to
    assert reports == []

    def failing(path, start, stop, source):
        if start >= 2000:
            raise FormatError(f"{source}: cannot read: simulated")
        return zlib.crc32(path.read_bytes()[start:stop])

    monkeypatch.setattr(layout, "_crc32_of_range", failing)
    with listening(lambda *report: reports.append(report)), pytest.raises(FormatError):
        apr.verify_footer(path)
    assert reports[-1][1:] == (body, body)  # ended, so a terminal line is erased
