"""The stage schema of `apr trace --save-tensor`, and its plan grammar.

The 23 stages in apr's canonical order (`SaveTensorStage::ALL`), which of them are per-layer, the
one alias, the one index-payload stage, and the exact parsing rules and error texts of
`--save-tensor STAGES` and `--save-tensor-layers START..END`
(shared/reference/aprender-formats.md §1.2-§1.4).

apr-tui adds three stages apr does not have, for the steps of Gemma 2/3 that no apr stage
holds: `post_attn_norm` (the norm of the attention output, before the residual add),
`ffn_gelu` (GELU-tanh of the gate, where a SwiGLU model has `ffn_silu`) and `post_ffn_norm`
(the norm of the FFN output, before the residual add). They sit in computation order among
apr's stages (`Stage.index`), are marked `apr=False`, and are never in apr's own lists
(`APR_STAGES`, the valid-stage list of the plan error text), so everything apr writes or
prints for a Llama-family model is unchanged; apr's names keep their meaning (`ffn_swigl` is
the gated product `act(gate) * up`, whichever the activation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import PlanError

WHOLE_MODEL_LAYER = 0xFFFFFFFF
"""Layer index in an APRT header for the whole-model stages (`final_norm`, `lm_head`)."""
WHOLE_MODEL_NAME = "whole-model"
"""How apr's JSON (and apr-tui's reports after it) name the WHOLE_MODEL_LAYER sentinel."""


def layer_name(layer: int) -> int | str:
    """A layer as apr's JSON writes it: the index, or `whole-model` for the sentinel."""
    return WHOLE_MODEL_NAME if layer == WHOLE_MODEL_LAYER else layer


U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class Stage:
    """One capture point of the traced forward pass."""

    name: str
    """Canonical name; also the APRT file name without `.bin`."""
    index: int
    """Position in apr's canonical (computation) order."""
    per_layer: bool
    """False only for `final_norm` and `lm_head`, which are written at the trace root."""
    index_payload: bool = False
    """True for `moe_router_indices`: f32-encoded expert ids, to compare as u32, not by cosine."""
    moe: bool = False
    """Produced only by mixture-of-experts models."""
    apr: bool = True
    """False for apr-tui's own stages (`post_attn_norm`, `ffn_gelu`, `post_ffn_norm`)."""


_STAGE_NAMES = (  # every stage, in computation order
    "embedding",
    "attn_norm",
    "qkv_matmul",
    "qkv_bias",
    "q_post_rope",
    "k_post_rope",
    "attn_scores",
    "attn_softmax",
    "attention",
    "attn_out",
    "post_attn_norm",
    "post_attn_residual",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_silu",
    "ffn_gelu",
    "ffn_swigl",
    "ffn_out",
    "post_ffn_norm",
    "post_ffn_residual",
    "moe_router",
    "moe_ffn_out",
    "moe_router_indices",
    "final_norm",
    "lm_head",
)

EXTENSION_STAGE_NAMES = ("post_attn_norm", "ffn_gelu", "post_ffn_norm")
"""apr-tui's stages that apr has no name for (Gemma's sandwich norms and GELU activation)."""

STAGES: tuple[Stage, ...] = tuple(
    Stage(
        name=name,
        index=index,
        per_layer=name not in ("final_norm", "lm_head"),
        index_payload=name == "moe_router_indices",
        moe=name.startswith("moe_"),
        apr=name not in EXTENSION_STAGE_NAMES,
    )
    for index, name in enumerate(_STAGE_NAMES)
)
"""Every stage apr-tui knows (apr's 23 and its own 3), in computation order."""

APR_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.apr)
"""apr's 23 stages in apr's canonical order (`SaveTensorStage::ALL`)."""

LOGITS_ALL = "logits_all"
"""apr-tui's own whole-model stage: the logits of every position, `[seq, vocab]` token-major,
beside apr's last-token `lm_head`. apr has no such stage, so it is not in STAGES: `all` and
apr's error texts are unchanged, and `trace` writes `logits_all.bin` (layer 0xFFFFFFFF, at the
trace root) only when the stage list names it."""

APR_TUI_STAGES: tuple[Stage, ...] = (Stage(name=LOGITS_ALL, index=len(STAGES), per_layer=False),)
"""Stages apr-tui adds after apr's 23; canonical order continues after `lm_head`."""

STAGE_BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES + APR_TUI_STAGES}

ALIASES: dict[str, str] = {"layer_output": "post_ffn_residual"}
"""The only alias apr accepts. File names always use the canonical name."""

PER_LAYER_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.per_layer)
WHOLE_MODEL_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if not s.per_layer)
DENSE_STAGES: tuple[Stage, ...] = tuple(s for s in APR_STAGES if not s.moe)
"""apr's stages of a dense (non-MoE) Llama-family decoder, in canonical order: the default
columns of a grid (the MoE and apr-tui's own stages join when a model produces them)."""


def stage(name: str) -> Stage:
    """The stage called `name` (canonical or alias, any case). Raises KeyError if unknown."""
    key = name.strip().lower()
    return STAGE_BY_NAME[ALIASES.get(key, key)]


RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
"""What Rust's `str::trim` strips (Unicode White_Space). Python's `str.strip()` also strips
U+001C..U+001F, which Rust keeps, so `.strip(RUST_WHITESPACE)` is used wherever apr trims."""


def rust_trim(text: str) -> str:
    """Rust's `str::trim`."""
    return text.strip(RUST_WHITESPACE)


def rust_debug_str(text: str) -> str:
    """`text` quoted as Rust's `{:?}` prints a `&str` (the quoting apr's error messages use)."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F:
            out.append(f"\\u{{{ord(char):x}}}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def parse_stages(spec: str) -> list[Stage]:
    """Parse a `--save-tensor` argument exactly as apr does.

    `all` (ASCII case-insensitive, alone) is every stage in canonical order (apr's 23 and
    apr-tui's own, which a Llama-family model never produces, so its files are apr's); an empty
    string is no stages; otherwise a comma list of names, each trimmed and lower-cased,
    duplicates kept in order. The unknown-stage error lists apr's 23 names, byte for byte.
    """
    trimmed = rust_trim(spec)
    if trimmed.lower() == "all" and trimmed.isascii():
        return list(STAGES)
    if not trimmed:
        return []
    stages = []
    for raw_token in trimmed.split(","):
        token = rust_trim(raw_token)
        if not token:
            raise PlanError(
                "save-tensor stage list invalid: save-tensor stage cannot be an empty string"
            )
        key = token.lower()
        key = ALIASES.get(key, key)
        if key not in STAGE_BY_NAME:
            valid = ",".join(s.name for s in APR_STAGES)
            raise PlanError(
                "save-tensor stage list invalid: "
                f"unknown save-tensor stage {rust_debug_str(token)}; valid stages: {valid}"
            )
        stages.append(STAGE_BY_NAME[key])
    return stages


_U32_TEXT = re.compile(r"\+?[0-9]+", re.ASCII)


def _parse_u32(side: str) -> int | None:
    """Rust's `u32::from_str` on an already-trimmed side: optional `+`, ASCII digits, < 2**32."""
    if not _U32_TEXT.fullmatch(side):
        return None
    digits = side.lstrip("+").lstrip("0")
    if len(digits) > 10:  # beyond u32 (and int() of 4300+ digits raises): no conversion
        return None
    value = int(digits or "0")
    return value if value <= U32_MAX else None


def parse_layer_range(spec: str) -> tuple[int, int]:
    """Parse a `--save-tensor-layers START..END` argument (END exclusive) exactly as apr does."""
    trimmed = rust_trim(spec)

    def fail(reason: str) -> PlanError:
        return PlanError(f"save-tensor layer range invalid ({rust_debug_str(trimmed)}): {reason}")

    if ".." not in trimmed:
        raise fail("expected `START..END`")
    raw_start, raw_end = trimmed.split("..", 1)
    start = _parse_u32(rust_trim(raw_start))
    if start is None:
        raise fail(f"START {rust_debug_str(raw_start)} is not a valid u32")
    end = _parse_u32(rust_trim(raw_end))
    if end is None:
        raise fail(f"END {rust_debug_str(raw_end)} is not a valid u32")
    if end <= start:
        raise fail(f"END ({end}) must be > START ({start})")
    return start, end


DEFAULT_LAYER_RANGE = "0..1"
"""apr's default `--save-tensor-layers`: layer 0 only."""


@dataclass(frozen=True)
class SaveTensorPlan:
    """Which (stage, layer) captures to write, and where. Built by `SaveTensorPlan.parse`."""

    stages: tuple[Stage, ...]
    layer_start: int
    layer_end: int
    directory: Path

    @classmethod
    def parse(
        cls, stages: str, layers: str = DEFAULT_LAYER_RANGE, directory: str | Path = "."
    ) -> SaveTensorPlan:
        # apr's `from_cli` parses the stage list first, so its error wins when both are bad.
        parsed_stages = tuple(parse_stages(stages))
        start, end = parse_layer_range(layers)
        return cls(parsed_stages, start, end, Path(directory))

    def should_save(self, stage_name: str, layer: int) -> bool:
        """apr's `should_save`: listed, and whole-model or START <= layer < END."""
        selected = STAGE_BY_NAME.get(stage_name)
        if selected is None or selected not in self.stages:
            return False
        if not selected.per_layer:
            return True
        return self.layer_start <= layer < self.layer_end

    def stage_path(self, stage_name: str, layer: int) -> Path:
        return stage_path(self.directory, stage_name, layer)


def stage_path(directory: str | Path, stage_name: str, layer: int) -> Path:
    """`<dir>/layer-<N>/<stage>.bin` for per-layer stages, `<dir>/<stage>.bin` for whole-model."""
    if not STAGE_BY_NAME[stage_name].per_layer:
        return Path(directory, f"{stage_name}.bin")
    return Path(directory, f"layer-{layer}", f"{stage_name}.bin")  # one parse, not three
