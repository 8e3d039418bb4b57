"""`apr-tui trace` and `apr-tui bisect`: the installed command in a subprocess, on real files.

Model files are written by the real writers (HF `save_pretrained`, the engine's GGUF writer);
stage files are read back here with `struct` and numpy, independently of engine.aprt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import apr_tui_argv
from tests.forward.agreement import TINY_MAX_REL_ERR, disagreements
from tests.forward.hf_oracle import build_hf_model, hf_stage_captures

WHOLE = 0xFFFFFFFF
LLAMA_PER_LAYER = [
    "attn_norm",
    "qkv_matmul",
    "q_post_rope",
    "k_post_rope",
    "attn_scores",
    "attn_softmax",
    "attention",
    "attn_out",
    "post_attn_residual",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_silu",
    "ffn_swigl",
    "ffn_out",
    "post_ffn_residual",
]


def apr_tui(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run(
        [*apr_tui_argv(), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def read_aprt_file(path: Path) -> tuple[int, np.ndarray]:
    """(header layer, values) parsed from the bytes, per the APRT layout (§1.1)."""
    data = path.read_bytes()
    magic, layer, count = struct.unpack_from("<4sII", data)
    assert magic == b"APRT"
    assert len(data) == 12 + 4 * count
    return layer, np.frombuffer(data, dtype="<f4", offset=12, count=count)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A 3-layer synthesized Llama with a tokenizer, as GGUF files: good and planted defects."""
    from engine.formats import apr, gguf
    from engine.synth import synthesize

    root = tmp_path_factory.mktemp("models")
    paths = {}

    def variant(name: str, change=None) -> None:
        model = synthesize("llama", seed=5, num_layers=3, name="tiny-llama")
        if change is not None:
            change(model.weights.arrays)
        paths[name] = gguf.write(model, root / f"{name}.gguf", dtype="f32")
        paths[f"{name}.apr"] = apr.write(model, root / f"{name}.apr", dtype="f32")

    def scale_up(arrays):
        arrays["model.layers.1.mlp.up_proj.weight"] = (
            arrays["model.layers.1.mlp.up_proj.weight"] * 18
        )

    def swap_v_rows(arrays):
        v = arrays["model.layers.1.self_attn.v_proj.weight"].copy()
        v[[3, 20]] = v[[20, 3]]
        arrays["model.layers.1.self_attn.v_proj.weight"] = v

    variant("good")
    variant("up18", scale_up)
    variant("vswap", swap_v_rows)
    return paths


# ------------------------------------------------------------------------------------ trace


def test_trace_defaults_write_apr_layout_beside_the_model(models, tmp_path):
    model = tmp_path / "tiny.gguf"
    shutil.copy(models["good"], model)
    result = apr_tui("trace", model, "--save-tensor", "all")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "tiny-trace"  # §1.5: <parent>/<stem>-trace
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted(
        [f"layer-0/{name}.bin" for name in ["embedding", *LLAMA_PER_LAYER]]
        + ["final_norm.bin", "lm_head.bin", "tokens.json"]
    )
    assert files == expected  # default layers 0..1; no qkv_bias for Llama; no moe stages
    tokens = json.loads((out / "tokens.json").read_text())
    assert tokens["schema"] == "apr-tui-tokens-v1"
    assert tokens["prompt"] == "What is 2+2?"
    seq = len(tokens["token_ids"])
    for name in files:
        if not name.endswith(".bin"):
            continue
        layer, values = read_aprt_file(out / name)
        assert layer == (0 if name.startswith("layer-0/") else WHOLE), name
    assert read_aprt_file(out / "layer-0/embedding.bin")[1].size == seq * 64
    assert read_aprt_file(out / "layer-0/attn_scores.bin")[1].size == 4 * seq * seq
    assert read_aprt_file(out / "lm_head.bin")[1].size == 277  # vocab, last token only

    lines = result.stdout.splitlines()
    assert lines[0] == "=== apr-tui trace --save-tensor ==="
    assert f"Model:        {model}" in lines
    assert "Stages:       all" in lines
    assert "Layers:       0..1" in lines
    assert f"Output dir:   {out}" in lines
    assert 'Test prompt:  "What is 2+2?"' in lines
    assert f"Token ids:    {tokens['token_ids']} ({seq} tokens)" in lines
    assert any(line.startswith("Wrote 19 stage tensor file(s), ") for line in lines)
    assert f"  {out}/layer-0/  17 stages (embedding … post_ffn_residual)" in lines
    assert f"  {out}/  final_norm.bin, lm_head.bin" in lines  # --verbose lists each file
    assert "Forward pass succeeded — 3 layer activations, 277 logits" in lines
    # progress: plain lines on a non-tty stderr, one per layer run
    assert [line for line in result.stderr.splitlines() if "layer" in line] == [
        "tracing tiny.gguf: layer 1/3",
        "tracing tiny.gguf: layer 2/3",
        "tracing tiny.gguf: layer 3/3",
    ]


