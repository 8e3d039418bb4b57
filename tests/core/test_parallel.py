"""engine.parallel: one job's chunks shared among threads, every item once, errors after all."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import engine.parallel as parallel
from engine.formats.ggml_types import GGMLQuantizationType
from engine.formats.quant import FAST_CHUNK_VALUES, dequantize_blocks, quantize_ggml


def test_every_item_is_worked_once_in_contiguous_groups_on_several_threads(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 3)
    seen: list[tuple[str, list[int]]] = []
    lock = threading.Lock()

    def work(group):
        with lock:
            seen.append((threading.current_thread().name, list(group)))

    parallel.parallel_chunks(work, list(range(10)))
    groups = sorted(group for _, group in seen)
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    by_thread = dict((group[0], name) for name, group in seen)
    caller = threading.current_thread().name
    assert by_thread[0] == caller  # the caller takes the first group itself
    assert by_thread[3] != caller and by_thread[6] != caller  # the others run on workers


def test_one_thread_runs_everything_on_the_caller(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 1)
    names = []
    parallel.parallel_chunks(lambda group: names.append(threading.current_thread().name), [1, 2])
    assert names == [threading.current_thread().name]


def test_an_error_is_raised_after_every_group_has_finished(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 2)
    finished = threading.Event()

    def work(group):
        if 0 in group:
            raise ValueError("first group failed")
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
