"""Gemma 2 and Gemma 3 beyond the seeded HF oracle models (tests/forward/test_oracle.py).

Engine-synthesized Gemma models (engine/synth.py) written by the engine's own writers and loaded
by transformers from the safetensors checkpoint, so the HF config the writer emits is checked
by HF itself; every stage of every layer against HF for a prompt three times the sliding
window; and the GGUF bytes laid out the way llama.cpp's converter lays out a Gemma file (norm
weights stored as 1 + w, Gemma's tensor names, the window key).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.forward import produced_stages, trace
from engine.synth import SYNTH_WINDOW, synthesize
from tests.forward.agreement import TINY_MAX_REL_ERR, disagreements
from tests.forward.hf_oracle import hf_stage_captures

LONG_PROMPT = [5, 17, 99, 3, 42, 7, 127, 64, 1, 250, 33, 8]
"""Twelve tokens: three sliding windows of the synthesized models."""

GEMMA_DIMS = dict(
    hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=96
)
"""Gemma 3 270M's shape in small: one KV head shared by four query heads."""


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def written(request, tmp_path_factory):
    """(arch, engine model, its safetensors directory, HF's model loaded from that directory)."""
    from transformers import AutoModelForCausalLM

    from engine.formats import safetensors

    model = synthesize(request.param, seed=11, **GEMMA_DIMS)
    directory = safetensors.write(model, tmp_path_factory.mktemp(request.param) / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(
        directory, dtype="float32", attn_implementation="eager"
    )
    hf_model.eval()
    return request.param, model, directory, hf_model


def test_hf_reads_the_written_config_as_the_engine_means_it(written):
    arch, model, _, hf_model = written
    config = hf_model.config
    assert config.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    assert config.sliding_window == SYNTH_WINDOW
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert config.query_pre_attn_scalar == 24
    assert config.hidden_activation == "gelu_pytorch_tanh"
    if arch == "gemma2":
        assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (2.0, 3.0)
    else:
        assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
        assert config.rope_parameters["full_attention"]["rope_theta"] == 1000000.0


@pytest.mark.parametrize("source", ["memory", "safetensors", "gguf", "apr"])
def test_long_prompt_matches_hf_at_every_stage(written, source, tmp_path):
    """A prompt of three windows: the sliding layers drop keys HF drops, at every position."""
    from engine.formats import apr, gguf, open_model

    arch, model, directory, hf_model = written
    expected = hf_stage_captures(hf_model, LONG_PROMPT)
    if source == "safetensors":
        model = open_model(directory)
    elif source == "gguf":
        model = open_model(gguf.write(model, tmp_path / "m.gguf"))
    elif source == "apr":
        model = open_model(apr.write(model, tmp_path / "m.apr"))
    try:
        got = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, LONG_PROMPT)}
    finally:
        model.close()
    assert len(got) == 1 + 3 * 18 + 2
    assert disagreements(got, expected, max_rel=TINY_MAX_REL_ERR) == []


def test_produced_stages_name_gemmas_own_steps():
    gemma = produced_stages(synthesize("gemma3", seed=1, **GEMMA_DIMS).config)
    llama = produced_stages(synthesize("llama", seed=1).config)
    assert [s for s in gemma if s not in llama] == ["post_attn_norm", "ffn_gelu", "post_ffn_norm"]
    assert [s for s in llama if s not in gemma] == ["ffn_silu"]
    assert gemma.index("post_attn_norm") == gemma.index("attn_out") + 1
    assert gemma.index("post_ffn_norm") == gemma.index("ffn_out") + 1


def test_gguf_stores_gemma_the_llama_cpp_way(tmp_path):
    """Norms as 1 + w under llama.cpp's Gemma names, the window and soft caps as its keys."""
    from gguf import GGUFReader

    from engine.formats import gguf

    model = synthesize("gemma2", seed=4, **GEMMA_DIMS)
    reader = GGUFReader(gguf.write(model, tmp_path / "g.gguf"))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    pairs = {
        "blk.1.attn_norm.weight": "input_layernorm",
        "blk.1.post_attention_norm.weight": "post_attention_layernorm",
        "blk.1.ffn_norm.weight": "pre_feedforward_layernorm",
        "blk.1.post_ffw_norm.weight": "post_feedforward_layernorm",
        "blk.1.attn_q_norm.weight": None,
    }
    for gguf_name, hf_norm in pairs.items():
        if hf_norm is None:
            assert gguf_name not in tensors  # Gemma 2 has no Q/K norm
            continue
        stored = tensors[gguf_name]
        w = model.weights.get(f"model.layers.1.{hf_norm}.weight")
        np.testing.assert_array_equal(stored, w + np.float32(1.0))
    np.testing.assert_array_equal(
        tensors["output_norm.weight"], model.weights.get("model.norm.weight") + np.float32(1.0)
    )
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "gemma2"
    assert fields["gemma2.attention.sliding_window"] == SYNTH_WINDOW
    assert fields["gemma2.attn_logit_softcapping"] == 2.0
    assert fields["gemma2.final_logit_softcapping"] == 3.0
