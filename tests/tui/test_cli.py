"""The explorer's command lines, run as the installed `apr-tui` in a subprocess."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import apr_tui_argv


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*apr_tui_argv(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_explorer_help_lists_its_options():
    result = run("model.apr", "--help")
    assert result.returncode == 0
    for option in ("--ref", "--prompt", "--tokens", "--layers", "--device", "--threshold"):
        assert option in result.stdout
    assert "<stem>-trace/" in result.stdout


def test_top_level_help_shows_the_explorer_and_the_demo():
    result = run("--help")
    assert result.returncode == 0
    assert "open the trace explorer on MODEL" in result.stdout
    assert "demo" in result.stdout and "planted defect" in result.stdout
    assert "files" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nowhere.apr"], "nowhere.apr: no such file or directory"),
        (["{model}", "--ref", "nowhere-trace"], "nowhere-trace: no such file or directory"),
        (["{model}", "--layers", "4..2"], "--layers '4..2': END (2) must be > START (4)"),
        (["{model}", "--layers", "x"], "--layers 'x': expected `START..END`"),
        (["{model}", "--tokens", "1,,2"], "--tokens: empty entry at position 2 in '1,,2'"),
        (
            ["{model}", "--threshold", "2"],
            "apr-tui: argument --threshold: must be a cosine in [-1, 1], got 2 (see --help)",
        ),
        (["files", "nowhere-dir"], "nowhere-dir: no such directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(demo_pair, args, message):
    result = run(*[a.format(model=demo_pair.model_a) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == f"apr-tui: error: {message}"
    assert "Traceback" not in result.stderr


def test_files_on_a_directory_without_stage_files(tmp_path):
    (tmp_path / "readme.txt").write_text("not a trace")
    result = run("files", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == (
        f"apr-tui: error: {tmp_path}: no APRT stage files "
        "(expected layer-<N>/<stage>.bin or final_norm.bin / lm_head.bin)\n"
    )
