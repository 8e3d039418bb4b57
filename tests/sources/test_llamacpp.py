"""The llama.cpp trace source against llama.cpp itself and against our own forward pass.

Oracles: an independent eval-callback dump of every graph node (tests/support/llamacpp_direct.py,
which copies with ggml_backend_tensor_get, not by strides), with the stage mapping re-derived
here from llamacpp-notes.md's table; `llama_get_logits`; and engine.forward.trace on the same
GGUF, compared on the causal part with numpy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from engine.errors import AprTuiError
from engine.formats import gguf as gguf_format
from engine.formats.gguf import open_gguf
from engine.forward import trace
from engine.sources import DirectorySource
from engine.stages import STAGE_BY_NAME, STAGES, WHOLE_MODEL_LAYER
from engine.synth import synthesize
from engine.trace_directory import read_tokens_json, read_trace_dir
from tests.support.llamacpp_direct import dump_all_nodes

pytestmark = pytest.mark.usefixtures("llama_cpp_installed")

TOKENS = [1, 504, 3458, 5145, 28, 8, 1090, 314, 2114, 30]
"""Ten SmolLM2 token ids (BOS, then an English sentence's tokens)."""

THREADS = 2


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def _causal(stage_name: str, values: np.ndarray, seq: int) -> np.ndarray:
    """Only what both paths define: causal score entries, the last position's logits."""
    if stage_name in ("attn_scores", "attn_softmax"):
        return values[:, np.tril(np.ones((seq, seq), dtype=bool))]
    if stage_name == "lm_head" and values.ndim == 2:
        return values[-1]
    return values


@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf):
    from engine.sources.llamacpp import LlamaCppSource

    source = LlamaCppSource(smollm2_gguf, TOKENS, n_threads=THREADS)
    yield source
    source.close()


@pytest.fixture(scope="module")
def smollm2_captures(smollm2_source):
    return [(c.layer, c.stage, c.array) for c in smollm2_source.captures()]


