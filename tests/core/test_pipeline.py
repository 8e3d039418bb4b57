"""engine.pipeline.Ahead and engine.recent_weights.RecentWeights: the pieces that let a
comparison run its parts side by side without changing a bit of what it computes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.pipeline import Ahead, pipeline_blas
from engine.recent_weights import RecentWeights


def test_ahead_yields_every_item_in_order():
    assert list(Ahead(iter(range(50)), depth=3)) == list(range(50))


def test_ahead_runs_the_iterator_in_another_thread_at_most_depth_ahead():
    produced: list[int] = []
    threads: set[str] = set()

    def source():
        for i in range(20):
            threads.add(threading.current_thread().name)
            produced.append(i)
            yield i

    stream = Ahead(source(), depth=2, name="side-x")
    assert next(stream) == 0
    # One item taken, two in the queue, one more computed and waiting for a place: 4 produced
    # (waited for, however loaded the machine), and no more after room to run further ahead.
    deadline = time.monotonic() + 30
    while len(produced) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(produced) == 4
    time.sleep(0.1)
    assert len(produced) == 4
    assert threads == {"side-x"}
    stream.close()


def test_ahead_reraises_the_iterators_exception_in_the_reader():
    def source():
        yield 1
        raise ValueError("bad layer 3")

    stream = Ahead(source(), depth=4)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad layer 3"):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)


def test_closing_stops_the_producer_and_closes_its_generator_in_its_thread():
    closed_in: list[str] = []

    def source():
        try:
            i = 0
            while True:  # endless: only close() ends it
                yield i
                i += 1
        finally:
            closed_in.append(threading.current_thread().name)

    stream = Ahead(source(), depth=1, name="endless")
    assert next(stream) == 0
    stream.close()
    assert closed_in == ["endless"]
    with pytest.raises(StopIteration):
        next(stream)


def test_pipeline_blas_limits_blas_threads_and_restores_them_after_the_last_user():
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    before = blas_threads()
    assert before  # numpy's BLAS is loaded
    with pipeline_blas():
        with pipeline_blas():
            inside = blas_threads()
        assert blas_threads() == inside  # the outer user still runs
    assert blas_threads() == before
    assert all(n <= max(before) for n in inside)


class CountingStore:
    """A WeightStore stand-in that counts decodes."""

    def __init__(self) -> None:
        self.decodes: list[str] = []
        self.closed = False

    def names(self):
        return ["w1", "w2", "w3"]

    def has(self, name):
        return name in self.names()

    def shape(self, name):
        return (256, 256)

    def get(self, name):
        self.decodes.append(name)
        return np.full((256, 256), float(int(name[1:])), dtype=np.float32)  # 256 KiB

    def get_rows(self, name, start, stop):
        return self.get(name)[start:stop].copy()

    def close(self):
        self.closed = True


def test_recent_weights_decode_once_and_return_read_only_arrays():
    store = CountingStore()
    recent = RecentWeights(store, limit=1 << 20)
    first = recent.get("w1")
    again = recent.get("w1")
    assert store.decodes == ["w1"]
    assert again is first and float(first[0, 0]) == 1.0
    with pytest.raises(ValueError):
        first[0, 0] = 5.0  # shared with the other reader: never edited in place


def test_recent_weights_evict_the_least_recently_used_past_the_budget():
    store = CountingStore()
    recent = RecentWeights(store, limit=2 * 256 * 256 * 4)  # room for two matrices
    recent.get("w1")
    recent.get("w2")
    recent.get("w1")  # w1 is now the most recent
    recent.get("w3")  # evicts w2
    assert recent.nbytes == 2 * 256 * 256 * 4
    recent.get("w1")
    recent.get("w2")
    assert store.decodes == ["w1", "w2", "w3", "w2"]
    recent.close()
    assert store.closed and recent.nbytes == 0


def test_a_model_and_its_converted_copy_encode_a_prompt_once(tmp_path, monkeypatch):
    # bisect MODEL COPY: the copy carries the same tokenizer, so the prompt is encoded once
    # (engine.tokenizer.same_prompt_encoding); a model with another vocabulary is not fooled.
    from engine import tokenizer as tokenizer_module
    from engine.formats import apr, open_model
    from engine.sources.opening import open_pair
    from engine.synth import synthesize

    model = synthesize("llama", seed=3)
    apr.write(model, tmp_path / "m.apr", dtype="f32")
    apr.write(model, tmp_path / "copy.apr", dtype="q8_0")
    other = synthesize("llama", seed=3, vocab_size=model.config.vocab_size + 16)
    apr.write(other, tmp_path / "other.apr", dtype="f32")
    first, copy, different = (
        open_model(tmp_path / name) for name in ("m.apr", "copy.apr", "other.apr")
    )
    assert tokenizer_module.same_prompt_encoding(first, copy)
    assert not tokenizer_module.same_prompt_encoding(first, different)

    calls: list[str] = []
    real = tokenizer_module.encode_prompt

    def counting(model, prompt):
        calls.append(str(model.path))
        return real(model, prompt)

    monkeypatch.setattr(tokenizer_module, "encode_prompt", counting)
    a, b = open_pair(tmp_path / "m.apr", tmp_path / "copy.apr", prompt="What is the answer")
    assert len(calls) == 1 and a.token_ids == b.token_ids
    a.close(), b.close()
    a, b = open_pair(tmp_path / "m.apr", tmp_path / "other.apr", prompt="What is the answer")
    assert len(calls) == 3  # two tokenizers, two encodings
    a.close(), b.close()
