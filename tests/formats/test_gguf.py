"""GGUF: files written through gguf.GGUFWriter, read back by our parser, checked by gguf's own reader."""

from __future__ import annotations

import struct

import gguf as gguf_package
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import FormatError, MissingTensorError, UnsupportedModelError
from engine.formats import gguf, open_model

from .gguf_bytes import (
    ARRAY,
    STRING,
    U32,
    gguf_file,
    gstr,
    kv,
    kv_str,
    kv_u32,
    tensor_info,
    tiny_llama_kvs,
)


def hf_row_of_gguf_row(n_head: int, head_dim: int) -> np.ndarray:
    """For each GGUF row, the HF row it holds: GGUF row h*hd + 2i + j is HF row h*hd + j*hd/2 + i."""
    rows = []
    for h in range(n_head):
        for i in range(head_dim // 2):
            for j in range(2):
                rows.append(h * head_dim + j * head_dim // 2 + i)
    return np.array(rows)


def test_permute_matches_a_hand_written_row_order():
    weight = np.arange(16, dtype=np.float32).reshape(16, 1)  # two heads of head_dim 8
    permuted = gguf.permute_rows(weight, n_head=2)
    assert permuted[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert gguf.unpermute_rows(permuted, n_head=2)[:, 0].tolist() == list(range(16))


def test_unpermute_inverts_permute_on_matrices():
    weight = np.random.default_rng(0).standard_normal((3 * 16, 5)).astype(np.float32)
    np.testing.assert_array_equal(gguf.unpermute_rows(gguf.permute_rows(weight, 3), 3), weight)
    np.testing.assert_array_equal(weight[hf_row_of_gguf_row(3, 16)], gguf.permute_rows(weight, 3))


def test_llama_q_and_k_are_stored_permuted_as_llama_cpp_expects(llama, llama_files):
    reader = gguf_package.GGUFReader(llama_files["gguf"])
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    q = llama.weights.get("model.layers.0.self_attn.q_proj.weight")
    k = llama.weights.get("model.layers.0.self_attn.k_proj.weight")
    v = llama.weights.get("model.layers.0.self_attn.v_proj.weight")
    np.testing.assert_array_equal(stored["blk.0.attn_q.weight"], q[hf_row_of_gguf_row(4, 64)])
    np.testing.assert_array_equal(stored["blk.0.attn_k.weight"], k[hf_row_of_gguf_row(2, 64)])
    np.testing.assert_array_equal(stored["blk.0.attn_v.weight"], v)


def test_qwen2_rows_are_not_permuted(tmp_path):
    from engine.synth import synthesize

    model = synthesize("qwen2", seed=2)
    path = gguf.write(model, tmp_path / "q.gguf")
    reader = gguf_package.GGUFReader(path)
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    np.testing.assert_array_equal(
        stored["blk.1.attn_q.weight"], model.weights.get("model.layers.1.self_attn.q_proj.weight")
    )
    np.testing.assert_array_equal(
        stored["blk.1.attn_k.bias"], model.weights.get("model.layers.1.self_attn.k_proj.bias")
    )


def test_f32_round_trip_is_exact_for_every_architecture(any_arch, tmp_path):
    path = gguf.write(any_arch, tmp_path / "m.gguf", "f32")
    loaded = open_model(path)
    assert loaded.format == "gguf"
    assert loaded.config == any_arch.config
    expected = [
        n
        for n in any_arch.weights.names()
        if not (any_arch.config.tied_embeddings and n == "lm_head.weight")
    ]
    assert loaded.weights.names() == expected
    for name in expected:
        np.testing.assert_array_equal(
            loaded.weights.get(name), any_arch.weights.get(name), err_msg=name
        )


def test_metadata_as_gguf_itself_reads_it(llama_files):
    reader = gguf_package.GGUFReader(llama_files["gguf"])
    field = {
        name: f.contents() for name, f in reader.fields.items() if name != "tokenizer.ggml.tokens"
    }
    assert field["general.architecture"] == "llama"
    assert field["llama.block_count"] == 2
    assert field["llama.embedding_length"] == 256
    assert field["llama.attention.head_count"] == 4
    assert field["llama.attention.head_count_kv"] == 2
    assert field["llama.feed_forward_length"] == 512
    assert field["tokenizer.ggml.model"] == "gpt2"
    assert field["tokenizer.ggml.bos_token_id"] == 1
    assert field["tokenizer.ggml.merges"][:3] == ["W h", "Wh a", "Wha t"]
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]


def test_header_parse_agrees_with_gguf_reader(llama_files):
    ours = gguf.read_header(llama_files["gguf"])
    reader = gguf_package.GGUFReader(llama_files["gguf"])
    assert ours.data_offset == reader.data_offset
    for tensor in reader.tensors:
        info = ours.tensors[tensor.name]
        assert info.ggml_dims == tuple(int(d) for d in tensor.shape)
        assert info.start == tensor.data_offset
        assert info.nbytes == tensor.n_bytes
        assert info.qtype == tensor.tensor_type


def test_tokenizer_and_tied_embeddings_survive(tmp_path):
    from engine.synth import synthesize

    model = synthesize("qwen3", seed=4, tied_embeddings=True, add_bos=True)
    loaded = open_model(gguf.write(model, tmp_path / "t.gguf"))
    assert loaded.config.tied_embeddings and loaded.config.add_bos
    assert not loaded.weights.has("lm_head.weight")
    text = "<|im_start|>user\nWhat is the answer?<|im_end|>"
    assert loaded.tokenizer.encode(text) == model.tokenizer.encode(text)
    assert loaded.tokenizer.encode(text)[0] == 1  # the control token is matched whole


def test_mistral_written_as_llama_reads_back_as_mistral(tmp_path):
    from engine.synth import synthesize

    model = synthesize("mistral", seed=5)
    path = gguf.write(model, tmp_path / "m.gguf")
    assert gguf_package.GGUFReader(path).fields["general.architecture"].contents() == "llama"
    assert open_model(path).config.architecture == "mistral"


# --- quantized storage ----------------------------------------------------------------------


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    return x.reshape(-1, size)


def bound_q8_0(x):
    # d = amax/127 stored as f16: rounding of the value (d/2) plus d's own f16 error times |q| <= 127.
    b = _blocks(x, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / 127
    return np.broadcast_to(0.5 * d + 127 * d * 2**-11, b.shape)


def bound_signed_block(levels):
    # Q4_0 / Q5_0: d = -max/levels; one side reaches `levels`, the other clips one level short:
    # <= d, plus d's f16 rounding times |q| <= levels.
    def bound(x):
        size = 32
        b = _blocks(x, size)
        d = np.abs(b).max(axis=1, keepdims=True) / levels
        return np.broadcast_to(d * (1 + levels * 2**-11), b.shape)

    return bound


def bound_min_block(levels):
    # Q4_1 / Q5_1: step = (max-min)/levels; half a step, plus f16 rounding of the step and the min.
    def bound(x):
        b = _blocks(x, 32)
        step = (b.max(axis=1, keepdims=True) - b.min(axis=1, keepdims=True)) / levels
        low = np.abs(b.min(axis=1, keepdims=True))
        return np.broadcast_to(0.5 * step + levels * step * 2**-11 + low * 2**-11, b.shape)

    return bound


def bound_q4_k(x):
    # Per 32-value sub-block: half its step (range/15), plus the 6-bit rounding of scale and min
    # against the block-wide d = max_step/63 and dmin = max_min/63 (7.5 d of range lost at worst,
    # dmin/2 of offset), plus f16 rounding.
    b = x.reshape(-1, 8, 32)
    lo = np.minimum(b.min(axis=2), 0)
    step = (b.max(axis=2) - lo) / 15
    d = step.max(axis=1, keepdims=True) / 63
    dmin = (-lo).max(axis=1, keepdims=True) / 63
    per_sub = 0.5 * step + 7.5 * d + 0.5 * dmin + (np.abs(b).max(axis=2)) * 2**-9
    return np.broadcast_to(per_sub[:, :, None], b.shape).reshape(-1, 256)


def bound_q6_k(x):
    # Per 16-value sub-block: half its step (amax/31), plus 8-bit scale rounding against
    # d = max_step/127 (at most 16 d of clipping), plus f16 rounding.
    b = x.reshape(-1, 16, 16)
    step = np.abs(b).max(axis=2) / 31
    d = step.max(axis=1, keepdims=True) / 127
    per_sub = 0.5 * step + 16 * d + np.abs(b).max(axis=2) * 2**-9
    return np.broadcast_to(per_sub[:, :, None], b.shape).reshape(-1, 256)


def bound_f16(x):
    return np.abs(x) * 2**-11 + 2**-24


BOUNDS = {
    "f16": (bound_f16, 1),
    "q8_0": (bound_q8_0, 32),
    "q4_0": (bound_signed_block(8), 32),
    "q5_0": (bound_signed_block(16), 32),
    "q4_1": (bound_min_block(15), 32),
    "q5_1": (bound_min_block(31), 32),
    "q4_k": (bound_q4_k, 256),
    "q6_k": (bound_q6_k, 256),
}
QTYPE = {
    "f16": T.F16,
    "q8_0": T.Q8_0,
    "q4_0": T.Q4_0,
    "q5_0": T.Q5_0,
    "q4_1": T.Q4_1,
    "q5_1": T.Q5_1,
    "q4_k": T.Q4_K,
    "q6_k": T.Q6_K,
}


@pytest.mark.parametrize("dtype", sorted(BOUNDS))
def test_quantized_files_decode_within_each_types_error_bound(llama, tmp_path, dtype):
    path = gguf.write(llama, tmp_path / f"{dtype}.gguf", dtype)
    loaded = open_model(path)
    bound, block = BOUNDS[dtype]
    reader = gguf_package.GGUFReader(path)
    stored_types = {t.name: t.tensor_type for t in reader.tensors}
    assert stored_types["blk.0.ffn_down.weight"] == QTYPE[dtype]
    assert stored_types["blk.0.attn_norm.weight"] == T.F32  # 1-D tensors stay f32
    for name in llama.weights.names():
        source = llama.weights.get(name)
        got = loaded.weights.get(name)
        assert got.shape == source.shape and got.dtype == np.float32
        if source.ndim == 1:
            np.testing.assert_array_equal(got, source)
            continue
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # compare in stored (permuted) order
            heads = 4 if "q_proj" in name else 2
            source, got = gguf.permute_rows(source, heads), gguf.permute_rows(got, heads)
        error = np.abs(got - source).reshape(-1, block)
        limit = bound(source.reshape(-1)).reshape(-1, block)
        assert np.all(error <= limit), f"{name}: worst excess {np.max(error - limit)}"
        assert np.any(error > 0)  # really quantized


def test_k_quant_blocks_decode_with_ggufs_own_dequantizer():
    from engine.formats.quant import quantize_q4_k, quantize_q6_k

    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32) * np.array(
        [[0.01], [1.0], [50.0]], dtype=np.float32
    )
    for quantize, qtype, bound in (
        (quantize_q4_k, T.Q4_K, bound_q4_k),
        (quantize_q6_k, T.Q6_K, bound_q6_k),
    ):
        blocks = quantize(x)
        assert blocks.shape == (3, gguf_package.GGML_QUANT_SIZES[qtype][1])
        decoded = gguf_package.quants.dequantize(blocks, qtype)
        assert np.all(np.abs(decoded - x) <= bound(x)), qtype.name


def test_q4_k_scale_packing_matches_get_scale_min_k4():
    """A block whose eight sub-blocks use distinct 6-bit scales and mins, unpacked by hand."""
    from engine.formats.quant import quantize_q4_k

    ramp = np.linspace(0, 1, 32, dtype=np.float32)
    sub = [(k + 1) * 0.5 * ramp - 0.1 * (8 - k) for k in range(8)]  # ranges and mins all differ
    block = quantize_q4_k(np.concatenate(sub))[0]
    q = block[4:16].astype(int)
    scales, mins = [], []
    for j in range(8):
        if j < 4:
            scales.append(q[j] & 63)
            mins.append(q[j + 4] & 63)
        else:
            scales.append((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4))
            mins.append((q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    assert scales == sorted(scales) and scales[-1] == 63  # scale grows with k; the largest is 63
    assert mins == sorted(mins, reverse=True) and mins[0] == 63  # min shrinks with k


# --- laziness ---------------------------------------------------------------------------------


def test_open_maps_nothing_and_get_returns_fresh_arrays(llama_files):
    model = open_model(llama_files["gguf"])
    assert model.weights._data is None
    a = model.weights.get("model.norm.weight")
    a[:] = 0
    assert np.any(model.weights.get("model.norm.weight") != 0)


# --- bad input ----------------------------------------------------------------------------------


def write(tmp_path, data: bytes, name="bad.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_wrong_magic(tmp_path):
    path = write(tmp_path, gguf_file([], [], magic=b"GGUX"))
    with pytest.raises(FormatError, match=r"bad\.gguf: wrong magic b'GGUX'"):
        gguf.read_header(path)


def test_truncated_header(tmp_path):
    path = write(tmp_path, b"GGUF\x03\x00\x00\x00")
    with pytest.raises(
        FormatError, match=r"bad\.gguf: truncated GGUF file \(8 bytes, header needs 24\)"
    ):
        open_model(path)


def test_unsupported_version(tmp_path):
    path = write(tmp_path, gguf_file([], [], version=1))
    with pytest.raises(UnsupportedModelError, match=r"bad\.gguf: GGUF version 1 is not supported"):
        open_model(path)


def test_absurd_tensor_count(tmp_path):
    path = write(tmp_path, gguf_file(tiny_llama_kvs(), [], tensor_count=1 << 40))
    with pytest.raises(
        FormatError, match=r"header claims 1099511627776 tensors, more than the file holds"
    ):
        open_model(path)


def test_absurd_string_length(tmp_path):
    path = write(
        tmp_path, gguf_file([kv("general.name", STRING, struct.pack("<Q", 1 << 60) + b"abc")], [])
    )
    with pytest.raises(
        FormatError,
        match=r"metadata 'general\.name' at offset \d+ claims 1152921504606846976 bytes",
    ):
        open_model(path)


def test_absurd_array_length_does_not_hang(tmp_path):
    payload = struct.pack("<IQ", U32, 1 << 40) + b"\0" * 16
    path = write(tmp_path, gguf_file([kv("tokenizer.ggml.token_type", ARRAY, payload)], []))
    with pytest.raises(
        FormatError, match=r"'tokenizer\.ggml\.token_type' claims 1099511627776 items"
    ):
        open_model(path)


def test_absurd_string_array_does_not_hang(tmp_path):
    payload = struct.pack("<IQ", STRING, 1 << 40) + gstr("a") * 3
    path = write(tmp_path, gguf_file([kv("tokenizer.ggml.tokens", ARRAY, payload)], []))
    with pytest.raises(FormatError, match=r"claims 1099511627776 items, more than the file holds"):
        open_model(path)


def test_unknown_value_type(tmp_path):
    path = write(tmp_path, gguf_file([kv("general.name", 99, b"\0" * 8)], []))
    with pytest.raises(
        FormatError, match=r"metadata 'general\.name' has unknown GGUF value type 99"
    ):
        open_model(path)


def test_unknown_tensor_type(tmp_path):
    path = write(
        tmp_path,
        gguf_file(
            tiny_llama_kvs(), [tensor_info("token_embd.weight", (32, 8), 200, 0)], b"\0" * 64
        ),
    )
    with pytest.raises(
        UnsupportedModelError, match=r"tensor 'token_embd\.weight' has unknown GGML type 200"
    ):
        open_model(path)


def test_tensor_data_past_the_end(tmp_path):
    path = write(
        tmp_path,
        gguf_file(tiny_llama_kvs(), [tensor_info("token_embd.weight", (32, 8), 0, 0)], b"\0" * 64),
    )
    with pytest.raises(
        FormatError,
        match=r"tensor 'token_embd\.weight' data \[\d+, \d+\) lies past the end of the file",
    ):
        open_model(path)


def test_absurd_tensor_dims(tmp_path):
    path = write(
        tmp_path, gguf_file(tiny_llama_kvs(), [tensor_info("x", (1 << 30, 1 << 30, 1 << 30), 0, 0)])
    )
    with pytest.raises(
        FormatError,
        match=r"tensor 'x' dims \[1073741824, 1073741824, 1073741824\] are absurdly large",
    ):
        open_model(path)


def test_type_gguf_cannot_dequantize(tmp_path):
    data = b"\0" * 292  # one Q8_K block of 256 values
    path = write(
        tmp_path,
        gguf_file(tiny_llama_kvs(), [tensor_info("token_embd.weight", (256, 1), 15, 0)], data),
    )
    with pytest.raises(
        UnsupportedModelError,
        match=r"tensor 'model\.embed_tokens\.weight' has GGML type Q8_K, which cannot be dequantized",
    ):
        open_model(path)


def test_missing_metadata_key(tmp_path):
    kvs = [k for k in tiny_llama_kvs() if b"block_count" not in k]
    path = write(tmp_path, gguf_file(kvs, []))
    with pytest.raises(FormatError, match=r"bad\.gguf: GGUF metadata lacks llama\.block_count"):
        open_model(path)


def test_missing_tensor(tmp_path):
    data = np.zeros((8, 32), dtype=np.float32).tobytes()
    path = write(
        tmp_path,
        gguf_file(tiny_llama_kvs(), [tensor_info("token_embd.weight", (32, 8), 0, 0)], data),
    )
    with pytest.raises(
        MissingTensorError,
        match=r"bad\.gguf: missing tensor 'model\.layers\.0\.input_layernorm\.weight'",
    ):
        open_model(path)


@pytest.mark.parametrize(
    ("kvs", "message"),
    [
        (
            [kv_str("general.architecture", "bert")],
            r"unsupported architecture 'bert' \(mixture-of-experts and encoder",
        ),
        (
            [kv_str("general.architecture", "rwkv6")],
            r"unsupported architecture 'rwkv6'; supported: llama, mistral, qwen2, qwen3",
        ),
        (
            tiny_llama_kvs() + [kv_u32("llama.expert_count", 8)],
            r"unsupported architecture 'llama' with experts",
        ),
        ([kv_u32("llama.block_count", 1)], r"no general\.architecture"),
    ],
)
def test_unsupported_architectures(tmp_path, kvs, message):
    path = write(tmp_path, gguf_file(kvs, []))
    with pytest.raises((UnsupportedModelError, FormatError), match=message):
        open_model(path)


def test_every_quantized_type_the_writer_offers_is_readable(tmp_path):
    from engine.synth import synthesize

    model = synthesize("llama", seed=9, hidden_size=256, intermediate_size=256, num_layers=1)
    for dtype in gguf.WRITE_DTYPES:
        loaded = open_model(gguf.write(model, tmp_path / f"{dtype}.gguf", dtype))
        assert loaded.config == model.config, dtype


def test_sentencepiece_vocabulary_round_trip_and_oracle(tmp_path):
    """A `llama` (SentencePiece) vocabulary: written with scores, read back, and encoded as the
    transformers GGUF tokenizer encodes it (texts without a leading space, where llama.cpp's
    extra prefix and transformers' Metaspace agree)."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from engine.synth import synthesize

    from .test_tokenizer import spm_tokenizer

    tok = spm_tokenizer()
    model = replace(synthesize("llama", seed=2, vocab_size=tok.vocab_size), tokenizer=tok)
    path = gguf.write(model, tmp_path / "spm.gguf")
    reader = gguf_package.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert "tokenizer.ggml.merges" not in reader.fields
    loaded = open_model(path)
    assert loaded.tokenizer.kind == "spm"
    oracle = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["hello world", "this is a world", "héllo\nworld", "hellohello", "abc def"]:
        assert loaded.tokenizer.encode(text) == oracle(text, add_special_tokens=False).input_ids, (
            text
        )


def test_sentencepiece_gguf_adds_bos_by_default(tmp_path):
    data = gguf_file(tiny_llama_kvs() + [kv_str("tokenizer.ggml.model", "llama")], [])
    header = gguf.read_header(write(tmp_path, data))
    config, _ = gguf.config_from_metadata(
        header.metadata,
        {"token_embd.weight": gguf.GgufTensorInfo("token_embd.weight", (32, 10), T.F32, 0, 0)},
        "x",
    )
    assert config.add_bos  # llama.cpp: SentencePiece vocabularies get BOS unless the file says no


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1])
def test_fast_dequantizers_equal_ggufs_bit_for_bit(qtype):
    from engine.formats.quant import dequantize_ggml

    x = np.random.default_rng(4).standard_normal((16, 96)).astype(np.float32) * 3
    blocks = gguf_package.quants.quantize(x, qtype)
    expected = gguf_package.quants.dequantize(blocks, qtype).reshape(-1)
    got = dequantize_ggml(blocks.reshape(-1), qtype, x.size)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.binary(max_size=12)
        | st.sampled_from([b"\xc2", b"\xe2\x82", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\x00"]),
        min_size=1,
        max_size=40,
    )
)
def test_lazy_strings_decode_each_string_as_alone(items):
    """The whole-array decode (NUL separators, one decode, one split) equals decoding every
    string alone with errors="replace": invalid tails, lone continuation bytes, NULs inside."""
    from engine.formats.gguf.parser import LazyStrings

    raw = b"".join(struct.pack("<Q", len(item)) + item for item in items)
    starts, at = [], 0
    for item in items:
        starts.append(at)
        at += 8 + len(item)
    lazy = LazyStrings(raw, np.array(starts, dtype=np.int64))
    assert list(lazy) == [item.decode("utf-8", errors="replace") for item in items]


def _vocabulary_array(strings: list[bytes], tail: bytes = b"") -> bytes:
    """A GGUF string array of `strings` (long enough to be walked lazily), then `tail`."""
    return struct.pack("<IQ", STRING, len(strings)) + b"".join(gstr(s) for s in strings) + tail


def test_a_long_string_array_walks_to_the_same_strings_as_gguf_py(tmp_path):
    from engine.formats.gguf.parser import LAZY_STRINGS

    strings = [f"tok{i}".encode() * (i % 5) for i in range(LAZY_STRINGS + 7)]  # "" included
    path = write(
        tmp_path, gguf_file([kv("tokenizer.ggml.tokens", ARRAY, _vocabulary_array(strings))], [])
    )
    tokens = gguf.read_header(path).metadata["tokenizer.ggml.tokens"]
    field = gguf_package.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    assert list(tokens) == [bytes(field.parts[i]).decode() for i in field.data]


@pytest.mark.parametrize("cut", [3, 8, 11])
def test_a_long_string_array_cut_short_names_the_item(tmp_path, cut):
    """The file ends `cut` bytes into item 1500: inside its length field (3), right after it
    (8), or inside its bytes (11); every item before it is whole."""
    from engine.formats.gguf.parser import LAZY_STRINGS

    strings = [b"abcdefgh"] * (LAZY_STRINGS + 1000)
    array = _vocabulary_array(strings)
    item = 1500
    item_start = 12 + item * (8 + 8)  # after the item type and count: 16 bytes an item
    data = gguf_file([kv("tokenizer.ggml.tokens", ARRAY, array)], [])
    array_at = data.index(array)
    path = write(tmp_path, data[: array_at + item_start + cut])
    if cut < 8:
        message = rf"truncated GGUF file inside metadata 'tokenizer\.ggml\.tokens' item {item}$"
    else:
        message = rf"'tokenizer\.ggml\.tokens' item {item} claims 8 bytes, only {cut - 8} remain"
    with pytest.raises(FormatError, match=message):
        gguf.read_header(path)


def test_a_long_string_array_item_claiming_too_much_names_it(tmp_path):
    from engine.formats.gguf.parser import LAZY_STRINGS

    strings = [b"ab"] * (LAZY_STRINGS + 10)
    array = bytearray(_vocabulary_array(strings, tail=b"\0" * 64))
    item = 1030
    at = 12 + item * (8 + 2)
    array[at : at + 8] = struct.pack("<Q", 1 << 62)
    path = write(tmp_path, gguf_file([kv("tokenizer.ggml.tokens", ARRAY, bytes(array))], []))
    with pytest.raises(
        FormatError,
        match=rf"'tokenizer\.ggml\.tokens' item {item} claims {1 << 62} bytes, only \d+ remain",
    ):
        gguf.read_header(path)
