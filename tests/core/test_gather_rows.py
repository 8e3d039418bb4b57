"""engine.model.gather_rows: an embedding lookup that decodes only the distinct ids' rows."""

from __future__ import annotations

import numpy as np

from engine.model import DictWeightStore, gather_rows


class CountingStore(DictWeightStore):
    """Records the row ranges asked for."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.asked: list[tuple[int, int]] = []

    def get_rows(self, name, start, stop):
        self.asked.append((start, stop))
        return super().get_rows(name, start, stop)


def test_rows_in_token_order_with_repeats_from_runs_of_distinct_ids():
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    store = CountingStore({"embed": table})
    ids = np.array([7, 2, 3, 7, 2, 9])
    assert np.array_equal(gather_rows(store, "embed", ids), table[ids])
    assert store.asked == [(2, 4), (7, 8), (9, 10)]  # each distinct id decoded once


def test_no_ids_give_no_rows():
    store = CountingStore({"embed": np.zeros((3, 5), dtype=np.float32)})
    assert gather_rows(store, "embed", np.array([], dtype=np.int64)).shape == (0, 5)
