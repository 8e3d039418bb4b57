"""Every local-error recipe against HF transformers: with HF's own stages as the checked side
(the `hf:` source, float32, transformers' own modules) and the same weights, every stage's
local error is float32 rounding (< 1e-5), for Llama, Qwen2 (QKV bias) and Qwen3 (Q/K norm).

A recipe that recomputed a stage differently from HF (a wrong norm, RoPE pairing, GQA grouping,
softmax mask or bias) would leave a large local error on every layer of that stage.
"""

from __future__ import annotations

import pytest

from engine.formats import safetensors as safetensors_format
from engine.plan import prepare
from engine.synth import synthesize

pytestmark = pytest.mark.usefixtures("hf_installed")

TOKENS = [3, 17, 5, 42, 9, 28, 11]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-local")
    return {
        arch: safetensors_format.write(
            synthesize(arch, seed=13, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2),
            root / arch,
        )
        for arch in ("llama", "qwen2", "qwen3")
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_every_recipe_is_exact_against_hf(hf_dirs, arch):
    with prepare(hf_dirs[arch], f"hf:{hf_dirs[arch]}", token_ids=TOKENS, device="cpu") as plan:
        assert plan.local is not None and plan.local.side == "b"  # HF's stages are checked
        cells = list(plan.run())
    checked = {c.stage for c in cells if c.local is not None and c.local.error is not None}
    recipes = {
        "embedding", "attn_norm", "qkv_matmul", "q_post_rope", "k_post_rope", "attn_scores",
        "attn_softmax", "attention", "attn_out", "post_attn_residual", "ffn_norm", "ffn_gate",
        "ffn_up", "ffn_silu", "ffn_swigl", "ffn_out", "post_ffn_residual", "final_norm",
        "lm_head",
    }  # fmt: skip
    if arch == "qwen2":
        recipes.add("qkv_bias")
    assert checked == recipes
    worst = max((c.local.error, c.layer, c.stage) for c in cells if c.local.error is not None)
    assert worst[0] < 1e-5, worst
