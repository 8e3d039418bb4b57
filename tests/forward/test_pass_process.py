"""A pass in a forked child, its captures streamed back (engine.pass_process.ForkedPass).

The stream is a stand-in for a pass: numbered captures with arrays, computed the same way in
the child and in the parent. What must hold: the parent gets exactly the stream, in order, once
each; a child that dies, hangs, sends what cannot be loaded or fails in its pass is replaced
by the parent's own run from where it stopped, so an error of the pass is the parent's own;
closing early ends the child.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pytest

import engine.pass_process as pass_process
from engine.pass_process import ForkedPass

pytestmark = pytest.mark.skipif(not pass_process.PASS_PROCESS, reason="needs os.fork")

PARENT = os.getpid()


@dataclass
class Item:
    layer: int
    array: np.ndarray


def _stream(count: int = 40, *, in_child=None, size: int = 20_000):
    """A stand-in pass: `count` items with distinct arrays; `in_child(index)` runs first in
    the child only (to make the child fail there)."""

    def make():
        for index in range(count):
            if in_child is not None and os.getpid() != PARENT:
                in_child(index)
            yield Item(index, np.full(size, index, dtype=np.float32))

    return make


def _received(forked: ForkedPass) -> list[int]:
    layers = []
    for item in forked:
        assert np.array_equal(item.array, np.full(item.array.size, item.layer, np.float32))
        layers.append(item.layer)
    return layers


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_child_streams_every_capture_in_order():
    forked = ForkedPass(_stream())
    pid = forked.pid
    assert pid not in (0, os.getpid())
    assert _received(forked) == list(range(40))
    assert forked.delivered == 40 and _gone(pid)


@pytest.mark.parametrize(
    "failure",
    [
        lambda index: os._exit(3) if index == 17 else None,  # dies mid-pass
        lambda index: (_ for _ in ()).throw(ValueError("x")) if index == 5 else None,  # raises
    ],
    ids=["dies", "raises"],
)
def test_a_failed_child_is_replaced_by_the_parents_own_pass(failure):
    forked = ForkedPass(_stream(in_child=failure))
    assert _received(forked) == list(range(40))  # nothing twice, nothing missing


def test_a_silent_child_is_ended_and_replaced(monkeypatch):
    monkeypatch.setattr(pass_process, "REPLY_TIMEOUT_S", 0.5)
    forked = ForkedPass(_stream(in_child=lambda index: time.sleep(3600) if index == 9 else None))
    pid = forked.pid
    began = time.monotonic()
    assert _received(forked) == list(range(40))
    assert time.monotonic() - began < 30 and _gone(pid)


def test_what_the_child_cannot_send_is_computed_here():
    def make():
        for index in range(5):
            # a lambda does not pickle: the child's first batch fails to be written
            yield Item(index, np.zeros(3, np.float32)) if index != 2 else Item(2, lambda: 0)

    got = list(ForkedPass(make))
    assert [item.layer for item in got] == [0, 1, 2, 3, 4] and callable(got[2].array)


def test_an_error_of_the_pass_is_raised_by_the_parents_run():
    def make():
        yield Item(0, np.zeros(3, np.float32))
        raise ValueError("blk.3.ffn_up.weight: corrupt block")

    forked = ForkedPass(make)
    iterator = iter(forked)
    assert next(iterator).layer == 0
    with pytest.raises(ValueError, match="corrupt block"):
        next(iterator)


def test_closing_early_ends_the_child():
    forked = ForkedPass(_stream(count=10_000))
    pid = forked.pid
    iterator = iter(forked)
    next(iterator)
    iterator.close()
    assert _gone(pid)


def test_a_child_never_read_ends_with_its_owner():
    forked = ForkedPass(_stream(count=10_000))
    pid = forked.pid
    del forked
    assert _gone(pid)
