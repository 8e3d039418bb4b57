"""Another engine's tensor dumps as a trace source, through a name map.

Anyone writing their own engine (Rust, C++, CUDA) can dump intermediate tensors as `.npy` files,
`.npz` archives or safetensors files under their own names and layouts. A *name map* says which
of their names holds which apr stage and how to bring it to apr's token-major layout
(shared/reference/aprender-formats.md §5); then the dump compares like any trace.

Name map (TOML or JSON; README "Name map"): one table per apr stage,

    base = "hf"                      # optional: start from a built-in map (hf | llama.cpp)
    [stages.attn_norm]
    name = "blk.{layer}.attn_norm"   # their name; {layer} matches the layer number
    transpose = [1, 0]               # optional: numpy axes order, applied first
    [stages.qkv_matmul]
    names = ["blk.{layer}.q", "blk.{layer}.k", "blk.{layer}.v"]   # concatenated per token
    [stages.q_post_rope]
    name = "blk.{layer}.q_rope"
    layout = "head_major"            # [heads, seq, head_dim] -> [seq, heads * head_dim]
    pairs = "adjacent"               # RoPE pairs (2i, 2i+1) -> apr/HF halves (i, i + hd/2)

Options of a stage, applied to each named tensor in this order: `squeeze` (drop leading axes of
size 1, e.g. a batch axis), `transpose`, `pairs` (on the last axis, which must be head_dim, or
give `head_dim`), `layout`, `crop_seq` (cut the last axis to the prompt length, e.g. padded KV
cells), `rows = "last"` (keep the last position only), `scale` (multiply), then the parts are
joined along the last axis and `reshape` (a list, -1 allowed) gives the final shape.

The dump's files are read by engine.sources.tensor_files (bounded, float payloads only, never
pickles); this module says which of their tensors is which stage.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import AprTuiError, FormatError
from engine.fileio import open_regular
from engine.forward import Capture
from engine.sources.base import TraceSource, in_run
from engine.sources.tensor_files import index_dump
from engine.stages import STAGE_BY_NAME, STAGES, WHOLE_MODEL_LAYER

MAX_MAP_BYTES = 1024 * 1024
"""Largest name-map file read."""

STAGE_OPTIONS = frozenset(
    {
        "name",
        "names",
        "squeeze",
        "transpose",
        "pairs",
        "head_dim",
        "layout",
        "crop_seq",
        "rows",
        "scale",
        "reshape",
    }
)
"""Keys a stage table of a name map may have; any other is an error (a typo must not pass)."""


# ------------------------------------------------------------------------------ name maps


@dataclass(frozen=True)
class StageRule:
    """How one apr stage is read from a dump."""

    stage: str
    names: tuple[str, ...]
    squeeze: bool = False
    transpose: tuple[int, ...] | None = None
    pairs: str = "half"
    head_dim: int | None = None
    layout: str = "token_major"
    crop_seq: bool = False
    rows: str = "all"
    scale: float | None = None
    reshape: tuple[int, ...] | None = None

    @property
    def per_layer(self) -> bool:
        return any("{layer}" in name for name in self.names)


def _pattern(name: str) -> re.Pattern[str]:
    """Their name with `{layer}` → a regex capturing the layer number."""
    parts = name.split("{layer}")
    return re.compile("(?P<layer>0|[1-9][0-9]*)".join(re.escape(p) for p in parts))


_HF_LAYER = "model.layers.{layer}"

BUILTIN_MAPS: dict[str, dict[str, dict[str, Any]]] = {
    "hf": {
        "embedding": {"name": "model.embed_tokens"},
        "attn_norm": {"name": f"{_HF_LAYER}.input_layernorm"},
        "qkv_matmul": {
            "names": [f"{_HF_LAYER}.self_attn.{p}_proj" for p in ("q", "k", "v")],
        },
        "attention": {"name": f"{_HF_LAYER}.self_attn.o_proj:input"},
        "attn_out": {"name": f"{_HF_LAYER}.self_attn.o_proj"},
        "post_attn_residual": {"name": f"{_HF_LAYER}.post_attention_layernorm:input"},
        "ffn_norm": {"name": f"{_HF_LAYER}.post_attention_layernorm"},
        "ffn_gate": {"name": f"{_HF_LAYER}.mlp.gate_proj"},
        "ffn_up": {"name": f"{_HF_LAYER}.mlp.up_proj"},
        "ffn_silu": {"name": f"{_HF_LAYER}.mlp.act_fn"},
        "ffn_swigl": {"name": f"{_HF_LAYER}.mlp.down_proj:input"},
        "ffn_out": {"name": f"{_HF_LAYER}.mlp.down_proj"},
        "post_ffn_residual": {"name": _HF_LAYER},
        "final_norm": {"name": "model.norm"},
        "lm_head": {"name": "lm_head", "rows": "last"},
    },
    "llama.cpp": {
        "embedding": {"name": "embd"},
        "attn_norm": {"name": "attn_norm-{layer}"},
        "q_post_rope": {"name": "Qcur-{layer}", "pairs": "adjacent"},
        "k_post_rope": {"name": "Kcur-{layer}", "pairs": "adjacent"},
        "attn_softmax": {"name": "kq_soft_max-{layer}", "crop_seq": True},
        "attention": {"name": "kqv_out-{layer}"},
        "attn_out": {"name": "attn_out-{layer}"},
        "post_attn_residual": {"name": "ffn_inp-{layer}"},
        "ffn_norm": {"name": "ffn_norm-{layer}"},
        "ffn_gate": {"name": "ffn_gate-{layer}"},
        "ffn_up": {"name": "ffn_up-{layer}"},
        "ffn_swigl": {"name": "ffn_swiglu-{layer}"},
        "ffn_out": {"name": "ffn_out-{layer}"},
        "post_ffn_residual": {"name": "l_out-{layer}"},
        "final_norm": {"name": "result_norm"},
        "lm_head": {"name": "result_output"},
    },
}
"""Built-in maps. `hf`: PyTorch module paths of an HF Llama-family model, a module's output under
its path and its input under `<path>:input`, each `[1, seq, ...]` (the batch axis squeezed);
q/k/v_proj outputs include a bias where the model has one. `llama.cpp`: ggml graph node names as
an eval-callback dump keys them (row-major, `ne` reversed; the last node of a name wins, so
`Qcur-N` is the RoPE output), for Llama-family GGUFs (adjacent RoPE pairs; Qwen2/Qwen3 graphs
need `pairs = "half"`); `kq-N` is left out because it needs the softmax's scale (map it with
`scale` and `crop_seq` yourself); `lm_head` is `[seq, vocab]`."""

for _table in BUILTIN_MAPS.values():
    for _rule in _table.values():
        _rule.setdefault("squeeze", True)


def _bad(source: str, reason: str) -> FormatError:
    return FormatError(f"{source}: {reason}")


def _int_list(value: Any, key: str, source: str, allow_negative: bool) -> tuple[int, ...]:
    low = -1 if allow_negative else 0
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value
    ):
        raise _bad(source, f"{key} must be a list of integers")
    return tuple(value)


def parse_rules(table: dict[str, Any], source: str) -> dict[str, StageRule]:
    """Validated stage rules from a map's `stages` table (any defect names the map file)."""
    if not isinstance(table, dict):
        raise _bad(source, '"stages" must be a table of stage names')
    rules: dict[str, StageRule] = {}
    for stage_name, spec in table.items():
        if stage_name not in STAGE_BY_NAME:
            raise _bad(source, f"unknown stage {stage_name!r}")
        where = f"stages.{stage_name}"
        if not isinstance(spec, dict):
            raise _bad(source, f"{where} must be a table")
        unknown = set(spec) - STAGE_OPTIONS
        if unknown:
            raise _bad(source, f"{where}: unknown option {sorted(unknown)[0]!r}")
        if ("name" in spec) == ("names" in spec):
            raise _bad(source, f"{where}: give exactly one of name / names")
        names = [spec["name"]] if "name" in spec else spec["names"]
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise _bad(source, f"{where}: names must be non-empty strings")
        per_layer = STAGE_BY_NAME[stage_name].per_layer and stage_name != "embedding"
        for name in names:
            if ("{layer}" in name) != per_layer:
                need = "needs" if per_layer else "must not have"
                raise _bad(source, f"{where}: {name!r} {need} a {{layer}} placeholder")
        pairs = spec.get("pairs", "half")
        layout = spec.get("layout", "token_major")
        rows = spec.get("rows", "all")
        if pairs not in ("half", "adjacent"):
            raise _bad(source, f'{where}: pairs must be "half" or "adjacent"')
        if layout not in ("token_major", "head_major"):
            raise _bad(source, f'{where}: layout must be "token_major" or "head_major"')
        if rows not in ("all", "last"):
            raise _bad(source, f'{where}: rows must be "all" or "last"')
        scale = spec.get("scale")
        if scale is not None and (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
        ):
            raise _bad(source, f"{where}: scale must be a finite number")
        head_dim = spec.get("head_dim")
        if head_dim is not None and (
            isinstance(head_dim, bool)
            or not isinstance(head_dim, int)
            or head_dim < 2
            or head_dim % 2
        ):
            raise _bad(source, f"{where}: head_dim must be an even integer >= 2")
        for flag in ("squeeze", "crop_seq"):
            if not isinstance(spec.get(flag, False), bool):
                raise _bad(source, f"{where}: {flag} must be true or false")
        rules[stage_name] = StageRule(
            stage=stage_name,
            names=tuple(names),
            squeeze=spec.get("squeeze", False),
            transpose=(
                None
                if "transpose" not in spec
                else _int_list(spec["transpose"], f"{where}.transpose", source, False)
            ),
            pairs=pairs,
            head_dim=head_dim,
            layout=layout,
            crop_seq=spec.get("crop_seq", False),
            rows=rows,
            scale=None if scale is None else float(scale),
            reshape=(
                None
                if "reshape" not in spec
                else _int_list(spec["reshape"], f"{where}.reshape", source, True)
            ),
        )
    return rules


