"""Tensor dumps under foreign names and layouts, read back through name maps, exactly."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.errors import AprTuiError, FormatError
from engine.forward import trace
from engine.sources.tensor_dump import DumpSource, load_name_map
from engine.stages import WHOLE_MODEL_LAYER
from engine.synth import synthesize
from engine.trace_directory import write_tokens_json

TOKENS = [3, 17, 42, 5, 9, 11, 23]
SEQ = len(TOKENS)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


@pytest.fixture(scope="module")
def seeded():
    """A seeded Qwen2 (QKV bias) model and our own trace of it: the other engine's truth."""
    model = synthesize(
        "qwen2", seed=9, hidden_size=64, num_layers=2, num_heads=HEADS, num_kv_heads=KV_HEADS
    )
    ours = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, TOKENS)}
    return model, ours


def _adjacent(values: np.ndarray) -> np.ndarray:
    """Last axis per head from halves (i, i+hd/2) to adjacent pairs (2i, 2i+1) (how a
    llama.cpp-style engine orders RoPE dims), written independently of the reader."""
    out = np.empty_like(values)
    half = HEAD_DIM // 2
    out[..., 0::2] = values[..., :half]
    out[..., 1::2] = values[..., half:]
    return out


FOREIGN_MAP = f"""
# A "Rust engine" dump: its own names, transposed and per-head layouts.
[stages.embedding]
name = "tok_emb"
[stages.attn_norm]
name = "L{{layer}}/norm1_T"
transpose = [1, 0]
[stages.qkv_matmul]
names = ["L{{layer}}/q", "L{{layer}}/k", "L{{layer}}/v"]
[stages.qkv_bias]
name = "L{{layer}}/qkv_b"
squeeze = true
[stages.q_post_rope]
name = "L{{layer}}/q_rot"
layout = "head_major"
pairs = "adjacent"
[stages.k_post_rope]
name = "L{{layer}}/k_rot"
squeeze = true
reshape = [{SEQ}, -1]
[stages.attn_scores]
name = "L{{layer}}/scores_padded"
crop_seq = true
scale = 0.5
[stages.attn_softmax]
name = "L{{layer}}/probs"
[stages.attention]
name = "L{{layer}}/ctx"
[stages.attn_out]
name = "L{{layer}}/o"
[stages.post_attn_residual]
name = "L{{layer}}/h1"
[stages.ffn_norm]
name = "L{{layer}}/norm2"
[stages.ffn_gate]
name = "L{{layer}}/gate_T"
transpose = [1, 0]
[stages.ffn_up]
name = "L{{layer}}/up"
[stages.ffn_silu]
name = "L{{layer}}/act"
[stages.ffn_swigl]
name = "L{{layer}}/glu"
[stages.ffn_out]
name = "L{{layer}}/down"
[stages.post_ffn_residual]
name = "L{{layer}}/out"
[stages.final_norm]
name = "norm_f"
[stages.lm_head]
name = "logits_all"
rows = "last"
"""


def _foreign_tensors(seeded) -> dict[str, np.ndarray]:
    """Our trace, renamed and re-laid-out the way another engine might dump it."""
    model, ours = seeded
    rng = np.random.default_rng(0)
    q_dim, kv_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = {"tok_emb": ours[(0, "embedding")].astype(np.float64)}
    for n in range(model.config.num_layers):
        get = lambda s, n=n: ours[(n, s)]  # noqa: E731
        qkv = get("qkv_matmul")
        out[f"L{n}/norm1_T"] = np.asfortranarray(get("attn_norm").T)
        out[f"L{n}/q"], out[f"L{n}/k"], out[f"L{n}/v"] = (
            qkv[:, :q_dim],
            qkv[:, q_dim : q_dim + kv_dim],
            qkv[:, q_dim + kv_dim :],
        )
        out[f"L{n}/qkv_b"] = get("qkv_bias")[None]  # [1, seq, q + 2kv]
        q_heads = get("q_post_rope").reshape(SEQ, HEADS, HEAD_DIM).transpose(1, 0, 2)
        out[f"L{n}/q_rot"] = _adjacent(q_heads)  # [heads, seq, hd], adjacent pairs
        out[f"L{n}/k_rot"] = get("k_post_rope").reshape(1, SEQ, KV_HEADS, HEAD_DIM)
        padded = rng.standard_normal((HEADS, SEQ, 16)).astype(np.float32)
        padded[:, :, :SEQ] = get("attn_scores") * 2  # exact: a power of two
        out[f"L{n}/scores_padded"] = padded
        out[f"L{n}/probs"] = get("attn_softmax")
        for stage, name in (
            ("attention", "ctx"),
            ("attn_out", "o"),
            ("post_attn_residual", "h1"),
            ("ffn_norm", "norm2"),
            ("ffn_up", "up"),
            ("ffn_silu", "act"),
            ("ffn_swigl", "glu"),
            ("ffn_out", "down"),
            ("post_ffn_residual", "out"),
        ):
            out[f"L{n}/{name}"] = get(stage)
        out[f"L{n}/gate_T"] = np.ascontiguousarray(get("ffn_gate").T)
    out["norm_f"] = ours[(WHOLE_MODEL_LAYER, "final_norm")]
    logits = rng.standard_normal((SEQ, model.config.vocab_size)).astype(np.float32)
    logits[-1] = ours[(WHOLE_MODEL_LAYER, "lm_head")]
    out["logits_all"] = logits
    return out


