"""Noise or bug on seeded models: the origin verdict of `apr-tui bisect`, through the real command.

The situations of the issue, built from real model files: an exact copy with a planted defect
(the origin is the defect), a copy whose every weight carries the same relative noise (a
re-quantization: no origin, although cosines fall below 0.999), the same noisy copy with a bug
hidden in the noise of one layer (the origin is that layer), and a trace directory written in
another runtime's conventions (raw future attention entries, all-position logits).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.aprt import read_aprt, write_aprt
from engine.stages import WHOLE_MODEL_LAYER

LAYERS = 6
NOISE = 0.01
"""Relative noise on every weight of the noisy copy: about what a 4-bit re-quantization costs."""


def run_cli(apr_tui: list[str], *args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run(
        [*apr_tui, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def bisect_json(apr_tui, a: Path, b: Path, *flags: str) -> tuple[int, dict]:
    result = run_cli(apr_tui, "bisect", a, b, "--json", *flags)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def noisy(arrays: dict[str, np.ndarray], seed: int) -> None:
    """Every weight matrix times (1 + NOISE·N(0, 1)) elementwise, the norms untouched."""
    rng = np.random.default_rng(seed)
    for name, weight in arrays.items():
        if weight.ndim == 2:
            jitter = rng.standard_normal(weight.shape).astype(np.float32)
            arrays[name] = weight * (1 + np.float32(NOISE) * jitter)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from engine.formats import apr
    from engine.synth import synthesize

    root = tmp_path_factory.mktemp("noise-models")
    paths: dict[str, Path] = {}

    def variant(name: str, *changes) -> None:
        model = synthesize("llama", seed=9, num_layers=LAYERS, name="noise-llama")
        for change in changes:
            change(model.weights.arrays)
        paths[name] = apr.write(model, root / f"{name}.apr", dtype="f32")

    def scale_up(arrays):
        arrays["model.layers.2.mlp.up_proj.weight"] = (
            arrays["model.layers.2.mlp.up_proj.weight"] * 18
        )

    def swap_v_rows(arrays):
        v = arrays["model.layers.1.self_attn.v_proj.weight"].copy()
        v[[3, 20]] = v[[20, 3]]
        arrays["model.layers.1.self_attn.v_proj.weight"] = v

    def kernel_bug(arrays):
        """A few rows of layer 4's down projection scaled by 1.5: a bad block scale."""
        down = arrays["model.layers.4.mlp.down_proj.weight"].copy()
        down[::16] *= np.float32(1.5)
        arrays["model.layers.4.mlp.down_proj.weight"] = down

    variant("good")
    variant("up18", scale_up)
    variant("vswap", swap_v_rows)
    variant("noisy", lambda arrays: noisy(arrays, seed=1))
    variant("noisy_bug", lambda arrays: noisy(arrays, seed=1), kernel_bug)
    return paths


def origin_of(report: dict) -> tuple | None:
    origin = report["origin"]
    return None if origin is None else (origin["layer"], origin["stage"])


def test_identical_models_have_no_origin_and_float32_local_errors(apr_tui, models):
    code, report = bisect_json(apr_tui, models["good"], models["good"])
    assert code == 0
    assert report["origin"] is None
    errors = [cell["local_error"] for cell in report["cells"]]
    missing = [(c["layer"], c["stage"], c["local_missing"]) for c in report["cells"]]
    assert all(error is not None for error in errors), missing
    # Our float32 pass against the float64 recomputation: rounding only.
    assert max(errors) < 1e-5
    # Exact paths: every floor is the float32 floor (borrowed ones with their 2x margin).
    assert {floor["floor"] for floor in report["noise_floors"].values()} == {1e-5, 2e-5}


def test_planted_scale_is_the_origin(apr_tui, models):
    code, report = bisect_json(apr_tui, models["good"], models["up18"])
    assert code == 1
    assert report["diverged"] is True
    origin = report["origin"]
    assert origin_of(report) == (2, "ffn_up")
    # B's ffn_up is 18x what A's weights give from B's own input: |1 - 18| / 18 relative.
    assert origin["local_error"] == pytest.approx(17 / 18, rel=1e-6)
    assert origin["ratio"] == pytest.approx(origin["local_error"] / origin["floor"])
    assert origin["ratio"] > 1000
    assert origin["inputs"] == ["L2 ffn_norm", "W up_proj"]
    # The stages after it in the same layer are recomputed from B's own (scaled) inputs: local.
    after = [
        c for c in report["cells"] if c["layer"] == 2 and c["stage"] in ("ffn_swigl", "ffn_out")
    ]
    assert all(cell["local_error"] < 1e-5 for cell in after)


def test_swapped_v_rows_are_the_origin(apr_tui, models):
    code, report = bisect_json(apr_tui, models["good"], models["vswap"])
    assert code == 1
    assert origin_of(report) == (1, "qkv_matmul")


def test_uniform_weight_noise_is_not_a_bug(apr_tui, models):
    """Every matmul carries ~1% error: cosines fall below 0.999, but nothing spikes."""
    code, report = bisect_json(apr_tui, models["good"], models["noisy"])
    assert report["first_divergence"] is not None  # the old gate would call it broken
    assert code == 0
    assert report["origin"] is None
    floors = report["noise_floors"]
    for stage in ("qkv_matmul", "attn_out", "ffn_gate", "ffn_up", "ffn_out"):
        assert floors[stage]["source"] == "calibrated"
        assert 0.004 < floors[stage]["median"] < 0.03  # ~NOISE, uniform over layers
    for stage in ("attn_norm", "attn_softmax", "post_ffn_residual", "ffn_swigl"):
        assert floors[stage]["floor"] == 1e-5  # element-wise ops stay exact