def test_trace_files_hold_hf_values(tmp_path):
    """The stage files of an HF checkpoint equal HF's own stages (read back byte by byte)."""
    hf_model = build_hf_model("qwen2", seed=8)
    checkpoint = tmp_path / "qwen2-tiny"
    hf_model.save_pretrained(checkpoint)
    tokens = [4, 8, 15, 16, 23, 42]
    out = tmp_path / "out"
    result = apr_tui(
        "trace", checkpoint, "--tokens", ",".join(map(str, tokens)), "--save-tensor", "all",
        "--save-tensor-layers", "0..3", "--save-tensor-dir", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Test prompt:  (token ids given with --tokens)" in result.stdout
    expected = hf_stage_captures(hf_model, tokens)
    got = {}
    for path in out.rglob("*.bin"):
        layer, values = read_aprt_file(path)
        key = (layer, path.stem)
        got[key] = values.reshape(expected[key].shape) if key in expected else values
    assert disagreements(got, expected, max_rel=TINY_MAX_REL_ERR) == []


def test_trace_layer_range_and_stage_list(models, tmp_path):
    out = tmp_path / "sel"
    result = apr_tui(
        "trace", models["good"], "--save-tensor", "ffn_swigl,LAYER_OUTPUT,ffn_swigl",
        "--save-tensor-layers", "1..3", "--save-tensor-dir", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.bin"))
    assert files == [
        "layer-1/ffn_swigl.bin",
        "layer-1/post_ffn_residual.bin",
        "layer-2/ffn_swigl.bin",
        "layer-2/post_ffn_residual.bin",
    ]
    assert read_aprt_file(out / "layer-2/ffn_swigl.bin")[0] == 2
    assert "3 of 3 layers run" in result.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--save-tensor", "attn_norm,bogus"],
            'save-tensor stage list invalid: unknown save-tensor stage "bogus"; valid stages: '
            "embedding,attn_norm,qkv_matmul,qkv_bias,q_post_rope,k_post_rope,attn_scores,"
            "attn_softmax,attention,attn_out,post_attn_residual,ffn_norm,ffn_gate,ffn_up,"
            "ffn_silu,ffn_swigl,ffn_out,post_ffn_residual,moe_router,moe_ffn_out,"
            "moe_router_indices,final_norm,lm_head",
        ),
        (
            ["--save-tensor", "attn_norm,"],
            "save-tensor stage list invalid: save-tensor stage cannot be an empty string",
        ),
        (
            ["--save-tensor", "all", "--save-tensor-layers", "3..3"],
            'save-tensor layer range invalid ("3..3"): END (3) must be > START (3)',
        ),
        (
            ["--save-tensor", "all", "--save-tensor-layers", "0-3"],
            'save-tensor layer range invalid ("0-3"): expected `START..END`',
        ),
    ],
)
def test_trace_plan_errors_are_apr_messages_and_write_nothing(models, tmp_path, flags, message):
    out = tmp_path / "never"
    result = apr_tui("trace", models["good"], *flags, "--save-tensor-dir", out)
    assert result.returncode == 2
    assert result.stderr == f"apr-tui: error: {message}\n"
    assert not out.exists()


def test_trace_refuses_a_directory_with_foreign_files_unless_forced(models, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    notes = out / "notes.txt"
    notes.write_text("keep me")
    result = apr_tui("trace", models["good"], "--save-tensor", "all", "--save-tensor-dir", out)
    assert result.returncode == 2
    assert f"{out}: holds files apr-tui trace did not write ({notes})" in result.stderr
    assert "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    forced = apr_tui(
        "trace", models["good"], "--save-tensor", "all", "--save-tensor-dir", out, "--force"
    )
    assert forced.returncode == 0, forced.stderr
    assert notes.read_text() == "keep me"
    assert (out / "layer-0" / "attn_norm.bin").is_file()
    # A second run into its own output is not refused: everything there is ours.
    notes.unlink()
    again = apr_tui("trace", models["good"], "--save-tensor", "ffn_up", "--save-tensor-dir", out)
    assert again.returncode == 0, again.stderr
    assert "(and 18 stage file(s) from an earlier run, left untouched)" in again.stdout


