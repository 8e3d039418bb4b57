"""`apr-tui trace` driven as a hostile user would: directories that are not ours, ranges past
the model, a rerun on other tokens, Ctrl+C in the middle. Real CLI in a subprocess."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.aprt import read_aprt, write_stage
from engine.trace_directory import read_trace_dir
from tests.commands.conftest import assert_one_line_error, run_cli, snapshot
from tests.support.bounded import lines_within
from tests.support.signals import interruptible


def _trace(apr_tui, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli([*apr_tui, "trace", str(model), "--save-tensor-dir", str(out), *extra])


def test_layer_range_past_the_model_is_refused_before_anything_is_written(
    apr_tui, models, tmp_path
):
    """Was: exit 0, "Wrote 0 stage tensor file(s)" and a directory holding only tokens.json."""
    out = tmp_path / "out"
    result = _trace(
        apr_tui, models.apr, out, "--save-tensor", "attn_norm", "--save-tensor-layers", "5..9"
    )
    assert_one_line_error(result, "--save-tensor-layers 5..9", "2 layers")
    assert not out.exists()


def test_layer_range_past_the_model_is_fine_for_whole_model_stages(apr_tui, models, tmp_path):
    out = tmp_path / "out"
    result = _trace(
        apr_tui, models.apr, out, "--save-tensor", "lm_head", "--save-tensor-layers", "5..9"
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["lm_head.bin", "tokens.json"]


def test_apr_written_trace_dir_is_not_overwritten_without_force(apr_tui, models, tmp_path):
    """Stage files with no tokens.json of ours are `apr trace`'s (its default dir is the same
    `<stem>-trace`): replacing them would destroy the very reference the user wants to bisect
    against. Was: silently overwritten."""
    apr_dir = tmp_path / "m-trace"
    write_stage(apr_dir, "attn_norm", 0, np.full(7 * 64, 0.25, dtype=np.float32))
    write_stage(apr_dir, "lm_head", 0, np.arange(5, dtype=np.float32))
    before = snapshot(apr_dir)
    result = _trace(apr_tui, models.apr, apr_dir, "--save-tensor", "attn_norm,lm_head")
    assert_one_line_error(result, str(apr_dir), "did not write", "--force")
    assert snapshot(apr_dir) == before


def test_rerun_on_other_tokens_is_refused_and_keeps_the_first_trace(apr_tui, models, tmp_path):
    """Was: the second run rewrote tokens.json ([5, 6]) and left the first run's 7-token files,
    so a later bisect compared mismatched prompts and called it a divergence."""
    out = tmp_path / "out"
    first = _trace(apr_tui, models.apr, out, "--save-tensor", "all")
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    result = _trace(apr_tui, models.apr, out, "--save-tensor", "attn_norm", "--tokens", "5,6")
    assert_one_line_error(result, str(out), "other tokens", "--force")
    assert snapshot(out) == before


def test_second_run_into_our_own_dir_with_other_stages_is_allowed(apr_tui, models, tmp_path):
    out = tmp_path / "out"
    assert _trace(apr_tui, models.apr, out, "--save-tensor", "attn_norm").returncode == 0
    second = _trace(apr_tui, models.apr, out, "--save-tensor", "ffn_norm,lm_head")
    assert second.returncode == 0, second.stderr
    entries = set(read_trace_dir(out).entries)
    assert {(0, "attn_norm"), (0, "ffn_norm")} <= {(layer, s) for layer, s in entries}
    assert any(stage == "lm_head" for _, stage in entries)


def test_force_never_replaces_a_file_that_is_not_a_stage_file(apr_tui, models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lm_head.bin").write_bytes(b"my own notes, not APRT")
    (out / "notes.txt").write_text("precious")
    result = _trace(apr_tui, models.apr, out, "--save-tensor", "lm_head", "--force")
    assert_one_line_error(result, "lm_head.bin")
    assert (out / "lm_head.bin").read_bytes() == b"my own notes, not APRT"
    assert (out / "notes.txt").read_text() == "precious"


def test_foreign_tokens_json_is_never_replaced(apr_tui, models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokens.json").write_text('{"vocab": "someone else\'s"}')
    for extra in ([], ["--force"]):
        result = _trace(apr_tui, models.apr, out, "--save-tensor", "lm_head", *extra)
        assert_one_line_error(result, "tokens.json")
    assert (out / "tokens.json").read_text() == '{"vocab": "someone else\'s"}'


def test_stale_temporary_of_ours_does_not_block_a_rerun(apr_tui, models, tmp_path):
    """A killed run can leave `.<name>.<pid>.<hex>.tmp`; readers skip it, so must the check."""
    out = tmp_path / "out"
    assert _trace(apr_tui, models.apr, out, "--save-tensor", "attn_norm").returncode == 0
    stale = out / "layer-0" / ".attn_norm.bin.4242.deadbeef.tmp"
    stale.write_bytes(b"APRT")
    again = _trace(apr_tui, models.apr, out, "--save-tensor", "attn_norm")
    assert again.returncode == 0, again.stderr
    assert stale.read_bytes() == b"APRT"  # ours or not, never deleted


def test_model_directory_is_refused(apr_tui, models):
    before = snapshot(models.hf_dir)
    result = _trace(apr_tui, models.hf_dir, models.hf_dir, "--save-tensor", "attn_norm")
    assert_one_line_error(result, str(models.hf_dir), "did not write")
    assert snapshot(models.hf_dir) == before


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Deep and wide enough that an all-stage trace of 160 tokens lasts seconds, not ms."""
    from engine.formats import apr
    from engine.synth import synthesize

    model = synthesize(
        "llama", seed=3, hidden_size=128, num_layers=40, num_heads=4, num_kv_heads=2,
        intermediate_size=256,
    )  # fmt: skip
    return Path(apr.write(model, tmp_path_factory.mktemp("slow") / "slow.apr"))


