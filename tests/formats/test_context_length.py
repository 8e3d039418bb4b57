"""The model's context length: read from every format, kept by every writer (our writers
recorded 2048 for every model before), and a prompt past it warned about, not refused."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import gguf as gguf_py
import pytest

from engine.formats import apr, gguf, open_model, safetensors
from engine.synth import synthesize

DIMS = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)


def model_with_context(length: int | None):
    model = synthesize("llama", seed=4, **DIMS)
    return replace(model, config=replace(model.config, context_length=length))


@pytest.mark.parametrize(
    "write", [apr.write, gguf.write, safetensors.write], ids=["apr", "gguf", "hf"]
)
def test_every_writer_keeps_the_context_length_and_every_reader_reads_it(tmp_path, write):
    path = Path(write(model_with_context(4096), tmp_path / "m"))
    with open_model(path) as model:
        assert model.config.context_length == 4096


def test_a_gguf_context_length_is_gguf_pys_too(tmp_path):
    """Independent of our reader: gguf-py reads the key our writer wrote."""
    path = Path(gguf.write(model_with_context(3000), tmp_path / "m.gguf"))
    field = gguf_py.GGUFReader(path).fields["llama.context_length"]
    assert int(field.contents()) == 3000


@pytest.mark.slow
def test_smollm2s_context_length(smollm2_gguf):
    field = gguf_py.GGUFReader(smollm2_gguf).fields["llama.context_length"]
    with open_model(smollm2_gguf) as model:
        assert model.config.context_length == int(field.contents()) == 8192


def test_a_prompt_past_the_context_length_is_warned_about_and_still_traced(apr_tui, tmp_path):
    path = Path(apr.write(model_with_context(8), tmp_path / "short.apr"))
    argv = [*apr_tui, "trace", str(path), "--save-tensor", "attn_norm"]

    def trace(tokens: int, out: str) -> subprocess.CompletedProcess[str]:
        ids = ",".join(str(5 + i) for i in range(tokens))
        return subprocess.run(
            [*argv, "--tokens", ids, "--save-tensor-dir", str(tmp_path / out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    past = trace(10, "past")
    assert past.returncode == 0, past.stderr
    warnings = [line for line in past.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: short.apr: 10 tokens exceed the model's context length 8: positions 8 and "
        "on are past what it was trained for"
    ]
    within = trace(8, "within")
    assert within.returncode == 0 and "warning" not in within.stderr
    bisect = subprocess.run(
        [*apr_tui, "bisect", str(path), str(path), "--tokens", ",".join(["5"] * 9)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bisect.returncode == 0, bisect.stderr
    assert (
        sum("exceed the model's context length 8" in line for line in bisect.stderr.splitlines())
        == 2
    )
