"""Weights decoded ahead in a forked child (engine.decoder_process, engine.prefetch).

The pass gets exactly the bits it would decode itself, never waits for work the child has not
begun, learns the order it asks in, and the child leaves nothing behind: no descriptor of the
parent's, no process after the pass or after the parent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import engine.prefetch
from engine.decoder_process import _STARTED, DecoderProcess
from engine.formats import gguf, open_model
from engine.formats.gguf.reader import GgufWeightStore
from engine.forward import trace
from engine.prefetch import WHOLE, WeightPrefetcher
from engine.synth import synthesize
from tests.support.bounded import first_line_within

DEADLINE_S = 20.0  # every wait below is bounded by this, however loaded the machine


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (reaped, or a zombie nobody of ours will reap)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def quantized_model(tmp_path_factory) -> Path:
    """A 3-layer llama with tied embeddings, stored Q4_1: real GGUF blocks, a head read as
    row blocks."""
    model = synthesize(
        "llama",
        seed=5,
        hidden_size=256,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=512,
        tied_embeddings=True,
    )
    return gguf.write(model, tmp_path_factory.mktemp("decode-ahead") / "q4_1.gguf", "q4_1")


@pytest.fixture
def child_always(monkeypatch):
    """A decoding child for any model size and load, waited for on every item it was asked."""
    monkeypatch.setattr(engine.prefetch, "DECODE_PROCESS_MIN_VALUES", 0)
    monkeypatch.setattr(engine.prefetch, "idle_core", lambda since, now: True)
    monkeypatch.setattr(engine.prefetch, "DECODE_PATIENT", True)


def captures_of(path: Path, decode_ahead: bool) -> list[tuple[str, int, np.ndarray]]:
    with open_model(path) as model:
        return [
            (c.stage, c.layer, np.array(c.array))
            for c in trace(model, [1, 5, 9, 2, 7], decode_ahead=decode_ahead)
        ]


def test_a_pass_decoded_ahead_captures_the_same_bits(quantized_model, child_always, monkeypatch):
    parent_gets: list[str] = []
    original_get = GgufWeightStore.get

    def counting_get(self, name):
        parent_gets.append(name)  # the child's calls count in the child's copy of this list
        return original_get(self, name)

    monkeypatch.setattr(GgufWeightStore, "get", counting_get)
    started: list[DecoderProcess] = []
    original_init = DecoderProcess.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(DecoderProcess, "__init__", recording_init)
    ahead = captures_of(quantized_model, decode_ahead=True)
    assert len(started) == 1 and not started[0].alive  # forked once, ended with the pass
    later_matrices = [
        n
        for n in parent_gets
        if n.startswith(("model.layers.1.", "model.layers.2.")) and "proj" in n
    ]
    assert later_matrices == []  # layers 1-2's matrices all came from the child
    parent_gets.clear()
    inline = captures_of(quantized_model, decode_ahead=False)
    assert any(n.startswith("model.layers.2.") and "proj" in n for n in parent_gets)
    assert [(s, layer) for s, layer, _ in ahead] == [(s, layer) for s, layer, _ in inline]
    for (stage, layer, a), (_, _, b) in zip(ahead, inline, strict=True):
        assert a.tobytes() == b.tobytes(), f"{stage} layer {layer}"


def test_no_child_for_a_small_model_or_a_busy_machine(quantized_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a decoding child was started")

    monkeypatch.setattr(DecoderProcess, "__init__", refuse)
    captures_of(quantized_model, decode_ahead=True)  # below DECODE_PROCESS_MIN_VALUES
    monkeypatch.setattr(engine.prefetch, "DECODE_PROCESS_MIN_VALUES", 0)
    monkeypatch.setattr(engine.prefetch, "idle_core", lambda since, now: False)
    captures_of(quantized_model, decode_ahead=True)  # no idle core
    monkeypatch.setattr(engine.prefetch, "idle_core", lambda since, now: True)
    captures_of(quantized_model, decode_ahead=False)  # a comparison's pass


class ArrayStore:
    """Named arrays; `get` in the child can be held until a file appears, and logs each call
    to a file (the only way the child can tell the test what it did)."""

    def __init__(self, arrays: dict[str, np.ndarray], log: Path, hold: dict[str, Path]):
        self.arrays, self.log, self.hold = arrays, log, hold

    def has(self, name):
        return name in self.arrays

    def shape(self, name):
        return self.arrays[name].shape

    def get(self, name):
        release = self.hold.get(name)
        if release is not None:
            wait_until(release.exists, f"{release}")
        with open(self.log, "a") as log:
            log.write(f"{name} {os.getpid()}\n")
        if self.log != Path(os.devnull):
            (self.log.parent / f"{name}.done").touch()
        if name == "broken":
            raise ValueError("a corrupt tensor")
        return self.arrays[name].copy()


def test_the_pass_takes_queued_work_itself_and_the_child_skips_it(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {name: rng.standard_normal((8, 4)).astype(np.float32) for name in "abcd"}
    release = tmp_path / "release"
    log = tmp_path / "child.log"
    store = ArrayStore(arrays, log, {"a": release})
    decoder = DecoderProcess(store, 8 * 4 * 4, 4)
    try:
        for seq, name in enumerate("abcd"):
            assert decoder.request(seq, (name, WHOLE, WHOLE))
        wait_until(lambda: int(decoder.counters[_STARTED]) == 0, "the child to begin 'a'")
        # 'b' is queued behind 'a', which the child is held on: the pass does not wait
        assert decoder.take(1, (8, 4)) is None
        release.touch()
        wait_until(lambda: int(decoder.counters[_STARTED]) >= 2, "the child to begin 'c'")
        got = decoder.take(2, (8, 4))  # the child is on it or done with it: waited for
        assert got is not None and got.tobytes() == arrays["c"].tobytes()
        wait_until(lambda: int(decoder.counters[_STARTED]) >= 3, "the child to begin 'd'")
        got = decoder.take(3, (8, 4))
        assert got is not None and got.tobytes() == arrays["d"].tobytes()
    finally:
        decoder.close()
    assert log.read_text().split()[::2] == ["a", "c", "d"]  # 'b' was the parent's: skipped


def test_a_failed_decode_in_the_child_is_decoded_again_by_the_pass(tmp_path):
    arrays = {"broken": np.zeros((2, 2), np.float32), "fine": np.ones((2, 2), np.float32)}
    store = ArrayStore(arrays, tmp_path / "child.log", {})
    prefetch = WeightPrefetcher(store, num_layers=1)
    prefetch.planned = [("broken", WHOLE, WHOLE), ("fine", WHOLE, WHOLE)]
    prefetch.schedule = {item: i for i, item in enumerate(prefetch.planned)}
    prefetch.decoder = DecoderProcess(store, 16, 2, patient=True)
    try:
        prefetch._request_ahead()
        with pytest.raises(ValueError, match="a corrupt tensor"):  # the pass's own decode
            prefetch.get("broken")
        assert prefetch.decoder.alive  # one failed decode does not end the child
        assert prefetch.get("fine").tobytes() == arrays["fine"].tobytes()
    finally:
        prefetch.close()
    # the child tried both; the parent decoded only the broken one again
    assert (tmp_path / "child.log").read_text().split()[::2] == ["broken", "fine", "broken"]


def test_the_order_is_learned_from_layer_zero_with_the_head_after_the_layers(monkeypatch):
    keys = ["input_layernorm.weight", "self_attn.q_proj.weight", "mlp.down_proj.weight"]
    arrays = {
        f"model.layers.{layer}.{key}": np.zeros((4,) if "norm" in key else (4, 4), np.float32)
        for layer in range(3)
        for key in keys
    }
    arrays["model.embed_tokens.weight"] = np.zeros((100, 4), np.float32)
    # a head block of 64 rows (256 values) is for threads to decode, not for the child
    monkeypatch.setattr(engine.prefetch, "PARALLEL_DECODE_MIN_VALUES", 200)
    store = ArrayStore(arrays, Path(os.devnull), {})
    head = [("model.embed_tokens.weight", 0, 64), ("model.embed_tokens.weight", 64, 100)]
    prefetch = WeightPrefetcher(store, num_layers=3, tail=head, child=False)
    for name in [f"model.layers.0.{key}" for key in keys] + ["model.layers.1." + keys[0]]:
        prefetch.get(name)
    assert prefetch.order == keys[1:]  # matrices only: a vector is cheaper inline
    assert (
        prefetch.planned
        == [(f"model.layers.{layer}.{key}", WHOLE, WHOLE) for layer in (1, 2) for key in keys[1:]]
        + head[1:]
    )
    assert prefetch.decoder is None  # child=False: everything inline


def test_the_child_holds_none_of_the_parents_descriptors(tmp_path):
    import fcntl

    locked = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(locked, fcntl.LOCK_EX)  # as a trace holds its directory's lock
    store = ArrayStore({"a": np.zeros((2, 2), np.float32)}, Path(os.devnull), {})
    decoder = DecoderProcess(store, 16, 1)
    pid = decoder.pid
    try:
        descriptors = f"/proc/{pid}/fd"
        wait_until(lambda: len(os.listdir(descriptors)) == 5, "the child to close what it got")
        assert len(os.listdir(descriptors)) == 5  # stdin, stdout, stderr and its two pipes
        assert {os.readlink(f"{descriptors}/{fd}") for fd in (0, 1, 2)} == {os.devnull}
        other = os.open(tmp_path, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held (by the parent)
        os.close(locked)  # the parent lets go: nobody may hold it now, the child included
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    finally:
        decoder.close()
    assert process_gone(pid)  # reaped by close


def test_the_child_ends_when_its_parent_is_killed(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time
        import numpy as np
        from engine.decoder_process import DecoderProcess

        class Store:
            def get(self, name):
                return np.zeros((2, 2), np.float32)

        decoder = DecoderProcess(Store(), 16, 1)
        print(decoder.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        child = int(first_line_within(parent.stdout, DEADLINE_S, "the child's pid"))
        assert not process_gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=DEADLINE_S)
        wait_until(lambda: process_gone(child), "the orphaned child to exit")
    finally:
        parent.kill()
        parent.wait(timeout=DEADLINE_S)
        parent.stdout.close()


def test_a_core_counts_as_free_when_it_stayed_idle_and_the_host_took_little():
    from engine.prefetch import idle_core

    # (all, idle, stolen) ticks: 200 ticks of 2 CPUs over one second
    assert idle_core((1000, 400, 10), (1200, 500, 12))  # 50% idle, 1% stolen
    assert not idle_core((1000, 400, 10), (1200, 420, 12))  # 10% idle: a neighbour is busy
    assert not idle_core((1000, 400, 10), (1200, 500, 34))  # 12% stolen by the host


def test_a_slot_is_not_reused_while_an_array_of_it_is_alive(tmp_path):
    rng = np.random.default_rng(8)
    arrays = {name: rng.standard_normal((4, 4)).astype(np.float32) for name in "abcd"}
    store = ArrayStore(arrays, tmp_path / "child.log", {})
    decoder = DecoderProcess(store, 4 * 4 * 4, 2, patient=True)
    try:
        assert decoder.request(0, ("a", WHOLE, WHOLE)) and decoder.request(1, ("b", WHOLE, WHOLE))
        held = decoder.take(0, (4, 4)).T  # a view of the slot's array: it keeps the slot
        assert not held.flags.writeable
        dropped = decoder.take(1, (4, 4))
        assert dropped.tobytes() == arrays["b"].tobytes()
        del dropped
        assert decoder.request(2, ("c", WHOLE, WHOLE))  # b's slot, free again
        assert not decoder.request(3, ("d", WHOLE, WHOLE))  # a's slot is still viewed
        assert decoder.take(2, (4, 4)).tobytes() == arrays["c"].tobytes()
        assert held.T.tobytes() == arrays["a"].tobytes()  # never overwritten
        del held
        assert decoder.request(3, ("d", WHOLE, WHOLE))  # a's slot, reclaimed
        assert decoder.take(3, (4, 4)).tobytes() == arrays["d"].tobytes()
    finally:
        decoder.close()


def test_rather_than_wait_the_pass_decodes_later_items_the_child_has_not_begun(tmp_path):
    rng = np.random.default_rng(9)
    arrays = {name: rng.standard_normal((4, 4)).astype(np.float32) for name in "abcd"}
    log = tmp_path / "decoded.log"
    # the child is held on 'a' until the pass has decoded 'b' itself
    store = ArrayStore(arrays, log, {"a": tmp_path / "b.done"})
    decoder = DecoderProcess(store, 4 * 4 * 4, 4)
    try:
        for seq, name in enumerate("abcd"):
            assert decoder.request(seq, (name, WHOLE, WHOLE))
        wait_until(lambda: int(decoder.counters[_STARTED]) == 0, "the child to begin 'a'")
        got = decoder.take(0, (4, 4), lambda seq: store.get("abcd"[seq]))
        assert got.tobytes() == arrays["a"].tobytes()
        for seq, name in enumerate("bcd", start=1):
            assert decoder.take(seq, (4, 4)).tobytes() == arrays[name].tobytes()
    finally:
        decoder.close()
    lines = [line.split() for line in log.read_text().splitlines()]
    me = str(os.getpid())
    assert [name for name, pid in lines if pid == me] == ["d", "c", "b"]  # furthest first
    assert [name for name, pid in lines if pid != me] == ["a"]  # the child skipped the rest
