"""The llama-cpp-python bindings the llama.cpp source needs: loading them, reading graph tensors.

`llama_cpp` is imported only here, and only when a llama.cpp source is opened (`load_library`;
without the package, MissingPackageError names it). `GgmlTensor` mirrors `struct ggml_tensor` of
the bundled libggml and is checked against `ggml_tensor_overhead()` before first use;
`copy_tensor` copies a computed node to a float32 host array. llama.cpp's log is kept for our
error messages instead of going to stderr (it would tear the terminal UI).
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from typing import Any

import numpy as np

from engine.errors import AprTuiError, MissingPackageError

LLAMA_CPP_PACKAGE = "llama-cpp-python"
"""The PyPI package that provides `llama_cpp` (a CPU wheel is in ../shared/wheels/)."""

MISSING_PACKAGE_HINT = (
    f"the llama.cpp source needs the {LLAMA_CPP_PACKAGE} package (pip install {LLAMA_CPP_PACKAGE})"
)

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1


# ----------------------------------------------------------------------------------- ctypes


class GgmlTensor(ctypes.Structure):
    """ctypes mirror of `struct ggml_tensor` (ggml.h of the bundled libggml).

    Only read, never written. Its size is checked against `ggml_tensor_overhead()` (the struct
    plus a 32-byte `ggml_object` header on 64-bit) before first use, so a changed layout fails
    loudly instead of reading garbage.
    """

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


GGML_OBJECT_HEADER = 32
"""sizeof(struct ggml_object) on 64-bit, included in ggml_tensor_overhead()."""


class _Library:
    """The loaded `llama_cpp` module and the libggml functions this source calls."""

    def __init__(self) -> None:
        try:
            import llama_cpp
            from llama_cpp import _ggml
        except ImportError:
            raise MissingPackageError(MISSING_PACKAGE_HINT) from None
        self.llama = llama_cpp
        self.version = getattr(llama_cpp, "__version__", "unknown")
        ggml = _ggml.libggml
        ggml.ggml_tensor_overhead.restype = ctypes.c_size_t
        ggml.ggml_tensor_overhead.argtypes = []
        ggml.ggml_op_name.restype = ctypes.c_char_p
        ggml.ggml_op_name.argtypes = [ctypes.c_int]
        ggml.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        ggml.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_tensor_get.restype = None
        ggml.ggml_backend_tensor_get.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
        ]
        self.ggml = ggml
        expected = ggml.ggml_tensor_overhead() - GGML_OBJECT_HEADER
        if ctypes.sizeof(GgmlTensor) != expected:
            raise AprTuiError(
                f"llama.cpp source: struct ggml_tensor is {expected} bytes in this "
                f"{LLAMA_CPP_PACKAGE} {self.version}, the mirror expects "
                f"{ctypes.sizeof(GgmlTensor)}; this version is not supported"
            )
        self.op_names: dict[int, str] = {}
        self.errors: deque[str] = deque(maxlen=8)
        """The last error lines llama.cpp logged (quoted in our error messages)."""
        # llama.cpp logs to stderr by default, which would tear the terminal UI: keep its
        # errors for our messages and drop the rest. The logger is process-global.
        self._log_callback = llama_cpp.llama_log_callback(self._log)
        llama_cpp.llama_log_set(self._log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()

    def _log(self, level: int, text: bytes, _user_data: Any) -> None:
        if level == 3 and text:  # GGML_LOG_LEVEL_ERROR
            line = text.decode("utf-8", "replace").strip()
            if line:
                self.errors.append(line)

    def op_name(self, op: int) -> str:
        name = self.op_names.get(op)
        if name is None:
            raw = self.ggml.ggml_op_name(op)
            name = self.op_names[op] = raw.decode() if raw else str(op)
        return name

    def last_error(self) -> str:
        return f": {self.errors[-1]}" if self.errors else ""


_LIBRARY: _Library | None = None
_LIBRARY_LOCK = threading.Lock()


def load_library() -> _Library:
    """The llama.cpp bindings, loaded once; MissingPackageError without the package."""
    global _LIBRARY
    with _LIBRARY_LOCK:
        if _LIBRARY is None:
            _LIBRARY = _Library()
        return _LIBRARY


def llama_cpp_available() -> bool:
    """Whether `llama_cpp` can be imported (without loading it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def copy_tensor(lib: _Library, tensor: GgmlTensor) -> np.ndarray:
    """A float32 host copy of a computed graph tensor in row-major order (ggml's `ne` reversed).

    Host buffers are read in place through the tensor's byte strides `nb` (views included);
    device buffers are fetched with `ggml_backend_tensor_get`, which needs a contiguous tensor.
    """
    dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16}.get(tensor.type)
    name = tensor.name.decode(errors="replace")
    if dtype is None:
        raise AprTuiError(f"llama.cpp node {name!r} has ggml type {tensor.type}, not f32/f16")
    shape = tuple(int(n) for n in reversed(tensor.ne))
    strides = tuple(int(s) for s in reversed(tensor.nb))
    itemsize = np.dtype(dtype).itemsize
    if any(n == 0 for n in shape):
        return np.zeros(shape, dtype=np.float32)
    span = sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + itemsize
    host = not tensor.buffer or lib.ggml.ggml_backend_buffer_is_host(tensor.buffer)
    if host:
        raw = (ctypes.c_char * span).from_address(tensor.data)
        view = np.ndarray(shape, dtype=dtype, buffer=raw, strides=strides)
        return np.array(view, dtype=np.float32, copy=True)
    contiguous = strides == tuple(int(np.prod(shape[i + 1 :])) * itemsize for i in range(4))
    if not contiguous:
        raise AprTuiError(f"llama.cpp node {name!r} is a strided view in device memory")
    out = np.empty(shape, dtype=dtype)
    lib.ggml.ggml_backend_tensor_get(ctypes.addressof(tensor), out.ctypes.data, 0, span)
    return out.astype(np.float32)
