"""Our table of GGML types (engine.formats.ggml_types, kept so that reading a model does not
import the `gguf` package) against the installed `gguf` package, the independent source."""

from __future__ import annotations

import subprocess
import sys

import gguf

from engine.formats.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType


def test_every_type_has_gguf_py_id_name_and_block_layout():
    for qtype in GGMLQuantizationType:
        theirs = gguf.GGMLQuantizationType(int(qtype))
        assert theirs.name == qtype.name
        assert GGML_QUANT_SIZES[qtype] == gguf.GGML_QUANT_SIZES[theirs], qtype.name


def test_members_are_interchangeable_with_gguf_py_members():
    assert GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K] == (256, 144)
    assert gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0] == (32, 34)


def test_opening_a_gguf_of_common_types_does_not_import_the_gguf_package(smollm2_gguf):
    code = (
        "import sys\n"
        "from engine.formats import open_model\n"
        f"model = open_model({str(smollm2_gguf)!r})\n"
        "model.weights.get('model.layers.0.mlp.up_proj.weight')\n"
        "print(sorted(m for m in sys.modules if m == 'gguf' or m.startswith('gguf.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"