def test_a_bug_inside_the_noise_is_found(apr_tui, models):
    """The noisy copy with 1/16 of layer 4's ffn_down rows ×1.5: the origin is that op."""
    code, report = bisect_json(apr_tui, models["good"], models["noisy_bug"])
    assert code == 1
    assert origin_of(report) == (4, "ffn_out")
    assert report["origin"]["ratio"] > 1.5
    clean = [
        c["local_ratio"] for c in report["cells"] if c["stage"] == "ffn_out" and c["layer"] != 4
    ]
    assert max(clean) < 1.0


def test_reversed_sides_find_the_same_origin(apr_tui, models):
    code, report = bisect_json(apr_tui, models["up18"], models["good"])
    assert code == 1
    assert origin_of(report) == (2, "ffn_up")


def test_explicit_threshold_keeps_the_old_gate(apr_tui, models):
    code, report = bisect_json(apr_tui, models["good"], models["noisy"], "--threshold", "0.999")
    assert report["origin"] is None
    assert code == 1  # the user asked for the cosine gate: it fires on the noise
    code, _ = bisect_json(apr_tui, models["good"], models["noisy"], "--threshold", "-1")
    assert code == 0  # cosine gate off; 1% noise leaves every std ratio inside [0.5, 2]


def test_text_summary_names_origin_and_floors(apr_tui, models):
    result = run_cli(apr_tui, "bisect", models["good"], models["up18"])
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    origin = next(line for line in lines if line.startswith("Origin: "))
    assert origin.startswith("Origin: layer 2 ffn_up: local error 0.944 is 9.44e+04× its floor")
    assert "(recomputed from L2 ffn_norm, W up_proj)" in origin
    floors = next(line for line in lines if line.startswith("noise floors"))
    assert "matmul: emb 2e-05, qkv 1e-05, attn_o 1e-05" in floors
    clean = run_cli(apr_tui, "bisect", models["good"], models["noisy"])
    assert clean.returncode == 0
    assert "No origin: every stage's local error is within its noise floor" in clean.stdout


def foreign_runtime_dir(apr_tui, model: Path, out: Path) -> list[int]:
    """Our trace of `model`, rewritten in another runtime's conventions: raw (unmasked) future
    attention entries and every position's logits, `[seq, vocab]`."""
    result = run_cli(
        apr_tui, "trace", model, "--save-tensor", "all", "--save-tensor-layers", f"0..{LAYERS}",
        "--save-tensor-dir", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokens = json.loads((out / "tokens.json").read_text())["token_ids"]
    seq = len(tokens)
    rng = np.random.default_rng(3)
    future = np.triu(np.ones((seq, seq), dtype=bool), k=1)
    for layer in range(LAYERS):
        for stage in ("attn_scores", "attn_softmax"):
            path = out / f"layer-{layer}" / f"{stage}.bin"
            values = read_aprt(path).values.reshape(-1, seq, seq).copy()
            values[:, future] = rng.standard_normal((values.shape[0], int(future.sum())))
            path.unlink()
            write_aprt(path, layer, values)
    logits = read_aprt(out / "lm_head.bin").values
    all_positions = np.tile(rng.standard_normal(logits.size).astype(np.float32), (seq, 1))
    all_positions[-1] = logits
    (out / "lm_head.bin").unlink()
    write_aprt(out / "lm_head.bin", WHOLE_MODEL_LAYER, all_positions)
    return tokens


def test_a_runtimes_conventions_are_not_divergences(apr_tui, models, tmp_path):
    out = tmp_path / "runtime-dump"
    foreign_runtime_dir(apr_tui, models["good"], out)
    code, report = bisect_json(apr_tui, models["good"], out)
    assert code == 0
    assert report["origin"] is None
    assert report["first_divergence"] is None
    by_key = {(c["layer"], c["stage"]): c for c in report["cells"]}
    for layer in range(LAYERS):
        for stage in ("attn_scores", "attn_softmax"):
            assert by_key[(layer, stage)]["diff"]["max_abs_diff"] == 0.0
    logits = by_key[("whole-model", "lm_head")]
    assert logits["diff"]["max_abs_diff"] == 0.0  # paired by the last row
    assert logits["local_error"] < 1e-5


def test_two_layers_are_too_few_for_a_stage_but_not_for_its_kind(apr_tui, models):
    # `--layers 0..2`: no stage has MIN_LAYERS layers of its own. The floors come from each
    # kind's local errors pooled (matmul: 2 layers x 5 stages), so uniform weight noise is
    # still noise (it used to fall back to the float32 floor: a false origin at L0 qkv) ...
    code, report = bisect_json(apr_tui, models["good"], models["noisy"], "--layers", "0..2")
    assert report["origin"] is None, report["origin"]
    assert code == 0
    qkv = report["noise_floors"]["qkv_matmul"]
    assert qkv["source"] == "kind matmul, pooled" and qkv["floor"] > 1e-3
    # ... and a planted bug inside the two layers is still the origin.
    code, report = bisect_json(apr_tui, models["good"], models["up18"], "--layers", "1..3")
    assert code == 1
    assert origin_of(report) == (2, "ffn_up")


@pytest.mark.parametrize("count", [1, 2, 3, 4, 29, 30])
def test_floor_median_is_numpys_median(count):
    """The floors' median (engine.noise._median, kept free of numpy.ma's import) equals
    np.median on odd and even counts of spread-out local errors."""
    from engine.noise import _median

    rng = np.random.default_rng(count)
    values = list(10.0 ** rng.uniform(-9, -1, count))
    assert _median(values) == float(np.median(values))
