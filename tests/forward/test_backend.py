"""Backend selection: numpy always, CuPy only when it imports and sees a CUDA device.

This machine has no GPU, so CuPy is replaced by stand-in modules that answer the two questions
the selection asks (does it import, how many devices). When CuPy with a GPU really is present,
the last test runs the oracle comparison on it.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from engine import backend as backend_module
from engine.backend import NUMPY_BACKEND, BackendError, resolve_backend, to_host
from engine.errors import AprTuiError


def _fake_cupy(device_count: int) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: device_count,
        getDeviceProperties=lambda index: {"name": b"Fake GPU 9000"},
    )
    cupy.cuda = types.SimpleNamespace(runtime=runtime, Device=lambda: types.SimpleNamespace(id=0))
    cupy.float32 = np.float32
    return cupy


@pytest.mark.parametrize("spec", ["numpy", "cpu", "CPU", " numpy "])
def test_cpu_spellings_give_numpy(spec):
    chosen = resolve_backend(spec)
    assert chosen is NUMPY_BACKEND
    assert chosen.xp is np
    assert chosen.device_name == "cpu (numpy)"


@pytest.mark.parametrize("spec", ["cuda", "cupy", "gpu"])
def test_gpu_requested_without_cupy_is_a_clear_error(monkeypatch, spec):
    monkeypatch.setattr(backend_module, "_import_cupy", lambda: None)
    with pytest.raises(BackendError, match=rf"--device {spec}: CuPy is not installed") as info:
        resolve_backend(spec)
    assert isinstance(info.value, AprTuiError)  # the CLI turns it into one red line, exit 2
    assert "\n" not in str(info.value)


def test_gpu_requested_without_a_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend_module, "_import_cupy", lambda: _fake_cupy(0))
    with pytest.raises(BackendError, match="CuPy found no CUDA device"):
        resolve_backend("cuda")


def test_auto_falls_back_to_numpy_without_cupy_or_device(monkeypatch):
    monkeypatch.setattr(backend_module, "_import_cupy", lambda: None)
    assert resolve_backend("auto") is NUMPY_BACKEND
    monkeypatch.setattr(backend_module, "_import_cupy", lambda: _fake_cupy(0))
    assert resolve_backend("auto") is NUMPY_BACKEND


@pytest.mark.parametrize("spec", ["auto", "cuda"])
def test_cupy_with_a_device_is_chosen_and_named(monkeypatch, spec):
    fake = _fake_cupy(1)
    monkeypatch.setattr(backend_module, "_import_cupy", lambda: fake)
    chosen = resolve_backend(spec)
    assert chosen.name == "cupy"
    assert chosen.xp is fake
    assert chosen.device_name == "cuda:0 Fake GPU 9000 (cupy)"


def test_unknown_device_names_the_valid_ones():
    with pytest.raises(BackendError, match=r"--device 'tpu': unknown device; valid: .*cuda.*numpy"):
        resolve_backend("tpu")


def test_to_host_passes_numpy_through_and_calls_get_on_device_arrays():
    host = np.arange(3, dtype=np.float32)
    assert to_host(host) is host

    class DeviceArray:
        def get(self):
            return host * 2

    np.testing.assert_array_equal(to_host(DeviceArray()), [0, 2, 4])


def test_cupy_trace_matches_numpy_when_a_gpu_is_present():
    """On a machine with CuPy and a GPU: the same pass on the device agrees with numpy to float32
    rounding (matmul kernels differ, so not bit-exact)."""
    cupy = backend_module._import_cupy()
    if cupy is None or backend_module._cuda_device_count(cupy) == 0:
        pytest.skip("no CuPy / CUDA device on this machine")
    from engine.forward import trace
    from tests.forward.agreement import TINY_MAX_REL_ERR, disagreements
    from tests.forward.hf_oracle import build_hf_model, engine_model, hf_stage_captures

    tokens = [5, 17, 99, 3, 42, 7, 127]
    for arch in ("llama", "qwen2", "qwen3"):
        hf_model = build_hf_model(arch, seed=2)
        got = {
            (c.layer, c.stage): to_host(c.array)
            for c in trace(engine_model(hf_model), tokens, backend="cuda")
        }
        assert (
            disagreements(got, hf_stage_captures(hf_model, tokens), max_rel=TINY_MAX_REL_ERR) == []
        )


def test_forward_blocks_compute_only_through_xp():
    """One code path for numpy and CuPy: inside engine/forward.py, `np.` appears only for host
    work (the embedding row lookup on the host table), numpy's floating-point error state and
    type annotations. A stray `np.exp(x)` in a block would silently pull a CuPy array to the
    host (or fail) on the GPU path, which this machine cannot run."""
    import ast
    import inspect

    import engine.forward as forward

    tree = ast.parse(inspect.getsource(forward))
    uses = []

    class Visitor(ast.NodeVisitor):
        def __init__(self):
            self.scope = []

        def visit_FunctionDef(self, node):
            self.scope.append(node.name)
            self.generic_visit(node)
            self.scope.pop()

        def visit_Attribute(self, node):
            if isinstance(node.value, ast.Name) and node.value.id == "np":
                uses.append((self.scope[-1] if self.scope else "<module>", node.attr))
            self.generic_visit(node)

    Visitor().visit(tree)
    computing = {(scope, attr) for scope, attr in uses if attr != "ndarray"}
    assert computing == {("silu", "errstate"), ("trace", "asarray")}
