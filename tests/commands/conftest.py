"""Small real model files for the hostile-user tests: written by engine.synth + our writers."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DIMS = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@dataclass(frozen=True)
class Models:
    apr: Path
    """A seeded 2-layer Llama, hidden 64, as .apr."""
    wide: Path
    """The same architecture with hidden 128 (every stage a different size)."""
    deep: Path
    """The same seed with 3 layers."""
    hf_dir: Path
    """The first model as an HF directory (safetensors + config.json + tokenizer.json)."""


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from engine.formats import apr, safetensors
    from engine.synth import synthesize

    root = tmp_path_factory.mktemp("review2-models")
    base = synthesize("llama", seed=1, **DIMS)
    return Models(
        apr=Path(apr.write(base, root / "m.apr", "f32")),
        wide=Path(
            apr.write(
                synthesize("llama", seed=1, **dict(DIMS, hidden_size=128)), root / "wide.apr", "f32"
            )
        ),
        deep=Path(
            apr.write(synthesize("llama", seed=1, **dict(DIMS, num_layers=3)), root / "deep.apr")
        ),
        hf_dir=Path(safetensors.write(base, root / "hf")),
    )


def run_cli(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, naming what it must name."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes (to prove nothing was touched)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }
