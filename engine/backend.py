"""Array-module choice for the forward pass: numpy on the host, or CuPy on a CUDA device.

The forward pass is written once, over an array module `xp` that is either `numpy` or `cupy`;
this module decides which one, moves weights onto the device and results back to the host, and
names the device for the status line. CuPy is optional (the `[gpu]` extra): importing this module
never imports it, and asking for it where it cannot work is a clear `AprTuiError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from engine.errors import AprTuiError

BACKEND_NAMES: tuple[str, ...] = ("auto", "numpy", "cupy")
"""What `trace(backend=...)` accepts; the command line's `--device` spellings map onto these."""

DEVICE_ALIASES: dict[str, str] = {
    "auto": "auto",
    "numpy": "numpy",
    "cpu": "numpy",
    "cupy": "cupy",
    "cuda": "cupy",
    "gpu": "cupy",
}
"""`--device` spellings (cpu, cuda, ...) to backend names."""


class BackendError(AprTuiError):
    """A requested backend or device that cannot be used here (no CuPy, no GPU, unknown name)."""


@dataclass(frozen=True)
class Backend:
    """One array module plus what the rest of the engine needs to know about it."""

    name: str
    """`numpy` or `cupy`."""
    xp: ModuleType
    """The array module every forward-pass function computes with."""
    device_name: str
    """For the status line: `cpu (numpy)` or `cuda:0 NVIDIA H100 80GB HBM3 (cupy)`."""

    def asarray(self, host_array: np.ndarray) -> Any:
        """A float32 array on this backend's device (no copy on numpy when already float32)."""
        return self.xp.asarray(host_array, dtype=self.xp.float32)

    def to_host(self, array: Any) -> np.ndarray:
        return to_host(array)


def to_host(array: Any) -> np.ndarray:
    """A host numpy array for a numpy or CuPy array (numpy passes through without a copy)."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)
    if callable(get):  # cupy.ndarray.get() copies device -> host
        return get()
    return np.asarray(array)


def _import_cupy() -> ModuleType | None:
    """CuPy if it is installed and imports cleanly, else None (a broken CUDA install counts as none)."""
    try:
        import cupy  # noqa: PLC0415 (optional dependency, imported on demand)
    except Exception:
        return None
    return cupy


def _cuda_device_count(cupy: ModuleType) -> int:
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def _cupy_device_name(cupy: ModuleType) -> str:
    device = cupy.cuda.Device()
    try:
        name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        name = "GPU"
    return f"cuda:{device.id} {name} (cupy)"


NUMPY_BACKEND = Backend(name="numpy", xp=np, device_name="cpu (numpy)")


def resolve_backend(spec: str | Backend = "auto") -> Backend:
    """The backend for `spec`: `numpy`/`cpu`, `cupy`/`cuda`/`gpu`, or `auto`.

    `auto` picks CuPy when it imports and sees at least one CUDA device, otherwise numpy. An
    explicit `cupy`/`cuda` that cannot work raises BackendError saying why, rather than quietly
    running on the CPU: a user who asked for the GPU wants to know they did not get it.
    """
    if isinstance(spec, Backend):
        return spec
    key = str(spec).strip().lower()
    if key not in DEVICE_ALIASES:
        valid = ", ".join(sorted(DEVICE_ALIASES))
        raise BackendError(f"--device {spec!r}: unknown device; valid: {valid}")
    wanted = DEVICE_ALIASES[key]
    if wanted == "numpy":
        return NUMPY_BACKEND
    cupy = _import_cupy()
    if cupy is None:
        if wanted == "auto":
            return NUMPY_BACKEND
        raise BackendError(
            f"--device {spec}: CuPy is not installed (pip install 'apr-tui[gpu]'), use --device cpu"
        )
    if _cuda_device_count(cupy) == 0:
        if wanted == "auto":
            return NUMPY_BACKEND
        raise BackendError(f"--device {spec}: CuPy found no CUDA device, use --device cpu")
    return Backend(name="cupy", xp=cupy, device_name=_cupy_device_name(cupy))