def _unpermute(values: np.ndarray, heads: int) -> np.ndarray:
    """[seq, heads*hd] from adjacent-pair column order to rotate-half order (written here,
    independently of engine.formats.gguf.unpermute_rows)."""
    seq, width = values.shape
    hd = width // heads
    return values.reshape(seq, heads, hd // 2, 2).transpose(0, 1, 3, 2).reshape(seq, width)


def _expected_from_direct(nodes, seq: int, num_layers: int) -> dict[tuple[int, str], np.ndarray]:
    """Our stages derived from a raw all-node dump, following the documented name table."""
    first: dict[tuple[str, str], object] = {}
    attn_out: dict[int, object] = {}
    for node in nodes:
        first.setdefault((node.name, node.op), node)
        if node.op == "MUL_MAT" and node.src1 and node.src1.startswith("kqv_out-"):
            attn_out[int(node.src1.split("-")[1])] = node

    def rows(name: str, op: str) -> np.ndarray:
        node = first[(name, op)]
        return node.values.reshape(seq, -1)

    out = {(0, "embedding"): rows("embd", "GET_ROWS")}
    for n in range(num_layers):
        q_heads = first[(f"Qcur-{n}", "ROPE")].ne[1]
        kv_heads = first[(f"Kcur-{n}", "ROPE")].ne[1]
        out[(n, "attn_norm")] = rows(f"attn_norm-{n}", "MUL")
        out[(n, "qkv_matmul")] = np.concatenate(
            [
                _unpermute(rows(f"Qcur-{n}", "MUL_MAT"), q_heads),
                _unpermute(rows(f"Kcur-{n}", "MUL_MAT"), kv_heads),
                rows(f"Vcur-{n}", "MUL_MAT"),
            ],
            axis=1,
        )
        out[(n, "q_post_rope")] = _unpermute(rows(f"Qcur-{n}", "ROPE"), q_heads)
        out[(n, "k_post_rope")] = _unpermute(rows(f"Kcur-{n}", "ROPE"), kv_heads)
        softmax = first[(f"kq_soft_max-{n}", "SOFT_MAX")]
        scale = np.array([softmax.op_params[0]], dtype=np.int32).view(np.float32)[0]
        cells = softmax.ne[0]
        kq = first[(f"kq-{n}", "MUL_MAT")].values.reshape(q_heads, seq, cells)
        out[(n, "attn_scores")] = kq[:, :, :seq] * scale
        out[(n, "attn_softmax")] = softmax.values.reshape(q_heads, seq, cells)[:, :, :seq]
        out[(n, "attention")] = rows(f"kqv_out-{n}", "CONT")
        out[(n, "attn_out")] = attn_out[n].values.reshape(seq, -1)
        out[(n, "post_attn_residual")] = rows(f"ffn_inp-{n}", "ADD")
        out[(n, "ffn_norm")] = rows(f"ffn_norm-{n}", "MUL")
        out[(n, "ffn_gate")] = rows(f"ffn_gate-{n}", "MUL_MAT")
        out[(n, "ffn_up")] = rows(f"ffn_up-{n}", "MUL_MAT")
        out[(n, "ffn_swigl")] = rows(f"ffn_swiglu-{n}", "GLU")
        out[(n, "ffn_out")] = rows(f"ffn_out-{n}", "MUL_MAT")
        out[(n, "post_ffn_residual")] = rows(f"l_out-{n}", "ADD")
    out[(WHOLE_MODEL_LAYER, "final_norm")] = rows("result_norm", "MUL")
    out[(WHOLE_MODEL_LAYER, "lm_head")] = rows("result_output", "MUL_MAT")
    return out


@pytest.mark.slow
def test_smollm2_same_tensors_as_a_direct_eval_callback_dump(
    smollm2_gguf, smollm2_source, smollm2_captures
):
    nodes = dump_all_nodes(smollm2_gguf, TOKENS, n_threads=THREADS)
    expected = _expected_from_direct(nodes, len(TOKENS), smollm2_source.num_layers)
    got = {(layer, stage): values for layer, stage, values in smollm2_captures}
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert got[key].shape == values.shape, key
        np.testing.assert_array_equal(got[key], values, err_msg=str(key))
    logits = nodes[-1].values.reshape(len(TOKENS), -1)  # llama_get_logits, [seq, vocab]
    np.testing.assert_array_equal(got[(WHOLE_MODEL_LAYER, "lm_head")], logits)


@pytest.mark.slow
def test_smollm2_stages_line_up_with_our_forward_pass(
    smollm2_gguf, smollm2_source, smollm2_captures
):
    seq = len(TOKENS)
    with open_gguf(smollm2_gguf) as model:
        ours = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, TOKENS)}
    worst: dict[str, float] = {}
    for layer, stage_name, values in smollm2_captures:
        mine = ours[(layer, stage_name)]
        theirs = _causal(stage_name, values, seq)
        assert theirs.shape == _causal(stage_name, mine, seq).shape, (layer, stage_name)
        cosine = _cosine(theirs, _causal(stage_name, mine, seq))
        worst[stage_name] = min(worst.get(stage_name, 1.0), cosine)
    assert min(worst.values()) >= 0.995, worst
    # Every stage is mapped or listed as not produced, with a reason.
    produced = set(smollm2_source.stages)
    assert produced == set(worst)
    assert produced.isdisjoint(smollm2_source.not_produced)
    assert produced | set(smollm2_source.not_produced) == {s.name for s in STAGES}
    assert "fuses the SiLU" in smollm2_source.not_produced["ffn_silu"]
    assert smollm2_source.not_produced["qkv_bias"]
    # Our forward pass produces everything else llama.cpp does not.
    assert {s for _, s in ours} - produced == {"ffn_silu"}


@pytest.mark.slow
def test_captures_come_in_computation_order_with_our_layouts(smollm2_source, smollm2_captures):
    keys = [(layer, STAGE_BY_NAME[stage].index) for layer, stage, _ in smollm2_captures]
    assert keys == sorted(keys)
    assert smollm2_captures[0][:2] == (0, "embedding")
    assert [c[:2] for c in smollm2_captures[-2:]] == [
        (WHOLE_MODEL_LAYER, "final_norm"),
        (WHOLE_MODEL_LAYER, "lm_head"),
    ]
    shapes = {stage: values.shape for layer, stage, values in smollm2_captures if layer != 0}
    seq = len(TOKENS)
    assert shapes["attn_scores"] == (9, seq, seq)  # SmolLM2: 9 query heads
    assert shapes["qkv_matmul"] == (seq, 576 + 2 * 192)
    assert shapes["lm_head"] == (seq, 49152)
    for _, _, values in smollm2_captures:
        assert values.dtype == np.float32 and values.flags.c_contiguous