def test_ctrl_c_during_trace_exits_130_and_leaves_only_whole_files(apr_tui, slow_model, tmp_path):
    out = tmp_path / "out"
    tokens = ",".join(str(10 + i % 200) for i in range(160))
    argv = [*apr_tui, "trace", str(slow_model), "--save-tensor", "all"]
    argv += ["--save-tensor-layers", "0..40", "--tokens", tokens, "--save-tensor-dir", str(out)]
    process = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    progress = []
    # One plain line per layer when stderr is not a terminal.
    for line in lines_within(process.stderr, 60, "the trace's progress"):
        progress.append(line)
        if "layer 2/40" in line:
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    lines = rest.splitlines()
    errors = [line for line in lines if not line.startswith("tracing ")]
    assert process.returncode == 130, "".join(progress) + rest
    assert errors == ["apr-tui: interrupted"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporaries
    stage_files = list(out.rglob("*.bin"))
    assert 0 < len(stage_files) < 40 * 18  # it really stopped part-way
    for path in stage_files:  # every file under its final name is complete and readable
        values = read_aprt(path).values
        assert path.stat().st_size == 12 + 4 * values.size
    rerun = _trace(apr_tui, slow_model, out, "--save-tensor", "attn_norm", "--tokens", tokens)
    assert rerun.returncode == 0, rerun.stderr  # the interrupted directory is still ours


def test_empty_save_tensor_dir_is_an_error_not_the_default(apr_tui, models, tmp_path):
    """Was: `--save-tensor-dir ""` silently wrote to the default `<stem>-trace` instead."""
    result = run_cli(
        [*apr_tui, "trace", str(models.apr), "--save-tensor", "attn_norm", "--save-tensor-dir", ""],
        cwd=tmp_path,
    )
    assert_one_line_error(result, "--save-tensor-dir", "empty")
    assert not (models.apr.parent / "m-trace").exists()


def _address_space_limit(limit_bytes: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def test_prompt_too_long_for_memory_is_refused_up_front(apr_tui, tmp_path):
    """A comparison holds two layers of captures per model (engine.memory.comparison_peak_bytes):
    at 20 000 tokens a model with a 4096-wide FFN needs ~9 GiB for them. Under a 4 GiB
    address-space limit this was a numpy MemoryError traceback (exit 1); without a limit,
    overcommit let it run into the OOM killer. (Attention no longer counts whole: it is
    computed and compared in blocks since issue 13, so a narrow model's 20 000 tokens fit:
    tests/plan/test_memory_budget.py.)"""
    from engine.formats import apr
    from engine.synth import synthesize

    wide = synthesize("llama", seed=1, hidden_size=512, intermediate_size=4096, num_layers=1)
    model = apr.write(wide, tmp_path / "m.apr", dtype="f16")
    tokens = ",".join(str(10 + i % 200) for i in range(20_000))
    result = subprocess.run(
        [*apr_tui, "bisect", str(model), str(model), "--tokens", tokens],
        capture_output=True, text=True, timeout=60,
        preexec_fn=_address_space_limit(4 * 1024**3),
    )  # fmt: skip
    assert_one_line_error(result, "m.apr", "20000 tokens", "GiB")


def test_trace_dot_inside_an_hf_dir_writes_beside_it(apr_tui, models, tmp_path):
    """Was: `apr-tui trace .` named the default directory `-trace` and put it *inside* the
    model's directory (Path('.').stem is '' and its parent is '.')."""
    hf = tmp_path / "smol"
    hf.mkdir()
    for path in models.hf_dir.iterdir():
        (hf / path.name).write_bytes(path.read_bytes())
    before = snapshot(hf)
    result = run_cli([*apr_tui, "trace", ".", "--save-tensor", "attn_norm"], cwd=hf)
    assert result.returncode == 0, result.stderr
    assert snapshot(hf) == before
    assert (tmp_path / "smol-trace" / "layer-0" / "attn_norm.bin").is_file()


def test_an_output_directory_that_cannot_be_created_is_named_as_such(apr_tui, models):
    """Was: "the run writes 0 MiB, only 0 MiB free" (the free space of /proc)."""
    argv = [*apr_tui, "trace", str(models.apr), "--save-tensor", "attn_norm"]
    result = run_cli([*argv, "--save-tensor-dir", "/proc/1/apr-tui-out"])
    assert_one_line_error(result, "/proc/1/apr-tui-out", "cannot be created", "not writable")
