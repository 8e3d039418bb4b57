"""Per-position logit metrics (engine.logits) against independent torch formulas, on real logits.

The real logits come from the installed `apr-tui trace --save-tensor logits_all` over the real
SmolLM2 GGUF and over a `q8_0` conversion of it (`apr-tui convert`), read back here with numpy
from the APRT bytes. Every expected value is computed in this file with torch
(`log_softmax`, `kl_div`, `topk`, `argsort`) or plain numpy loops, never by engine.logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.logits import (
    block_metrics,
    format_logit_report,
    logit_report,
    topk_mask,
    topk_masks,
)

APR_TUI = str(Path(sys.executable).with_name("apr-tui"))
PROMPT = "The capital of France is Paris, and the capital of Germany is Berlin. In 1990, the"


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [APR_TUI, *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="200", NO_COLOR="1"),
        timeout=300,
    )
    if check:
        assert done.returncode in (0, 1), done.stderr
    return done


def read_table(path: Path, seq: int) -> np.ndarray:
    """[seq, vocab] float32 from an APRT file's bytes (12-byte header, then f32 LE)."""
    data = path.read_bytes()
    assert data[:4] == b"APRT"
    values = np.frombuffer(data, dtype="<f4", offset=12)
    return values.reshape(seq, -1).astype(np.float32)


@pytest.fixture(scope="module")
def traces(smollm2_gguf, tmp_path_factory):
    """(gguf, q8 copy, gguf trace dir, q8 trace dir, token ids) — all written by the CLI."""
    root = tmp_path_factory.mktemp("logits")
    copy = root / "smollm2-q8.apr"
    run("convert", smollm2_gguf, copy, "--dtype", "q8_0")
    dirs = {}
    for name, model in (("gguf", smollm2_gguf), ("q8", copy)):
        out = root / f"{name}-trace"
        run(
            "trace", model, "--save-tensor", "lm_head,logits_all", "--save-tensor-dir", out,
            "--prompt", PROMPT,
        )  # fmt: skip
        dirs[name] = out
    ids = json.loads((dirs["gguf"] / "tokens.json").read_text())["token_ids"]
    return smollm2_gguf, copy, dirs["gguf"], dirs["q8"], ids


def oracle(a: np.ndarray, b: np.ndarray, ids: list[int]) -> dict[str, np.ndarray]:
    """The metrics from torch, position by position, written independently of engine.logits."""
    ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    la, lb = torch.log_softmax(ta, dim=-1), torch.log_softmax(tb, dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q)
    kl_ab = torch.nn.functional.kl_div(lb, la, reduction="none", log_target=True).sum(-1)
    kl_ba = torch.nn.functional.kl_div(la, lb, reduction="none", log_target=True).sum(-1)
    seq = a.shape[0]
    out = {
        "kl_ab": kl_ab.numpy(),
        "kl_ba": kl_ba.numpy(),
        "top1_a": np.array([int(np.argmax(row)) for row in a]),
        "top1_b": np.array([int(np.argmax(row)) for row in b]),
        "max_abs_logprob_diff": (la - lb).abs().max(-1).values.numpy(),
    }
    for k in (5, 10):
        overlap = []
        for i in range(seq):
            # stable descending order: ties keep the lower id first
            top_a = set(np.argsort(-a[i], kind="stable")[:k].tolist())
            top_b = set(np.argsort(-b[i], kind="stable")[:k].tolist())
            overlap.append(len(top_a & top_b))
        out[f"topk_overlap_{k}"] = np.array(overlap)
    out["top_a"] = np.array([np.argsort(-row, kind="stable")[:5] for row in a])
    out["top_b"] = np.array([np.argsort(-row, kind="stable")[:5] for row in b])
    out["rank_b_of_top1_a"] = np.array(
        [int((b[i] > b[i, out["top1_a"][i]]).sum()) for i in range(seq)]
    )
    out["rank_a_of_top1_b"] = np.array(
        [int((a[i] > a[i, out["top1_b"][i]]).sum()) for i in range(seq)]
    )
    out["logprob_next_a"] = np.array([float(la[i, ids[i + 1]]) for i in range(seq - 1)])
    out["logprob_next_b"] = np.array([float(lb[i, ids[i + 1]]) for i in range(seq - 1)])
    return out


