"""engine.parallel: one job's chunks claimed by several threads, every item once, a stalled thread
holding back only its own item, errors after all."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import engine.parallel as parallel
from engine.formats.ggml_types import GGMLQuantizationType
from engine.formats.quant import FAST_CHUNK_VALUES, dequantize_blocks, quantize_ggml


def test_every_item_is_worked_once_and_three_threads_work_at_once(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 3)
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()
    # A thread that claimed one of the first three items waits here for two others, so it
    # cannot claim another meanwhile: items 0, 1 and 2 are worked by three threads at once.
    together = threading.Barrier(3, timeout=10)

    def work(group):
        assert len(group) == 1  # claimed one at a time
        with lock:
            seen.append((threading.current_thread().name, group[0]))
        if group[0] < 3:
            together.wait()

    parallel.parallel_chunks(work, list(range(10)))
    assert sorted(item for _, item in seen) == list(range(10))  # each once
    first_three = {name for name, item in seen if item < 3}
    assert len(first_three) == 3
    assert threading.current_thread().name in first_three  # the caller works too


def test_a_stalled_thread_holds_back_only_the_item_it_has(monkeypatch):
    """A core taken away by the host (CPU steal): the worker stalls in its first item until the
    caller has done all the others, which a fixed half each could not do."""
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 2)
    caller = threading.current_thread().name
    done: dict[str, list[int]] = {}
    rest_done = threading.Event()

    def work(group):
        name = threading.current_thread().name
        done.setdefault(name, []).append(group[0])
        if name != caller:
            assert rest_done.wait(10), "the caller did not take over the remaining items"
        elif len(done[caller]) == 9:
            rest_done.set()

    parallel.parallel_chunks(work, list(range(10)))
    assert sorted(i for items in done.values() for i in items) == list(range(10))
    assert len(done[caller]) >= 9


def test_no_item_is_claimed_after_a_stop():
    claims = parallel._Claims(3)
    assert claims.next() == 0
    claims.stop()
    assert claims.next() is None


def test_one_thread_runs_everything_on_the_caller(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 1)
    names = []
    parallel.parallel_chunks(lambda group: names.append(threading.current_thread().name), [1, 2])
    assert names == [threading.current_thread().name]


def test_an_error_is_raised_after_every_thread_has_finished(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 2)
    finished = threading.Event()

    other_started = threading.Event()

    def work(group):
        if 0 in group:
            assert other_started.wait(10)  # fail only once item 1 is claimed and running
            raise ValueError("first group failed")
        other_started.set()
        time.sleep(0.2)  # still writing when the first group fails
        finished.set()

    with pytest.raises(ValueError, match="first group failed"):
        parallel.parallel_chunks(work, [0, 1])
    assert finished.is_set()  # the other group was waited for before the error came out


def test_a_tensor_decodes_to_the_same_bits_on_one_or_two_threads(monkeypatch):
    rng = np.random.default_rng(5)
    values = rng.standard_normal((48, FAST_CHUNK_VALUES // 16)).astype(np.float32)  # 3 chunks
    blocks = quantize_ggml(values, GGMLQuantizationType.Q8_0)
    blocks = blocks.reshape(-1, 34)
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 1)
    serial = dequantize_blocks(blocks, GGMLQuantizationType.Q8_0)
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 2)
    threaded = dequantize_blocks(blocks, GGMLQuantizationType.Q8_0)
    assert np.array_equal(serial.view(np.uint32), threaded.view(np.uint32))
    assert np.abs(serial.reshape(values.shape) - values).max() < 0.05  # and it is the tensor


def test_a_job_that_finds_the_workers_taken_runs_alone_instead_of_waiting(monkeypatch):
    """Two jobs at once (both sides of a comparison decoding): the second finds the only
    worker held by the first and does all its items on its own thread, without waiting."""
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 2)
    release = threading.Event()
    first_started = threading.Event()

    def slow(group):
        if threading.current_thread().name.startswith("apr-tui-chunks"):
            first_started.set()
            assert release.wait(10)  # the worker is held until the second job is done
        else:  # the first job's own thread leaves the other item to its worker
            assert first_started.wait(10)

    first = threading.Thread(target=parallel.parallel_chunks, args=(slow, [0, 1]))
    first.start()
    assert first_started.wait(10)
    seen: list[tuple[str, list[int]]] = []
    parallel.parallel_chunks(
        lambda group: seen.append((threading.current_thread().name, list(group))), [0, 1, 2, 3]
    )
    assert seen == [(threading.current_thread().name, [0, 1, 2, 3])]  # alone, all of it
    release.set()
    first.join(10)
    assert not first.is_alive()
    assert parallel._busy_workers == 0  # the first job gave its worker back
