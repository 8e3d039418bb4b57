"""Errors stay one line whatever text they quote (issue 11, "one-line errors over several
lines"): file names, flag values and metadata strings with newlines, carriage returns and ANSI
escapes; numpy RuntimeWarnings; `apr-tui` with no arguments (tests/test_cli_top.py)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from engine.errors import FormatError, path_text, printable
from tests.hostile.conftest import one_line_error, run_cli

HOSTILE_NAMES = ["a\nb.gguf", "a\rb.gguf", "a\x1b[31mred.gguf", "a\u2028b.gguf", "a\x9bc.gguf"]


def test_printable_escapes_every_control_character_and_is_idempotent():
    """The unit under every message: each line-breaking or terminal-controlling character
    becomes a visible escape; escaping twice changes nothing; other text is left alone."""
    text = "x\ny\rz\x1b[0m\x00\x7f\x9b\u2028\u2029\t" + "caf\u00e9 \u2192 \U0001f600"
    shown = printable(text)
    assert (
        shown == "x\\ny\\rz\\x1b[0m\\x00\\x7f\\x9b\\u2028\\u2029\\t" + "caf\u00e9 \u2192 \U0001f600"
    )
    assert printable(shown) == shown
    assert printable("m\udcff.gguf") == "m\\xff.gguf"  # an undecodable byte of a path
    assert str(FormatError("bad\nname: x")) == "bad\\nname: x"
    assert path_text("m\udcff.gguf") == "m\\xff.gguf"


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_missing_file_with_a_hostile_name_is_one_line(apr_tui, tmp_path, name):
    """The OSError path (no such file) printed the name raw: two lines, or a repainted line."""
    result = run_cli(apr_tui, "convert", tmp_path / name, tmp_path / "out.apr", text=True)
    line = one_line_error(result, "no such file or directory")
    assert printable(name) in line


@pytest.mark.parametrize("name", HOSTILE_NAMES[:3])
def test_corrupt_model_with_a_hostile_name_is_one_line(apr_tui, files, tmp_path, name):
    """A FormatError naming the file: the name is escaped inside the message."""
    bad = tmp_path / name
    bad.write_bytes(files.gguf.read_bytes()[:100])
    result = run_cli(apr_tui, "bisect", bad, files.apr, text=True)
    line = one_line_error(result, "more than the file holds")
    assert printable(name) in line


def test_threshold_with_a_newline_is_one_line(apr_tui, files):
    """`float("2\\n")` is 2.0, so the range error quoted the raw text: two lines."""
    result = run_cli(apr_tui, "bisect", files.apr, files.gguf, "--threshold", "2\n", text=True)
    one_line_error(result, "--threshold", "must be a cosine in [-1, 1], got 2\\n")


def test_safetensors_dtype_with_a_newline_is_one_line(apr_tui, files, tmp_path):
    """The dtype string went into the message unquoted."""
    hf = tmp_path / "hf"
    shutil.copytree(files.hf_dir, hf)
    data = (hf / "model.safetensors").read_bytes()
    (length,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + length])
    name = "model.layers.0.input_layernorm.weight"
    header[name]["dtype"] = "X\nY\x1b[2J"
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    begin = 8 + length
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[begin:])
    result = run_cli(apr_tui, "convert", hf, tmp_path / "out.apr", text=True)
    one_line_error(result, "has dtype X\\nY\\x1b[2J")


def test_quant_method_with_a_newline_is_one_line(apr_tui, files, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(files.hf_dir, hf)
    config = json.loads((hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq\n\x1b[31mok"}
    (hf / "config.json").write_text(json.dumps(config))
    result = run_cli(apr_tui, "convert", hf, tmp_path / "out.apr", text=True)
    one_line_error(result, "quantized checkpoints (gptq\\n\\x1b[31mok)")


def test_architecture_with_control_characters_is_one_line(apr_tui, files, tmp_path):
    data = bytearray(files.gguf.read_bytes())
    old = b"\x05\x00\x00\x00\x00\x00\x00\x00llama"  # general.architecture = "llama"
    at = data.index(old)
    hostile = (
        bytes(data[:at])
        + b"\x05\x00\x00\x00\x00\x00\x00\x00ll\x1bma"
        + bytes(data[at + len(old) :])
    )
    path = tmp_path / "arch.gguf"
    path.write_bytes(hostile)
    result = run_cli(apr_tui, "convert", path, tmp_path / "out.apr", text=True)
    one_line_error(result, "unsupported architecture")


def test_rope_freq_base_1e300_prints_no_runtime_warning(apr_tui, tmp_path, monkeypatch):
    """An f64 `llama.rope.freq_base` of 1e300 overflowed the f32 cast: numpy printed a
    RuntimeWarning and its source line on stderr. Now the value is carried as it is."""
    import gguf as gguf_package

    from engine.formats import gguf
    from engine.synth import synthesize
    from tests.hostile.conftest import DIMS

    def as_float64(self, value):  # what a hostile converter may write: an F64 key
        self.add_float64(f"{self.arch}.rope.freq_base", 1e300)

    monkeypatch.setattr(gguf_package.GGUFWriter, "add_rope_freq_base", as_float64)
    path = gguf.write(synthesize("llama", seed=3, **DIMS), tmp_path / "rope.gguf", "f32")
    reader = gguf_package.GGUFReader(path)
    field = reader.fields["llama.rope.freq_base"]
    assert field.types == [gguf_package.GGUFValueType.FLOAT64]
    result = run_cli(
        apr_tui,
        "trace",
        path,
        "--save-tensor",
        "q_post_rope",
        "--tokens",
        "1,2,3",
        "--save-tensor-dir",
        tmp_path / "out",
        text=True,
    )
    assert "Warning" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
