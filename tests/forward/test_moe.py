"""Qwen3-MoE beyond the seeded HF oracle models (tests/forward/test_oracle.py runs every stage of
two seeded HF Qwen3-MoE models, with and without renormalized top-k, from memory, safetensors,
GGUF and APR).

Here: the routing HF computes for every token includes an expert that exactly one token picks,
and the engine's stages still agree with HF; experts are fetched only when a token routes to
them, a GGUF expert only as its own slab of llama.cpp's merged tensor; `apr-tui trace` of a
Qwen3-MoE GGUF writes apr's three MoE stage files in apr's byte layout; `apr-tui bisect`
finds a planted wrong expert and a planted router bias.
"""

from __future__ import annotations

import json
import struct
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.forward import trace
from engine.model import DictWeightStore, Model
from engine.stages import WHOLE_MODEL_LAYER
from tests.forward.agreement import TINY_MAX_REL_ERR, disagreements
from tests.forward.hf_oracle import build_hf_model, engine_model, hf_stage_captures

TOKENS = [5, 17, 99, 3, 42, 7, 127]


def _hf_routing(hf_model, tokens):
    """HF's routing of every token in every layer ({layer: [seq, k] expert ids}) and its stage
    captures, from one forward over `tokens`."""
    routing: dict[int, np.ndarray] = {}
    handles = [
        decoder.mlp.gate.register_forward_hook(
            lambda module, args, output, layer=layer: routing.__setitem__(
                layer, output[2].numpy().copy()
            )
        )
        for layer, decoder in enumerate(hf_model.model.layers)
    ]
    try:
        expected = hf_stage_captures(hf_model, tokens)
    finally:
        for handle in handles:
            handle.remove()
    return routing, expected


@pytest.fixture(scope="module")
def moe():
    """A seeded HF Qwen3-MoE (8 experts, 2 per token, renormalized), HF's routing of TOKENS in
    every layer and HF's stage captures."""
    hf_model = build_hf_model("qwen3_moe", seed=3, norm_topk_prob=True)
    return hf_model, *_hf_routing(hf_model, TOKENS)


def test_a_token_routes_to_an_expert_no_other_token_uses(moe):
    hf_model, routing, expected = moe
    lonely = []
    for layer, experts in routing.items():
        picked_by = {e: int((experts == e).any(axis=1).sum()) for e in range(8)}
        lonely += [(layer, e) for e, count in picked_by.items() if count == 1]
    assert lonely, "the seed must give some expert exactly one token"
    got = {(c.layer, c.stage): np.asarray(c.array) for c in trace(engine_model(hf_model), TOKENS)}
    assert disagreements(got, expected, max_rel=TINY_MAX_REL_ERR) == []
    for layer, experts in routing.items():  # the index payload: the very ids, as f32
        np.testing.assert_array_equal(got[(layer, "moe_router_indices")], experts[-1])


@dataclass
class _CountingStore(DictWeightStore):
    """A DictWeightStore that remembers every tensor name it hands out."""

    fetched: list[str] = field(default_factory=list)

    def get(self, name: str) -> np.ndarray:
        self.fetched.append(name)
        return super().get(name)


def test_experts_are_fetched_only_when_a_token_routes_to_them(moe):
    """Two tokens pick at most four of the eight experts: the others are never fetched."""
    hf_model, _, _ = moe
    routing, _ = _hf_routing(hf_model, TOKENS[:2])
    base = engine_model(hf_model)
    store = _CountingStore(base.weights.arrays)
    model = replace(base, weights=store)
    for _ in trace(model, TOKENS[:2]):
        pass
    for layer, experts in routing.items():
        prefix = f"model.layers.{layer}.mlp.experts."
        fetched = {
            int(n[len(prefix) :].split(".")[0]) for n in store.fetched if n.startswith(prefix)
        }
        assert fetched == {int(e) for e in experts.ravel()}
        assert len(fetched) < 8  # so the test can tell
        per_expert = [n for n in store.fetched if n.startswith(f"{prefix}{min(fetched)}.")]
        assert sorted(per_expert) == sorted(
            f"{prefix}{min(fetched)}.{p}_proj.weight" for p in ("gate", "up", "down")
        )  # each matrix once


