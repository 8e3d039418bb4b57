"""APRT bytes (engine.aprt, §1.1); trace directories and tokens.json (engine.trace_directory)."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.aprt import (
    AprtFormatError,
    AprtHeader,
    AprtOpenError,
    check_aprt_pair,
    read_aprt,
    read_aprt_header,
    write_aprt,
    write_stage,
)
from engine.errors import DiffError, FormatError
from engine.stages import WHOLE_MODEL_LAYER
from engine.trace_directory import read_tokens_json, read_trace_dir, write_tokens_json


def raw_file(path: Path, layer: int, dim_product: int, body: bytes = b"") -> Path:
    """An APRT file assembled by hand with struct (independent of the writer under test)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"APRT" + struct.pack("<II", layer, dim_product) + body)
    return path


def f32_bits(values: np.ndarray) -> list[int]:
    return np.asarray(values, dtype=np.float32).view(np.uint32).tolist()


# ----------------------------------------------------------------------------- worked bytes


def test_worked_bytes_layer0(tmp_path):
    path = write_aprt(tmp_path / "x.bin", 0, np.array([1.0, -2.0], dtype=np.float32))
    assert path.read_bytes() == bytes.fromhex("41505254 00000000 02000000 0000803f 000000c0")


def test_worked_bytes_whole_model_nan(tmp_path):
    path = write_stage(tmp_path, "lm_head", 0, np.array([np.nan], dtype=np.float32))
    assert path == tmp_path / "lm_head.bin"
    assert path.read_bytes() == bytes.fromhex("41505254 ffffffff 01000000 0000c07f")


def test_header_layer3_dim3584(tmp_path):
    path = write_aprt(tmp_path / "x.bin", 3, np.zeros(3584, dtype=np.float32))
    data = path.read_bytes()
    assert data[:12] == b"APRT" + bytes([3, 0, 0, 0]) + (3584).to_bytes(4, "little")
    assert len(data) == 12 + 4 * 3584


def test_whole_model_header_151936(tmp_path):
    values = np.arange(151936, dtype=np.float32)
    path = write_stage(tmp_path, "lm_head", 17, values)
    assert path.read_bytes()[:12] == bytes.fromhex("41505254 ffffffff") + (151936).to_bytes(
        4, "little"
    )
    tensor = read_aprt(path)
    assert tensor.layer == WHOLE_MODEL_LAYER and tensor.is_whole_model
    assert np.array_equal(tensor.values, values)


def test_empty_tensor_is_a_12_byte_file(tmp_path):
    path = write_aprt(tmp_path / "e.bin", 0, np.zeros(0, dtype=np.float32))
    assert path.read_bytes() == bytes.fromhex("41505254 00000000 00000000")
    tensor = read_aprt(path)
    assert tensor.dim_product == 0 and tensor.values.dtype == np.float32


def test_special_values_round_trip_bit_exactly(tmp_path):
    bits = np.array(
        [0x7FC00000, 0x3F800000, 0x7F800000, 0xFF800000, 0x80000000, 0x7FA00001, 0xFFC12345, 1],
        dtype=np.uint32,
    )  # NaN, 1, +Inf, -Inf, -0.0, signalling NaN, negative NaN with payload, smallest denormal
    path = write_aprt(tmp_path / "s.bin", 2, bits.view(np.float32))
    assert path.read_bytes()[12:] == bits.astype("<u4").tobytes()
    assert f32_bits(read_aprt(path).values) == bits.tolist()


def test_reader_reads_bytes_written_by_hand(tmp_path):
    body = struct.pack("<3f", 1.5, -0.25, 3.0)
    tensor = read_aprt(raw_file(tmp_path / "h.bin", 41, 3, body))
    assert tensor.layer == 41
    assert tensor.values.tolist() == [1.5, -0.25, 3.0]
    assert tensor.values.dtype == np.float32 and tensor.values.flags.writeable


