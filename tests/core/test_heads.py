"""engine.heads: the one head layout behind ModelConfig's widths, trace-directory shapes and
the drill-down's coordinates (values worked out by hand: 4 query heads, 2 KV heads, 16 dims)."""

from __future__ import annotations

from engine.heads import HeadLayout, head_layout_of
from engine.model import ModelConfig
from engine.sources.trace_dir import logical_shape

CONFIG = ModelConfig(
    architecture="llama",
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=96,
    vocab_size=50,
)


def test_widths_of_the_head_stages():
    heads = HeadLayout(num_heads=4, num_kv_heads=2, head_dim=16)
    assert (heads.q_dim, heads.kv_dim) == (64, 32)
    assert heads.stage_width("qkv_matmul") == 128  # 64 + 2 * 32
    assert heads.stage_width("qkv_bias") == 128
    assert heads.stage_width("q_post_rope") == 64
    assert heads.stage_width("attention") == 64
    assert heads.stage_width("k_post_rope") == 32
    assert heads.stage_width("attn_norm") is None
    assert heads.stage_width("attn_scores") is None  # [heads, seq, seq], not [seq, width]


def test_model_config_reads_its_widths_from_the_layout():
    assert CONFIG.heads == HeadLayout(4, 2, 16)
    assert (CONFIG.q_dim, CONFIG.kv_dim) == (64, 32)
    assert head_layout_of(CONFIG) == HeadLayout(4, 2, 16)


def test_trace_directory_shapes_use_the_same_widths():
    assert logical_shape("qkv_matmul", CONFIG, 7) == (7, 128)
    assert logical_shape("q_post_rope", CONFIG, 7) == (7, 64)
    assert logical_shape("k_post_rope", CONFIG, 7) == (7, 32)
    assert logical_shape("attention", CONFIG, 7) == (7, 64)
    assert logical_shape("attn_scores", CONFIG, 7) == (4, 7, 7)
    assert logical_shape("ffn_up", CONFIG, 7) == (7, 96)
    assert logical_shape("attn_norm", CONFIG, 7) == (7, 64)


def test_no_layout_without_a_usable_config():
    assert head_layout_of(None) is None
    assert head_layout_of(object()) is None
    assert head_layout_of(HeadLayout(4, 0, 16)) is None  # no KV heads: nonsense