def _assert_exact(source: DumpSource, ours) -> None:
    got = {(c.layer, c.stage): c.array for c in source.captures()}
    assert set(got) == set(ours)
    for key, values in ours.items():
        np.testing.assert_array_equal(got[key].reshape(values.shape), values, err_msg=str(key))
    keys = list(got)
    assert keys[0] == (0, "embedding") and keys[-1] == (WHOLE_MODEL_LAYER, "lm_head")


def _write_npy_dir(tensors: dict[str, np.ndarray], root) -> None:
    for name, values in tensors.items():
        path = root / f"{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, values)


def test_npy_directory_with_a_toml_map_matches_our_trace_exactly(seeded, tmp_path):
    _, ours = seeded
    dump = tmp_path / "dump"
    _write_npy_dir(_foreign_tensors(seeded), dump)
    write_tokens_json(dump, TOKENS)
    (tmp_path / "map.toml").write_text(FOREIGN_MAP)
    source = DumpSource(dump, tmp_path / "map.toml")
    assert source.token_ids == TOKENS and source.num_layers == 2
    assert source.not_produced.keys() == {
        "moe_router",
        "moe_ffn_out",
        "moe_router_indices",
        "post_attn_norm",  # apr-tui's Gemma stages: the map names none
        "ffn_gelu",
        "post_ffn_norm",
    }
    _assert_exact(source, ours)
    np.testing.assert_array_equal(
        source.tensor(1, "q_post_rope").reshape(SEQ, -1), ours[(1, "q_post_rope")]
    )
    assert source.tensor(5, "attn_norm") is None


def test_safetensors_and_npz_dumps_with_a_json_map(seeded, tmp_path):
    _, ours = seeded
    tensors = {k: np.ascontiguousarray(v) for k, v in _foreign_tensors(seeded).items()}
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    dump = tmp_path / "dump"
    dump.mkdir()
    save_file({n: tensors[n] for n in first}, dump / "part-1.safetensors")
    np.savez_compressed(dump / "part-2.npz", **{n: tensors[n] for n in second})
    import tomllib

    (tmp_path / "map.json").write_text(json.dumps(tomllib.loads(FOREIGN_MAP)))
    (tmp_path / "map.toml").write_text(FOREIGN_MAP)
    assert load_name_map(tmp_path / "map.json") == load_name_map(tmp_path / "map.toml")
    _assert_exact(DumpSource(dump, tmp_path / "map.json", token_ids=TOKENS), ours)


def test_builtin_hf_map_reads_module_named_dumps(tmp_path):
    """Module paths as an HF hook dump names them, each [1, seq, ...]."""
    model = synthesize(
        "llama", seed=2, hidden_size=64, num_layers=2, num_heads=HEADS, num_kv_heads=KV_HEADS
    )
    ours = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, TOKENS)}
    q_dim, kv_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    tensors = {"model.embed_tokens": ours[(0, "embedding")][None]}
    for n in range(2):
        base = f"model.layers.{n}"
        qkv = ours[(n, "qkv_matmul")]
        tensors[f"{base}.input_layernorm"] = ours[(n, "attn_norm")][None]
        tensors[f"{base}.self_attn.q_proj"] = qkv[None, :, :q_dim]
        tensors[f"{base}.self_attn.k_proj"] = qkv[None, :, q_dim : q_dim + kv_dim]
        tensors[f"{base}.self_attn.v_proj"] = qkv[None, :, q_dim + kv_dim :]
        for stage, module in (
            ("attention", "self_attn.o_proj:input"),
            ("attn_out", "self_attn.o_proj"),
            ("post_attn_residual", "post_attention_layernorm:input"),
            ("ffn_norm", "post_attention_layernorm"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_silu", "mlp.act_fn"),
            ("ffn_swigl", "mlp.down_proj:input"),
            ("ffn_out", "mlp.down_proj"),
        ):
            tensors[f"{base}.{module}"] = ours[(n, stage)][None]
        tensors[base] = ours[(n, "post_ffn_residual")][None]
    tensors["model.norm"] = ours[(WHOLE_MODEL_LAYER, "final_norm")][None]
    logits = np.zeros((1, SEQ, model.config.vocab_size), dtype=np.float32)
    logits[0, -1] = ours[(WHOLE_MODEL_LAYER, "lm_head")]
    tensors["lm_head"] = logits
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp_path / "hf.safetensors")
    source = DumpSource(tmp_path / "hf.safetensors", "hf", token_ids=TOKENS)
    expected = {
        k: v
        for k, v in ours.items()
        if k[1] not in ("q_post_rope", "k_post_rope", "attn_scores", "attn_softmax")
    }
    got = {(c.layer, c.stage): c.array for c in source.captures()}
    assert set(got) == set(expected)
    for key, values in expected.items():
        np.testing.assert_array_equal(got[key].reshape(values.shape), values, err_msg=str(key))
    assert "q_post_rope" in source.not_produced


