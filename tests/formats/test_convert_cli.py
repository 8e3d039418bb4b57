"""`apr-tui convert`, run as the installed command in a subprocess."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from engine.formats import open_model
from tests.conftest import apr_tui_argv

from .test_gguf import bound_q6_k


def apr_tui(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*apr_tui_argv(), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("source", ["gguf", "safetensors"])
def test_convert_writes_a_loadable_apr(llama_files, llama, tmp_path, source):
    out = tmp_path / "out.apr"
    result = apr_tui("convert", str(llama_files[source]), str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out} (")
    assert "llama, 2 layers, hidden 256, vocab 277" in result.stdout
    model = open_model(out)
    assert model.config == llama.config
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        np.testing.assert_array_equal(model.weights.get(name), llama.weights.get(name))


def test_convert_with_dtype(llama_files, tmp_path):
    out = tmp_path / "q.apr"
    result = apr_tui("convert", str(llama_files["apr"]), str(out), "--dtype", "q6_k")
    assert result.returncode == 0, result.stderr
    model = open_model(out)
    assert model.weights.dtype_code("model.layers.0.mlp.up_proj.weight") == 14  # GGML Q6_K
    # and the values are the source's within Q6_K's error bound (rows of 256: no padding)
    source = open_model(llama_files["apr"]).weights.get("model.layers.0.mlp.up_proj.weight")
    got = model.weights.get("model.layers.0.mlp.up_proj.weight")
    assert not np.array_equal(got, source)  # really quantized
    assert np.all(np.abs(got - source) <= bound_q6_k(source.reshape(-1)).reshape(source.shape))


def test_refuses_to_overwrite_without_force(llama_files, tmp_path):
    out = tmp_path / "keep.apr"
    out.write_bytes(b"precious")
    result = apr_tui("convert", str(llama_files["gguf"]), str(out))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"apr-tui: error: {out}: already exists; pass --force to replace it"
    )
    assert out.read_bytes() == b"precious"
    assert apr_tui("convert", str(llama_files["gguf"]), str(out), "--force").returncode == 0
    assert open_model(out).format == "apr"


def test_bad_input_is_one_line_and_leaves_nothing_behind(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    result = apr_tui("convert", str(broken), str(tmp_path / "out.apr"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"apr-tui: error: {broken}: header claims")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_bad_dtype_is_a_usage_error(llama_files, tmp_path):
    result = apr_tui(
        "convert", str(llama_files["gguf"]), str(tmp_path / "o.apr"), "--dtype", "q3_k"
    )
    assert result.returncode == 2
    assert result.stderr == (
        "apr-tui: error: apr-tui convert: argument --dtype: invalid choice: 'q3_k' "
        "(choose from 'f32', 'f16', 'q8_0', 'q4_k', 'q6_k') (see --help)\n"
    )
