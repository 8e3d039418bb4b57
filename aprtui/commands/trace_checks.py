"""What `apr-tui trace` checks before it writes a byte, and refuses (exit 2).

The output directory: files the command did not write are refused unless --force, and one
that a stage file or tokens.json would replace is refused even then (`foreign_files`,
`check_output_dir`); stage files of ours traced on other tokens are refused, since they would
stay beside the new ones under a tokens.json that no longer describes them
(`check_earlier_tokens`). The plan: a layer range wholly past the model (`check_layers_reach`).
The cost: the files, bytes and working memory a run needs, announced when large and refused
when the free disk space or memory cannot hold them (`run_cost`, `check_cost`). Both
`apr-tui trace` and `apr-tui trace --engine` (aprtui.commands.trace_engines) use the directory
checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _is_ours_tokens(path: Path) -> bool:
    from engine.errors import FormatError
    from engine.trace_directory import read_tokens_json

    try:
        read_tokens_json(path)
    except FormatError:
        return False
    return True


def _is_aprt(path: Path) -> bool:
    from engine.aprt import read_aprt_header
    from engine.errors import FormatError

    try:
        read_aprt_header(path)
    except (FormatError, OSError):
        return False
    return True


def foreign_files(directory: Path) -> list[Path]:
    """Everything under `directory` that apr-tui trace did not write.

    Ours: a tokens.json of our schema, and APRT files at apr's stage names *when that
    tokens.json is there* (we write it before any stage file, so it marks the directory as
    ours; stage files without it come from `apr trace` or another tool, and we must not
    replace them). Our own temporary names (`.<name>.<pid>.<hex>.tmp`, left by a killed run)
    are neither: readers skip them and they are never overwritten.
    """
    from engine.stages import STAGE_BY_NAME
    from engine.trace_directory import _TEMP_NAME, TOKENS_FILE

    per_layer = {f"{s.name}.bin" for s in STAGE_BY_NAME.values() if s.per_layer}
    whole = {f"{s.name}.bin" for s in STAGE_BY_NAME.values() if not s.per_layer}
    tokens = directory / TOKENS_FILE
    ours = tokens.is_file() and _is_ours_tokens(tokens)
    found = []

    def check(file: Path, names: set[str]) -> None:
        if _TEMP_NAME.fullmatch(file.name):
            return
        if not (ours and file.is_file() and file.name in names and _is_aprt(file)):
            found.append(file)

    for child in sorted(directory.iterdir()):
        if child.name == TOKENS_FILE and ours:
            continue
        is_layer_dir = (
            child.is_dir()
            and child.name.startswith("layer-")
            and child.name[6:].isascii()
            and child.name[6:].isdigit()
        )
        if not is_layer_dir:
            check(child, whole)
            continue
        for grandchild in sorted(child.iterdir()):
            check(grandchild, per_layer)
    return found


def check_output_dir(directory: Path, force: bool) -> None:
    """Refuse a directory holding files we did not write (--force writes anyway)."""
    from engine.errors import AprTuiError

    if directory.exists() and not directory.is_dir():
        raise AprTuiError(f"--save-tensor-dir {directory}: exists and is not a directory")
    if not directory.exists():
        return
    foreign = foreign_files(directory)
    clobbered = [path for path in foreign if _would_replace(path, directory)]
    if clobbered:  # even --force never replaces a file that is not a stage file or ours
        raise AprTuiError(
            f"{clobbered[0]}: not a file apr-tui trace wrote, and a stage file (or tokens.json) "
            "would replace it; choose another --save-tensor-dir"
        )
    if foreign and not force:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise AprTuiError(
            f"{directory}: holds files apr-tui trace did not write ({foreign[0]}{more}); "
            "choose another --save-tensor-dir or pass --force"
        )


def _would_replace(path: Path, directory: Path) -> bool:
    """A foreign file at a name we write whose contents are not APRT (or not our tokens.json)."""
    from engine.stages import STAGE_BY_NAME
    from engine.trace_directory import TOKENS_FILE

    if path == directory / TOKENS_FILE:
        return True
    if path.suffix != ".bin" or path.stem not in STAGE_BY_NAME:
        return False
    return not (path.is_file() and _is_aprt(path))


def check_earlier_tokens(directory: Path, force: bool, token_ids: list[int]) -> None:
    """Refuse our own stage files from a run on other tokens: they would stay beside the new
    ones under a tokens.json that no longer describes them, and a later bisect would compare
    mismatched prompts as if they were a divergence. --force writes anyway."""
    from engine.errors import AprTuiError
    from engine.trace_directory import TOKENS_FILE, read_tokens_json

    tokens = directory / TOKENS_FILE
    if force or not tokens.is_file() or next(directory.rglob("*.bin"), None) is None:
        return
    earlier = read_tokens_json(tokens).token_ids
    if earlier != list(token_ids):
        raise AprTuiError(
            f"{directory}: holds stage files traced on other tokens ({len(earlier)} tokens in "
            f"{TOKENS_FILE}, this run traces {len(token_ids)}); choose another "
            "--save-tensor-dir or pass --force"
        )


def check_layers_reach(plan, config, text: str) -> None:
    """A layer range wholly past the model would write no per-layer file at all."""
    from engine.errors import PlanError

    wants_layers = any(s.per_layer for s in plan.stages)
    if wants_layers and plan.layer_start >= config.num_layers:
        raise PlanError(
            f"--save-tensor-layers {text}: the model has {config.num_layers} layers "
            f"(0..{config.num_layers}), so no layer in this range exists"
        )


LONG_RUN_BYTES = 256 * 1024 * 1024
"""A run that writes more than this is announced before it starts (files, bytes, memory)."""


def run_cost(plan, config, seq_len: int, stage_names: list[str]) -> tuple[int, int, int]:
    """(files, bytes on disk, peak working-set bytes) the run will need, before it starts."""
    from engine.attention import attention_peak_bytes
    from engine.sources.trace_dir import logical_shape
    from engine.stages import STAGE_BY_NAME

    layers = max(0, min(plan.layer_end, config.num_layers) - plan.layer_start)
    produced = {"qkv_bias"} if config.qkv_bias else set()
    files = size = 0
    for name in stage_names:
        stage = STAGE_BY_NAME[name]
        if stage.moe or (name == "qkv_bias" and name not in produced):
            continue
        if name == "logits_all":
            count = seq_len * config.vocab_size
        else:
            count = 1
            for dim in logical_shape(name, config, seq_len):
                count *= dim
        if not stage.per_layer:
            copies = 1
        elif name == "embedding":
            copies = 1 if plan.layer_start == 0 else 0
        else:
            copies = layers
        files += copies
        size += copies * (12 + 4 * count)
    activations = 12 * seq_len * max(config.hidden_size, config.intermediate_size) * 4
    peak = attention_peak_bytes(config.num_heads, seq_len) + activations
    return files, size, peak


def check_cost(directory: Path, cost: tuple[int, int, int], seq_len: int, label: str) -> None:
    """Say what a long run costs on stderr; refuse (exit 2) one that cannot fit the free disk
    space or memory."""
    import shutil

    from engine.errors import AprTuiError
    from engine.memory import available_memory

    files, size, peak = cost
    mib = 1024 * 1024
    if size > LONG_RUN_BYTES:
        sys.stderr.write(
            f"{label}: {seq_len} tokens: {files} stage files, {size / mib:,.0f} MiB to write, "
            f"about {peak / mib:,.0f} MiB of working memory\n"
        )
        sys.stderr.flush()
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and probe != directory and not os.access(probe, os.W_OK | os.X_OK):
        raise AprTuiError(
            f"--save-tensor-dir {directory}: cannot be created: {probe} is not writable"
        )
    free = shutil.disk_usage(probe).free if probe.exists() else None
    if free is not None and size > free:
        raise AprTuiError(
            f"--save-tensor-dir {directory}: the run writes {size / mib:,.0f} MiB, only "
            f"{free / mib:,.0f} MiB free; save fewer stages or layers, or a shorter prompt"
        )
    available = available_memory()
    if available is not None and peak > available:
        raise AprTuiError(
            f"{label}: {seq_len} tokens need about {peak / mib:,.0f} MiB of working memory, "
            f"more than the {available / mib:,.0f} MiB available; trace a shorter prompt"
        )
