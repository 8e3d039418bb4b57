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


def stderr_on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run with stderr on a pseudo-terminal (so the command may colour it); its bytes back."""
    import os
    import pty

    main, child = pty.openpty()
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=child,
            env=env,
            timeout=60,
        )
        os.close(child)
        child = -1
        chunks = []
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
        return result.returncode, b"".join(chunks)
    finally:
        if child >= 0:
            os.close(child)
        os.close(main)


def test_error_colour_respects_no_color(apr_tui, tmp_path):
    """On a terminal the error prefix is coloured, unless NO_COLOR is set; scripts grep the
    plain prefix. (Was a test that could not fail: stderr was never a terminal.)"""
    import os

    argv = [*apr_tui, "files", str(tmp_path / "none")]
    base = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    code, coloured = stderr_on_a_terminal(argv, base)
    assert code == 2
    assert b"\x1b[" in coloured
    code, plain = stderr_on_a_terminal(argv, {**base, "NO_COLOR": "1"})
    assert code == 2
    assert b"\x1b[" not in plain
    assert plain.startswith(b"apr-tui: error: ")