def check_against_oracle(report: dict, expected: dict[str, np.ndarray]) -> None:
    for key in ("kl_ab", "kl_ba", "max_abs_logprob_diff"):
        np.testing.assert_allclose(report[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=key)
    for key in ("logprob_next_a", "logprob_next_b"):
        assert report[key][-1] is None  # no token follows the last position
        np.testing.assert_allclose(report[key][:-1], expected[key], rtol=1e-12, err_msg=key)
    for key in ("top1_a", "top1_b", "topk_overlap_5", "topk_overlap_10"):
        assert report[key] == expected[key].tolist(), key
    for key in ("rank_b_of_top1_a", "rank_a_of_top1_b", "top_a", "top_b"):
        assert report[key] == expected[key].tolist(), key
    agree = expected["top1_a"] == expected["top1_b"]
    assert report["top1_agreement"] == pytest.approx(agree.mean())
    assert report["disagreeing_positions"] == np.flatnonzero(~agree).tolist()
    assert report["mean_kl"] == pytest.approx(expected["kl_ab"].mean(), rel=1e-9)
    assert report["max_kl"] == pytest.approx(expected["kl_ab"].max(), rel=1e-9)
    assert report["max_kl_position"] == int(np.argmax(expected["kl_ab"]))
    assert report["mean_topk_overlap_5"] == pytest.approx(expected["topk_overlap_5"].mean())


@pytest.mark.slow
def test_metrics_of_smollm2_against_its_q8_copy_match_torch(traces):
    _, _, gguf_dir, q8_dir, ids = traces
    seq = len(ids)
    a, b = read_table(gguf_dir / "logits_all.bin", seq), read_table(q8_dir / "logits_all.bin", seq)
    assert a.shape == (seq, 49152) and not np.array_equal(a, b)  # a real, small difference
    expected = oracle(a, b, ids)
    # one block, blocks of 3 (a ragged tail), one position at a time: the same numbers
    for block in (None, 3, 1):
        check_against_oracle(logit_report(a, b, ids, block=block), expected)
    # the q8 copy of a Q4_1 model is close but not identical: the metrics must see that
    assert 0 < expected["kl_ab"].max() < 0.1


@pytest.mark.slow
def test_logits_all_rows_are_the_per_position_logits(traces, smollm2_hf_model):
    """Every row of logits_all is HF's logits at that position; the last row is lm_head."""
    _, _, gguf_dir, _, ids = traces
    seq = len(ids)
    ours = read_table(gguf_dir / "logits_all.bin", seq)
    with torch.no_grad():
        hf = smollm2_hf_model(torch.tensor([ids])).logits[0].numpy()  # [seq, vocab]
    np.testing.assert_allclose(ours, hf, rtol=0, atol=2e-3)
    assert [int(np.argmax(r)) for r in ours] == [int(np.argmax(r)) for r in hf]
    last = read_table(gguf_dir / "lm_head.bin", 1)[0]
    # the same 576-term dot products, summed by a matrix-matrix instead of a matrix-vector
    # kernel: float32 rounding of another summation order (|logit| < 30, so 2e-6 relative)
    np.testing.assert_allclose(ours[-1], last, rtol=0, atol=6e-5)
    assert int(np.argmax(ours[-1])) == int(np.argmax(last))


@pytest.mark.slow
def test_apr_files_are_byte_identical_with_and_without_logits_all(traces, tmp_path):
    """Asking for logits_all adds one file and changes no byte of apr's files; `all` is apr's
    23 stages and never writes it."""
    gguf, _, gguf_dir, _, _ = traces
    plain = tmp_path / "plain"
    run("trace", gguf, "--save-tensor", "all", "--save-tensor-dir", plain, "--prompt", PROMPT)
    assert not (plain / "logits_all.bin").exists()
    assert (plain / "lm_head.bin").read_bytes() == (gguf_dir / "lm_head.bin").read_bytes()


@pytest.mark.slow
def test_bisect_json_and_text_carry_the_logits_block(traces):
    gguf, copy, gguf_dir, q8_dir, ids = traces
    seq = len(ids)
    expected = oracle(
        read_table(gguf_dir / "logits_all.bin", seq),
        read_table(q8_dir / "logits_all.bin", seq),
        ids,
    )
    # two models: the metrics come from each side's final norm times its head
    models = json.loads(run("bisect", gguf, copy, "--prompt", PROMPT, "--json").stdout)
    # a model against a [seq, vocab] trace directory of the other
    against_dir = json.loads(run("bisect", gguf, q8_dir, "--prompt", PROMPT, "--json").stdout)
    for document in (models, against_dir):
        logits = document["logits"]
        assert logits["positions"] == seq and logits["vocab"] == 49152
        np.testing.assert_allclose(logits["kl_ab"], expected["kl_ab"], rtol=2e-3, atol=1e-7)
        assert logits["top1_a"] == expected["top1_a"].tolist()
        assert logits["top1_b"] == expected["top1_b"].tolist()
        assert logits["topk_overlap_5"] == expected["topk_overlap_5"].tolist()
        assert logits["top1_agreement"] == pytest.approx(
            (expected["top1_a"] == expected["top1_b"]).mean()
        )
    text = run("bisect", gguf, copy, "--prompt", PROMPT).stdout
    assert f"Logits, every position ({seq} positions, vocabulary 49152)" in text
    mean = expected["kl_ab"].mean()
    assert f"KL(A‖B) mean {mean:.3g}" in text


@pytest.mark.slow
def test_runtime_lm_head_of_every_position_is_used(traces, tmp_path):
    """A directory whose lm_head.bin holds [seq, vocab] (a runtime that keeps every position)
    gets the logits metrics too; apr's last-token lm_head.bin alone does not."""
    gguf, _, _, q8_dir, ids = traces
    seq = len(ids)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (runtime / "tokens.json").write_text((q8_dir / "tokens.json").read_text())
    body = (q8_dir / "logits_all.bin").read_bytes()
    (runtime / "lm_head.bin").write_bytes(body)  # same header (whole-model), seq × vocab values
    document = json.loads(run("bisect", gguf, runtime, "--prompt", PROMPT, "--json").stdout)
    assert document["logits"]["positions"] == seq
    last_only = tmp_path / "last-only"
    last_only.mkdir()
    (last_only / "tokens.json").write_text((q8_dir / "tokens.json").read_text())
    (last_only / "lm_head.bin").write_bytes((q8_dir / "lm_head.bin").read_bytes())
    document = json.loads(run("bisect", gguf, last_only, "--prompt", PROMPT, "--json").stdout)
    assert document["logits"] is None


# ------------------------------------------------------------------------- small, exact cases


def test_topk_ties_go_to_the_lower_ids_like_a_stable_sort():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(50, 40)).astype(np.float32)  # many ties
    x[::3] = rng.permutation(40)[None, :].astype(np.float32)  # and rows without any
    ks = (1, 5, 10, 39, 40, 41)
    together = topk_masks(x, ks)  # one partition for every k
    for k in ks:
        mask = topk_mask(x, k)
        assert np.array_equal(mask, together[k])
        for row, chosen in zip(x, mask, strict=True):
            expected = np.zeros(40, dtype=bool)
            expected[np.argsort(-row, kind="stable")[:k]] = True
            assert np.array_equal(chosen, expected)


