"""The command starts OpenBLAS with one thread (aprtui.cli._defer_blas_threads) and a large
pass raises it to what engine.pipeline.BLAS_THREADS_ENV allows; a user's own
OPENBLAS_NUM_THREADS wins. Each case runs in a fresh interpreter: OpenBLAS reads the variable
once, when numpy loads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, os, sys
from types import SimpleNamespace
from aprtui.cli import _defer_blas_threads
_defer_blas_threads()
import numpy
from threadpoolctl import threadpool_info
from engine.pipeline import BLAS_THREADS_ENV, pass_blas

def threads():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"][0]

config = SimpleNamespace(layer_weight_count=10**9)  # a large pass at any length
loaded = threads()
with pass_blas(config, 512):
    large = threads()
small_config = SimpleNamespace(layer_weight_count=1000)
with pass_blas(small_config, 4):
    small = threads()
print(json.dumps({"loaded": loaded, "large": large, "small": small, "after": threads(),
                  "allowed": os.environ.get(BLAS_THREADS_ENV)}))
"""


def probe(**env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS",)}
    environment.pop("APR_TUI_BLAS_THREADS", None)
    environment.update(env, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=environment
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_blas_starts_with_one_thread_and_a_large_pass_takes_the_cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    seen = probe()
    assert seen["loaded"] == 1
    assert seen["allowed"] == str(cores)
    assert seen["large"] == cores
    assert seen["small"] == 1
    assert seen["after"] == 1  # the large pass's limit is undone when it ends


def test_the_users_own_setting_is_left_alone():
    seen = probe(OPENBLAS_NUM_THREADS="2")
    assert seen["loaded"] == 2
    assert seen["allowed"] is None
    assert seen["large"] == 2  # as the user set it: nothing raised or lowered
    assert seen["small"] == 1


SMALL_PASS_PROBE = r"""
import json, sys
from types import SimpleNamespace
from aprtui.cli import _defer_blas_threads
_defer_blas_threads()
import numpy
from engine.pipeline import pass_blas

with pass_blas(SimpleNamespace(layer_weight_count=1000), 4):
    imported = "threadpoolctl" in sys.modules
    from threadpoolctl import threadpool_info
    inside = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"][0]
print(json.dumps({"imported": imported, "inside": inside}))
"""


def test_a_small_pass_on_blas_started_with_one_thread_leaves_threadpoolctl_unloaded():
    """OpenBLAS started on one thread runs a small pass on one thread without threadpoolctl
    (its import and library scan cost ~11 ms of a short trace)."""
    environment = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    environment.pop("APR_TUI_BLAS_THREADS", None)
    environment["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", SMALL_PASS_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"imported": False, "inside": 1}
