"""Snapshots of the noise-or-bug view: the local-error metric and the origin mark.

Regenerate with `pytest tests/tui/test_noise_snapshots.py --snapshot-update` only after looking
at the new pictures.
"""

from __future__ import annotations

import pytest

from aprtui.app import make_app
from engine.plan import prepare
from tests.tui.conftest import explorer, settle

SNAP_SIZE = (150, 40)


def test_demo_local_error_and_origin(snap_compare, demo_pair):
    """The demo pair in the `local` metric (m ×4): every cell at float32 rounding (green, far
    below 1× its floor) except L2 `up`, the origin, marked `▶` and red at ~94444× its floor;
    the status line leads with `origin L2 up`; the legend explains local error ÷ noise floor."""
    app = explorer(demo_pair.model_a, demo_pair.model_b)

    async def run_before(pilot):
        await settle(pilot)
        for _ in range(4):
            await pilot.press("m")
        await pilot.press("f")
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)


@pytest.mark.slow
def test_llamacpp_pair_has_no_origin(snap_compare, smollm2_gguf, llama_cpp_installed):
    """SmolLM2 against llama.cpp running the same GGUF (`apr-tui model.gguf --ref llama.cpp`)
    in the `local` metric: matmuls at a fraction of their calibrated floors, element-wise ops at
    float32 rounding, `silu` one-sided (fused in llama.cpp), no origin; the status line says
    so and names the first cosine below 0.999 as noise."""
    plan = prepare(smollm2_gguf, "llama.cpp", device="cpu")
    app = make_app(plan, clock=None)

    async def run_before(pilot):
        await settle(pilot, timeout=600)
        assert app.origin is None
        for _ in range(4):
            await pilot.press("m")
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SNAP_SIZE)