def test_large_logits_do_not_overflow_and_identical_rows_have_zero_kl():
    a = np.array([[1000.0, 999.0, -1000.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    metrics = block_metrics(a, a.copy(), None)
    assert np.all(metrics["kl_ab"] == 0.0) and np.all(metrics["max_abs_logprob_diff"] == 0.0)
    b = a + np.float32(5.0)  # a constant shift is the same distribution
    metrics = block_metrics(a, b, None)
    np.testing.assert_allclose(metrics["kl_ab"], 0.0, atol=1e-12)
    # row 0: p = softmax(1000, 999, -1000) against softmax(999, 1000, -1000)
    swapped = a.copy()
    swapped[0, :2] = swapped[0, 1::-1]
    metrics = block_metrics(a, swapped, None)
    p = np.array([1.0, np.exp(-1.0)]) / (1.0 + np.exp(-1.0))
    expected = p[0] * np.log(p[0] / p[1]) + p[1] * np.log(p[1] / p[0])
    assert metrics["kl_ab"][0] == pytest.approx(expected, rel=1e-12)
    assert metrics["top1_a"][0] == 0 and metrics["top1_b"][0] == 1
    assert metrics["rank_b_of_top1_a"][0] == 1


def test_nan_rows_give_null_metrics_not_errors():
    a = np.array([[1.0, 2.0, 3.0], [1.0, np.nan, 0.0]], dtype=np.float32)
    report = logit_report(a, a.copy(), [0, 2])
    assert report["kl_ab"][1] is None and report["kl_ab"][0] == 0.0
    assert report["nonfinite_positions"] == [1]
    log_p_token_2 = 3.0 - np.log(np.exp([1.0, 2.0, 3.0]).sum())
    assert report["logprob_next_a"] == [pytest.approx(log_p_token_2, rel=1e-12), None]
    text = "\n".join(format_logit_report(report))
    assert "NaN/Inf logits at 1 position(s)" in text


def test_shape_mismatch_is_a_one_line_error():
    from engine.errors import DiffError

    with pytest.raises(DiffError, match=r"logits tables differ in shape: \[2, 3\] vs \[2, 4\]"):
        logit_report(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))


def test_text_block_names_the_disagreeing_positions_worst_first():
    a = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 5.0], [9.0, 0.0, 0.0]], dtype=np.float32)
    b = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 5.0], [0.0, 9.0, 0.0]], dtype=np.float32)
    report = logit_report(a, b, [0, 1, 2])
    names = {0: "x", 1: "y", 2: "z"}
    lines = format_logit_report(report, names.get)
    assert report["disagreeing_positions"] == [0, 2]
    assert (
        lines[-1]
        == "  2 position(s) predict another token: 2 (A 0 'x' / B 1 'y'), 0 (A 0 'x' / B 1 'y')"
    )
    assert "  top-1 agreement 1/3 (33.3%); top-5 overlap mean 3.00/5, top-10 3.00/10" in lines
    assert max(len(line) for line in lines[:-1]) < 80  # the positions' list aside


