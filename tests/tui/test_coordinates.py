"""Top-K coordinates of the fused attention stages, checked against hand-computed positions.

The layout used throughout: 4 query heads, 2 KV heads, head_dim 16 (the small demo model), so
Q is columns 0..63, K 64..95 and V 96..127 of `qkv_matmul` [seq, 128].
"""

from __future__ import annotations

import pytest

from aprtui.coordinates import decode_index
from aprtui.screens.cell_detail import CellDetailScreen
from engine.demo import SMALL_DIMS
from engine.heads import HeadLayout
from tests.tui.conftest import SIZE, explorer, settle
from tests.tui.test_cell_detail import open_cell, table_rows

HEADS = HeadLayout(num_heads=4, num_kv_heads=2, head_dim=16)
TOKENS = (10, 11, 12, 13, 14, 15, 16)


def token_text(token_id: int) -> str:
    return f"Ġt{token_id}"


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        (3 * 128 + 37, "token 3, Q head 2, dim 5"),  # 37 = 2 * 16 + 5
        (0 * 128 + 0, "token 0, Q head 0, dim 0"),
        (0 * 128 + 63, "token 0, Q head 3, dim 15"),  # the last Q column
        (0 * 128 + 64, "token 0, K kv head 0, dim 0"),  # the first K column
        (6 * 128 + 95, "token 6, K kv head 1, dim 15"),  # 95 - 64 = 31 = 1 * 16 + 15
        (2 * 128 + 96, "token 2, V kv head 0, dim 0"),  # the first V column
        (2 * 128 + 116, "token 2, V kv head 1, dim 4"),  # 116 - 96 = 20 = 1 * 16 + 4
        (1 * 128 + 127, "token 1, V kv head 1, dim 15"),
    ],
)
@pytest.mark.parametrize("stage", ["qkv_matmul", "qkv_bias"])
def test_fused_qkv_columns_split_into_part_head_and_dim(stage, index, expected):
    assert decode_index(index, stage, (7, 128), (), None, HEADS) == expected


@pytest.mark.parametrize(
    ("stage", "shape", "index", "expected"),
    [
        ("q_post_rope", (7, 64), 5 * 64 + 49, "token 5, head 3, dim 1"),
        ("attention", (7, 64), 0 * 64 + 16, "token 0, head 1, dim 0"),
        ("k_post_rope", (7, 32), 4 * 32 + 17, "token 4, kv head 1, dim 1"),
        ("k_post_rope", (7, 32), 6 * 32 + 15, "token 6, kv head 0, dim 15"),
    ],
)
def test_per_head_stages_decode_token_head_and_dim(stage, shape, index, expected):
    assert decode_index(index, stage, shape, (), None, HEADS) == expected


def test_flat_tensors_are_split_by_the_token_count():
    # a trace file without a model config: 7 tokens × 128 values, flat
    assert decode_index(3 * 128 + 37, "qkv_matmul", (896,), TOKENS, None, None) == (
        "token 3, channel 37"
    )
    # and with a layout that matches the recovered width, the heads are decoded too
    assert decode_index(3 * 128 + 37, "qkv_matmul", (896,), TOKENS, None, HEADS) == (
        "token 3, Q head 2, dim 5"
    )
    # attention matrices: 4 heads × 7 queries × 7 keys
    assert decode_index(2 * 49 + 5 * 7 + 6, "attn_softmax", (196,), TOKENS, None, None) == (
        "head 2, query 5, key 6"
    )
    # a count the tokens do not divide stays a flat index
    assert decode_index(12, "attn_norm", (100,), TOKENS, None, None) == "[12]"


def test_token_text_is_kept_in_front_of_the_head():
    where = decode_index(3 * 128 + 37, "qkv_matmul", (7, 128), TOKENS, token_text, HEADS)
    assert where == "token 3 '␣t13', Q head 2, dim 5"


def test_unknown_or_mismatched_layout_falls_back_to_channel():
    assert decode_index(3 * 128 + 37, "qkv_matmul", (7, 128), (), None, None) == (
        "token 3, channel 37"
    )
    # a layout that does not match the tensor's width is not trusted
    assert decode_index(3 * 100 + 37, "qkv_matmul", (7, 100), (), None, HEADS) == (
        "token 3, channel 37"
    )
    # stages without heads keep (token, channel) even with a layout
    assert decode_index(2 * 64 + 9, "attn_norm", (7, 64), (), None, HEADS) == ("token 2, channel 9")


async def test_drill_down_decodes_qkv_with_the_models_layout(demo_pair):
    app = explorer(demo_pair.model_a, demo_pair.model_b)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_cell(pilot, 3, "qkv_matmul")
        assert isinstance(screen, CellDetailScreen)
        hidden, heads, kv_heads = (
            SMALL_DIMS["hidden_size"],
            SMALL_DIMS["num_heads"],
            SMALL_DIMS["num_kv_heads"],
        )
        head_dim = hidden // heads  # 16
        assert screen.context.heads == HeadLayout(heads, kv_heads, head_dim)
        width = screen.cell.shape[1]
        assert width == 128
        rows = table_rows(screen)
        assert len(rows) == 20  # the drill-down lists the top 20
        for row in rows:
            position, column = divmod(int(row[1]), width)
            if column < 64:
                part, offset, word = "Q", column, "head"
            elif column < 96:
                part, offset, word = "K", column - 64, "kv head"
            else:
                part, offset, word = "V", column - 96, "kv head"
            assert row[2].startswith(f"token {position} ")
            assert row[2].endswith(f", {part} {word} {offset // 16}, dim {offset % 16}")


async def test_two_trace_directories_fall_back_to_token_and_channel(traced):
    app = explorer(traced.trace_dir, traced.trace_dir)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_cell(pilot, 1, "k_post_rope")
        assert screen.context.heads is None
        rows = table_rows(screen)
        assert len(rows) == 20  # the drill-down lists the top 20
        # stage files are flat; tokens.json's 7 tokens give back the [seq, kv_dim] rows
        (count,) = screen.cell.shape
        assert len(app.token_ids) == 7
        width = count // 7
        assert width == 32  # 2 KV heads × head_dim 16
        for row in rows:
            position, channel = divmod(int(row[1]), width)
            assert row[2].endswith(f", channel {channel}")
            assert row[2].startswith(f"token {position}")