def test_a_gguf_expert_is_its_own_slab_of_the_merged_tensor(moe, tmp_path):
    from gguf import GGUFReader

    from engine.formats import gguf, open_model

    hf_model, _, _ = moe
    path = gguf.write(engine_model(hf_model), tmp_path / "moe.gguf", dtype="q8_0")
    merged = {t.name: t for t in GGUFReader(path).tensors}["blk.0.ffn_down_exps.weight"]
    assert [int(d) for d in merged.shape] == [48, 64, 8]  # ggml dims: cols, rows, experts
    with open_model(path) as model:
        store = model.weights
        slabs = [store._info(f"model.layers.0.mlp.experts.{e}.down_proj.weight") for e in range(8)]
        assert {s.nbytes for s in slabs} == {merged.n_bytes // 8}
        assert [s.start - slabs[0].start for s in slabs] == [
            e * merged.n_bytes // 8 for e in range(8)
        ]
        assert store.shape("model.layers.0.mlp.experts.5.down_proj.weight") == (64, 48)


def _aprt(path: Path) -> tuple[int, np.ndarray]:
    """(layer, f32 payload) of an APRT stage file, read from its bytes (§1.1: `APRT`, u32
    layer, u32 element count, little-endian f32s)."""
    data = path.read_bytes()
    magic, layer, count = struct.unpack_from("<4sII", data)
    assert magic == b"APRT" and len(data) == 12 + 4 * count
    return layer, np.frombuffer(data, "<f4", offset=12)


def test_trace_writes_aprs_three_moe_stages_byte_compatible(moe, apr_tui, tmp_path):
    from engine.formats import gguf

    hf_model, routing, expected = moe
    model_path = gguf.write(engine_model(hf_model), tmp_path / "moe.gguf")
    out = tmp_path / "trace"
    result = subprocess.run(
        [
            *apr_tui,
            "trace",
            str(model_path),
            "--save-tensor",
            "moe_router,moe_ffn_out,moe_router_indices",
            "--save-tensor-layers",
            "0..3",
            "--tokens",
            ",".join(map(str, TOKENS)),
            "--save-tensor-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.bin"))
    assert written == [
        f"layer-{layer}/{stage}.bin"
        for layer in range(3)
        for stage in ("moe_ffn_out", "moe_router", "moe_router_indices")
    ]
    for layer in range(3):
        file_layer, router = _aprt(out / f"layer-{layer}/moe_router.bin")
        assert file_layer == layer and router.shape == (2,)
        np.testing.assert_allclose(router, expected[(layer, "moe_router")], rtol=1e-5)
        assert router[0] >= router[1] and abs(float(router.sum()) - 1.0) < 1e-6  # renormalized
        _, indices = _aprt(out / f"layer-{layer}/moe_router_indices.bin")
        assert indices.tolist() == [float(e) for e in routing[layer][-1]]  # ids as exact f32
        _, ffn_out = _aprt(out / f"layer-{layer}/moe_ffn_out.bin")
        assert ffn_out.shape == (64,)
        assert (
            disagreements(
                {(layer, "x"): ffn_out},
                {(layer, "x"): expected[(layer, "moe_ffn_out")]},
                max_rel=1e-5,
            )
            == []
        )
    assert WHOLE_MODEL_LAYER not in routing


def _planted(hf_model, change) -> Model:
    """The HF model's weights with `change(arrays)` applied, as an in-memory engine model."""
    base = engine_model(hf_model)
    arrays = {name: base.weights.get(name) for name in base.weights.names()}
    change(arrays)
    return replace(base, weights=DictWeightStore(arrays))


@pytest.mark.parametrize("defect", ["wrong_expert", "router_bias"])
def test_bisect_locates_a_planted_moe_defect(moe, defect, apr_tui, tmp_path):
    """Side B of layer 1 runs the wrong expert's down projection for the expert the last token
    routes to first, or its router favours an expert the last token did not pick (a bias on its
    logit row).
    bisect's first divergence is layer 1 `ffn_out` either way (apr's order puts the MoE stages
    after the residual); the expert ids tell them apart: equal for the wrong expert, differing
    for the router bias (compared as ids, never by cosine)."""
    from engine.formats import apr, gguf

    hf_model, routing, _ = moe
    first = int(routing[1][-1][0])
    unused = int(next(e for e in range(8) if e not in routing[1][-1]))  # the last token's

    def change(arrays):
        prefix = "model.layers.1.mlp."
        if defect == "wrong_expert":
            arrays[f"{prefix}experts.{first}.down_proj.weight"] = arrays[
                f"{prefix}experts.{unused}.down_proj.weight"
            ]
        else:  # a large bias on one unused expert's logit, along the mean input direction
            router = arrays[f"{prefix}gate.weight"]
            router[unused] += 3.0 * np.sign(router.mean(axis=0))

    path_a = gguf.write(engine_model(hf_model), tmp_path / "a.gguf")
    path_b = apr.write(_planted(hf_model, change), tmp_path / "b.apr")
    result = subprocess.run(
        [*apr_tui, "bisect", str(path_a), str(path_b), "--tokens", ",".join(map(str, TOKENS))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    first_line = next(line for line in lines if line.startswith("First propagated divergence"))
    assert "layer 1 ffn_out" in first_line, result.stdout
    header = next(line for line in lines if line.startswith("layer"))
    end = header.index(" r_idx") + len(" r_idx")  # the grid's label; columns right-aligned

    def experts_cell(layer: str) -> str:
        row = next(line for line in lines if line.split()[:1] == [layer])
        return row[header.rindex(" ", 0, end - 1) : end].strip()

    assert experts_cell("0") == "="
    if defect == "wrong_expert":
        assert experts_cell("1") == "=", result.stdout
    else:  # the biased expert takes the first place: both positions change
        assert experts_cell("1") == "≠2", result.stdout
        report = subprocess.run(
            [
                *apr_tui,
                "bisect",
                str(path_a),
                str(path_b),
                "--tokens",
                "5,17,99,3,42,7,127",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        cells = {(c["layer"], c["stage"]): c for c in json.loads(report.stdout)["cells"]}
        ids = cells[(1, "moe_router_indices")]["index_diff"]
        assert ids["equal"] is False and ids["positions"] == [0, 1]
        assert ids["a"] == [int(e) for e in routing[1][-1]] and ids["b"][0] == unused
        assert cells[(0, "moe_router_indices")]["index_diff"]["equal"] is True


def test_routing_matches_torch_topk_order(moe):
    """`route`: softmax, top-k descending, renormalized, as HF's router (on its own logits)."""
    from engine.forward import route

    hf_model, _, _ = moe
    torch.manual_seed(0)
    logits = torch.randn(5, 8)
    probs = torch.softmax(logits, dim=-1)
    top, ids = torch.topk(probs, 2, dim=-1)
    ours_top, ours_ids = route(np, logits.numpy(), 2, renormalize=True)
    np.testing.assert_array_equal(ours_ids, ids.numpy())
    np.testing.assert_allclose(ours_top, (top / top.sum(-1, keepdim=True)).numpy(), rtol=1e-6)
    raw_top, _ = route(np, logits.numpy(), 2, renormalize=False)
    np.testing.assert_allclose(raw_top, top.numpy(), rtol=1e-6)


def test_index_payloads_compare_as_ids_not_values():
    """Experts 3 and 4 are as different as 3 and 100; a non-integral value is no id at all."""
    from engine.stats import index_diff

    same = index_diff(np.array([5.0, 2.0], np.float32), np.array([5.0, 2.0], np.float32))
    assert same.equal and same.positions == () and same.a == (5, 2)
    swapped = index_diff(np.array([5.0, 2.0], np.float32), np.array([2.0, 5.0], np.float32))
    assert not swapped.equal and swapped.positions == (0, 1) and swapped.b == (2, 5)
    near = index_diff(np.array([3.0, 7.0], np.float32), np.array([4.0, 7.0], np.float32))
    assert near.positions == (0,)
    broken = index_diff(np.array([3.5, np.nan], np.float32), np.array([3.5, np.nan], np.float32))
    assert not broken.equal and broken.positions == (0, 1) and broken.a == (-1, -1)


@pytest.mark.parametrize("renormalize", [True, False])
def test_synthesized_moe_written_as_safetensors_loads_in_hf_and_agrees(renormalize, tmp_path):
    """engine.synth's Qwen3-MoE through the engine's safetensors writer into transformers: HF
    reads the config the writer emits (experts, top-k, renormalization) as the engine means it."""
    from transformers import AutoModelForCausalLM

    from engine.formats import safetensors
    from engine.synth import synthesize

    model = synthesize("qwen3_moe", seed=9, num_layers=2, norm_topk_prob=renormalize)
    directory = safetensors.write(model, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    assert (hf_model.config.num_experts, hf_model.config.num_experts_per_tok) == (8, 2)
    assert hf_model.config.norm_topk_prob is renormalize
    tokens = model.tokenizer.encode("What is 2+2? The answer is 4.")
    expected = hf_stage_captures(hf_model, tokens)
    got = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, tokens)}
    assert disagreements(got, expected, max_rel=TINY_MAX_REL_ERR) == []
    total = float(got[(1, "moe_router")].sum())
    assert (abs(total - 1.0) < 1e-6) is renormalize


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_experts_per_tok=9), "9 experts per token of 8 is not a valid routing"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size 0 is not positive"),
    ],
)
@pytest.mark.parametrize("container", ["gguf", "apr"])
def test_a_corrupt_moe_config_is_one_line_naming_the_file(changes, message, container, tmp_path):
    from engine.errors import FormatError
    from engine.formats import apr, gguf, open_model
    from engine.formats.gguf import with_config
    from engine.synth import synthesize

    model = with_config(synthesize("qwen3_moe", seed=2, num_layers=1), **changes)
    writer = gguf if container == "gguf" else apr
    path = writer.write(model, tmp_path / f"bad.{container}")
    with pytest.raises(FormatError) as caught:
        open_model(path)
    assert str(caught.value) == f"{path}: {message}"
    assert "\n" not in str(caught.value)
