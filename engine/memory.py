"""Host-memory budget of a traced pass: refuse, before any work, a prompt that cannot fit."""

from __future__ import annotations

from engine.attention import ATTENTION_COPIES
from engine.backend import Backend
from engine.model import ModelConfig


def attention_peak_bytes(config: ModelConfig, seq_len: int) -> int:
    """Host bytes one layer's attention needs in a *comparison* for `seq_len` tokens: the whole
    path's ATTENTION_COPIES `[heads, seq, seq]` float32 arrays (engine.attention). A trace alone
    computes long prompts in blocks (engine.attention.use_blocked) and checks its own, smaller
    budget; a comparison still reads a trace directory's attention files whole, so it is held
    to the whole-path figure (30 000 tokens on 4 heads: 72 GB)."""
    return ATTENTION_COPIES * config.num_heads * seq_len * seq_len * 4


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


def check_prompt_fits(config: ModelConfig, seq_len: int, label: str, backend: Backend) -> None:
    """Refuse, before any work, a prompt whose attention cannot fit in host memory.

    Without this a long --tokens/--prompt list died in numpy with a MemoryError traceback, or
    worse, was granted by overcommit and brought the machine into the OOM killer. CuPy runs are
    left to CuPy's own out-of-memory error (device memory is not host memory).
    """
    from engine.errors import TokenizerError

    if backend.name != "numpy":
        return
    need = attention_peak_bytes(config, seq_len)
    available = available_memory()
    if available is not None and need > available:
        gib = 1024**3
        raise TokenizerError(
            f"{label}: {seq_len} tokens need about {need / gib:.1f} GiB for one layer's "
            f"attention ({ATTENTION_COPIES} × [{config.num_heads}, {seq_len}, {seq_len}] "
            f"float32), more than the {available / gib:.1f} GiB available; trace a shorter "
            "prompt or fewer --tokens"
        )
