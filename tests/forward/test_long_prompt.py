"""Long prompts: the installed `apr-tui trace` on a SmolLM2 prompt long enough for the blocked
attention path (1,400 tokens: 9 × 1400² float32 = 70.6 MB per attention stage, above
engine.attention.WHOLE_ATTENTION_LIMIT), its streamed stage files against the whole path run
in this process, and its up-front cost line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine.attention as attention

APR_TUI = str(Path(sys.executable).with_name("apr-tui"))
SEQ = 1400
TOKENS = [(i * 7919) % 40000 + 100 for i in range(SEQ)]


def read_aprt_file(path: Path) -> tuple[int, np.ndarray]:
    data = path.read_bytes()
    assert data[:4] == b"APRT"
    layer, count = np.frombuffer(data[4:12], dtype="<u4").tolist()
    values = np.frombuffer(data, dtype="<f4", offset=12)
    assert values.size == count
    return layer, values


@pytest.mark.slow
def test_long_trace_streams_attention_files_equal_to_the_whole_path(
    smollm2_gguf, tmp_path, monkeypatch
):
    assert attention.use_blocked(9, SEQ)
    out = tmp_path / "long"
    result = subprocess.run(
        [
            APR_TUI, "trace", str(smollm2_gguf),
            "--save-tensor", "attn_scores,attn_softmax,attention",
            "--save-tensor-layers", "0..2", "--save-tensor-dir", str(out),
            "--tokens", ",".join(map(str, TOKENS)),
        ],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="200"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # announced before the run: 6 files, 4 × 70.6 MB of attention + 2 × [1400, 576] floats
    size = 6 * 12 + 4 * (4 * 9 * SEQ * SEQ) + 2 * (4 * SEQ * 576)
    line = next(x for x in result.stderr.splitlines() if "stage files" in x)
    assert f"{SEQ} tokens: 6 stage files, {size / 2**20:,.0f} MiB to write" in line
    assert re.search(r"about [0-9,]+ MiB of working memory", line)
    assert line.index("stage files") >= 0 and "layer 1/2" in result.stderr

    # the whole path, in this process, as the reference
    monkeypatch.setattr(attention, "WHOLE_ATTENTION_LIMIT", 1 << 40)
    from engine.formats import open_model
    from engine.forward import trace

    with open_model(smollm2_gguf) as model:
        for capture in trace(
            model, TOKENS, stages=["attn_scores", "attn_softmax", "attention"], layers=(0, 2)
        ):
            assert isinstance(capture.array, np.ndarray)  # really the whole path
            layer, values = read_aprt_file(out / f"layer-{capture.layer}" / f"{capture.stage}.bin")
            assert layer == capture.layer
            expected = capture.array.reshape(-1)
            np.testing.assert_allclose(values, expected, rtol=1e-5, atol=2e-6)
            if capture.stage != "attention":
                grid = values.reshape(9, SEQ, SEQ)
                assert np.all(grid[:, np.triu(np.ones((SEQ, SEQ), bool), 1)] == 0.0)


def test_run_cost_counts_files_bytes_and_memory():
    from aprtui.commands.trace_checks import run_cost
    from engine.model import ModelConfig
    from engine.stages import SaveTensorPlan

    config = ModelConfig(
        architecture="llama", hidden_size=64, intermediate_size=160, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=300, rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )  # fmt: skip
    plan = SaveTensorPlan.parse("embedding,attn_softmax,ffn_up,lm_head,logits_all", "1..9")
    names = [s.name for s in plan.stages]
    files, size, peak = run_cost(plan, config, 10, names)
    # embedding only with layer 0 (not in 1..9); 3 layers exist in 1..9 for two stages; 2 roots
    assert files == 3 * 2 + 2
    expected = (
        3 * (12 + 4 * 4 * 10 * 10)  # attn_softmax [heads, seq, seq]
        + 3 * (12 + 4 * 10 * 160)  # ffn_up [seq, intermediate]
        + (12 + 4 * 300)  # lm_head [vocab]
        + (12 + 4 * 10 * 300)  # logits_all [seq, vocab]
    )
    assert size == expected
    assert peak >= 5 * 4 * 10 * 10 * 4  # at least the whole path's attention copies