def load_name_map(spec: str | os.PathLike[str]) -> dict[str, StageRule]:
    """A built-in map by name (`hf`, `llama.cpp`) or a TOML / JSON map file."""
    text_spec = os.fspath(spec)
    if text_spec in BUILTIN_MAPS:
        return parse_rules(BUILTIN_MAPS[text_spec], f"built-in map {text_spec}")
    path = Path(text_spec)
    try:
        with open_regular(path) as handle:
            raw = handle.read(MAX_MAP_BYTES + 1)
    except FileNotFoundError:
        known = ", ".join(BUILTIN_MAPS)
        raise FormatError(f"{path}: no such name-map file (built-in maps: {known})") from None
    except OSError as error:
        raise FormatError(f"{path}: cannot read the name map: {error}") from None
    if len(raw) > MAX_MAP_BYTES:
        raise _bad(str(path), f"name map larger than {MAX_MAP_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        document = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise _bad(str(path), f"not a valid name map: {str(error).splitlines()[0]}") from None
    if not isinstance(document, dict):
        raise _bad(str(path), "a name map is a table with a stages table")
    unknown = set(document) - {"base", "stages"}
    if unknown:
        raise _bad(str(path), f"unknown top-level key {sorted(unknown)[0]!r}")
    table: dict[str, Any] = {}
    base = document.get("base")
    if base is not None:
        if base not in BUILTIN_MAPS:
            raise _bad(str(path), f"base {base!r}: built-in maps are {', '.join(BUILTIN_MAPS)}")
        table.update({k: dict(v) for k, v in BUILTIN_MAPS[base].items()})
    stages = document.get("stages", {})
    if not isinstance(stages, dict):
        raise _bad(str(path), '"stages" must be a table of stage names')
    table.update(stages)
    if not table:
        raise _bad(str(path), "the name map maps no stage")
    return parse_rules(table, str(path))


# ---------------------------------------------------------------------------- transforms


def _halves_from_adjacent(values: np.ndarray, head_dim: int | None, where: str) -> np.ndarray:
    """Last-axis RoPE order (2i, 2i+1) → (i, i + hd/2), per head."""
    if head_dim is None:
        head_dim = values.shape[-1]
    if head_dim % 2 or values.shape[-1] % head_dim:
        raise AprTuiError(f"{where}: last axis {values.shape[-1]} is not heads × even head_dim")
    lead = values.shape[:-1]
    heads = values.shape[-1] // head_dim
    split = values.reshape(*lead, heads, head_dim // 2, 2)
    return np.swapaxes(split, -1, -2).reshape(values.shape)


def apply_rule_part(values: np.ndarray, rule: StageRule, seq: int | None, where: str) -> np.ndarray:
    """One named tensor through a rule's per-tensor transforms (module docstring order)."""
    if rule.squeeze:
        while values.ndim > 1 and values.shape[0] == 1:
            values = values[0]
    if rule.transpose is not None:
        if sorted(rule.transpose) != list(range(values.ndim)):
            raise AprTuiError(
                f"{where}: transpose {list(rule.transpose)} does not fit shape {values.shape}"
            )
        values = values.transpose(rule.transpose)
    if rule.pairs == "adjacent":
        values = _halves_from_adjacent(values, rule.head_dim, where)
    if rule.layout == "head_major":
        if values.ndim != 3:
            raise AprTuiError(
                f"{where}: head_major needs [heads, seq, head_dim], got {values.shape}"
            )
        values = values.transpose(1, 0, 2).reshape(values.shape[1], -1)  # [seq, heads * hd]
    if rule.crop_seq:
        if seq is None:
            raise AprTuiError(f"{where}: crop_seq needs the token ids (tokens.json)")
        values = values[..., :seq]
    if rule.rows == "last":
        values = values[..., -1, :] if values.ndim >= 2 else values
    if rule.scale is not None:
        values = values * np.float32(rule.scale)
    return values


def apply_rule(parts: list[np.ndarray], rule: StageRule, where: str) -> np.ndarray:
    """Join a rule's transformed parts along the last axis and give the final shape."""
    if len(parts) == 1:
        values = parts[0]
    else:
        rows = parts[0].shape[0] if parts[0].ndim > 1 else 1
        try:
            values = np.concatenate([p.reshape(rows, -1) for p in parts], axis=-1)
        except ValueError:
            shapes = [p.shape for p in parts]
            raise AprTuiError(f"{where}: parts {shapes} cannot be joined per token") from None
    if rule.reshape is not None:
        try:
            values = values.reshape(rule.reshape)
        except ValueError:
            raise AprTuiError(
                f"{where}: cannot reshape {values.shape} to {list(rule.reshape)}"
            ) from None
    return np.ascontiguousarray(values, dtype=np.float32)


# ------------------------------------------------------------------------------- source


class DumpSource(TraceSource):
    """A tensor dump read through a name map, stage by stage, in computation order."""

    kind = "dump"

    def __init__(
        self,
        path: str | os.PathLike[str],
        name_map: str | os.PathLike[str] = "hf",
        *,
        token_ids: list[int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.map_spec = os.fspath(name_map)
        self.rules = load_name_map(name_map)
        self.index = index_dump(self.path)
        if token_ids is None and self.path.is_dir() and (self.path / "tokens.json").is_file():
            from engine.trace_directory import read_tokens_json

            token_ids = read_tokens_json(self.path / "tokens.json").token_ids
        self.token_ids = None if token_ids is None else [int(t) for t in token_ids]
        self.prompt = None
        self.entries: dict[tuple[int, str], list[str]] = self._resolve()
        if not self.entries:
            raise FormatError(
                f"{self.path}: no tensor matches the name map {self.map_spec} "
                f"(first names in the dump: {', '.join(sorted(self.index)[:3])})"
            )
        layers = [layer for layer, _ in self.entries if layer != WHOLE_MODEL_LAYER]
        self.num_layers = max(layers) + 1 if layers else 0
        present = {stage for _, stage in self.entries}
        self.stages = tuple(s.name for s in STAGES if s.name in present)
        self.not_produced = {
            s.name: f"not in the dump under the name map {self.map_spec}"
            for s in STAGES
            if s.name not in present
        }
        mapped = {name for names in self.entries.values() for name in names}
        self.unmapped = sorted(set(self.index) - mapped)
        """Tensors of the dump no rule uses (listed, not an error)."""
        self.label = f"dump:{self.path.name}"
        self.description = (
            f"{self.path} (tensor dump, {len(self.index)} tensors, name map {self.map_spec}, "
            f"{len(self.entries)} stage tensors)"
        )
        self._lock = threading.Lock()

    def _resolve(self) -> dict[tuple[int, str], list[str]]:
        """(layer, stage) → their names, for every rule whose names are all in the dump."""
        found: dict[tuple[int, str], list[str]] = {}
        for stage_name, rule in self.rules.items():
            if not rule.per_layer:
                if all(name in self.index for name in rule.names):
                    layer = 0 if STAGE_BY_NAME[stage_name].per_layer else WHOLE_MODEL_LAYER
                    found[(layer, stage_name)] = list(rule.names)
                continue
            first = _pattern(rule.names[0])
            for name in self.index:
                match = first.fullmatch(name)
                if match is None:
                    continue
                layer = int(match.group("layer"))
                if layer >= WHOLE_MODEL_LAYER:
                    continue
                names = [n.replace("{layer}", str(layer)) for n in rule.names]
                if all(n in self.index for n in names):
                    found[(layer, stage_name)] = names
        return dict(sorted(found.items(), key=lambda kv: (kv[0][0], STAGE_BY_NAME[kv[0][1]].index)))

    def record(self) -> dict[str, Any]:
        return {
            "engine": "tensor dump",
            "model": str(self.path),
            "settings": {"name_map": self.map_spec},
            "not_produced": dict(self.not_produced),
            "unmapped_tensors": self.unmapped[:100],
        }

    def _load(self, layer: int, stage_name: str) -> np.ndarray:
        rule = self.rules[stage_name]
        names = self.entries[(layer, stage_name)]
        seq = None if self.token_ids is None else len(self.token_ids)
        parts = []
        for name in names:
            values = self.index[name][1]()
            parts.append(apply_rule_part(values, rule, seq, f"{self.path}: {name}"))
        return apply_rule(parts, rule, f"{self.path}: {names[0]}")

    def captures(
        self,
        layers: range | None = None,
        cancel: threading.Event | None = None,
        whole_model: bool = True,
    ) -> Iterator[Capture]:
        for layer, stage_name in self.entries:
            if cancel is not None and cancel.is_set():
                return
            if not in_run(layer, layers, whole_model):
                continue
            values = self._load(layer, stage_name)
            yield Capture(layer, stage_name, values, tuple(values.shape))

    def tensor(self, layer: int, stage_name: str) -> np.ndarray | None:
        if (layer, stage_name) not in self.entries:
            return None
        return self._load(layer, stage_name)
