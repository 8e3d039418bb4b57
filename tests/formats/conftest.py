"""Fixtures: one seeded small model per architecture, and real files of it in each format."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.formats import apr, gguf, safetensors
from engine.model import Model
from engine.synth import synthesize

# 256 columns so every GGML block type (up to the 256-value K-quants) fits whole rows.
DIMS = dict(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512)


@pytest.fixture(scope="session")
def llama() -> Model:
    return synthesize("llama", seed=7, **DIMS)


@pytest.fixture(scope="session", params=["llama", "mistral", "qwen2", "qwen3"])
def any_arch(request) -> Model:
    return synthesize(request.param, seed=11, tied_embeddings=request.param == "qwen3", **DIMS)


@pytest.fixture(scope="session")
def llama_files(llama, tmp_path_factory) -> dict[str, Path]:
    """The same llama model as safetensors directory, F32 GGUF and F32 APR."""
    root = tmp_path_factory.mktemp("llama-files")
    return {
        "safetensors": safetensors.write(llama, root / "hf"),
        "gguf": gguf.write(llama, root / "model.gguf", "f32"),
        "apr": apr.write(llama, root / "model.apr", "f32"),
    }
