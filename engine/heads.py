"""How a model splits its attention projections into heads, and the widths that follows for
the head-structured stages: the one place `num_heads × head_dim` is written.

`ModelConfig.q_dim` / `kv_dim` (engine.model), the logical shape of a stage file read beside a
model (engine.sources.trace_dir.logical_shape) and the drill-down's coordinates
(aprtui.coordinates) all read `HeadLayout`, so a fused QKV column means the same thing to the
forward pass, to a trace directory and to the person reading the top-K table.
"""

from __future__ import annotations

from dataclasses import dataclass

FUSED_QKV_STAGES = ("qkv_matmul", "qkv_bias")
"""`[seq, q_dim + 2 × kv_dim]`: the Q columns (num_heads × head_dim), then K, then V."""
QUERY_HEAD_STAGES = ("q_post_rope", "attention")
"""`[seq, q_dim]`: one head_dim block per query head."""
KEY_HEAD_STAGES = ("k_post_rope",)
"""`[seq, kv_dim]`: one head_dim block per key/value head."""


@dataclass(frozen=True)
class HeadLayout:
    """The attention head layout of a model (from its ModelConfig: `ModelConfig.heads`)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_dim(self) -> int:
        """Width of the query projection: every query head's head_dim block."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection: every KV head's block."""
        return self.num_kv_heads * self.head_dim

    def stage_width(self, stage: str) -> int | None:
        """The column count of a head-structured stage's `[seq, width]` tensor (None for a
        stage that is not one)."""
        if stage in FUSED_QKV_STAGES:
            return self.q_dim + 2 * self.kv_dim
        if stage in QUERY_HEAD_STAGES:
            return self.q_dim
        if stage in KEY_HEAD_STAGES:
            return self.kv_dim
        return None


def head_layout_of(config: object | None) -> HeadLayout | None:
    """A config's head layout, or None when there is no usable config (none at all, a source
    without one, or nonsense counts): callers fall back to plain channels."""
    try:
        layout = HeadLayout(
            int(config.num_heads),  # type: ignore[union-attr]
            int(config.num_kv_heads),  # type: ignore[union-attr]
            int(config.head_dim),  # type: ignore[union-attr]
        )
    except (AttributeError, TypeError, ValueError):
        return None
    if min(layout.num_heads, layout.num_kv_heads, layout.head_dim) <= 0:
        return None
    return layout
