"""The grid reads an index payload (`moe_router_indices`) as ids: equal or not, never a cosine."""

from __future__ import annotations

import numpy as np

from aprtui.widgets.metrics import METRICS
from engine.compare import make_cell as _cell
from engine.forward import Capture


def _capture(stage: str, values: list[float]) -> Capture:
    array = np.array(values, dtype=np.float32)
    return Capture(layer=1, stage=stage, array=array, shape=array.shape)


def test_expert_ids_read_as_equal_or_not():
    cosine = next(m for m in METRICS if m.key == "cosine")
    # [3, 5] vs [5, 3]: a cosine of 0.88 would call these close; as ids they differ everywhere.
    swapped = _cell(_capture("moe_router_indices", [3, 5]), _capture("moe_router_indices", [5, 3]))
    assert swapped.index_diff is not None and swapped.index_diff.positions == (0, 1)
    assert cosine.value(swapped) == 0.0
    same = _cell(_capture("moe_router_indices", [3, 5]), _capture("moe_router_indices", [3, 5]))
    assert cosine.value(same) == 1.0
    # An ordinary stage keeps its cosine.
    values = _cell(_capture("moe_router", [3, 5]), _capture("moe_router", [5, 3]))
    assert values.index_diff is None
    assert abs(cosine.value(values) - 30 / 34) < 1e-6
