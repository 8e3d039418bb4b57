"""Fixtures of the trace-source tests: the optional runtimes, skipped locally, required in CI."""

from __future__ import annotations

import importlib.util
import os

import pytest


def require_package(module: str, install: str) -> None:
    """Skip without `module` (fail when CI is set: CI installs it, so absence is a broken setup)."""
    if importlib.util.find_spec(module) is not None:
        return
    reason = f"needs the {module} package ({install})"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but this test {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def llama_cpp_installed() -> None:
    """llama-cpp-python (the CPU wheel in ../shared/wheels/, installed by .ci/run)."""
    require_package(
        "llama_cpp",
        "pip install ../shared/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl",
    )


@pytest.fixture(scope="session")
def hf_installed() -> None:
    """torch + transformers (the `[hf]` extra; CI installs them with `[test]`)."""
    require_package("torch", "pip install 'apr-tui[hf]'")
    require_package("transformers", "pip install 'apr-tui[hf]'")
