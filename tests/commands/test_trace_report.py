"""What `apr-tui trace` says about its run: NaN and Inf in what it wrote, a prompt with control
characters, a long list of token ids."""

from __future__ import annotations

import json
from pathlib import Path

from tests.commands.conftest import run_cli


def test_nan_in_the_outputs_is_reported_with_the_first_layer_that_has_any(
    apr_tui, models, tmp_path
):
    from engine.demo import plant_defect
    from engine.formats import apr, open_model

    with open_model(models.apr) as model:
        broken, _ = plant_defect(model, layer=1, factor=float("nan"))  # layer 1's up_proj: NaN
        path = Path(apr.write(broken, tmp_path / "nan.apr", "f32"))
    out = tmp_path / "out"
    argv = [*apr_tui, "trace", str(path), "--save-tensor", "post_ffn_residual,lm_head"]
    result = run_cli([*argv, "--save-tensor-layers", "0..2", "--save-tensor-dir", str(out)])
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings[0].startswith("warning: layer 1 post_ffn_residual: ")
    assert "values NaN or Inf (the first layer with any)" in warnings[0]
    assert warnings[1].startswith("warning: lm_head: ") and len(warnings) == 2


def test_a_clean_run_has_no_warning(apr_tui, models, tmp_path):
    argv = [*apr_tui, "trace", str(models.apr), "--save-tensor", "post_ffn_residual,lm_head"]
    result = run_cli([*argv, "--save-tensor-dir", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout


def test_control_characters_of_the_prompt_are_escaped_in_the_report(apr_tui, models, tmp_path):
    prompt = 'a\nb\x1b[31mRED\x07 "q" \\ é\u2028'
    argv = [*apr_tui, "trace", str(models.apr), "--save-tensor", "embedding", "--prompt", prompt]
    result = run_cli([*argv, "--save-tensor-dir", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("Test prompt:")]
    assert line == 'Test prompt:  "a\\nb\\x1b[31mRED\\x07 \\"q\\" \\\\ é\\u2028"'


def test_a_long_token_list_is_cut_in_the_report_and_whole_in_tokens_json(apr_tui, models, tmp_path):
    tokens = [(7 * i) % 200 for i in range(300)]
    out = tmp_path / "out"
    argv = [*apr_tui, "trace", str(models.apr), "--save-tensor", "embedding"]
    result = run_cli([*argv, "--tokens", ",".join(map(str, tokens)), "--save-tensor-dir", str(out)])
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("Token ids:")]
    head = ", ".join(map(str, tokens[:32]))
    tail = ", ".join(map(str, tokens[-32:]))
    assert line == f"Token ids:    [{head}, …, {tail}] (300 tokens)"
    assert json.loads((out / "tokens.json").read_text())["token_ids"] == tokens