def test_trace_bad_inputs_are_one_line_errors(models, tmp_path):
    missing = apr_tui("trace", tmp_path / "nope.gguf", "--save-tensor", "all")
    assert missing.returncode == 2
    assert (
        missing.stderr == f"apr-tui: error: {tmp_path / 'nope.gguf'}: no such file or directory\n"
    )
    bad_tokens = apr_tui("trace", models["good"], "--save-tensor", "all", "--tokens", "1,x")
    assert bad_tokens.returncode == 2
    assert bad_tokens.stderr == (
        "apr-tui: error: --tokens: 'x' at position 2 is not a non-negative integer token id\n"
    )
    out_of_vocab = apr_tui(
        "trace", models["good"], "--save-tensor", "all", "--tokens", "1,5000",
        "--save-tensor-dir", tmp_path / "o",
    )  # fmt: skip
    assert out_of_vocab.returncode == 2
    # the synthesized tokenizer has 277 entries (ids 0..276)
    assert out_of_vocab.stderr == (
        f"apr-tui: error: {models['good']}: token id 5000 is outside the vocabulary (0..276)\n"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_trace_on_cuda_without_cupy_says_so(models, tmp_path):
    result = apr_tui(
        "trace", models["good"], "--save-tensor", "all", "--device", "cuda",
        "--save-tensor-dir", tmp_path / "o",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--device cuda: CuPy is not installed" in result.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ bisect


def _bisect_json(*args) -> tuple[int, dict]:
    result = apr_tui("bisect", *args, "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def _where(cell: dict | None) -> tuple | None:
    return None if cell is None else (cell["layer"], cell["stage"])


def test_bisect_identical_models_exit_0(models):
    code, report = _bisect_json(models["good"], models["good"])
    assert code == 0
    assert report["schema"] == "apr-tui-bisect-v1"
    assert report["diverged"] is False
    assert report["first_divergence"] is None and report["first_std_divergence"] is None
    assert len(report["cells"]) == 1 + 3 * 16 + 2
    assert report["cells"][-1]["layer"] == "whole-model"
    assert all(cell["diff"]["max_abs_diff"] == 0.0 for cell in report["cells"])
    assert all(cell["cosine"] == pytest.approx(1.0, abs=1e-12) for cell in report["cells"])
    assert report["token_ids"] == report["a"]["token_ids"] == report["b"]["token_ids"]


def test_bisect_finds_a_scaled_up_proj(models):
    """up_proj ×18 in layer 1: the scale verdict names ffn_up, the first stage it reaches;
    the cosine verdict the residual add where the direction first breaks."""
    code, report = _bisect_json(models["good"], models["up18"])
    assert code == 1
    assert report["diverged"] is True
    assert _where(report["first_std_divergence"]) == (1, "ffn_up")
    ratio = report["first_std_divergence"]["std_ratio"]
    # f32 rounding of 18·W and of the sums: measured 9e-9 relative; 1e-6 leaves 100x headroom
    assert ratio == pytest.approx(1 / 18, rel=1e-6)
    assert _where(report["first_divergence"]) == (1, "post_ffn_residual")
    layer0 = [cell for cell in report["cells"] if cell["layer"] == 0]
    assert all(cell["diff"]["max_abs_diff"] == 0.0 for cell in layer0)
    first = report["first_divergence"]
    assert first["a"]["count"] == first["b"]["count"] == first["diff"]["count"]
    assert len(first["diff"]["top_diffs"]) == 10


def test_bisect_across_containers(models):
    """The same weights as GGUF (Q/K rows permuted on disk) and APR agree everywhere; the
    defect planted in the APR copy is found where it is in the GGUF copy."""
    code, report = _bisect_json(models["good"], models["good.apr"])
    assert code == 0
    assert min(cell["cosine"] for cell in report["cells"]) > 0.99999
    code, report = _bisect_json(models["good"], models["up18.apr"])
    assert code == 1
    assert _where(report["first_std_divergence"]) == (1, "ffn_up")
    assert _where(report["first_divergence"]) == (1, "post_ffn_residual")


def test_bisect_finds_swapped_v_rows(models):
    code, report = _bisect_json(models["good"], models["vswap"])
    assert code == 1
    assert _where(report["first_divergence"]) == (1, "qkv_matmul")
    # A permutation keeps the spread of values: no scale verdict at that stage.
    assert report["first_divergence"]["std_diverged"] is False


def test_bisect_model_against_trace_dir_of_a_defective_model(models, tmp_path):
    """What a user does with apr: save the suspect's stages, bisect our pass against them."""
    out = tmp_path / "suspect-trace"
    written = apr_tui(
        "trace", models["up18"], "--save-tensor", "all", "--save-tensor-layers", "0..3",
        "--save-tensor-dir", out,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    code, report = _bisect_json(models["good"], out)
    assert code == 1
    assert report["b"]["kind"] == "trace-dir"
    assert _where(report["first_std_divergence"]) == (1, "ffn_up")
    assert _where(report["first_divergence"]) == (1, "post_ffn_residual")


def test_bisect_text_report(models):
    result = apr_tui("bisect", models["good"], models["up18"])
    assert result.returncode == 1
    out = result.stdout
    assert "Origin: layer 1 ffn_up: local error 0.944 is " in out
    assert "First propagated divergence (cosine < 0.999): layer 1 post_ffn_residual" in out
    assert "First scale divergence (std ratio outside [0.5, 2.0]): layer 1 ffn_up" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("layer"))
    # The grid's own column labels: one vocabulary everywhere.
    assert header.split() == [
        "layer", "emb", "attn_n", "qkv", "q_rope", "k_rope", "score", "smax", "attn", "attn_o",
        "res1", "ffn_n", "gate", "up", "silu", "swigl", "ffn_o", "res2", "f_norm", "logits",
    ]  # fmt: skip
    row1 = next(line for line in out.splitlines() if line.split()[:1] == ["1"])
    assert "◆1.0000*" in row1.split()  # ffn_up: the origin; same direction, std outside the band

    same = apr_tui("bisect", models["good"], models["good"])
    assert same.returncode == 0
    assert "No origin: every stage's local error is within its noise floor" in same.stdout
    assert "No propagated divergence: all 51 compared stages have cosine ≥ 0.999" in same.stdout


def test_bisect_layers_before_the_defect_do_not_diverge(models):
    code, report = _bisect_json(models["good"], models["up18"], "--layers", "0..1")
    assert code == 0
    assert {cell["layer"] for cell in report["cells"]} == {0}
    assert report["layers"] == [0, 1]


def test_bisect_threshold_flag(models):
    """A threshold of -1 accepts any cosine; only the scale verdict is left to fail."""
    code, report = _bisect_json(models["good"], models["up18"], "--threshold", "-1")
    assert code == 1
    assert report["first_divergence"] is None
    assert _where(report["first_std_divergence"]) == (1, "ffn_up")


def test_bisect_errors_exit_2(models, tmp_path):
    other = tmp_path / "other"
    assert apr_tui(
        "trace", models["good"], "--save-tensor", "all", "--tokens", "1,2,3",
        "--save-tensor-dir", other,
    ).returncode == 0  # fmt: skip
    mismatch = apr_tui("bisect", models["good"], other, "--tokens", "1,2,3,4")
    assert mismatch.returncode == 2
    assert mismatch.stderr == (
        "apr-tui: error: token ids differ: good.gguf has [1, 2, 3, 4] (4 tokens), "
        "other/ has [1, 2, 3] (3 tokens); trace both with the same --prompt or --tokens\n"
    )

    bad_range = apr_tui("bisect", models["good"], models["good"], "--layers", "2..1")
    assert bad_range.returncode == 2
    assert bad_range.stderr == "apr-tui: error: --layers '2..1': END (1) must be > START (2)\n"

    missing = apr_tui("bisect", models["good"], tmp_path / "missing.gguf")
    assert missing.returncode == 2
    assert missing.stderr == (
        f"apr-tui: error: {tmp_path / 'missing.gguf'}: no such file or directory\n"
    )

    bad_threshold = apr_tui("bisect", models["good"], models["good"], "--threshold", "2")
    assert bad_threshold.returncode == 2
    assert bad_threshold.stderr == (
        "apr-tui: error: apr-tui bisect: argument --threshold: must be a cosine in [-1, 1], "
        "got 2 (see --help)\n"
    )
