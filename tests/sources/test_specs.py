"""`open_spec` (llama.cpp / hf: / dump: specs) and `apr-tui trace --engine`."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from engine.aprt import read_aprt
from engine.errors import AprTuiError
from engine.formats import gguf as gguf_format
from engine.formats import open_model
from engine.formats import safetensors as safetensors_format
from engine.forward import trace
from engine.sources import DirectorySource
from engine.sources.specs import open_spec, split_spec
from engine.stages import WHOLE_MODEL_LAYER
from engine.synth import synthesize
from engine.trace_directory import read_tokens_json

TOKENS = [3, 17, 42, 5, 9, 11]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("model.gguf", None),
        ("./hf-dir", None),
        ("hf", None),
        ("llama.cpp", ("llama.cpp", None, {})),
        ("llama.cpp?type_k=f32", ("llama.cpp", None, {"type_k": "f32"})),
        (
            "llama.cpp:m.gguf?type_k=f32&n_threads=2",
            ("llama.cpp", "m.gguf", {"type_k": "f32", "n_threads": "2"}),
        ),
        ("hf:./dir?dtype=float16", ("hf", "./dir", {"dtype": "float16"})),
        ("dump:out?map=llama.cpp", ("dump", "out", {"map": "llama.cpp"})),
    ],
)
def test_split_spec(spec, expected):
    assert split_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf:", "needs a path"),
        ("hf:x?dtyp=float16", "has no setting 'dtyp'"),
        ("llama.cpp:x.gguf?flash_attn=maybe", "expected 0 or 1"),
        ("llama.cpp:x.gguf?n_threads=two", "expected an integer"),
        ("llama.cpp", "give llama.cpp:PATH.gguf"),
        ("dump:x?map", "has no setting|key=value"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(AprTuiError, match=message):
        open_spec(spec, token_ids=TOKENS)


def test_plain_paths_are_not_ours(tmp_path):
    assert open_spec(str(tmp_path), token_ids=TOKENS) is None


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("specs")
    model = synthesize("llama", seed=6, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return {
        "gguf": gguf_format.write(model, root / "m.gguf", "f32"),
        "hf": safetensors_format.write(model, root / "hf"),
    }


def test_llamacpp_specs_carry_their_settings(seeded, llama_cpp_installed):
    with open_spec(
        "llama.cpp?type_k=f32&n_threads=2", token_ids=TOKENS, model=seeded["gguf"]
    ) as source:
        assert source.kind == "llama.cpp"
        record = source.record()
        assert record["settings"]["type_k"] == "f32" and record["settings"]["n_threads"] == 2
        assert record["settings"]["type_v"] == "f16"  # llama.cpp's default, recorded
    with open_spec(
        f"llama.cpp:{seeded['gguf']}", token_ids=TOKENS, settings={"flash_attn": True}
    ) as source:
        assert "attn_scores" not in source.stages
    # Without token ids the prompt is encoded by our tokenizer of the GGUF.
    with (
        open_spec(f"llama.cpp:{seeded['gguf']}", prompt="hello") as source,
        open_model(seeded["gguf"]) as model,
    ):
        from engine.tokenizer import encode_prompt

        assert source.token_ids == encode_prompt(model, "hello")


def test_hf_and_dump_specs(seeded, tmp_path, hf_installed):
    with open_spec(f"hf:{seeded['hf']}?dtype=bfloat16", token_ids=TOKENS) as source:
        assert source.kind == "hf" and source.dtype == "bfloat16"
    dump = tmp_path / "dump"
    dump.mkdir()
    with open_model(seeded["hf"]) as model:
        ours = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, TOKENS)}
    for n in range(2):
        np.save(dump / f"n{n}.npy", ours[(n, "attn_norm")])
    (dump / "name-map.toml").write_text('[stages.attn_norm]\nname = "n{layer}"\n')
    source = open_spec(f"dump:{dump}", token_ids=TOKENS)
    assert source.stages == ("attn_norm",)
    np.testing.assert_array_equal(source.tensor(1, "attn_norm"), ours[(1, "attn_norm")])


@pytest.mark.slow
def test_trace_engine_llamacpp_writes_what_the_source_captures(
    smollm2_gguf, tmp_path, apr_tui, llama_cpp_installed
):
    from engine.sources.llamacpp import LlamaCppSource

    tokens = [1, 504, 3458, 5145]
    out = tmp_path / "lc"
    result = subprocess.run(
        [
            *apr_tui, "trace", str(smollm2_gguf), "--engine", "llama.cpp", "--save-tensor", "all",
            "--save-tensor-layers", "0..2", "--tokens", ",".join(map(str, tokens)),
            "--save-tensor-dir", str(out),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "not produced by this engine: ffn_silu" in result.stdout
    directory = DirectorySource(out)
    assert directory.token_ids == tokens
    assert {layer for layer, _ in directory.trace_dir.entries} == {0, 1, WHOLE_MODEL_LAYER}
    with LlamaCppSource(smollm2_gguf, tokens) as source:
        expected = {(c.layer, c.stage): c.array for c in source.captures(layers=range(0, 2))}
    assert set(directory.trace_dir.entries) == set(expected)
    for key, values in expected.items():
        np.testing.assert_array_equal(directory.tensor(*key).reshape(values.shape), values)
    assert read_aprt(out / "lm_head.bin").values.size == len(tokens) * 49152
    record = json.loads((out / "source.json").read_text())
    assert record["engine"] == "llama.cpp" and record["settings"]["flash_attn"] is False
    assert read_tokens_json(out / "tokens.json").model == str(smollm2_gguf)


def test_trace_engine_hf_float16(seeded, tmp_path, apr_tui, hf_installed):
    out = tmp_path / "hf16"
    result = subprocess.run(
        [
            *apr_tui, "trace", str(seeded["hf"]), "--engine", "hf", "--dtype", "float16",
            "--save-tensor", "attn_norm,attention,lm_head", "--tokens", "3,17,42,5,9,11",
            "--save-tensor-dir", str(out),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    entries = set(DirectorySource(out).trace_dir.entries)
    assert entries == {(0, "attn_norm"), (0, "attention"), (WHOLE_MODEL_LAYER, "lm_head")}
    with open_model(seeded["hf"]) as model:
        ours = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, TOKENS)}
    directory = DirectorySource(out)
    for key in entries:
        got = directory.tensor(*key).reshape(ours[key].shape)
        assert not np.array_equal(got, ours[key])  # float16, not our float32
        cos = float(
            np.dot(got.ravel(), ours[key].ravel()) / np.linalg.norm(got) / np.linalg.norm(ours[key])
        )
        assert cos > 0.999, (key, cos)
    assert json.loads((out / "source.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtype", "float16"], "--dtype: only --engine hf"),
        (["--engine", "llama.cpp"], "not a GGUF file"),
    ],
)
def test_trace_engine_bad_input_exits_2(seeded, tmp_path, apr_tui, extra, message):
    result = subprocess.run(
        [*apr_tui, "trace", str(seeded["hf"]), "--save-tensor", "all", *extra,
         "--save-tensor-dir", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