@pytest.mark.slow
def test_tensor_on_demand_and_a_subset_of_layers(smollm2_gguf, smollm2_captures):
    from engine.sources.llamacpp import LlamaCppSource

    got = {(layer, stage): values for layer, stage, values in smollm2_captures}
    with LlamaCppSource(smollm2_gguf, TOKENS, n_threads=THREADS) as fresh:
        np.testing.assert_array_equal(fresh.tensor(7, "attn_out"), got[(7, "attn_out")])
        np.testing.assert_array_equal(
            fresh.tensor(WHOLE_MODEL_LAYER, "lm_head"), got[(WHOLE_MODEL_LAYER, "lm_head")]
        )
        assert fresh.tensor(3, "ffn_silu") is None
        assert fresh.tensor(99, "attn_norm") is None
        part = [(c.layer, c.stage) for c in fresh.captures(layers=range(2, 4), whole_model=False)]
        assert {layer for layer, _ in part} == {2, 3}
        assert len(part) == 2 * len([s for s in fresh.stages if STAGE_BY_NAME[s].per_layer]) - 2


@pytest.mark.slow
def test_leaving_early_and_cancelling_stop_the_decode(smollm2_gguf):
    from engine.sources.llamacpp import LlamaCppSource

    with LlamaCppSource(smollm2_gguf, TOKENS, n_threads=THREADS) as source:
        for capture in source.captures():
            if capture.layer == 1:
                break
        cancel = threading.Event()
        seen = []
        for capture in source.captures(cancel=cancel):
            seen.append(capture.layer)
            if capture.layer == 2:
                cancel.set()
        assert max(seen) == 2
        # The context lock was released: a later run completes.
        assert source.tensor(0, "embedding").shape == (len(TOKENS), 576)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_seeded_f32_models_match_our_forward_pass(tmp_path, arch):
    """With f32 weights and an f32 KV cache llama.cpp does our arithmetic: every stage agrees
    closely, including Qwen2's QKV bias and its unnamed output projection."""
    from engine.sources.llamacpp import LlamaCppSource

    model = synthesize(arch, seed=4, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    path = gguf_format.write(model, tmp_path / f"{arch}.gguf", "f32")
    tokens = [3, 17, 42, 5, 9, 11, 23]
    seq = len(tokens)
    with open_gguf(path) as reopened:
        ours = {(c.layer, c.stage): np.asarray(c.array) for c in trace(reopened, tokens)}
    with LlamaCppSource(path, tokens, type_k="f32", type_v="f32", n_threads=THREADS) as source:
        got = {(c.layer, c.stage): c.array for c in source.captures()}
        assert ("qkv_bias" in source.stages) == (arch == "qwen2")
    assert set(ours) - set(got) == {(n, "ffn_silu") for n in range(2)}
    for key, values in got.items():
        mine = _causal(key[1], ours[key], seq)
        theirs = _causal(key[1], values, seq)
        np.testing.assert_allclose(theirs, mine, rtol=2e-3, atol=2e-4, err_msg=str(key))


@pytest.mark.slow
def test_flash_attention_drops_the_score_stages_and_says_so(smollm2_gguf):
    from engine.sources.llamacpp import LlamaCppSource

    with LlamaCppSource(smollm2_gguf, TOKENS[:4], flash_attn=True, n_threads=THREADS) as source:
        assert "attn_scores" not in source.stages and "attn_softmax" not in source.stages
        assert "flash attention" in source.not_produced["attn_scores"]
        stages = {c.stage for c in source.captures(layers=range(0, 1), whole_model=False)}
        assert "attention" in stages and "attn_scores" not in stages
        assert source.record()["settings"]["flash_attn"] is True


def test_bad_settings_and_missing_files_are_one_line_errors(tmp_path):
    from engine.sources.llamacpp import LlamaCppSource

    with pytest.raises(AprTuiError, match="type_k 'q3'"):
        LlamaCppSource(tmp_path / "x.gguf", [1], type_k="q3")
    with pytest.raises(AprTuiError, match="not a GGUF file"):
        LlamaCppSource(tmp_path / "missing.gguf", [1])


def test_missing_package_names_what_to_install(tmp_path):
    """Without llama_cpp importable, opening the source says which package to install."""
    model = synthesize("llama", seed=1, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    path = gguf_format.write(model, tmp_path / "m.gguf", "f32")
    code = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "from engine.sources.llamacpp import LlamaCppSource\n"
        "from engine.errors import MissingPackageError\n"
        "try:\n"
        f"    LlamaCppSource({str(path)!r}, [1, 2])\n"
        "except MissingPackageError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "pip install llama-cpp-python" in result.stdout


@pytest.mark.slow
def test_dump_writes_a_trace_directory_bisect_reads(
    smollm2_gguf, smollm2_captures, tmp_path, apr_tui
):
    from engine.sources.llamacpp import dump_llamacpp_trace

    out = tmp_path / "llamacpp-trace"
    dump_llamacpp_trace(smollm2_gguf, TOKENS, out, prompt="x", n_threads=THREADS)
    directory = DirectorySource(out)
    assert directory.token_ids == TOKENS
    assert read_tokens_json(out / "tokens.json").model == str(smollm2_gguf)
    for layer, stage_name, values in smollm2_captures:
        np.testing.assert_array_equal(
            directory.tensor(layer, stage_name).reshape(values.shape), values
        )
    assert len(read_trace_dir(out).entries) == len(smollm2_captures)
    record = json.loads((out / "source.json").read_text())
    assert record["engine"] == "llama.cpp"
    assert record["settings"]["n_threads"] == THREADS
    assert record["settings"]["type_k"] == "f16" and record["settings"]["flash_attn"] is False
    assert "ffn_silu" in record["not_produced"]
    # A second dump into the same directory is refused, and the first is left as it was.
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(AprTuiError, match="not overwriting"):
        dump_llamacpp_trace(smollm2_gguf, TOKENS, out)
    assert sorted(p.name for p in out.rglob("*")) == before
    # The real command reads it as the reference side.
    result = subprocess.run(
        [*apr_tui, "bisect", str(smollm2_gguf), str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["b"]["kind"] == "trace-dir" and report["token_ids"] == TOKENS
    compared = {(c["layer"], c["stage"]): c["cosine"] for c in report["cells"] if c["diff"]}
    assert compared[(0, "attn_norm")] > 0.99  # a correct runtime: the first stages agree


@pytest.mark.slow
def test_a_planted_scale_bug_shows_where_it_was_planted(smollm2_gguf, smollm2_captures, tmp_path):
    """llama.cpp runs the copy with 1% of layer 3's ffn_down block scales × 1.5: everything
    before that matmul is bit-identical, its output is not."""
    from engine.sources.llamacpp import LlamaCppSource
    from tests.support.gguf_edit import scale_block_scales

    planted = scale_block_scales(
        smollm2_gguf, tmp_path / "bug.gguf", "blk.3.ffn_down.weight", fraction=0.01, factor=1.5
    )
    clean = {(layer, stage): values for layer, stage, values in smollm2_captures}
    with LlamaCppSource(planted.path, TOKENS, n_threads=THREADS) as source:
        bugged = {(c.layer, c.stage): c.array for c in source.captures(layers=range(3, 4))}
    np.testing.assert_array_equal(bugged[(3, "ffn_swigl")], clean[(3, "ffn_swigl")])
    assert not np.array_equal(bugged[(3, "ffn_out")], clean[(3, "ffn_out")])
    assert _cosine(bugged[(3, "ffn_out")], clean[(3, "ffn_out")]) > 0.9


@pytest.mark.slow
def test_drill_down_while_a_capture_run_is_paused(smollm2_gguf, smollm2_captures):
    """The explorer asks for a tensor while the grid's capture iteration is suspended."""
    from engine.sources.llamacpp import LlamaCppSource

    clean = {(layer, stage): values for layer, stage, values in smollm2_captures}
    with LlamaCppSource(smollm2_gguf, TOKENS, n_threads=THREADS) as source:
        running = source.captures()
        first = next(running)
        assert (first.layer, first.stage) == (0, "embedding")
        result: list[np.ndarray] = []
        worker = threading.Thread(
            target=lambda: result.append(source.tensor(20, "ffn_up")), daemon=True
        )
        worker.start()
        worker.join(timeout=300)
        assert not worker.is_alive(), "tensor() waited for the paused capture run"
        np.testing.assert_array_equal(result[0], clean[(20, "ffn_up")])
        rest = list(running)
        assert (rest[-1].layer, rest[-1].stage) == (WHOLE_MODEL_LAYER, "lm_head")


def test_adopt_tokens_reruns_on_the_new_ids(tmp_path):
    from engine.sources.llamacpp import LlamaCppSource

    model = synthesize("qwen2", seed=8, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    path = gguf_format.write(model, tmp_path / "q.gguf", "f32")
    with LlamaCppSource(path, [5, 6, 7], n_threads=THREADS) as source:
        before = source.tensor(0, "attn_out")
        source.adopt_tokens([5, 6, 7, 8, 9])
        after = source.tensor(0, "attn_out")
        with pytest.raises(AprTuiError):
            source.adopt_tokens([10**7])
    with LlamaCppSource(path, [5, 6, 7, 8, 9], n_threads=THREADS) as fresh:
        np.testing.assert_array_equal(after, fresh.tensor(0, "attn_out"))
    assert before.shape == (3, 64) and after.shape == (5, 64)
