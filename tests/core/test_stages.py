"""engine.stages against apr's stage schema and plan grammar (§1.2-§1.4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import PlanError
from engine.stages import (
    ALIASES,
    APR_STAGES,
    DENSE_STAGES,
    EXTENSION_STAGE_NAMES,
    STAGES,
    WHOLE_MODEL_LAYER,
    SaveTensorPlan,
    parse_layer_range,
    parse_stages,
    rust_debug_str,
    stage,
    stage_path,
)

CANONICAL_ORDER = [
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
    "post_attn_residual",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_silu",
    "ffn_swigl",
    "ffn_out",
    "post_ffn_residual",
    "moe_router",
    "moe_ffn_out",
    "moe_router_indices",
    "final_norm",
    "lm_head",
]
VALID_LIST = ",".join(CANONICAL_ORDER)
UNKNOWN_PREFIX = "save-tensor stage list invalid: unknown save-tensor stage "
EMPTY_MESSAGE = "save-tensor stage list invalid: save-tensor stage cannot be an empty string"


def names(stages) -> list[str]:
    return [s.name for s in stages]


# ----------------------------------------------------------------------------- schema (§1.2)


def test_twenty_three_stages_in_canonical_order():
    assert names(APR_STAGES) == CANONICAL_ORDER
    assert all(s.apr for s in APR_STAGES)


ALL_IN_COMPUTATION_ORDER = [
    *CANONICAL_ORDER[:10],
    "post_attn_norm",  # Gemma: the attention output normed before the residual add
    *CANONICAL_ORDER[10:15],
    "ffn_gelu",  # Gemma: GELU-tanh where SwiGLU models have ffn_silu
    *CANONICAL_ORDER[15:17],
    "post_ffn_norm",  # Gemma: the FFN output normed before the residual add
    *CANONICAL_ORDER[17:],
]


def test_apr_tui_stages_sit_in_computation_order_among_aprs():
    assert names(STAGES) == ALL_IN_COMPUTATION_ORDER
    assert [s.index for s in STAGES] == list(range(26))
    assert [s.name for s in STAGES if not s.apr] == list(EXTENSION_STAGE_NAMES)
    assert all(s.per_layer and not s.moe for s in STAGES if not s.apr)


def test_only_final_norm_and_lm_head_are_whole_model():
    whole = [s.name for s in STAGES if not s.per_layer]
    assert whole == ["final_norm", "lm_head"]


def test_index_payload_is_only_moe_router_indices():
    assert [s.name for s in STAGES if s.index_payload] == ["moe_router_indices"]


def test_dense_stages_drop_the_three_moe_stages():
    assert names(DENSE_STAGES) == [n for n in CANONICAL_ORDER if not n.startswith("moe_")]
    assert len(DENSE_STAGES) == 20


def test_layer_output_is_the_only_alias():
    assert ALIASES == {"layer_output": "post_ffn_residual"}
    assert stage("layer_output").name == "post_ffn_residual"
    assert stage("  FFN_Gate ").name == "ffn_gate"
    with pytest.raises(KeyError):
        stage("not_a_stage")


def test_sentinel_is_u32_max():
    assert WHOLE_MODEL_LAYER == 0xFFFFFFFF


# ----------------------------------------------------------------------------- stage list (§1.4)


@pytest.mark.parametrize("spec", ["all", "ALL", "All", "aLL", "  all\t", "\nALL "])
def test_all_is_case_insensitive_and_trimmed(spec):
    assert names(parse_stages(spec)) == ALL_IN_COMPUTATION_ORDER


def test_extension_stages_parse_but_the_error_lists_only_aprs():
    assert names(parse_stages("post_attn_norm, FFN_GELU,post_ffn_norm")) == list(
        EXTENSION_STAGE_NAMES
    )
    with pytest.raises(PlanError) as caught:
        parse_stages("ffn_geglu")
    assert str(caught.value) == f'{UNKNOWN_PREFIX}"ffn_geglu"; valid stages: {VALID_LIST}'


def test_all_is_only_valid_alone():
    with pytest.raises(PlanError) as caught:
        parse_stages("all,embedding")
    assert str(caught.value) == f'{UNKNOWN_PREFIX}"all"; valid stages: {VALID_LIST}'


def test_non_ascii_lookalike_of_all_is_unknown():
    # a Cyrillic "а" is not ASCII: eq_ignore_ascii_case rejects it, so it is an unknown stage
    with pytest.raises(PlanError) as caught:
        parse_stages("\u0430ll")  # Cyrillic a
    assert str(caught.value) == f'{UNKNOWN_PREFIX}"\u0430ll"; valid stages: {VALID_LIST}'


@pytest.mark.parametrize("spec", ["", "   ", "\t\n"])
def test_empty_string_means_no_stages(spec):
    assert parse_stages(spec) == []


@pytest.mark.parametrize("spec", ["embedding,,ffn_gate", "embedding,", ",embedding", "a, ,b"])
def test_empty_token_is_rejected(spec):
    with pytest.raises(PlanError) as caught:
        parse_stages(spec)
    if spec == "a, ,b":
        # parsing stops at the first bad token: `a` is unknown before the empty one
        assert str(caught.value).startswith(f'{UNKNOWN_PREFIX}"a";')
    else:
        assert str(caught.value) == EMPTY_MESSAGE


def test_tokens_are_trimmed_and_lowercased():
    assert names(parse_stages(" Embedding , FFN_GATE ,ffn_swigl")) == [
        "embedding",
        "ffn_gate",
        "ffn_swigl",
    ]


def test_duplicates_are_kept_in_order():
    assert names(parse_stages("ffn_out,embedding,ffn_out,layer_output")) == [
        "ffn_out",
        "embedding",
        "ffn_out",
        "post_ffn_residual",
    ]


def test_unknown_stage_message_quotes_the_trimmed_token_in_original_case():
    with pytest.raises(PlanError) as caught:
        parse_stages("embedding,  Not_A_Stage ,ffn_gate")
    assert str(caught.value) == f'{UNKNOWN_PREFIX}"Not_A_Stage"; valid stages: {VALID_LIST}'


def test_unknown_stage_is_rust_debug_quoted():
    with pytest.raises(PlanError) as caught:
        parse_stages('bad"na\\me\x01')
    assert str(caught.value).startswith(f'{UNKNOWN_PREFIX}"bad\\"na\\\\me\\u{{1}}";')


def test_rust_trim_does_not_strip_information_separators():
    # Python's str.strip() removes U+001F, Rust's trim() keeps it: apr rejects this token.
    with pytest.raises(PlanError) as caught:
        parse_stages("\x1fembedding")
    assert '"\\u{1f}embedding"' in str(caught.value)
    # ... while Unicode White_Space (NBSP, ideographic space) is trimmed like Rust does.
    assert names(parse_stages("\xa0embedding\u3000")) == ["embedding"]


def test_rust_debug_str_escapes():
    assert rust_debug_str("a\tb\nc\r\0") == '"a\\tb\\nc\\r\\0"'
    assert rust_debug_str("\x7f\x85") == '"\\u{7f}\\u{85}"'
    assert rust_debug_str("it's") == '"it\'s"'


# ----------------------------------------------------------------------------- layer range (§1.4)


def range_error(spec: str, got: str, reason: str) -> None:
    with pytest.raises(PlanError) as caught:
        parse_layer_range(spec)
    assert str(caught.value) == f"save-tensor layer range invalid ({got}): {reason}"


def test_range_examples_that_parse():
    assert parse_layer_range("0..1") == (0, 1)
    assert parse_layer_range(" 3..7 ") == (3, 7)
    assert parse_layer_range("0..32") == (0, 32)
    assert parse_layer_range("3 .. 7") == (3, 7)


def test_plus_sign_is_accepted_like_rust():
    assert parse_layer_range("+3..+5") == (3, 5)


def test_leading_zeros_are_accepted():
    assert parse_layer_range("007..010") == (7, 10)


def test_u32_bounds():
    assert parse_layer_range("0..4294967295") == (0, 4294967295)
    range_error("0..4294967296", '"0..4294967296"', 'END "4294967296" is not a valid u32')


def test_no_dotdot():
    range_error("0-3", '"0-3"', "expected `START..END`")


def test_negative_start():
    range_error("-1..3", '"-1..3"', 'START "-1" is not a valid u32')


def test_underscore_is_rejected_unlike_python_int():
    range_error("1_0..20", '"1_0..20"', 'START "1_0" is not a valid u32')


def test_lone_plus_and_empty_side():
    range_error("+..3", '"+..3"', 'START "+" is not a valid u32')
    range_error("..3", '"..3"', 'START "" is not a valid u32')
    range_error("3..", '"3.."', 'END "" is not a valid u32')


def test_end_not_greater_than_start():
    range_error("5..5", '"5..5"', "END (5) must be > START (5)")
    range_error("10..3", '"10..3"', "END (3) must be > START (10)")


def test_garbage_end():
    range_error("0..abc", '"0..abc"', 'END "abc" is not a valid u32')


def test_inclusive_range_syntax_fails_at_end():
    range_error("3..=5", '"3..=5"', 'END "=5" is not a valid u32')


def test_split_is_at_the_first_dotdot():
    range_error("1..2..3", '"1..2..3"', 'END "2..3" is not a valid u32')


def test_sides_are_shown_untrimmed_and_input_trimmed():
    range_error("  x ..3 ", '"x ..3"', 'START "x " is not a valid u32')


def test_non_ascii_digits_are_rejected():
    range_error("\u0663..5", '"\u0663..5"', 'START "\u0663" is not a valid u32')  # Arabic 3


# ----------------------------------------------------------------------------- plan (§1.3-§1.4)


def test_default_range_is_layer_zero_only():
    plan = SaveTensorPlan.parse("embedding")
    assert (plan.layer_start, plan.layer_end) == (0, 1)
    assert plan.should_save("embedding", 0)
    assert not plan.should_save("embedding", 1)


def test_per_layer_selection_is_end_exclusive():
    plan = SaveTensorPlan.parse("ffn_gate", "0..3")
    assert [plan.should_save("ffn_gate", layer) for layer in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert not plan.should_save("attention", 0)


def test_whole_model_stage_ignores_the_range():
    plan = SaveTensorPlan.parse("lm_head", "5..7")
    assert plan.should_save("lm_head", 0)
    assert plan.should_save("lm_head", 99)
    assert plan.should_save("lm_head", WHOLE_MODEL_LAYER)
    assert not plan.should_save("final_norm", 0)


def test_embedding_needs_layer_zero_in_range():
    plan = SaveTensorPlan.parse("embedding,attn_norm", "1..4")
    assert not plan.should_save("embedding", 0)
    assert plan.should_save("attn_norm", 1)


def test_empty_plan_saves_nothing():
    plan = SaveTensorPlan.parse("", "0..10")
    assert plan.stages == ()
    assert not plan.should_save("embedding", 0)
    assert not plan.should_save("lm_head", 0)


def test_stage_errors_win_over_range_errors_like_apr():
    with pytest.raises(PlanError) as caught:
        SaveTensorPlan.parse("nope", "0-3")
    assert "unknown save-tensor stage" in str(caught.value)


def test_stage_paths():
    root = Path("trace_out")
    assert stage_path(root, "embedding", 0) == root / "layer-0" / "embedding.bin"
    assert stage_path(root, "ffn_gate", 3) == root / "layer-3" / "ffn_gate.bin"
    assert stage_path(root, "ffn_gate", 12) == root / "layer-12" / "ffn_gate.bin"
    assert stage_path(root, "lm_head", 5) == root / "lm_head.bin"
    assert stage_path(root, "final_norm", WHOLE_MODEL_LAYER) == root / "final_norm.bin"
    plan = SaveTensorPlan.parse("all", "0..2", "out")
    assert plan.stage_path("attn_out", 1) == Path("out/layer-1/attn_out.bin")
