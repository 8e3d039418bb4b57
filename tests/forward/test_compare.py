"""Trace sources, pairing, token agreement and the two first-divergence verdicts."""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest

from engine.aprt import write_stage
from engine.compare import (
    Cell,
    compare,
    cosine_diverged,
    first_divergence,
    first_std_divergence,
    std_diverged,
    std_ratio,
)
from engine.errors import TokenizerError, TokenMismatchError
from engine.forward import trace
from engine.model import DictWeightStore
from engine.sources import DirectorySource, ModelSource, open_pair, open_source
from engine.stages import WHOLE_MODEL_LAYER
from engine.stats import DiffStats, TensorStats
from engine.trace_directory import write_tokens_json
from tests.forward.agreement import cosine
from tests.forward.hf_oracle import build_hf_model, engine_model

TOKENS = [7, 3, 90, 11, 64, 2]


@pytest.fixture(scope="module")
def hf_llama():
    return build_hf_model("llama", seed=21, tied=True)


def _model(hf_model, **weight_changes):
    """The HF model as an engine Model, with some weights replaced (planted defects)."""
    model = engine_model(hf_model)
    arrays = dict(model.weights.arrays)
    for name, change in weight_changes.items():
        arrays[name.replace("__", ".")] = change(arrays[name.replace("__", ".")])
    return dataclasses.replace(model, weights=DictWeightStore(arrays))


def _source(hf_model, tokens=TOKENS, explicit=True, **weight_changes) -> ModelSource:
    return ModelSource(_model(hf_model, **weight_changes), tokens, tokens_explicit=explicit)


def _write_trace_dir(model, directory, tokens=TOKENS, *, stages=None, with_tokens=True):
    """A trace directory as `apr-tui trace` lays it out, written with the APRT writer."""
    for capture in trace(model, tokens, stages=stages):
        write_stage(directory, capture.stage, capture.layer, capture.array)
    if with_tokens:
        write_tokens_json(directory, tokens, None, None)
    return directory


UP18 = {"model__layers__1__mlp__up_proj__weight": lambda w: w * 18}


def test_identical_models_agree_everywhere(hf_llama):
    cells = list(compare(_source(hf_llama), _source(hf_llama)))
    assert len(cells) == 1 + 3 * 16 + 2
    keys = [(c.layer, c.stage) for c in cells]
    assert keys[0] == (0, "embedding")
    assert keys[-2:] == [(WHOLE_MODEL_LAYER, "final_norm"), (WHOLE_MODEL_LAYER, "lm_head")]
    assert all(c.diff is not None and c.diff.max_abs_diff == 0.0 for c in cells)
    assert first_divergence(cells) is None
    assert first_std_divergence(cells) is None


