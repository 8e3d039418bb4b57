"""Host-memory budget of a comparison: refuse, before any work, a prompt that cannot fit.

The budget is what the run really holds (comparison_peak_bytes), not the whole-attention
figure: a long prompt's attention is computed, compared and checked in blocks by every part of
a comparison (the pass, engine.stats' streamed sums, the local error, a directory's attention
files read a block at a time), so only the dense captures grow with the prompt, linearly."""

from __future__ import annotations

from engine.attention import attention_peak_bytes, use_blocked
from engine.backend import Backend
from engine.model import ModelConfig

LAYERS_OF_CAPTURES = 2
"""Layers of captures one side of a comparison holds at once: the layer whose stages the local
error keeps as inputs of later stages, and the one its pass computes ahead meanwhile
(engine.pipeline: a few captures ahead, at most a layer)."""


def layer_capture_bytes(config: ModelConfig, seq_len: int) -> int:
    """Bytes of one layer's captures for `seq_len` tokens, as float32: every per-layer stage at
    its logical shape, the attention stages only when the whole path materialises them (a long
    prompt's lazy attention captures hold q and k, counted with the dense stages)."""
    from engine.sources.trace_dir import logical_shape
    from engine.stages import STAGES

    total = 0
    blocked = use_blocked(config.num_heads, seq_len)
    for stage in STAGES:
        if not stage.per_layer:
            continue
        if stage.name in ("attn_scores", "attn_softmax") and blocked:
            continue
        count = 1
        for extent in logical_shape(stage.name, config, seq_len):
            count *= extent
        total += 4 * count
    return total


def comparison_peak_bytes(config: ModelConfig, seq_len: int) -> int:
    """Host bytes one model side of a comparison needs at its peak for `seq_len` tokens: its
    pass's attention working set (whole `[heads, seq, seq]` arrays up to
    engine.attention.WHOLE_ATTENTION_LIMIT, ~4 row blocks beyond it) plus LAYERS_OF_CAPTURES
    layers of captures. Statistics, local error and drill-down work on blocks (8-16 MiB) of a
    long prompt's attention and never materialise it. SmolLM2 at 4,096 tokens: ~0.7 GiB a side
    (the whole-path figure would be 2.8 GiB)."""
    working = attention_peak_bytes(config.num_heads, seq_len)
    return working + LAYERS_OF_CAPTURES * layer_capture_bytes(config, seq_len)


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by an address-space limit
    (`ulimit -v`); None where neither can be read."""
    limits = []
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def check_prompt_fits(sides: list[tuple[ModelConfig, str, Backend]], seq_len: int) -> None:
    """Refuse, before any work, a comparison whose model sides cannot fit in host memory.

    `sides`: (config, label, backend) of each model side; both run at once, so their needs add
    up (comparison_peak_bytes each). Without this a long --tokens/--prompt list died in numpy
    with a MemoryError traceback, or worse, was granted by overcommit and brought the machine
    into the OOM killer. CuPy runs are left to CuPy's own out-of-memory error (device memory is
    not host memory).
    """
    from engine.errors import TokenizerError

    host = [(config, label) for config, label, backend in sides if backend.name == "numpy"]
    if not host:
        return
    need = sum(comparison_peak_bytes(config, seq_len) for config, _ in host)
    available = available_memory()
    if available is not None and need > available:
        gib = 1024**3
        labels = " and ".join(label for _, label in host)
        raise TokenizerError(
            f"{labels}: {seq_len} tokens need about {need / gib:.1f} GiB to compare (one "
            f"layer's attention working set and {LAYERS_OF_CAPTURES} layers of captures per "
            f"model), more than the {available / gib:.1f} GiB available; compare a shorter "
            "prompt or fewer --tokens"
        )
