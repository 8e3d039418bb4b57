"""The plan: decided before anything runs, consumed as is by the explorer and the commands.

Two bugs the plan fixes (both failed before it existed): the explorer labelled a model-vs-trace
run with the default prompt's tokens while the engine traced the directory's tokens.json, and a
trace directory without tokens.json as side A ended in "internal error: TypeError". And the
explorer's pre-flight: every refusal is a one-line error before the screen opens.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from aprtui.app import make_app
from engine.aprt import write_stage
from engine.errors import PlanError, TokenizerError
from engine.plan import prepare
from engine.stages import WHOLE_MODEL_LAYER
from tests.tui.conftest import settle, write_trace_dir

SIZE = (150, 40)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def run_cli(apr_tui, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*apr_tui, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, NO_COLOR="1"),
    )


@pytest.fixture(scope="module")
def other_prompt_dir(demo_pair, tmp_path_factory) -> Path:
    """The healthy demo model traced on ids 5..8 (not the default prompt), with tokens.json."""
    directory = tmp_path_factory.mktemp("other-prompt") / "trace"
    write_trace_dir(demo_pair.model_a, directory, token_ids=[5, 6, 7, 8])
    return directory


def test_plan_adopts_the_directorys_tokens(demo_pair, other_prompt_dir):
    with prepare(demo_pair.model_a, other_prompt_dir, device="cpu") as plan:
        assert plan.token_ids == (5, 6, 7, 8)
        assert plan.a.token_ids == [5, 6, 7, 8]
        assert plan.layers == range(6)
        assert plan.whole_model is True
        # Exactly the cells the run yields, in order: embedding once, 16 stages × 6 layers, 2.
        cells = list(plan.run())
        assert [(c.layer, c.stage) for c in cells] == list(plan.cells)
        assert len(plan.cells) == 1 + 6 * 16 + 2
        assert plan.cells[-1] == (WHOLE_MODEL_LAYER, "lm_head")


async def test_explorer_labels_what_the_engine_traces(demo_pair, other_prompt_dir):
    """Was: app.token_ids held the default prompt's 7 ids while the engine traced 4."""
    plan = prepare(demo_pair.model_a, other_prompt_dir, device="cpu")
    app = make_app(plan, clock=None, reference_dir=other_prompt_dir)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.state == "finished"
        assert app.token_ids == (5, 6, 7, 8)
        assert app.status.status.tokens == 4


async def test_directory_without_tokens_json_as_side_a(demo_pair, tmp_path):
    """`apr-tui DIR --ref MODEL`, DIR as apr writes it (no tokens.json). Was: TypeError."""
    directory = tmp_path / "apr-trace"
    ids = write_trace_dir(demo_pair.model_a, directory)
    (directory / "tokens.json").unlink()
    plan = prepare(directory, demo_pair.model_b, device="cpu")
    assert plan.token_ids == tuple(ids)  # the model's default prompt, checked against sizes
    app = make_app(plan, clock=None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.state == "finished", app.error
        assert app.error is None
        assert app.origin is not None and (app.origin.layer, app.origin.stage) == (2, "ffn_up")


def test_cells_that_can_never_exist_are_not_planned(demo_pair, tmp_path):
    """A directory holding only layers 0..1 and lm_head: the plan has exactly those cells."""
    directory = tmp_path / "partial"
    with prepare(demo_pair.model_a, None, device="cpu") as plan:
        for capture in plan.a.captures():
            if capture.layer in (0, 1) or capture.stage == "lm_head":
                write_stage(directory, capture.stage, capture.layer, capture.array)
    with prepare(demo_pair.model_a, directory, device="cpu") as plan:
        assert plan.layers == range(0, 2)
        assert (WHOLE_MODEL_LAYER, "lm_head") in plan.cells
        assert (WHOLE_MODEL_LAYER, "final_norm") in plan.cells  # the model side produces it
        assert all(layer in (0, 1, WHOLE_MODEL_LAYER) for layer, _ in plan.cells)


def test_plan_refusals(demo_pair):
    with pytest.raises(PlanError) as error:
        prepare(demo_pair.model_a, demo_pair.model_b, layers=(5, 9), device="cpu")
    assert str(error.value) == (
        "--layers 5..9: the model has 6 layers (0..6); nothing to compare beyond layer 5"
    )
    with pytest.raises(TokenizerError) as error:
        prepare(demo_pair.model_a, demo_pair.model_b, token_ids=[99999999], device="cpu")
    assert "token id 99999999 is outside the vocabulary" in str(error.value)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--layers", "50..60"], "--layers 50..60: the model has 6 layers"),
        (["--tokens", "99999999"], "token id 99999999 is outside the vocabulary"),
        (["--prompt", ""], "gives no tokens"),
    ],
)
def test_explorer_refuses_before_the_screen_opens(apr_tui, demo_pair, flags, expected):
    line = one_line_error(run_cli(apr_tui, demo_pair.model_a, "--ref", demo_pair.model_b, *flags))
    assert expected in line


