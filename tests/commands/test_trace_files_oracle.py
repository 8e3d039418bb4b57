"""`apr-tui trace`'s files read by a second, independent reader and checked against HF.

The reader below is written from the format description alone (§1.1: b"APRT", u32 LE layer,
u32 LE count, count f32 LE values, nothing else): it shares no code with engine.aprt. The
values it reads must be what HF transformers computes for the same safetensors model, and each
file must be byte for byte what an independent writer of the same values would produce.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tests.commands.conftest import run_cli

TOKENS = [3, 17, 42, 100, 5]
WHOLE_MODEL = 0xFFFFFFFF


def read_aprt_struct(path: Path) -> tuple[int, np.ndarray]:
    """(layer, values) by struct alone."""
    data = path.read_bytes()
    magic, layer, count = struct.unpack_from("<4sII", data, 0)
    assert magic == b"APRT"
    assert len(data) == 12 + 4 * count  # no trailing bytes from our writer
    values = np.array(struct.unpack_from(f"<{count}f", data, 12), dtype=np.float32)
    return layer, values


def write_aprt_struct(layer: int, values: np.ndarray) -> bytes:
    """What a second writer produces for the same values."""
    flat = values.astype(np.float32).reshape(-1)
    return struct.pack("<4sII", b"APRT", layer, flat.size) + struct.pack(f"<{flat.size}f", *flat)


@pytest.fixture(scope="module")
def hf_norms(models) -> dict[str, np.ndarray]:
    """Layer 0's input_layernorm and the final norm outputs of HF's own modules."""
    import torch  # the oracle: in the test extra, never skipped
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        models.hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    captured: dict[str, np.ndarray] = {}

    def keep(name):
        return lambda module, args, output: captured.__setitem__(name, output[0].numpy().copy())

    model.model.layers[0].input_layernorm.register_forward_hook(keep("attn_norm"))
    model.model.norm.register_forward_hook(keep("final_norm"))
    with torch.no_grad():
        model(torch.tensor([TOKENS]))
    return captured  # each [seq, hidden]


def test_trace_files_match_hf_and_a_second_writer(apr_tui, models, hf_norms, tmp_path):
    out = tmp_path / "trace"
    argv = [*apr_tui, "trace", str(models.hf_dir), "--save-tensor", "attn_norm,final_norm"]
    argv += ["--tokens", ",".join(map(str, TOKENS)), "--save-tensor-dir", str(out)]
    result = run_cli(argv)
    assert result.returncode == 0, result.stderr

    layer, attn_norm = read_aprt_struct(out / "layer-0" / "attn_norm.bin")
    assert layer == 0
    whole, final_norm = read_aprt_struct(out / "final_norm.bin")
    assert whole == WHOLE_MODEL

    # token-major [seq, hidden] rows, as HF's [seq, hidden] output
    expected = hf_norms["attn_norm"]
    assert attn_norm.shape == (len(TOKENS) * 64,)
    # Same float32 RMSNorm arithmetic on the same weights; the bound allows a few ulps of
    # summation-order difference in the mean of squares (|values| are O(1)).
    np.testing.assert_allclose(attn_norm.reshape(expected.shape), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        final_norm.reshape(hf_norms["final_norm"].shape), hf_norms["final_norm"], rtol=0, atol=1e-4
    )
    assert (out / "layer-0" / "attn_norm.bin").read_bytes() == write_aprt_struct(0, attn_norm)
    assert (out / "final_norm.bin").read_bytes() == write_aprt_struct(WHOLE_MODEL, final_norm)
