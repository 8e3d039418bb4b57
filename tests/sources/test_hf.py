"""The HF transformers trace source against our own forward pass.

Float32 must agree within the bounds of the existing HF oracle tests (tests/forward/agreement.py:
cosine >= 0.99999 and max relative error 1e-5 on the tiny seeded models, 1e-4 on SmolLM2);
float16 and bfloat16 show their rounding floor, asserted loosely and printed for the report.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from engine.errors import AprTuiError, FormatError
from engine.formats import safetensors as safetensors_format
from engine.formats.gguf import open_gguf
from engine.forward import trace
from engine.sources import DirectorySource
from engine.stages import STAGE_BY_NAME, STAGES, WHOLE_MODEL_LAYER
from engine.synth import synthesize
from tests.forward.agreement import (
    SMOLLM2_MAX_REL_ERR,
    TINY_MAX_REL_ERR,
    cosine,
    disagreements,
)

pytestmark = pytest.mark.usefixtures("hf_installed")

SMOLLM2_TOKENS = [1, 504, 3458, 5145, 28, 8, 1090, 314, 2114, 30]
TINY_TOKENS = [3, 17, 42, 5, 9, 11, 23, 8]


def _ours(model, tokens) -> dict[tuple[int, str], np.ndarray]:
    return {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, tokens)}


def _captures(source, **kwargs) -> dict[tuple[int, str], np.ndarray]:
    return {(c.layer, c.stage): c.array for c in source.captures(**kwargs)}


@pytest.fixture(scope="module")
def seeded_dirs(tmp_path_factory):
    """HF directories (config.json + safetensors) of seeded Llama, Qwen2 and Qwen3 models."""
    root = tmp_path_factory.mktemp("hf-seeded")
    dirs = {}
    for arch in ("llama", "qwen2", "qwen3"):
        model = synthesize(arch, seed=11, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
        dirs[arch] = safetensors_format.write(model, root / arch)
    return dirs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_seeded_models_float32_agree_with_our_forward_pass(seeded_dirs, arch):
    from engine.formats import open_model
    from engine.sources.hf import HfSource

    with open_model(seeded_dirs[arch]) as model:
        ours = _ours(model, TINY_TOKENS)
    with HfSource(seeded_dirs[arch], TINY_TOKENS) as source:
        got = _captures(source)
        assert ("qkv_bias" in source.stages) == (arch == "qwen2")
        assert set(source.stages) | set(source.not_produced) == {s.name for s in STAGES}
    assert set(got) == set(ours)
    assert disagreements(got, ours, max_rel=TINY_MAX_REL_ERR) == []
    keys = [(layer, STAGE_BY_NAME[stage].index) for layer, stage in got]
    assert keys == sorted(keys)


def test_seeded_bfloat16_differs_by_rounding_only(seeded_dirs):
    from engine.formats import open_model
    from engine.sources.hf import HfSource

    with open_model(seeded_dirs["qwen2"]) as model:
        ours = _ours(model, TINY_TOKENS)
    with HfSource(seeded_dirs["qwen2"], TINY_TOKENS, dtype="bfloat16") as source:
        got = _captures(source)
        assert source.record()["dtype"] == "bfloat16"
    floor = min(cosine(got[key], ours[key]) for key in got)
    worst_rel = max(float(np.abs(got[k] - ours[k]).max() / np.abs(ours[k]).max()) for k in got)
    # bfloat16 keeps 8 bits of mantissa (2^-9 ≈ 2e-3 relative per rounding): close, never exact.
    assert 0.999 <= floor < 0.9999999, floor
    assert worst_rel > TINY_MAX_REL_ERR
    print(f"\nseeded qwen2 bfloat16: cosine floor {floor:.6f}, worst max rel err {worst_rel:.2e}")


@pytest.mark.slow
def test_smollm2_float32_agrees_with_our_forward_pass(smollm2_gguf, smollm2_hf_model):
    """The session's HF load of the SmolLM2 GGUF, captured through the source."""
    from engine.sources.hf import HfSource

    with open_gguf(smollm2_gguf) as model:
        ours = _ours(model, SMOLLM2_TOKENS)
    with HfSource(smollm2_gguf, SMOLLM2_TOKENS, model=smollm2_hf_model) as source:
        got = _captures(source)
        np.testing.assert_array_equal(
            source.tensor(WHOLE_MODEL_LAYER, "lm_head"), got[(WHOLE_MODEL_LAYER, "lm_head")]
        )
        np.testing.assert_array_equal(source.tensor(12, "ffn_silu"), got[(12, "ffn_silu")])
    assert smollm2_hf_model.config._attn_implementation == "eager"  # given back on close
    assert set(got) == set(ours)
    assert disagreements(got, ours, max_rel=SMOLLM2_MAX_REL_ERR) == []


