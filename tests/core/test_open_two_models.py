"""engine.sources.opening.open_two_models: both model files of a comparison opened at once,
errors in the order of one-after-the-other opening, and nothing left open on a failure."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import engine.formats as formats
from engine.errors import FormatError
from engine.formats import apr
from engine.sources.opening import open_pair, open_two_models
from engine.synth import synthesize


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real APR file, its Q8_0 copy, and a corrupt one (its footer CRC broken)."""
    root = tmp_path_factory.mktemp("open-two")
    model = synthesize("llama", seed=11)
    good, copy, bad = root / "m.apr", root / "copy.apr", root / "bad.apr"
    apr.write(model, good, dtype="f32")
    apr.write(model, copy, dtype="q8_0")
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the tensor data
    bad.write_bytes(bytes(data))
    return {"good": good, "copy": copy, "bad": bad}


@pytest.fixture
def recorded(monkeypatch):
    """open_model, recording which thread opened which file and which models were closed."""
    opened: dict[str, str] = {}
    closed: list[str] = []
    real = formats.open_model

    def spy(path):
        opened[Path(path).name] = threading.current_thread().name
        model = real(path)
        close = model.close

        def recording_close():
            closed.append(Path(path).name)
            close()

        model.close = recording_close
        return model

    monkeypatch.setattr(formats, "open_model", spy)
    return opened, closed


def test_b_opens_on_a_helper_thread_and_both_come_back_in_order(files, recorded):
    opened, closed = recorded
    model_a, model_b = open_two_models(files["good"], files["copy"])
    try:
        assert (model_a.path.name, model_b.path.name) == ("m.apr", "copy.apr")
        assert opened["m.apr"] == threading.current_thread().name
        assert opened["copy.apr"].startswith("open-b")
    finally:
        model_a.close(), model_b.close()
    assert sorted(closed) == ["copy.apr", "m.apr"]


def test_when_both_fail_a_is_the_error_reported(files, tmp_path):
    missing = tmp_path / "missing.apr"
    with pytest.raises(Exception) as raised:
        open_two_models(files["bad"], missing)
    assert "bad.apr" in str(raised.value) and "footer CRC mismatch" in str(raised.value)


def test_a_failing_closes_b_and_b_failing_closes_a(files, recorded):
    _, closed = recorded
    with pytest.raises(FormatError, match="bad.apr"):
        open_two_models(files["bad"], files["copy"])
    assert closed == ["copy.apr"]
    closed.clear()
    with pytest.raises(FormatError, match="bad.apr"):
        open_two_models(files["good"], files["bad"])
    assert closed == ["m.apr"]


def test_open_pair_of_two_files_uses_it_and_traces_the_same_tokens(files, recorded):
    opened, _ = recorded
    a, b = open_pair(files["good"], files["copy"], token_ids=[1, 2, 3], device="cpu")
    try:
        assert opened["copy.apr"].startswith("open-b")
        assert a.token_ids == b.token_ids == [1, 2, 3]
    finally:
        a.close(), b.close()