def test_logits_all_capture_streams_position_blocks_equal_to_hf(monkeypatch):
    """The lazy logits_all capture: blocks of 3 positions tile the [seq, vocab] payload in
    order, and every row is HF's logits at that position."""
    import engine.logits as logits_module
    from engine.forward import trace
    from engine.stages import WHOLE_MODEL_LAYER
    from tests.forward.hf_oracle import build_hf_model, engine_model

    hf_model = build_hf_model("qwen2", seed=4, tied=False)
    ids = [5, 17, 99, 3, 42, 7, 127, 64]
    vocab = hf_model.config.vocab_size
    monkeypatch.setattr(logits_module, "LOGIT_BLOCK_BYTES", 8 * vocab * 3)
    (capture,) = list(trace(engine_model(hf_model), ids, stages=["logits_all"]))
    assert capture.layer == WHOLE_MODEL_LAYER and capture.shape == (len(ids), vocab)
    offsets, rows = [], []
    for offset, block in capture.array.blocks():
        offsets.append(offset)
        rows.append(block)
    assert offsets == [0, 3 * vocab, 6 * vocab] and [len(r) for r in rows] == [3, 3, 2]
    table = np.concatenate(rows)
    assert np.array_equal(table, np.asarray(capture.array))
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(table, expected, rtol=1e-4, atol=1e-5)


def test_lm_head_stage_keeps_every_position_logits_for_the_metrics(tmp_path):
    """After a pass over a real GGUF file with keep_logits (a comparison's), ModelLogits takes
    the table the lm_head stage computed from the head rows it decoded (no second decode),
    equal to a fresh computation; a plain trace keeps nothing."""
    import engine.logits as logits_module
    from engine.formats import gguf, open_model
    from engine.forward import trace
    from engine.stages import WHOLE_MODEL_LAYER
    from tests.forward.hf_oracle import build_hf_model, engine_model

    hf_model = build_hf_model("llama", seed=9, tied=True)
    path = gguf.write(engine_model(hf_model), tmp_path / "m.gguf", dtype="f32")
    ids = [3, 9, 27, 81, 11]
    with open_model(path) as model:
        logits_module._KEPT.clear()
        plain = {(c.layer, c.stage): c.array for c in trace(model, ids)}
        assert len(logits_module._KEPT) == 0  # a plain trace computes no table
        captures = {(c.layer, c.stage): c.array for c in trace(model, ids, keep_logits=True)}
        assert np.array_equal(
            plain[(WHOLE_MODEL_LAYER, "lm_head")], captures[(WHOLE_MODEL_LAYER, "lm_head")]
        )
        final_norm = captures[(WHOLE_MODEL_LAYER, "final_norm")]
        kept = logits_module.ModelLogits(model, final_norm)
        assert kept._table is not None  # reused, nothing decoded
        # another prompt's final norm never takes the kept table
        assert logits_module.ModelLogits(model, final_norm * 2)._table is None
        logits_module._KEPT.clear()
        fresh = logits_module.ModelLogits(model, final_norm)
        assert fresh._table is None
        np.testing.assert_allclose(kept.rows(0, 5), fresh.rows(0, 5), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            kept.rows(4, 5)[0], captures[(WHOLE_MODEL_LAYER, "lm_head")], rtol=1e-5, atol=1e-5
        )
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(kept.rows(0, 5), expected, rtol=1e-4, atol=1e-5)
