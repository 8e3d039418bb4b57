"""Corruption that used to decode as plausible garbage and exit 0 (issue 11, "silent garbage"):
each is now a one-line error naming the file and what is wrong."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from engine.errors import FormatError
from engine.formats import apr
from engine.trace_directory import read_trace_dir
from tests.hostile.conftest import (
    apr_index_entries,
    fix_apr_footer,
    gguf_tensor_fields,
    one_line_error,
    run_cli,
)

NORM = "model.layers.0.input_layernorm.weight"
GGUF_NORM = "blk.0.attn_norm.weight"


def edited_gguf(files, tmp_path, field: str, value: int, name: str = GGUF_NORM):
    data = bytearray(files.gguf.read_bytes())
    where = gguf_tensor_fields(bytes(data), name)
    fmt = "<Q" if field == "offset" else "<I"
    struct.pack_into(fmt, data, where[f"{field}_at"], value)
    path = tmp_path / "edited.gguf"
    path.write_bytes(bytes(data))
    return path, where


def test_gguf_offset_off_alignment_is_refused(apr_tui, files, tmp_path):
    """A one-byte change of an offset decoded shifted bytes and exited 0; llama.cpp refuses
    an offset that is not a multiple of general.alignment."""
    original = gguf_tensor_fields(files.gguf.read_bytes(), GGUF_NORM)
    path, _ = edited_gguf(files, tmp_path, "offset", original["offset"] + 1)
    result = run_cli(apr_tui, "convert", path, tmp_path / "out.apr", text=True)
    one_line_error(result, "edited.gguf", repr(GGUF_NORM), "not a multiple of the alignment 32")


def test_gguf_offset_into_another_tensor_is_refused(apr_tui, files, tmp_path):
    """An aligned offset that points into another tensor's bytes: overlap."""
    data = files.gguf.read_bytes()
    other = gguf_tensor_fields(data, "blk.0.attn_q.weight")
    path, _ = edited_gguf(files, tmp_path, "offset", other["offset"] + 32)
    result = run_cli(apr_tui, "convert", path, tmp_path / "out.apr", text=True)
    one_line_error(result, "edited.gguf", "overlaps tensor")


def test_gguf_integer_weight_is_refused(apr_tui, files, tmp_path):
    """An F32 norm re-typed as I32 (same size) decoded integers as weights and exited 0."""
    path, where = edited_gguf(files, tmp_path, "type", 26)  # GGML_TYPE_I32
    assert where["type"] == 0  # it was F32
    result = run_cli(apr_tui, "convert", path, tmp_path / "out.apr", text=True)
    one_line_error(result, "edited.gguf", repr(GGUF_NORM), "integer type I32")


def edited_apr(files, tmp_path, edit) -> tuple:
    data = bytearray(files.apr.read_bytes())
    entries = apr_index_entries(bytes(data))
    edit(data, entries)
    path = tmp_path / "edited.apr"
    path.write_bytes(bytes(data))
    return path, entries


def test_apr_footer_checksum_is_verified(apr_tui, files, tmp_path):
    """One flipped byte inside a tensor: the footer CRC says so; it was never checked."""

    def flip(data, entries):
        data_offset = struct.unpack_from("<Q", data, 32)[0]
        data[data_offset + entries[NORM]["offset"] + 1] ^= 0x40

    path, _ = edited_apr(files, tmp_path, flip)
    result = run_cli(apr_tui, "convert", path, tmp_path / "out.apr", text=True)
    one_line_error(result, "edited.apr", "APR footer CRC mismatch")
    with pytest.raises(FormatError, match="footer CRC mismatch"):
        apr.open_apr(path)


def test_apr_offset_off_alignment_is_refused(apr_tui, files, tmp_path):
    def shift(data, entries):
        struct.pack_into("<Q", data, entries[NORM]["offset_at"], entries[NORM]["offset"] + 4)
        fix_apr_footer(data)  # the footer alone would catch it: reach the offset check

    path, _ = edited_apr(files, tmp_path, shift)
    result = run_cli(apr_tui, "convert", path, tmp_path / "out.apr", text=True)
    one_line_error(result, "edited.apr", repr(NORM), "is not a multiple of 64")


