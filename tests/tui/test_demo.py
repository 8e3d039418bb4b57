"""engine.demo: the demo pair is two real .apr files that differ by exactly the planted scale."""

from __future__ import annotations

import numpy as np

from engine.demo import DEFECT_FACTOR, DEFECT_LAYER
from engine.formats import open_model


def test_small_demo_pair_differs_only_by_the_planted_scale(demo_pair):
    assert demo_pair.flavour == "small"
    # The README's promise, stated independently of engine.demo: layer 2's up_proj scaled ×18
    # (a factor of 1 would make the equality below hold for an un-planted pair).
    assert (DEFECT_LAYER, DEFECT_FACTOR) == (2, 18.0)
    assert demo_pair.model_a.suffix == demo_pair.model_b.suffix == ".apr"
    planted = f"model.layers.{DEFECT_LAYER}.mlp.up_proj.weight"
    assert demo_pair.defect.tensor == planted
    with open_model(demo_pair.model_a) as a, open_model(demo_pair.model_b) as b:
        assert a.weights.names() == b.weights.names()
        for name in a.weights.names():
            wa, wb = a.weights.get(name), b.weights.get(name)
            if name == planted:
                np.testing.assert_allclose(wb, wa * np.float32(DEFECT_FACTOR), rtol=1e-6)
            else:
                np.testing.assert_array_equal(wa, wb)
        assert a.tokenizer is not None and a.tokenizer.encode("What is 2+2?")
