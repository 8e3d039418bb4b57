"""Fixtures of the reader tests (hostile input to the file readers): the real `apr-tui` in a subprocess, and the small
llama model of tests/formats written by our real writers (`llama_files`)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from tests.formats.conftest import llama, llama_files  # noqa: F401 - shared real model files

Run = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def run(apr_tui) -> Run:
    """Run `apr-tui ARGS` (30 s limit: a hang fails the test instead of stalling the suite)."""

    def run_command(*args: str | os.PathLike[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*apr_tui, *map(os.fspath, args)],
            capture_output=True,
            text=True,
            timeout=30,
            **kwargs,
        )

    return run_command


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one stderr line that contains every fragment."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