def _bad_map(tmp_path, text: str, suffix=".toml"):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[stages.attn_nrom]\nname = "x{layer}"', "unknown stage 'attn_nrom'"),
        ('[stages.attn_norm]\nname = "x{layer}"\ntranspos = [1, 0]', "unknown option 'transpos'"),
        ('[stages.attn_norm]\nname = "x"', "needs a {layer} placeholder"),
        ('[stages.final_norm]\nname = "x{layer}"', "must not have a {layer}"),
        ('[stages.attn_norm]\nname = "x{layer}"\npairs = "odd"', 'pairs must be "half"'),
        ('[stages.attn_norm]\nname = "x{layer}"\nscale = inf', "scale must be a finite"),
        ("[stages.attn_norm\n", "not a valid name map"),
        ('base = "vllm"', "built-in maps are"),
    ],
)
def test_bad_name_maps_are_one_line_errors_naming_the_file(tmp_path, text, message):
    path = _bad_map(tmp_path, text)
    with pytest.raises(FormatError, match=message) as caught:
        load_name_map(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_hostile_dump_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "map.toml").write_text('[stages.attn_norm]\nname = "a{layer}"')
    cases = {}
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    np.save(truncated / "a0.npy", np.ones((4, 8), dtype=np.float32))
    data = (truncated / "a0.npy").read_bytes()
    (truncated / "a0.npy").write_bytes(data[:-5])
    cases[truncated] = "body is"
    objects = tmp_path / "objects"
    objects.mkdir()
    np.save(objects / "a0.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    cases[objects] = "expected float16"
    ints = tmp_path / "ints"
    ints.mkdir()
    np.save(ints / "a0.npy", np.arange(6))
    cases[ints] = "expected float16"
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    with zipfile.ZipFile(bomb / "x.npz", "w") as archive:
        header = b"\x93NUMPY\x01\x00" + b"v\x00"
        body = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 1000), }"
        header = b"\x93NUMPY\x01\x00" + len(body.ljust(118) + "\n").to_bytes(2, "little")
        archive.writestr("a0.npy", header + (body.ljust(118) + "\n").encode() + b"\0" * 16)
    cases[bomb] = "larger than"
    duplicate = tmp_path / "duplicate"
    duplicate.mkdir()
    np.save(duplicate / "a0.npy", np.ones(3, dtype=np.float32))
    np.savez(duplicate / "more.npz", a0=np.ones(3, dtype=np.float32))
    cases[duplicate] = "is also in"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[empty] = "no .npy, .npz or .safetensors"
    cases[tmp_path / "missing"] = "no such dump"
    for path, message in cases.items():
        with pytest.raises(FormatError, match=message) as caught:
            DumpSource(path, tmp_path / "map.toml")
        assert str(path) in str(caught.value), caught.value
    unmatched = tmp_path / "unmatched"
    unmatched.mkdir()
    np.save(unmatched / "zzz.npy", np.ones(3, dtype=np.float32))
    with pytest.raises(FormatError, match="no tensor matches the name map"):
        DumpSource(unmatched, tmp_path / "map.toml")


def test_layout_mismatch_is_an_error_not_garbage(tmp_path):
    dump = tmp_path / "d"
    dump.mkdir()
    np.save(dump / "a0.npy", np.ones((4, 8), dtype=np.float32))
    (tmp_path / "map.toml").write_text(
        '[stages.q_post_rope]\nname = "a{layer}"\nlayout = "head_major"'
    )
    source = DumpSource(dump, tmp_path / "map.toml")
    with pytest.raises(AprTuiError, match="head_major needs"):
        list(source.captures())


@pytest.mark.slow
def test_builtin_llamacpp_map_reads_an_eval_callback_dump(
    smollm2_gguf, tmp_path, llama_cpp_installed
):
    """A raw all-node llama.cpp dump saved as .npz under ggml's names (last node of a name
    wins, as in a name-keyed dump) reads like the llama.cpp source's own captures."""
    from engine.sources.llamacpp import LlamaCppSource
    from tests.support.llamacpp_direct import dump_all_nodes

    tokens = [1, 504, 3458, 5145, 28, 8]
    named = {}
    for node in dump_all_nodes(smollm2_gguf, tokens, n_threads=2):
        if node.values is not None and node.ne:
            named[node.name] = node.values.reshape(tuple(reversed(node.ne)))
    np.savez(tmp_path / "llamacpp.npz", **named)
    source = DumpSource(tmp_path / "llamacpp.npz", "llama.cpp", token_ids=tokens)
    with LlamaCppSource(smollm2_gguf, tokens, n_threads=2) as live:
        expected = {(c.layer, c.stage): c.array for c in live.captures()}
    got = {(c.layer, c.stage): c.array for c in source.captures()}
    mapped = set(load_name_map("llama.cpp"))
    assert set(got) == {k for k in expected if k[1] in mapped}
    for key, values in got.items():
        np.testing.assert_array_equal(
            values.reshape(expected[key].shape), expected[key], err_msg=str(key)
        )
