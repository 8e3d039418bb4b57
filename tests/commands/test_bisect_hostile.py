"""`apr-tui bisect` and the explorer on inputs that cannot be compared, as a hostile user."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aprtui.app import make_app
from engine.aprt import read_aprt, write_stage
from engine.sources import open_pair
from engine.trace_directory import write_tokens_json
from tests.commands.conftest import assert_one_line_error, run_cli

TOKENS = [3, 17, 42, 100, 5]


@pytest.fixture(scope="module")
def trace_dir(models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage of models.apr on TOKENS, written by our tracer (the engine, not the CLI)."""
    out = tmp_path_factory.mktemp("trace") / "m-trace"
    source, _ = open_pair(models.apr, None, token_ids=TOKENS, device="cpu")
    try:
        for capture in source.captures():
            write_stage(out, capture.stage, capture.layer, capture.array)
    finally:
        source.close()
    write_tokens_json(out, TOKENS, None, str(models.apr))
    return out


def test_models_of_different_width_are_an_error_not_a_divergence(apr_tui, models):
    """Was: exit 1, "First divergence: layer 0 embedding, element counts differ"."""
    result = run_cli([*apr_tui, "bisect", str(models.apr), str(models.wide)])
    assert_one_line_error(result, "m.apr", "wide.apr", "hidden_size 64 vs 128")


def test_trace_dir_of_another_width_is_an_error_even_with_tokens_json(apr_tui, models, trace_dir):
    """Was: exit 1 with every cell `size≠` (tokens.json matched, so nothing checked sizes)."""
    result = run_cli([*apr_tui, "bisect", str(models.wide), str(trace_dir)])
    line = assert_one_line_error(result, str(trace_dir), "wide.apr", "another shape")
    assert "320 values" in line  # 5 tokens × hidden 64 in layer-0/embedding.bin


def test_a_directory_mixing_two_runs_is_an_error_not_a_divergence(apr_tui, models, tmp_path):
    """Was: `trace --force` over a directory traced on another prompt left the earlier run's
    ffn_up beside the new tokens.json; bisect then reported "element counts differ" at L0
    ffn_up as a divergence (exit 1)."""
    mixed = tmp_path / "mixed"
    for tokens, stages in ((TOKENS[:3], "ffn_up"), (TOKENS, "attn_norm")):
        argv = [*apr_tui, "trace", str(models.apr), "--save-tensor", stages, "--force"]
        argv += ["--tokens", ",".join(map(str, tokens)), "--save-tensor-dir", str(mixed)]
        assert run_cli(argv).returncode == 0
    result = run_cli([*apr_tui, "bisect", str(models.apr), str(mixed), "--tokens", "3,17,42,100,5"])
    assert_one_line_error(result, "layer-0/ffn_up.bin", "mixes runs", "3 rows", "5 tokens")


def test_models_of_different_depth_compare_their_common_layers(apr_tui, models):
    """Documented choice: a different layer count is a meaningful partial comparison."""
    result = run_cli([*apr_tui, "bisect", str(models.apr), str(models.deep), "--json"])
    # The seeded models share nothing but their shape: every layer the two have in common adds
    # the same error locally (none: B recomputed with A's weights is B), B's extra layer has no
    # weights in A to recompute with, and the first stage whose weights differ is final_norm.
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert (document["origin"]["layer"], document["origin"]["stage"]) == (None, "final_norm")
    layer2 = [c for c in document["cells"] if c["layer"] == 2 and c["stage"] == "ffn_out"]
    assert layer2[0]["local_missing"] == "m.apr has no tensor model.layers.2.mlp.down_proj.weight"
    both = {(c["layer"], c["stage"]) for c in document["cells"] if c["a"] and c["b"]}
    only_b = {(c["layer"], c["stage"]) for c in document["cells"] if c["a"] is None}
    assert (1, "ffn_out") in both and (2, "attn_norm") in only_b
    assert document["first_divergence"]["layer"] == "whole-model"


def test_layers_past_both_models_are_an_error(apr_tui, models, trace_dir):
    """Was: exit 0, "No divergence: all 2 compared stages" (only final_norm and lm_head)."""
    for other in (str(trace_dir), str(models.apr)):
        result = run_cli([*apr_tui, "bisect", str(models.apr), other, "--layers", "5..9"])
        assert_one_line_error(result, "--layers 5..9")