def test_apr_offset_into_another_tensor_is_refused(apr_tui, files, tmp_path):
    def alias(data, entries):
        other = entries["model.layers.0.post_attention_layernorm.weight"]["offset"]
        struct.pack_into("<Q", data, entries[NORM]["offset_at"], other)
        fix_apr_footer(data)

    path, _ = edited_apr(files, tmp_path, alias)
    result = run_cli(apr_tui, "convert", path, tmp_path / "out.apr", text=True)
    one_line_error(result, "edited.apr", "overlaps tensor")


def test_apr_integer_weight_is_refused(apr_tui, files, tmp_path):
    def retype(data, entries):
        assert entries[NORM]["dtype"] == 0  # F32
        data[entries[NORM]["dtype_at"]] = 4  # I32, the same 4 bytes a value
        fix_apr_footer(data)

    path, _ = edited_apr(files, tmp_path, retype)
    result = run_cli(apr_tui, "convert", path, tmp_path / "out.apr", text=True)
    one_line_error(result, "edited.apr", repr(NORM), "integer dtype i32")


@pytest.mark.parametrize(
    ("key", "message"),
    [("rope_theta", "rope_theta 0.0 is not a positive number"), ("head_dim", "head_dim is 0")],
)
def test_config_json_zero_is_refused_not_defaulted(apr_tui, files, tmp_path, key, message):
    """`value or default` turned an explicit 0 into 10000.0 / hidden // heads: the model ran
    with a RoPE base or head size the file did not say."""
    hf = tmp_path / "hf"
    shutil.copytree(files.hf_dir, hf)
    config = json.loads((hf / "config.json").read_text())
    config[key] = 0
    (hf / "config.json").write_text(json.dumps(config))
    result = run_cli(apr_tui, "convert", hf, tmp_path / "out.apr", text=True)
    one_line_error(result, "config.json", message)


@pytest.fixture
def reference(apr_tui, files, tmp_path):
    out = tmp_path / "ref"
    result = run_cli(
        apr_tui,
        "trace",
        files.apr,
        "--save-tensor",
        "attn_norm,ffn_out",
        "--tokens",
        "1,2,3",
        "--save-tensor-layers",
        "0..2",
        "--save-tensor-dir",
        out,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_bisect_with_a_corrupt_reference_stage_fails(apr_tui, files, reference):
    """The stage was listed as "ignored" and went unchecked: exit 0, a CI gate that passes on
    a broken reference. Now the trace directory is refused, naming the file."""
    bad = reference / "layer-1" / "ffn_out.bin"
    bad.write_bytes(b"GGUF" + bad.read_bytes()[4:])
    result = run_cli(apr_tui, "bisect", files.apr, reference, text=True)
    one_line_error(result, str(bad), "corrupt stage file", "magic mismatch")


def test_bisect_with_a_reference_stage_in_the_wrong_layer_fails(apr_tui, files, reference):
    bad = reference / "layer-1" / "attn_norm.bin"
    data = bytearray(bad.read_bytes())
    struct.pack_into("<I", data, 4, 0)  # header layer 0 inside layer-1/
    bad.write_bytes(bytes(data))
    result = run_cli(apr_tui, "bisect", files.apr, reference, "--json", text=True)
    one_line_error(result, str(bad), "corrupt stage file", "header layer 0 disagrees")


def test_trace_dir_reader_keeps_corrupt_files_listed_when_not_strict(reference):
    """The file browser still opens such a directory and lists the corrupt file with why."""
    bad = reference / "layer-0" / "attn_norm.bin"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(FormatError, match="corrupt stage file: save-tensor body length"):
        read_trace_dir(reference)
    trace = read_trace_dir(reference, strict=False)
    assert [path for path, _ in trace.corrupt] == [bad]
    assert (0, "attn_norm") not in trace.entries and (0, "ffn_out") in trace.entries
    assert np.isfinite(trace.layers).all()