def test_two_models_run_ahead_of_the_cells_by_a_bounded_number_of_captures(hf_llama, monkeypatch):
    """The passes run in threads (engine.pipeline) but neither gets further ahead of the cells
    yielded than its queue, the pairs in flight and the one it is handing over: memory stays
    bounded however long the other side or the statistics take."""
    import engine.plan
    from engine.pipeline import IN_FLIGHT
    from engine.plan import WINDOW

    monkeypatch.setattr(engine.plan, "PIPELINE_MIN_FLOPS", 0)  # side by side at any length
    events: list[str] = []
    lead_bound = IN_FLIGHT + WINDOW + 2

    class Logged(ModelSource):
        def __init__(self, name, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.name = name

        def captures(self, *args, **kwargs):
            for capture in super().captures(*args, **kwargs):
                events.append(self.name)
                yield capture

    a = Logged("A", _model(hf_llama), TOKENS, tokens_explicit=True)
    b = Logged("B", _model(hf_llama), TOKENS, tokens_explicit=True)
    leads = []
    for _ in compare(a, b):
        events.append("cell")
        cells = events.count("cell")
        leads.append(max(events.count("A"), events.count("B")) - cells)
    assert events.count("A") == events.count("B") == events.count("cell")
    assert max(leads) <= lead_bound
    assert max(leads) >= 1  # they did run ahead: the pipeline is on


def test_cell_statistics_describe_each_side(hf_llama):
    a = _source(hf_llama)
    b = _source(hf_llama, **UP18)
    cells = {(c.layer, c.stage): c for c in compare(a, b)}
    cell = cells[(1, "ffn_out")]
    x, y = a.tensor(1, "ffn_out"), b.tensor(1, "ffn_out")
    assert cell.shape == (len(TOKENS), 64)
    assert cell.stats_a.count == cell.stats_b.count == x.size
    assert cell.stats_a.std == pytest.approx(np.std(x.astype(np.float64), ddof=1), rel=1e-9)
    assert cell.stats_b.std == pytest.approx(np.std(y.astype(np.float64), ddof=1), rel=1e-9)
    assert cell.diff.cosine_sim == pytest.approx(cosine(x, y), abs=1e-12)
    assert cell.diff.max_abs_diff == pytest.approx(float(np.abs(x - y).max()))


def test_a_scaled_weight_is_a_scale_divergence_first_and_a_cosine_one_later(hf_llama):
    """up_proj ×18 in layer 1: ffn_up, silu·up and down-proj keep their direction (cosine 1),
    only their scale; the residual add after the FFN is where the direction breaks."""
    cells = list(compare(_source(hf_llama), _source(hf_llama, **UP18)))
    first_std = first_std_divergence(cells)
    first_cos = first_divergence(cells)
    assert (first_std.layer, first_std.stage) == (1, "ffn_up")
    assert std_ratio(first_std) == pytest.approx(1 / 18, rel=1e-4)
    assert (first_cos.layer, first_cos.stage) == (1, "post_ffn_residual")
    by_key = {(c.layer, c.stage): c for c in cells}
    for stage_name in ("ffn_up", "ffn_swigl", "ffn_out"):
        assert by_key[(1, stage_name)].diff.cosine_sim > 0.999999
    assert by_key[(1, "ffn_gate")].diff.max_abs_diff == 0.0  # untouched before the defect


def test_model_against_its_defective_trace_directory(hf_llama, tmp_path):
    directory = _write_trace_dir(_model(hf_llama, **UP18), tmp_path / "bad-trace")
    b = DirectorySource(directory)
    cells = list(compare(_source(hf_llama), b))
    assert len(cells) == 1 + 3 * 16 + 2
    assert (first_std_divergence(cells).layer, first_std_divergence(cells).stage) == (1, "ffn_up")
    assert (first_divergence(cells).layer, first_divergence(cells).stage) == (
        1,
        "post_ffn_residual",
    )
    by_key = {(c.layer, c.stage): c for c in cells}
    assert by_key[(0, "attn_scores")].shape == (4, len(TOKENS), len(TOKENS))  # logical shapes
    np.testing.assert_array_equal(
        b.tensor(2, "attn_softmax"), _source(hf_llama, **UP18).tensor(2, "attn_softmax")
    )


def test_stages_missing_on_one_side_are_absent_not_zero(hf_llama, tmp_path):
    directory = _write_trace_dir(
        _model(hf_llama), tmp_path / "partial", stages=["attn_norm", "ffn_swigl", "lm_head"]
    )
    # A stage our dense model never produces, as a MoE trace would hold it.
    write_stage(directory, "moe_router", 0, np.array([0.7, 0.3], dtype=np.float32))
    cells = list(compare(_source(hf_llama), DirectorySource(directory)))
    by_key = {(c.layer, c.stage): c for c in cells}
    both = {key for key, c in by_key.items() if c.stats_a and c.stats_b}
    assert both == {
        (0, "attn_norm"),
        (0, "ffn_swigl"),
        (1, "attn_norm"),
        (1, "ffn_swigl"),
        (2, "attn_norm"),
        (2, "ffn_swigl"),
        (WHOLE_MODEL_LAYER, "lm_head"),
    }
    only_model = by_key[(1, "attn_scores")]
    assert only_model.stats_a is not None and only_model.stats_b is None and only_model.diff is None
    only_dir = by_key[(0, "moe_router")]
    assert only_dir.stats_a is None and only_dir.stats_b.count == 2
    keys = list(by_key)
    assert keys.index((0, "moe_router")) == keys.index((0, "post_ffn_residual")) + 1
    assert first_divergence(cells) is None  # absent is not divergent


def test_model_without_explicit_tokens_adopts_the_directory_tokens(hf_llama, tmp_path):
    other_tokens = [1, 2, 3, 4]
    directory = _write_trace_dir(_model(hf_llama), tmp_path / "t", tokens=other_tokens)
    a = _source(hf_llama, tokens=TOKENS, explicit=False)
    cells = list(compare(a, DirectorySource(directory)))
    assert a.token_ids == other_tokens
    assert first_divergence(cells) is None


def test_explicit_tokens_that_differ_from_tokens_json_are_a_mismatch(hf_llama, tmp_path):
    directory = _write_trace_dir(_model(hf_llama), tmp_path / "t", tokens=[1, 2, 3, 4])
    with pytest.raises(TokenMismatchError, match=r"token ids differ: .*\(6 tokens\).*\(4 tokens\)"):
        next(compare(_source(hf_llama), DirectorySource(directory)))


def test_directory_without_tokens_json_is_checked_by_sequence_length(hf_llama, tmp_path):
    """apr's directories carry no tokens.json: the embedding size gives its token count."""
    directory = _write_trace_dir(
        _model(hf_llama), tmp_path / "apr-trace", tokens=[1, 2, 3, 4, 5], with_tokens=False
    )
    with pytest.raises(TokenMismatchError) as info:
        next(compare(_source(hf_llama), DirectorySource(directory)))
    message = str(info.value)
    assert "layer-0/embedding.bin holds 320 values = 5 tokens × hidden 64" in message
    assert "(6 tokens)" in message and "\n" not in message
    cells = list(compare(_source(hf_llama, tokens=[9, 8, 7, 6, 5]), DirectorySource(directory)))
    assert len(cells) == 51  # same length: compared (values differ, tokens do)


def test_single_model_mode_has_only_side_a(hf_llama):
    cells = list(compare(_source(hf_llama), None))
    assert len(cells) == 51
    assert all(c.stats_a is not None and c.stats_b is None and c.diff is None for c in cells)
    assert first_divergence(cells) is None


def test_layer_range_limits_cells_and_whole_model_needs_the_last_layer(hf_llama):
    middle = list(compare(_source(hf_llama), _source(hf_llama), layers=(1, 2)))
    assert {c.layer for c in middle} == {1}
    to_end = list(compare(_source(hf_llama), _source(hf_llama), layers=range(2, 3)))
    assert {c.layer for c in to_end} == {2, WHOLE_MODEL_LAYER}


def test_model_against_a_layer_0_directory_runs_only_what_it_can_compare(hf_llama, tmp_path):
    """apr's default saves layer 0 only: the model side stops after layer 0."""
    model = _model(hf_llama)
    directory = tmp_path / "layer0"
    for capture in trace(model, TOKENS, layers=(0, 1), stages=["attn_norm", "ffn_out"]):
        write_stage(directory, capture.stage, capture.layer, capture.array)
    cells = list(compare(_source(hf_llama), DirectorySource(directory)))
    assert {c.layer for c in cells} == {0}
    assert len([c for c in cells if c.stats_b is not None]) == 2


def test_cancel_stops_the_comparison(hf_llama):
    cancel = threading.Event()
    seen = []
    for cell in compare(_source(hf_llama), _source(hf_llama), cancel=cancel):
        seen.append(cell.stage)
        if len(seen) == 3:
            cancel.set()
    assert seen == ["embedding", "attn_norm", "qkv_matmul"]


def test_model_source_tensor_recomputes_and_knows_what_it_lacks(hf_llama):
    cached = _source(hf_llama)
    all_captures = {(c.layer, c.stage): np.array(c.array) for c in cached.captures()}
    uncached = ModelSource(_model(hf_llama), TOKENS, cache_bytes=0)
    for key in [(2, "ffn_swigl"), (0, "embedding"), (WHOLE_MODEL_LAYER, "lm_head")]:
        np.testing.assert_array_equal(uncached.tensor(*key), all_captures[key])
        np.testing.assert_array_equal(cached.tensor(*key), all_captures[key])
    assert uncached.tensor(1, "qkv_bias") is None  # Llama has no QKV bias
    assert uncached.tensor(3, "attn_norm") is None  # 3 layers
    assert uncached.tensor(1, "embedding") is None
    assert uncached.tensor(1, "lm_head") is None


def test_model_source_cache_stays_within_its_budget(hf_llama):
    budget = 16 * 1024
    source = ModelSource(_model(hf_llama), TOKENS, cache_bytes=budget)
    for _ in source.captures():
        assert source._cache.nbytes <= budget
    assert source._cache.nbytes > 0


def _stats(std: float, zeros: int = 0, nans: int = 0) -> TensorStats:
    return TensorStats(10, nans, 0, zeros, -1.0, 1.0, 0.0, std, 1.0, 1.0)


def _diff(cosine_sim: float, max_abs: float = 0.5) -> DiffStats:
    return DiffStats(10, max_abs, 0, 0.1, cosine_sim, ())


@pytest.mark.parametrize(
    ("cell", "diverged"),
    [
        (Cell(0, "attn_norm", (10,), _stats(1), _stats(1), _diff(0.9990)), False),
        (Cell(0, "attn_norm", (10,), _stats(1), _stats(1), _diff(0.99899)), True),
        # all-zero on both sides: apr's cosine is 0.0, but nothing differs
        (Cell(0, "attn_norm", (10,), _stats(0, 10), _stats(0, 10), _diff(0.0, 0.0)), False),
        # NaN on a side: cosine 0.0 and max|diff| skips NaN; still diverged
        (Cell(0, "attn_norm", (10,), _stats(1, nans=1), _stats(1), _diff(0.0, 0.0)), True),
        # both present with different element counts
        (Cell(0, "attn_norm", (10,), _stats(1), _stats(1), None), True),
        # one side only
        (Cell(0, "attn_norm", (10,), _stats(1), None, None), False),
        # expert ids compare exactly, whatever their cosine
        (Cell(0, "moe_router_indices", (2,), _stats(1), _stats(1), _diff(0.9999, 1.0)), True),
    ],
)
def test_cosine_divergence_rules(cell, diverged):
    assert cosine_diverged(cell) is diverged


@pytest.mark.parametrize(
    ("std_a", "diverged"),
    [
        (2.0, False),  # the band [0.5, 2.0] is closed, as bisect prints it
        (float(np.nextafter(2.0, 3.0)), True),
        (0.5, False),
        (float(np.nextafter(0.5, 0.0)), True),
        (1.0, False),
    ],
)
def test_std_band_edges_are_inside(std_a, diverged):
    cell = Cell(0, "ffn_up", (10,), _stats(std_a), _stats(1.0), _diff(1.0))
    assert std_diverged(cell) is diverged


def test_threshold_and_std_band_pick_the_first_cell_in_order():
    cells = [
        Cell(0, "attn_norm", (10,), _stats(1.0), _stats(1.0), _diff(0.9995)),
        Cell(0, "ffn_up", (10,), _stats(2.1), _stats(1.0), _diff(0.99999)),
        Cell(1, "attn_norm", (10,), _stats(1.0), _stats(1.0), _diff(0.99)),
        Cell(1, "ffn_up", (10,), _stats(0.4), _stats(1.0), _diff(0.9)),
    ]
    assert first_divergence(cells) is cells[2]
    assert first_divergence(cells, threshold=0.9999) is cells[0]
    assert first_std_divergence(cells) is cells[1]
    assert first_std_divergence(cells, band=(0.3, 3.0)) is None
    assert std_ratio(cells[3]) == pytest.approx(0.4)
    flat_b = Cell(0, "ffn_up", (10,), _stats(1.0), _stats(0.0), _diff(0.0))
    assert math.isinf(std_ratio(flat_b))


def test_open_source_tells_directories_from_models(tmp_path, hf_llama):
    directory = _write_trace_dir(_model(hf_llama), tmp_path / "x-trace")
    source = open_source(directory)
    assert isinstance(source, DirectorySource)
    assert source.token_ids == TOKENS
    assert source.num_layers == 3
    hf_dir = tmp_path / "hf"
    hf_llama.save_pretrained(hf_dir)
    model_source = open_source(hf_dir, token_ids=[1, 2, 3], device="cpu")
    assert isinstance(model_source, ModelSource) and model_source.token_ids == [1, 2, 3]
    model_source.close()


def test_a_model_without_tokenizer_takes_the_other_sides_tokens(tmp_path, hf_llama):
    hf_dir = tmp_path / "hf"  # save_pretrained writes no tokenizer
    hf_llama.save_pretrained(hf_dir)
    with pytest.raises(TokenizerError, match="pass --tokens"):
        open_pair(hf_dir, None, device="cpu")
    directory = _write_trace_dir(_model(hf_llama), tmp_path / "t")
    a, b = open_pair(hf_dir, directory, device="cpu")
    assert a.token_ids == TOKENS
    assert first_divergence(list(compare(a, b))) is None
    a.close()


def test_two_directories_compare_file_by_file(hf_llama, tmp_path):
    good = _write_trace_dir(_model(hf_llama), tmp_path / "good")
    bad = _write_trace_dir(_model(hf_llama, **UP18), tmp_path / "bad")
    cells = list(compare(DirectorySource(good), DirectorySource(bad)))
    assert len(cells) == 51
    assert (first_std_divergence(cells).layer, first_std_divergence(cells).stage) == (1, "ffn_up")


def test_two_directories_without_tokens_json_must_hold_the_same_prompt_length(hf_llama, tmp_path):
    five = _write_trace_dir(
        _model(hf_llama), tmp_path / "five", tokens=[1, 2, 3, 4, 5], with_tokens=False
    )
    six = _write_trace_dir(_model(hf_llama), tmp_path / "six", with_tokens=False)
    with pytest.raises(TokenMismatchError, match="embedding.bin holds 320 vs 384 values"):
        next(compare(DirectorySource(five), DirectorySource(six)))


def test_side_by_side_and_serial_runs_yield_the_same_cells(hf_llama, monkeypatch):
    """The pipeline changes when things run, never what they compute: every statistic and
    local error of every cell is bit-identical to the one-step-after-the-other run."""
    import engine.plan
    from engine.plan import plan_for

    def cells(min_flops: float):
        monkeypatch.setattr(engine.plan, "PIPELINE_MIN_FLOPS", min_flops)
        a = _source(hf_llama)
        b = _source(hf_llama, **{"model.layers.1.mlp.up_proj.weight": lambda w: w * 1.01})
        with plan_for(a, b) as plan:
            assert plan._concurrent() == (min_flops == 0)
            return list(plan.run())

    assert cells(0) == cells(float("inf"))


def test_a_drill_down_rerun_of_a_large_pass_gets_the_passes_blas_threads(hf_llama, monkeypatch):
    """`ModelSource.tensor` recomputes a stage with a pass of its own, under the same BLAS
    limit a trace of that size runs with (engine.pipeline.pass_blas): a large pass takes the
    threads BLAS_THREADS_ENV allows, though the command started OpenBLAS with one."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import engine.pipeline as pipeline
    import engine.sources.model_run as model_run

    def blas_threads() -> int:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"][0]

    seen: list[int] = []
    real_trace = model_run.trace

    def watched_trace(*args, **kwargs):
        seen.append(blas_threads())
        yield from real_trace(*args, **kwargs)

    monkeypatch.setattr(model_run, "trace", watched_trace)
    monkeypatch.setattr(pipeline, "SMALL_PASS_FLOPS", 0.0)  # this tiny pass counts as large
    monkeypatch.setenv(pipeline.BLAS_THREADS_ENV, "2")
    source = ModelSource(_model(hf_llama), TOKENS, cache_bytes=0)
    with threadpool_limits(1, user_api="blas"):
        assert source.tensor(1, "attn_out") is not None
        assert seen == [2]
        assert blas_threads() == 1  # restored when the rerun ends


def _serial_with_local_jobs(monkeypatch, wrap) -> None:
    """Comparisons run one step after the other (a short prompt's way) and every local-error
    job the tracker hands out replaced by `wrap(capture, job)`."""
    import engine.plan
    from engine.local_error import LocalErrorTracker

    monkeypatch.setattr(engine.plan, "PIPELINE_MIN_FLOPS", float("inf"))
    real_job = LocalErrorTracker.job
    monkeypatch.setattr(
        LocalErrorTracker, "job", lambda self, capture: wrap(capture, real_job(self, capture))
    )


def test_a_serial_run_computes_the_matrix_products_local_error_on_one_helper(hf_llama, monkeypatch):
    """One step after the other (a short prompt), the local error of the matrix-product
    stages runs on one helper thread and every other stage's on the caller's; the cells still
    come out in computation order, each with its local error (the test above checks the
    values against the side-by-side run)."""
    from engine.plan import OFFLOADED_LOCAL_ERROR_STAGES, plan_for
    from engine.stages import STAGE_BY_NAME

    assert set(STAGE_BY_NAME) >= OFFLOADED_LOCAL_ERROR_STAGES  # real stage names
    ran_on: dict[tuple[int, str], int] = {}
    taken: list[tuple[int, str]] = []  # the order the tracker took the captures in

    def recorded(capture, compute):
        taken.append((capture.layer, capture.stage))

        def run():
            ran_on[(capture.layer, capture.stage)] = threading.get_ident()
            return compute()

        return run

    _serial_with_local_jobs(monkeypatch, recorded)
    a = _source(hf_llama)
    b = _source(hf_llama, **{"model.layers.1.mlp.up_proj.weight": lambda w: w * 1.01})
    with plan_for(a, b) as plan:
        assert not plan._concurrent()
        cells = list(plan.run())
    caller = threading.get_ident()
    helpers = {ident for key, ident in ran_on.items() if key[1] in OFFLOADED_LOCAL_ERROR_STAGES}
    assert len(helpers) == 1 and caller not in helpers
    assert {
        ident for key, ident in ran_on.items() if key[1] not in OFFLOADED_LOCAL_ERROR_STAGES
    } == {caller}
    assert [(c.layer, c.stage) for c in cells] == taken == sorted(ran_on, key=taken.index)
    ffn_up = next(c for c in cells if (c.layer, c.stage) == (1, "ffn_up"))
    assert ffn_up.local is not None and ffn_up.local.error is not None


@pytest.mark.parametrize("local_error", [True, False])
def test_a_serial_run_computes_statistics_beside_the_passes_only_when_a_core_is_idle(
    hf_llama, monkeypatch, local_error
):
    """With a core idle, every cell's statistics run on the helper thread (one thread, never
    the caller's); with none, on the caller's; with or without local error. Either way the
    same cells come out, in the same order, with the same statistics and local errors."""
    import engine.plan
    from engine.plan import Plan, plan_for

    _serial_with_local_jobs(monkeypatch, lambda capture, job: job)
    if not local_error:
        monkeypatch.setattr(Plan, "_tracker", lambda self: None)
    real_make_cell = engine.plan.make_cell
    runs = {}
    for idle in (True, False):
        made_on: list[int] = []

        def recorded(*args, _made_on=made_on, **kwargs):
            _made_on.append(threading.get_ident())
            return real_make_cell(*args, **kwargs)

        monkeypatch.setattr(engine.plan, "make_cell", recorded)
        monkeypatch.setattr(engine.plan, "idle_core", lambda *_, _idle=idle: _idle)
        a = _source(hf_llama)
        b = _source(hf_llama, **{"model.layers.1.mlp.up_proj.weight": lambda w: w * 1.01})
        with plan_for(a, b) as plan:
            assert not plan._concurrent()
            cells = list(plan.run())
        assert len(made_on) == len(cells) == plan.expected
        caller = threading.get_ident()
        if idle:
            assert len(set(made_on)) == 1 and caller not in made_on
        else:
            assert set(made_on) == {caller}
        runs[idle] = [(c.layer, c.stage, c.diff, c.stats_a, c.stats_b, c.local) for c in cells]
    assert runs[True] == runs[False]
    assert any(local is not None and local.error for *_, local in runs[True]) == local_error


def test_cancel_stops_a_serial_run_whose_cells_wait_for_the_helper(hf_llama, monkeypatch):
    """Cells computed while a matrix product's local error is still on the helper wait behind
    it; once the consumer cancels, none of them comes out (qkv_matmul's job on the helper
    finishes only once two later captures have been handed to the tracker, so their cells are
    always waiting when qkv_matmul's cell is handed over)."""
    from engine.plan import OFFLOADED_LOCAL_ERROR_STAGES

    handed: list[str] = []  # the stages whose jobs the tracker has handed out, in order
    two_later = threading.Event()

    def held(capture, compute):
        handed.append(capture.stage)
        if "qkv_matmul" in handed and len(handed) - handed.index("qkv_matmul") > 2:
            two_later.set()
        if capture.stage not in OFFLOADED_LOCAL_ERROR_STAGES:
            return compute

        def after_two_later():
            assert two_later.wait(60), "the serial run did not go on while the helper worked"
            return compute()

        return after_two_later

    _serial_with_local_jobs(monkeypatch, held)
    cancel = threading.Event()
    seen = []
    for cell in compare(_source(hf_llama), _source(hf_llama), cancel=cancel):
        seen.append(cell.stage)
        if cell.stage == "qkv_matmul":
            cancel.set()
    assert seen == ["embedding", "attn_norm", "qkv_matmul"]
