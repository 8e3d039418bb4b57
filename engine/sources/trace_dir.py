"""A directory of APRT stage files as a trace source: ours, or one `apr trace --save-tensor`
(or another runtime) wrote: `layer-<N>/<stage>.bin`, `final_norm.bin`, `lm_head.bin`.

Files hold flat payloads; when the directory is paired with a model, captures get the stage's
logical shape (`logical_shape`) from that model's config and the token count.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.attention import LazyAttention
from engine.forward import Capture
from engine.model import ModelConfig
from engine.sources.base import TraceSource, in_run
from engine.stages import STAGE_BY_NAME, WHOLE_MODEL_LAYER, WHOLE_MODEL_STAGES


def logical_shape(stage_name: str, config: ModelConfig, seq_len: int) -> tuple[int, ...]:
    """The §5 shape of a stage for a model and prompt length (what our trace produces); the
    head-structured stages are `[seq, width]` with the width of the model's HeadLayout."""
    width = config.heads.stage_width(stage_name)
    if width is not None:
        return (seq_len, width)
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = {
        "attn_scores": (config.num_heads, seq_len, seq_len),
        "attn_softmax": (config.num_heads, seq_len, seq_len),
        "ffn_gate": (seq_len, inter),
        "ffn_up": (seq_len, inter),
        "ffn_silu": (seq_len, inter),
        "ffn_gelu": (seq_len, inter),
        "ffn_swigl": (seq_len, inter),
        "moe_router": (config.num_experts_per_tok,),
        "moe_router_indices": (config.num_experts_per_tok,),
        "moe_ffn_out": (hidden,),
        "lm_head": (config.vocab_size,),
    }
    return shapes.get(stage_name, (seq_len, hidden))


class DirectorySource(TraceSource):
    """A directory of APRT stage files: `layer-<N>/<stage>.bin`, `final_norm.bin`, `lm_head.bin`."""

    kind = "trace-dir"

    def __init__(self, path: str | Path) -> None:
        from engine.trace_directory import read_trace_dir

        self.trace_dir = read_trace_dir(path)
        self.root = self.trace_dir.root
        self.token_ids = self.trace_dir.token_ids
        self.prompt = self.trace_dir.prompt
        entries = self.trace_dir.entries
        per_layer = [layer for layer, _ in entries if layer != WHOLE_MODEL_LAYER]
        self.num_layers = max(per_layer) + 1 if per_layer else 0
        present = {stage_name for _, stage_name in entries}
        self.stages = tuple(s.name for s in STAGE_BY_NAME.values() if s.name in present)
        self.has_whole_model = any(layer == WHOLE_MODEL_LAYER for layer, _ in entries)
        self.label = self.root.name + "/"
        tokens = "tokens.json" if self.token_ids is not None else "no tokens.json"
        self.complete = self.trace_dir.complete
        """False when the run that wrote the directory did not finish (engine.trace_directory); None when
        it does not say (apr's own traces)."""
        partial = (
            ", INCOMPLETE: the run that wrote it did not finish" if self.complete is False else ""
        )
        from engine.sources.provenance import read_source_record

        self.record = read_source_record(self.root)
        """What wrote the directory (engine, dtype, settings), from its source.json; None when
        it has none (apr's traces and ours)."""
        engine = ""
        if self.record is not None and "engine" in self.record:
            engine = f", written by {self.record['engine']}"
        self.description = (
            f"{self.root}/ (APRT stage files, {len(entries)} files, {tokens}{engine}{partial})"
        )
        self.shape_config: ModelConfig | None = None
        """Set when paired with a model, so captures carry logical shapes instead of flat ones."""

    @property
    def per_layer_range(self) -> range:
        per_layer = [layer for layer, _ in self.trace_dir.entries if layer != WHOLE_MODEL_LAYER]
        return range(min(per_layer), max(per_layer) + 1) if per_layer else range(0)

    def implied_seq_len(self, hidden_size: int) -> tuple[int, str] | None:
        """(seq, evidence) from the first `[seq, hidden]` stage file present, or None."""
        from engine.aprt import read_aprt_header

        for (_layer, stage_name), path in self.trace_dir.entries.items():
            if stage_name in ("embedding", "attn_norm", "post_ffn_residual", "final_norm"):
                count = read_aprt_header(path).dim_product
                return count // hidden_size if count % hidden_size == 0 else -1, (
                    f"{path.relative_to(self.root)} holds {count} values"
                )
        return None

    def embedding_size(self) -> int | None:
        """dim_product of layer-0/embedding.bin (seq × hidden), or None without one."""
        from engine.aprt import read_aprt_header

        path = self.trace_dir.entries.get((0, "embedding"))
        return None if path is None else read_aprt_header(path).dim_product

    def _shape(self, stage_name: str, count: int) -> tuple[int, ...]:
        config = self.shape_config
        if config is not None and self.token_ids is not None:
            shape = logical_shape(stage_name, config, len(self.token_ids))
            if math.prod(shape) == count:
                return shape
        return (count,)

    def captures(
        self,
        layers: range | None = None,
        cancel: threading.Event | None = None,
        whole_model: bool = True,
    ) -> Iterator[Capture]:
        from engine.aprt import read_aprt

        for (layer, stage_name), path in self.trace_dir.entries.items():
            if cancel is not None and cancel.is_set():
                return
            if not in_run(layer, layers, whole_model):
                continue
            lazy = self._lazy_attention(stage_name, path)
            if lazy is not None:  # a long prompt's attention file: read a block at a time
                yield Capture(layer, stage_name, lazy, lazy.shape)
                continue
            values = read_aprt(path).values
            shape = self._shape(stage_name, values.size)
            yield Capture(layer, stage_name, values.reshape(shape), shape)

    def _lazy_attention(self, stage_name: str, path: Path) -> AttentionFile | None:
        """The attention file as a lazy capture when it is larger than a layer's whole-path
        attention may be (engine.attention.WHOLE_ATTENTION_LIMIT) and its shape is known."""
        from engine.aprt import read_aprt_header
        from engine.attention import WHOLE_ATTENTION_LIMIT

        if stage_name not in ("attn_scores", "attn_softmax"):
            return None
        count = read_aprt_header(path).dim_product
        shape = self._shape(stage_name, count)
        if len(shape) != 3 or 4 * count <= WHOLE_ATTENTION_LIMIT:
            return None
        return AttentionFile(path, shape)

    def tensor(self, layer: int, stage_name: str) -> np.ndarray | None:
        from engine.aprt import read_aprt

        path = self.trace_dir.entries.get((layer, stage_name))
        if path is None:
            return None
        lazy = self._lazy_attention(stage_name, path)
        if lazy is not None:  # read by blocks when consumed, never whole
            return lazy  # type: ignore[return-value]
        values = read_aprt(path).values
        return values.reshape(self._shape(stage_name, values.size))