def test_trailing_bytes_are_ignored(tmp_path):
    body = struct.pack("<2f", 1.0, 2.0) + b"trailing garbage"
    tensor = read_aprt(raw_file(tmp_path / "t.bin", 0, 2, body))
    assert tensor.values.tolist() == [1.0, 2.0]


def test_writer_flattens_any_shape_in_c_order(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3).T  # not C-contiguous
    tensor = read_aprt(write_aprt(tmp_path / "f.bin", 1, values))
    assert tensor.values.tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_layer_u32_max_minus_one_is_per_layer(tmp_path):
    tensor = read_aprt(write_aprt(tmp_path / "m.bin", 0xFFFFFFFE, [1.0]))
    assert tensor.layer == 0xFFFFFFFE and not tensor.is_whole_model


@settings(max_examples=60, deadline=None)
@given(
    bits=st.lists(st.integers(0, 0xFFFFFFFF), max_size=64),
    layer=st.integers(0, 0xFFFFFFFF),
)
def test_write_read_is_bit_exact(tmp_path_factory, bits, layer):
    directory = tmp_path_factory.mktemp("prop")
    pattern = np.array(bits, dtype=np.uint32)
    path = write_aprt(directory / "p.bin", layer, pattern.view(np.float32))
    assert path.read_bytes() == b"APRT" + struct.pack("<II", layer, len(bits)) + struct.pack(
        f"<{len(bits)}I", *bits
    )
    tensor = read_aprt(path)
    assert tensor.layer == layer
    assert f32_bits(tensor.values) == bits


# ----------------------------------------------------------------------------- write_stage


def test_write_stage_places_per_layer_files_and_keeps_their_layer(tmp_path):
    path = write_stage(tmp_path, "ffn_out", 12, [1.0, 2.0])
    assert path == tmp_path / "layer-12" / "ffn_out.bin"
    assert read_aprt(path).layer == 12


@pytest.mark.parametrize("caller_layer", [0, 5, WHOLE_MODEL_LAYER])
def test_write_stage_whole_model_uses_the_sentinel_whatever_the_layer(tmp_path, caller_layer):
    path = write_stage(tmp_path, "final_norm", caller_layer, [1.0])
    assert path == tmp_path / "final_norm.bin"
    assert path.read_bytes()[4:8] == b"\xff\xff\xff\xff"


def test_write_stage_accepts_the_alias_but_writes_the_canonical_name(tmp_path):
    path = write_stage(tmp_path, "layer_output", 0, [1.0])
    assert path == tmp_path / "layer-0" / "post_ffn_residual.bin"