@pytest.mark.slow
def test_smollm2_float16_noise_floor(smollm2_gguf):
    from engine.sources.hf import HfSource

    with open_gguf(smollm2_gguf) as model:
        ours = _ours(model, SMOLLM2_TOKENS)
    with HfSource(smollm2_gguf, SMOLLM2_TOKENS, dtype="float16") as source:
        got = _captures(source)
    by_stage: dict[str, float] = {}
    for key, values in got.items():
        by_stage[key[1]] = min(by_stage.get(key[1], 1.0), cosine(values, ours[key]))
    floor_stage = min(by_stage, key=by_stage.get)
    print(f"\nSmolLM2 float16 cosine floor {by_stage[floor_stage]:.7f} at {floor_stage}")
    assert 0.9999 <= by_stage[floor_stage] < 1.0
    top1_ours = int(np.argmax(ours[(WHOLE_MODEL_LAYER, "lm_head")]))
    assert int(np.argmax(got[(WHOLE_MODEL_LAYER, "lm_head")])) == top1_ours


def test_dump_writes_a_trace_directory_with_its_record(seeded_dirs, tmp_path):
    from engine.sources.dump import write_trace
    from engine.sources.hf import HfSource

    out = tmp_path / "hf-trace"
    with HfSource(seeded_dirs["llama"], TINY_TOKENS, dtype="float16") as source:
        got = _captures(source)
        write_trace(source, out, prompt="p")
    directory = DirectorySource(out)
    assert directory.token_ids == TINY_TOKENS
    for (layer, stage_name), values in got.items():
        np.testing.assert_array_equal(
            directory.tensor(layer, stage_name).reshape(values.shape), values
        )
    record = json.loads((out / "source.json").read_text())
    assert record["engine"] == "hf-transformers"
    assert record["dtype"] == "float16" and record["device"] == "cpu"


def test_partial_runs_and_early_exit(seeded_dirs):
    from engine.sources.hf import HfSource

    with HfSource(seeded_dirs["qwen3"], TINY_TOKENS) as source:
        part = _captures(source, layers=range(1, 2), whole_model=False)
        assert {layer for layer, _ in part} == {1}
        full = _captures(source)
        for key, values in part.items():
            np.testing.assert_array_equal(values, full[key])
        for _ in source.captures():
            break  # leaving a run early releases its worker
        assert source.tensor(2, "attn_softmax").shape == (4, len(TINY_TOKENS), len(TINY_TOKENS))
        source.adopt_tokens(TINY_TOKENS[:3])
        assert source.tensor(2, "attn_softmax").shape == (4, 3, 3)
        adopted = source.tensor(0, "attn_out")
    with HfSource(seeded_dirs["qwen3"], TINY_TOKENS[:3]) as fresh:
        np.testing.assert_array_equal(adopted, fresh.tensor(0, "attn_out"))


def test_bad_input_is_one_line(seeded_dirs, tmp_path):
    from engine.sources.hf import HfSource

    with pytest.raises(AprTuiError, match="--dtype float8"):
        HfSource(seeded_dirs["llama"], TINY_TOKENS, dtype="float8")
    with pytest.raises(FormatError, match="no such HF model"):
        HfSource(tmp_path / "missing", TINY_TOKENS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="not an HF model directory"):
        HfSource(tmp_path / "empty", TINY_TOKENS)
    with pytest.raises(AprTuiError, match="outside the vocabulary"):
        HfSource(seeded_dirs["llama"], [1, 10**6])


def test_missing_packages_name_the_extra(seeded_dirs):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from engine.sources.hf import HfSource\n"
        "from engine.errors import MissingPackageError\n"
        "try:\n"
        f"    HfSource({str(seeded_dirs['llama'])!r}, [1, 2])\n"
        "except MissingPackageError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "apr-tui[hf]" in result.stdout


def test_name_map_is_built_once_during_a_load_and_restored_after():
    import gguf

    from engine.sources.hf import gguf_name_maps_built_once

    original = gguf.get_tensor_name_map
    with gguf_name_maps_built_once():
        first = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not first
        assert first.get_name("model.layers.1.self_attn.q_proj") == "blk.1.attn_q"
    assert gguf.get_tensor_name_map is original
    assert original(gguf.MODEL_ARCH.LLAMA, 2) is not original(gguf.MODEL_ARCH.LLAMA, 2)