class AttentionFile(LazyAttention):
    """A `[heads, seq, seq]` APRT attention file as a lazy capture, like
    engine.attention.AttentionStage: `blocks(rows)` reads `[rows, seq]` blocks in file order
    (one block in memory at a time) with the future entries set to 0.0, apr's convention, so a
    comparison of a 4,096-token directory never reads a 604 MB file whole."""

    def __init__(self, path: Path, shape: tuple[int, int, int]) -> None:
        self.path = path
        self.shape = shape
        self.size = math.prod(shape)
        self.nbytes = 4 * self.size
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def blocks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(flat offset, float32 block [rows, seq]) in file order, future entries 0.0."""
        from engine.aprt import HEADER_SIZE, AprtFormatError, read_aprt_header
        from engine.attention import block_rows
        from engine.fileio import open_regular

        heads, seq, _ = self.shape
        step = rows or block_rows(seq)
        if read_aprt_header(self.path).dim_product != self.size:
            raise AprtFormatError(self.path, "the file changed while it was being compared")
        with open_regular(self.path) as handle:  # never a FIFO or device swapped in
            for head in range(heads):
                for start in range(0, seq, step):
                    stop = min(start + step, seq)
                    offset = (head * seq + start) * seq
                    handle.seek(HEADER_SIZE + 4 * offset)
                    values = np.fromfile(handle, dtype="<f4", count=(stop - start) * seq)
                    if values.size != (stop - start) * seq:
                        raise AprtFormatError(self.path, "the file shrank while being compared")
                    block = values.astype(np.float32, copy=False).reshape(stop - start, seq)
                    block[np.arange(seq)[None, :] > np.arange(start, stop)[:, None]] = 0.0
                    yield offset, block


def looks_like_trace_dir(path: Path) -> bool:
    """A directory with `layer-N/` subdirectories or whole-model stage files, and no config.json."""
    if not path.is_dir() or (path / "config.json").exists():
        return False
    if any((path / f"{s.name}.bin").is_file() for s in WHOLE_MODEL_STAGES):
        return True
    return any(child.is_dir() and child.name.startswith("layer-") for child in path.iterdir())