def test_json_has_no_nan_or_infinity_tokens(apr_tui, models, trace_dir, tmp_path):
    broken = tmp_path / "broken"
    for path in trace_dir.rglob("*"):
        if path.is_file():
            target = broken / path.relative_to(trace_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    values = read_aprt(broken / "layer-0" / "attn_norm.bin").values.copy()
    values[[3, 5]] = [np.nan, np.inf]
    write_stage(broken, "attn_norm", 0, values)
    write_stage(broken, "ffn_up", 1, np.full_like(values, np.inf, shape=(5 * 128,)))
    result = run_cli([*apr_tui, "bisect", str(models.apr), str(broken), "--json"])
    assert result.returncode == 1, result.stderr

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-JSON constant {constant} in the report")

    document = json.loads(result.stdout, strict=True, parse_constant=refuse)
    first = document["first_divergence"]
    assert (first["layer"], first["stage"]) == (0, "attn_norm")
    assert first["b"]["nan_count"] == 1 and first["b"]["inf_count"] == 1
    up = next(c for c in document["cells"] if (c["layer"], c["stage"]) == (1, "ffn_up"))
    assert up["b"]["inf_count"] == 5 * 128
    assert up["b"]["max"] is None and up["diff"]["max_abs_diff"] is None  # inf, written as null


def test_explorer_device_cuda_without_cupy_is_one_line(apr_tui, models, tmp_path):
    """Was: the app opened full-screen and showed the error inside (a non-interactive caller
    hung until killed: exit 124 under `timeout`). A `cupy` that fails to import stands for this GPU-less machine."""
    fake = tmp_path / "fake" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no CUDA here')\n")
    import os
    import subprocess

    path = [str(fake.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    for argv in ([str(models.apr)], ["demo", "--small"]):
        result = subprocess.run(
            [*apr_tui, *argv, "--device", "cuda"],
            capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert_one_line_error(result, "--device cuda", "CuPy")


async def test_explorer_shows_width_mismatch_and_stays_usable(models):
    app = make_app(
        lambda: open_pair(models.apr, models.wide, device="cpu"), clock=None, single_model=False
    )
    async with app.run_test(size=(150, 40)) as pilot:
        for _ in range(200):
            await pilot.pause(0.05)
            if app.state in ("finished", "failed", "cancelled"):
                break
        assert app.state == "failed"
        assert "hidden_size 64 vs 128" in (app.error or "")
        assert app.grid.first_divergence is None  # no fake divergence marked
        await pilot.press("question_mark")
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        await pilot.press("q")
    assert app.return_code == 0  # q quit it (None would mean it never exited)


def test_two_apr_dirs_of_different_sizes_are_an_error(apr_tui, tmp_path):
    """Directories as `apr trace` writes them (no tokens.json, no embedding stage) that hold
    different element counts. Was: exit 1, "First divergence ... element counts differ"."""
    short, wide = tmp_path / "short", tmp_path / "wide"
    write_stage(short, "attn_norm", 0, np.ones(7 * 64, dtype=np.float32))
    write_stage(wide, "attn_norm", 0, np.ones(7 * 128, dtype=np.float32))
    result = run_cli([*apr_tui, "bisect", str(short), str(wide)])
    assert_one_line_error(result, "different prompts", "448 vs 896")


def test_unknown_files_in_a_trace_dir_are_reported_not_silently_dropped(
    apr_tui, models, trace_dir, tmp_path
):
    mixed = tmp_path / "mixed"
    for path in trace_dir.rglob("*"):
        if path.is_file():
            target = mixed / path.relative_to(trace_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (mixed / "README").write_text("notes")
    (mixed / "layer-0" / "weird.bin").write_bytes(b"APRT")
    text = run_cli([*apr_tui, "bisect", str(models.apr), str(mixed)])
    assert text.returncode == 0, text.stderr
    assert "mixed/: ignored 2 file(s)" in text.stdout
    report = run_cli([*apr_tui, "bisect", str(models.apr), str(mixed), "--json"])
    ignored = json.loads(report.stdout)["b"]["ignored_files"]
    assert sorted(Path(item["path"]).name for item in ignored) == ["README", "weird.bin"]