def test_write_stage_rejects_unknown_stage_and_bad_layer(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        write_stage(tmp_path, "nope", 0, [1.0])
    with pytest.raises(ValueError, match="needs a layer"):
        write_stage(tmp_path, "ffn_out", WHOLE_MODEL_LAYER, [1.0])
    with pytest.raises(ValueError, match="0..=0xFFFFFFFF"):
        write_aprt(tmp_path / "x.bin", -1, [1.0])
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "r.bin"
    target.write_bytes(b"old contents")
    inode_before = target.stat().st_ino
    write_aprt(target, 0, [7.0])
    assert read_aprt(target).values.tolist() == [7.0]
    assert target.stat().st_ino != inode_before  # a new file was renamed over the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.bin"]


def test_written_file_gets_umask_permissions_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_aprt(tmp_path / "p.bin", 0, [1.0])
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_no_temp_file(tmp_path):
    class Exploding:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_aprt(tmp_path / "x.bin", 0, Exploding())
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- read errors


def test_short_file_is_truncated_header(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"APRT\0\0\0\0\1\0\0")  # 11 bytes
    with pytest.raises(AprtFormatError) as caught:
        read_aprt(path)
    assert str(caught.value) == f"{path}: save-tensor header truncated: got 11 bytes, need 12"


def test_empty_file_is_truncated_header(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(FormatError, match=r"header truncated: got 0 bytes, need 12$"):
        read_aprt(path)


def test_bad_magic_names_the_bytes(tmp_path):
    path = tmp_path / "g.bin"
    path.write_bytes(b"GGUF" + bytes(8))
    with pytest.raises(AprtFormatError) as caught:
        read_aprt(path)
    assert str(caught.value) == (
        f"{path}: save-tensor magic mismatch: got [71, 71, 85, 70], expected [65, 80, 82, 84]"
    )


def test_short_body_is_a_length_mismatch(tmp_path):
    path = raw_file(tmp_path / "b.bin", 0, 3, struct.pack("<2f", 1.0, 2.0))
    with pytest.raises(AprtFormatError) as caught:
        read_aprt(path)
    assert str(caught.value) == (
        f"{path}: save-tensor body length mismatch: header says 12 bytes (3 f32s), got 8"
    )


def test_corrupt_dim_product_never_allocates_past_the_file(tmp_path):
    path = raw_file(tmp_path / "huge.bin", 0, 0xFFFFFFFF, bytes(16))
    tracemalloc.start()
    try:
        with pytest.raises(AprtFormatError, match="header says 17179869180 bytes"):
            read_aprt(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # far below the 16 GiB the header claims


def test_missing_file(tmp_path):
    path = tmp_path / "nope.bin"
    with pytest.raises(AprtOpenError) as caught:
        read_aprt(path)
    assert str(caught.value) == f"{path}: cannot open: No such file or directory (os error 2)"


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(AprtOpenError, match=r"cannot open: Is a directory \(os error 21\)"):
        read_aprt(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.bin"
    os.mkfifo(fifo)
    with pytest.raises(AprtOpenError, match="not a regular file"):
        read_aprt(fifo)


def test_read_header_only(tmp_path):
    path = write_aprt(tmp_path / "h.bin", 9, np.zeros(5, dtype=np.float32))
    header = read_aprt_header(path)
    assert (header.layer, header.dim_product, header.is_whole_model) == (9, 5, False)


# ----------------------------------------------------------------------------- tokens.json


def test_tokens_json_round_trip(tmp_path):
    path = write_tokens_json(tmp_path / "t", [1, 22, 333], "What is 2+2?", "m.gguf")
    assert path == tmp_path / "t" / "tokens.json"
    assert json.loads(path.read_text()) == {
        "schema": "apr-tui-tokens-v1",
        "token_ids": [1, 22, 333],
        "prompt": "What is 2+2?",
        "model": "m.gguf",
        "complete": True,
    }
    info = read_tokens_json(path)
    assert (info.token_ids, info.prompt, info.model) == ([1, 22, 333], "What is 2+2?", "m.gguf")


def test_tokens_json_nulls(tmp_path):
    path = write_tokens_json(tmp_path, [5], None, None)
    info = read_tokens_json(path)
    assert (info.token_ids, info.prompt, info.model) == ([5], None, None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not valid JSON (Expecting property name enclosed in double quotes"),
        ("[1, 2]", "expected a JSON object"),
        (
            '{"schema": "other", "token_ids": []}',
            '"schema" must be "apr-tui-tokens-v1", got "other"',
        ),
        ('{"schema": "apr-tui-tokens-v1", "token_ids": [1, -2]}', '"token_ids" must be a list'),
        ('{"schema": "apr-tui-tokens-v1", "token_ids": [true]}', '"token_ids" must be a list'),
        ('{"schema": "apr-tui-tokens-v1", "token_ids": "1,2"}', '"token_ids" must be a list'),
        ('{"schema": "apr-tui-tokens-v1", "token_ids": [], "prompt": 3}', '"prompt" must be'),
    ],
)
def test_malformed_tokens_json_names_the_file(tmp_path, text, reason):
    path = tmp_path / "tokens.json"
    path.write_text(text)
    with pytest.raises(FormatError) as caught:
        read_tokens_json(path)
    assert str(caught.value).startswith(f"{path}: {reason}")


# ----------------------------------------------------------------------------- trace dirs


def make_trace(root: Path) -> None:
    write_stage(root, "embedding", 0, [1.0, 2.0])
    for layer in (0, 1, 10):
        write_stage(root, "attn_norm", layer, [float(layer)])
        write_stage(root, "ffn_out", layer, [float(layer), 1.0])
    write_stage(root, "lm_head", 0, [0.5, 0.25, 0.125])
    write_stage(root, "final_norm", 0, [3.0])


def test_trace_dir_entries_in_computation_order(tmp_path):
    make_trace(tmp_path)
    trace = read_trace_dir(tmp_path)
    assert list(trace.entries) == [
        (0, "embedding"),
        (0, "attn_norm"),
        (0, "ffn_out"),
        (1, "attn_norm"),
        (1, "ffn_out"),
        (10, "attn_norm"),
        (10, "ffn_out"),
        (WHOLE_MODEL_LAYER, "final_norm"),
        (WHOLE_MODEL_LAYER, "lm_head"),
    ]
    assert trace.entries[(10, "ffn_out")] == tmp_path / "layer-10" / "ffn_out.bin"
    assert trace.layers == [0, 1, 10]
    assert trace.unknown == []
    assert trace.token_ids is None and trace.prompt is None


def test_trace_dir_reads_tokens_json(tmp_path):
    make_trace(tmp_path)
    write_tokens_json(tmp_path, [9, 8, 7], "hi", None)
    trace = read_trace_dir(tmp_path)
    assert (trace.token_ids, trace.prompt, trace.model) == ([9, 8, 7], "hi", None)
    assert trace.unknown == []


def test_trace_dir_malformed_tokens_json_is_an_error(tmp_path):
    make_trace(tmp_path)
    (tmp_path / "tokens.json").write_text("{")
    with pytest.raises(FormatError, match=r"tokens\.json: not valid JSON"):
        read_trace_dir(tmp_path)


def test_trace_dir_reports_what_it_does_not_understand(tmp_path):
    make_trace(tmp_path)
    (tmp_path / "_PROVENANCE.txt").write_text("hf script")  # understood, skipped
    (tmp_path / "notes.txt").write_text("x")
    raw_file(tmp_path / "bogus_stage.bin", WHOLE_MODEL_LAYER, 0)
    raw_file(tmp_path / "attn_out.bin", WHOLE_MODEL_LAYER, 0)  # per-layer stage at root
    raw_file(tmp_path / "layer-1" / "lm_head.bin", 1, 0)  # whole-model stage in a layer dir
    raw_file(tmp_path / "layer-1" / "layer_output.bin", 1, 0)  # alias file name
    raw_file(tmp_path / "layer-2" / "ffn_up.bin", 7, 0)  # header disagrees with its dir
    raw_file(tmp_path / "final_norm.bin", 0, 0)  # root file without the sentinel
    (tmp_path / "layer-2").mkdir(exist_ok=True)
    (tmp_path / "layer-2" / "ffn_gate.bin").write_bytes(b"GGUF" + bytes(8))  # bad magic
    raw_file(tmp_path / "layer-2" / "attention.bin", 2, 4, bytes(4))  # short body
    (tmp_path / "layer-03").mkdir()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "layer-1" / "sub").mkdir()

    trace = read_trace_dir(tmp_path, strict=False)
    reasons = {path.relative_to(tmp_path).as_posix(): reason for path, reason in trace.unknown}
    assert reasons == {
        "notes.txt": "not a .bin stage file",
        "bogus_stage.bin": "unknown stage name 'bogus_stage'",
        "attn_out.bin": "per-layer stage attn_out at the root (apr writes it in layer-N/)",
        "layer-1/lm_head.bin": (
            "whole-model stage lm_head inside a layer directory (apr writes it at the root)"
        ),
        "layer-1/layer_output.bin": (
            "alias file name; apr writes the canonical name post_ffn_residual.bin"
        ),
        "layer-2/ffn_up.bin": "header layer 7 disagrees with its directory (2)",
        "final_norm.bin": ("header layer 0 disagrees with the root (whole-model) (4294967295)"),
        "layer-2/ffn_gate.bin": (
            "save-tensor magic mismatch: got [71, 71, 85, 70], expected [65, 80, 82, 84]"
        ),
        "layer-2/attention.bin": (
            "save-tensor body length mismatch: header says 16 bytes (4 f32s), got 4"
        ),
        "layer-03": "directory is not layer-<N>",
        "cpu": "directory is not layer-<N>",
        "layer-1/sub": "unexpected directory inside layer-<N>",
    }
    # the good files are still all there, the bad ones are not
    assert (WHOLE_MODEL_LAYER, "final_norm") not in trace.entries
    assert (2, "ffn_up") not in trace.entries
    assert (1, "ffn_out") in trace.entries and (WHOLE_MODEL_LAYER, "lm_head") in trace.entries


def test_layer_directories_stop_below_the_whole_model_sentinel(tmp_path):
    """layer-4294967294 is the last per-layer directory; 0xFFFFFFFF is the whole-model sentinel
    and anything larger is not a u32, so neither names a layer (header layers match the dirs,
    so only the directory-name rule can reject them)."""
    make_trace(tmp_path)
    raw_file(tmp_path / "layer-4294967294" / "attn_norm.bin", 0xFFFFFFFE, 1, bytes(4))
    raw_file(tmp_path / "layer-4294967295" / "attn_norm.bin", 0xFFFFFFFF, 1, bytes(4))
    raw_file(tmp_path / "layer-4294967296" / "attn_norm.bin", 0, 1, bytes(4))
    trace = read_trace_dir(tmp_path)
    reasons = {path.relative_to(tmp_path).as_posix(): reason for path, reason in trace.unknown}
    assert reasons == {
        "layer-4294967295": "directory is not layer-<N>",
        "layer-4294967296": "directory is not layer-<N>",
    }
    assert (WHOLE_MODEL_LAYER, "attn_norm") not in trace.entries
    assert trace.layers == [0, 1, 10, 0xFFFFFFFE]


def test_trace_dir_skips_in_flight_temp_files(tmp_path):
    make_trace(tmp_path)
    (tmp_path / ".lm_head.bin.1234.0badc0de.tmp").write_bytes(b"APR")
    assert read_trace_dir(tmp_path).unknown == []


def test_missing_trace_dir(tmp_path):
    with pytest.raises(FormatError) as caught:
        read_trace_dir(tmp_path / "absent")
    assert str(caught.value) == f"{tmp_path / 'absent'}: no such directory"


def test_trace_dir_that_is_a_file(tmp_path):
    path = write_aprt(tmp_path / "x.bin", 0, [1.0])
    with pytest.raises(FormatError, match=r"x\.bin: not a directory$"):
        read_trace_dir(path)


def test_trace_dir_without_stage_files(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FormatError) as caught:
        read_trace_dir(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path}: no APRT stage files")


# ----------------------------------------------------------------------------- pair check


def test_pair_check_names_the_size_before_the_layer():
    """apr's order (§2.2): a pair wrong in both is refused for its size."""
    with pytest.raises(DiffError) as error:
        check_aprt_pair("a.bin", AprtHeader(0, 2), "b.bin", AprtHeader(7, 3))
    assert str(error.value) == (
        "APRT dim_product mismatch: a.bin has 2 f32s, b.bin has 3 f32s — "
        "cannot compare stage tensors of different sizes"
    )
    with pytest.raises(DiffError) as error:
        check_aprt_pair("./a.bin", AprtHeader(0, 2), "b.bin", AprtHeader(7, 2))
    assert str(error.value) == (  # the paths as given, not normalized
        "APRT layer mismatch: ./a.bin is layer 0, b.bin is layer 7 — "
        "stages from different layers cannot be compared element-wise"
    )


def test_pair_check_across_layers_only_checks_the_size():
    check_aprt_pair("a.bin", AprtHeader(0, 2), "b.bin", AprtHeader(7, 2), same_layer=False)
    with pytest.raises(DiffError, match="dim_product mismatch"):
        check_aprt_pair("a.bin", AprtHeader(0, 2), "b.bin", AprtHeader(7, 3), same_layer=False)