def test_explorer_refuses_bad_references_before_the_screen(apr_tui, demo_pair, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(run_cli(apr_tui, demo_pair.model_a, "--ref", empty))
    assert str(empty) in line
    text = tmp_path / "text.gguf"
    text.write_text("not a model\n")
    line = one_line_error(run_cli(apr_tui, demo_pair.model_a, "--ref", text))
    assert "text.gguf" in line


def test_explorer_without_a_terminal_says_so(apr_tui, demo_pair):
    """Was: with stdin not a terminal the app started and never exited."""
    line = one_line_error(run_cli(apr_tui, demo_pair.model_a, "--ref", demo_pair.model_b))
    assert line == (
        f"apr-tui: error: apr-tui {demo_pair.model_a}: the explorer needs a terminal (stdin and "
        "stdout are not both a tty); use `apr-tui bisect` or `apr-tui trace` for headless work"
    )


def test_bisect_reports_apr_anomaly_flags(apr_tui, demo_pair):
    """apr's rules (engine.anomalies) in bisect's report: only what one side breaks is news."""
    import json

    result = run_cli(apr_tui, "bisect", demo_pair.model_a, demo_pair.model_b, "--json")
    assert result.returncode == 1
    cells = {(c["layer"], c["stage"]): c for c in json.loads(result.stdout)["cells"]}
    swigl = cells[(2, "ffn_swigl")]
    # B carries the ×18: its values pass apr's 100, A's do not (checked from the statistics).
    assert max(abs(swigl["b"]["min"]), abs(swigl["b"]["max"])) > 100
    assert max(abs(swigl["a"]["min"]), abs(swigl["a"]["max"])) <= 100
    assert swigl["one_sided_anomalies"] == ["large_values"]
    assert [flag["rule"] for flag in swigl["anomalies"]["b"]] == ["large_values"]
    assert cells[(1, "ffn_swigl")]["one_sided_anomalies"] == []
    text = run_cli(apr_tui, "bisect", demo_pair.model_a, demo_pair.model_b)
    assert "apr anomaly flags on one side only: layer 2 ffn_swigl: B: large values" in text.stdout


def test_an_incomplete_trace_directory_says_so(apr_tui, demo_pair, tmp_path):
    """A directory whose writer did not finish (tokens.json `complete: false`) is never read as
    a complete reference: bisect's header, summary and JSON say it is incomplete."""
    import json

    from engine.trace_directory import write_tokens_json

    directory = tmp_path / "partial-trace"
    ids = write_trace_dir(demo_pair.model_a, directory)
    write_tokens_json(directory, ids, None, str(demo_pair.model_a), complete=False)
    text = run_cli(apr_tui, "bisect", demo_pair.model_a, directory)
    assert text.returncode == 0, text.stderr
    assert "INCOMPLETE: the run that wrote it did not finish" in text.stdout
    assert "partial-trace/: INCOMPLETE trace: the run that wrote it did not finish" in text.stdout
    report = json.loads(run_cli(apr_tui, "bisect", demo_pair.model_a, directory, "--json").stdout)
    assert report["b"]["complete"] is False
    write_tokens_json(directory, ids, None, str(demo_pair.model_a), complete=True)
    done = run_cli(apr_tui, "bisect", demo_pair.model_a, directory)
    assert "INCOMPLETE" not in done.stdout
