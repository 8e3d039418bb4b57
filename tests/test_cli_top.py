"""The top-level `apr-tui` command: help, version, dispatch and bad input, run for real."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ("demo", "diff", "trace", "bisect", "convert", "files")


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def test_help_lists_every_command_and_the_explorer(apr_tui):
    result = run([*apr_tui, "--help"])
    assert result.returncode == 0
    assert result.stdout.startswith("apr-tui 0.1.0: find where two LLM inference paths")
    assert "usage: apr-tui MODEL [--ref REF]" in result.stdout
    for command in COMMANDS:
        assert f"\n  {command} " in result.stdout, command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(apr_tui, command):
    result = run([*apr_tui, command, "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: apr-tui {command}")
    assert result.stderr == ""


def test_no_arguments_is_a_usage_error_on_stderr(apr_tui):
    """One usage line on stderr and exit 2 (was: the 14-line help on stderr)."""
    result = run([*apr_tui])
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "usage: apr-tui MODEL [--ref REF] [options] | "
        "apr-tui {demo,diff,trace,bisect,convert,files} [ARGS] (apr-tui --help for more)"
    ]


def test_version_from_the_module_entry_point():
    result = run([sys.executable, "-m", "aprtui", "--version"])
    assert result.returncode == 0
    assert result.stdout == "apr-tui 0.1.0\n"


def test_missing_model_is_one_line_naming_the_file(apr_tui, tmp_path):
    missing = tmp_path / "nowhere.gguf"
    result = run([*apr_tui, "bisect", str(missing), str(missing)])
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == f"apr-tui: error: {missing}: no such file or directory"
    assert "Traceback" not in result.stderr


def test_unknown_option_is_one_line_and_exit_2(apr_tui):
    result = run([*apr_tui, "diff", "--frobnicate", "a", "b"])
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        "apr-tui: error: apr-tui diff: unrecognized arguments: --frobnicate (see --help)"
    )


def test_error_colour_respects_no_color(apr_tui, tmp_path):
    """Not a tty here, so never colour; the plain prefix is what scripts grep for."""
    result = run([*apr_tui, "files", str(tmp_path / "none")], env={"NO_COLOR": "1", "PATH": ""})
    assert result.returncode == 2
    assert "\x1b[" not in result.stderr
    assert result.stderr.startswith("apr-tui: error: ")
