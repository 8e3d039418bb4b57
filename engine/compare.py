"""Trace sources, pairing of captures, cell results and the first divergence.

A *trace source* is anything that yields stage captures in computation order: a model file run
through our forward pass (`ModelSource`), or a directory of APRT stage files (`DirectorySource`),
ours or one `apr trace --save-tensor` wrote. `compare(a, b)` pairs the two streams by
(layer, stage) as they arrive and yields one `Cell` per pair with both sides' statistics and the
diff statistics. Both streams are ordered the same way (layer, then canonical stage index, the
whole-model stages last), so an ordered merge pairs them; two model runs therefore advance in
lock-step, stage by stage, and cells complete in computation order.

Only statistics leave `compare`; full tensors are kept in a small per-source cache, re-read from
the file, or recomputed when a caller asks for one (`TraceSource.tensor`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.backend import Backend, resolve_backend, to_host
from engine.errors import DiffError, TokenMismatchError
from engine.forward import Capture, produced_stages, trace
from engine.model import Model, ModelConfig
from engine.stages import (
    DENSE_STAGES,
    STAGE_BY_NAME,
    WHOLE_MODEL_LAYER,
    WHOLE_MODEL_STAGES,
)
from engine.stats import DiffStats, IndexDiff, TensorStats, diff_stats, index_diff, tensor_stats

DEFAULT_THRESHOLD = 0.999
"""Cosine below which a cell has diverged: apr's documented Q4_K noise floor (contract
apr-cli-trace-save-tensor-v1: cosine < 0.999 is the bisection threshold)."""

DEFAULT_STD_BAND = (0.5, 2.0)
"""Std ratio A/B outside this band marks a scale divergence.

Cosine is blind to scale: a weight scaled ×18 leaves the cosine of its own output at 1.0, and
only the residual add after it shows the damage. The ratio of standard deviations sees it at
the first stage it reaches. Quantization noise at the cosine floor (0.999 ⇒ a relative error of
about sqrt(2·(1−0.999)) ≈ 4.5%) moves the std by a few percent; a factor of 2 is far outside
that, and still an order of magnitude inside the 18× `ffn_swigl` signature seen in the seeds,
a missing or doubled norm weight, or a 1/hd instead of 1/sqrt(hd) attention scale."""

CACHE_BYTES = 64 * 1024 * 1024
"""Host bytes of full tensors a model source keeps for drill-down before evicting the oldest."""


@dataclass(frozen=True)
class Cell:
    """The comparison of one (layer, stage) between side A and side B.

    A side that does not produce the stage has `stats_x is None`; `diff` is None unless both
    sides have it with the same element count.
    """

    layer: int
    """Layer index, or WHOLE_MODEL_LAYER for `final_norm` / `lm_head`."""
    stage: str
    shape: tuple[int, ...]
    stats_a: TensorStats | None
    stats_b: TensorStats | None
    diff: DiffStats | None
    index_diff: IndexDiff | None = None
    """For an index payload (`moe_router_indices`) on both sides: the ids compared as ids."""


def stage_order_key(layer: int, stage_name: str) -> tuple[int, int]:
    """Computation order: by layer (whole-model last), then apr's canonical stage index."""
    return (layer, STAGE_BY_NAME[stage_name].index)


def logical_shape(stage_name: str, config: ModelConfig, seq_len: int) -> tuple[int, ...]:
    """The §5 shape of a stage for a model and prompt length (what our trace produces)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.q_dim, config.kv_dim
    shapes = {
        "qkv_matmul": (seq_len, q + 2 * kv),
        "qkv_bias": (seq_len, q + 2 * kv),
        "q_post_rope": (seq_len, q),
        "k_post_rope": (seq_len, kv),
        "attn_scores": (config.num_heads, seq_len, seq_len),
        "attn_softmax": (config.num_heads, seq_len, seq_len),
        "attention": (seq_len, q),
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


ATTENTION_COPIES = 5
"""How many `[heads, seq, seq]` float32 arrays one layer's attention holds at its peak: the raw
scores (kept for the `attn_scores` capture), the masked copy, the shifted copy, the exponentials
and the normalised weights (engine.forward.causal_softmax)."""


def attention_peak_bytes(config: ModelConfig, seq_len: int) -> int:
    """Host bytes the prefill attention of one layer needs for `seq_len` tokens (no KV cache,
    so it grows with seq²: 30 000 tokens on 4 heads is 72 GB)."""
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


# --------------------------------------------------------------------------------- sources


class TraceSource:
    """One side of a comparison. Subclasses: ModelSource, DirectorySource."""

    kind: str = ""
    """`model` or `trace-dir`."""
    label: str
    """Short name for headers: the file or directory name."""
    description: str
    """One line: what it is, how it runs."""
    token_ids: list[int] | None
    num_layers: int
    stages: tuple[str, ...]
    """The stages this source can produce, in computation order."""

    def captures(
        self,
        layers: range | None = None,
        cancel: threading.Event | None = None,
        whole_model: bool = True,
    ) -> Iterator[Capture]:
        raise NotImplementedError

    def tensor(self, layer: int, stage_name: str) -> np.ndarray | None:
        """The full host float32 tensor of one (layer, stage), or None if this side lacks it."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> TraceSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelSource(TraceSource):
    """A model run through engine.forward.trace on a fixed token sequence."""

    kind = "model"

    def __init__(
        self,
        model: Model,
        token_ids: list[int],
        *,
        prompt: str | None = None,
        tokens_explicit: bool = False,
        backend: str | Backend = "numpy",
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.model = model
        self.config = model.config
        self.token_ids = list(token_ids)
        self.prompt = prompt
        self.tokens_explicit = tokens_explicit
        """True when the caller fixed the tokens (--tokens or --prompt); False for the default."""
        self.backend = resolve_backend(backend)
        self.num_layers = model.config.num_layers
        self.stages = produced_stages(model.config)
        self.label = model.path.name or str(model.path)
        self.description = (
            f"{model.path} ({model.format}, {model.config.architecture}, "
            f"{model.config.num_layers} layers, {self.backend.device_name})"
        )
        self._cache: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._lock = threading.Lock()

    def adopt_tokens(self, token_ids: list[int], prompt: str | None = None) -> None:
        """Trace these ids instead of the default prompt's (a reference's tokens.json)."""
        self.token_ids = list(token_ids)
        self.prompt = prompt
        self._clear_cache()

    def captures(
        self,
        layers: range | None = None,
        cancel: threading.Event | None = None,
        whole_model: bool = True,
    ) -> Iterator[Capture]:
        stage_names = [s for s in self.stages if whole_model or STAGE_BY_NAME[s].per_layer]
        for capture in trace(
            self.model,
            self.token_ids,
            backend=self.backend,
            stages=stage_names,
            layers=layers,
            cancel=cancel,
        ):
            self._remember(capture)
            yield capture

    def tensor(self, layer: int, stage_name: str) -> np.ndarray | None:
        if stage_name not in self.stages:
            return None
        key = (layer, stage_name)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        if STAGE_BY_NAME[stage_name].per_layer:
            if not 0 <= layer < self.num_layers or (stage_name == "embedding" and layer != 0):
                return None
            layers = range(layer, layer + 1)
        elif layer != WHOLE_MODEL_LAYER:
            return None
        else:
            layers = range(0)
        for capture in trace(
            self.model, self.token_ids, backend=self.backend, stages=[stage_name], layers=layers
        ):
            self._remember(capture)
            return np.asarray(to_host(capture.array), dtype=np.float32)
        return None

    def _remember(self, capture: Capture) -> np.ndarray | None:
        """Keep a host copy of the capture for drill-down while it fits the cache budget."""
        if int(capture.array.nbytes) > self._cache_limit:
            return None
        host = np.asarray(to_host(capture.array), dtype=np.float32)
        with self._lock:
            key = (capture.layer, capture.stage)
            if key not in self._cache:
                self._cache[key] = host
                self._cache_bytes += host.nbytes
            while self._cache_bytes > self._cache_limit:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= evicted.nbytes
        return host

    def _clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0

    def close(self) -> None:
        self._clear_cache()
        self.model.close()


class DirectorySource(TraceSource):
    """A directory of APRT stage files: `layer-<N>/<stage>.bin`, `final_norm.bin`, `lm_head.bin`."""

    kind = "trace-dir"

    def __init__(self, path: str | Path) -> None:
        from engine.aprt import read_trace_dir

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
        self.description = f"{self.root}/ (APRT stage files, {len(entries)} files, {tokens})"
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
            if layer == WHOLE_MODEL_LAYER:
                if not whole_model:
                    continue
            elif layers is not None and layer not in layers:
                continue
            values = read_aprt(path).values
            shape = self._shape(stage_name, values.size)
            yield Capture(layer, stage_name, values.reshape(shape), shape)

    def tensor(self, layer: int, stage_name: str) -> np.ndarray | None:
        from engine.aprt import read_aprt

        path = self.trace_dir.entries.get((layer, stage_name))
        if path is None:
            return None
        values = read_aprt(path).values
        return values.reshape(self._shape(stage_name, values.size))


def looks_like_trace_dir(path: Path) -> bool:
    """A directory with `layer-N/` subdirectories or whole-model stage files, and no config.json."""
    if not path.is_dir() or (path / "config.json").exists():
        return False
    if any((path / f"{s.name}.bin").is_file() for s in WHOLE_MODEL_STAGES):
        return True
    return any(child.is_dir() and child.name.startswith("layer-") for child in path.iterdir())


def open_source(
    spec: str | Path,
    *,
    prompt: str | None = None,
    token_ids: list[int] | None = None,
    device: str | Backend = "auto",
) -> TraceSource:
    """A model file / HF directory as a ModelSource, or an APRT directory as a DirectorySource.

    For a model: explicit `token_ids` win, else `prompt` (default apr's "What is 2+2?") is
    encoded with the model's own tokenizer, as apr does (no chat template).
    """
    a, _ = open_pair(spec, None, prompt=prompt, token_ids=token_ids, device=device)
    return a


def open_pair(
    spec_a: str | Path,
    spec_b: str | Path | None,
    *,
    prompt: str | None = None,
    token_ids: list[int] | None = None,
    device: str | Backend = "auto",
) -> tuple[TraceSource, TraceSource | None]:
    """Open both sides of a comparison and settle which tokens a model side traces.

    Token ids, by precedence: `token_ids`; `prompt` encoded by the model's tokenizer; a trace
    directory's tokens.json (checked again by `compare`); the default prompt encoded by the
    model's tokenizer, or by the other model's when this one carries none.
    """
    from engine.errors import TokenizerError
    from engine.formats import open_model
    from engine.tokenizer import DEFAULT_PROMPT, encode_prompt

    backend = resolve_backend(device)  # a bad --device fails before any model is opened
    specs = [Path(spec_a)] + ([Path(spec_b)] if spec_b is not None else [])
    opened: list[TraceSource | Model] = []
    try:
        for path in specs:
            opened.append(DirectorySource(path) if looks_like_trace_dir(path) else open_model(path))
        models = [m for m in opened if isinstance(m, Model)]
        sources: list[TraceSource] = []
        for item in opened:
            if not isinstance(item, Model):
                sources.append(item)
                continue
            if token_ids is not None:
                ids, used_prompt, explicit = list(token_ids), None, True
            else:
                used_prompt = prompt if prompt is not None else DEFAULT_PROMPT
                explicit = prompt is not None
                encoders = [item] + [m for m in models if m is not item and m.tokenizer]
                encoder = next((m for m in encoders if m.tokenizer is not None), item)
                try:
                    ids = encode_prompt(encoder, used_prompt)
                except TokenizerError:
                    directory_ids = next(
                        (
                            s.token_ids
                            for s in opened
                            if isinstance(s, DirectorySource) and s.token_ids
                        ),
                        None,
                    )
                    if directory_ids is None:
                        raise
                    ids, used_prompt, explicit = directory_ids, None, False
            sources.append(
                ModelSource(
                    item, ids, prompt=used_prompt, tokens_explicit=explicit, backend=backend
                )
            )
    except BaseException:
        for item in opened:
            item.close()
        raise
    return sources[0], (sources[1] if len(sources) > 1 else None)


# --------------------------------------------------------------------------------- pairing


def _describe_ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:12])
    return f"[{shown}{', ...' if len(ids) > 12 else ''}] ({len(ids)} tokens)"


def reconcile_tokens(a: TraceSource, b: TraceSource | None) -> list[int] | None:
    """Make both sides trace the same tokens, or raise TokenMismatchError saying how they differ.

    A model run without explicit tokens adopts the other side's tokens.json; two token lists
    must be equal; against a directory without tokens.json, the sequence length implied by its
    `[seq, hidden]` stage files must equal the model's token count.
    """
    if b is None:
        return a.token_ids
    for model_side, other in ((a, b), (b, a)):
        if (
            isinstance(model_side, ModelSource)
            and not model_side.tokens_explicit
            and other.token_ids is not None
            and (not isinstance(other, ModelSource) or other.tokens_explicit)
        ):
            model_side.adopt_tokens(other.token_ids, getattr(other, "prompt", None))
    if a.token_ids is not None and b.token_ids is not None:
        if isinstance(a, ModelSource) and isinstance(b, ModelSource):
            b.adopt_tokens(a.token_ids, a.prompt)  # two models: B runs A's token ids
        elif a.token_ids != b.token_ids:
            raise TokenMismatchError(
                f"token ids differ: {a.label} has {_describe_ids(a.token_ids)}, "
                f"{b.label} has {_describe_ids(b.token_ids)}; trace both with the same "
                "--prompt or --tokens"
            )
    for model_side, directory in ((a, b), (b, a)):
        if isinstance(model_side, ModelSource) and isinstance(directory, DirectorySource):
            _check_directory_fits(directory, model_side)
            return model_side.token_ids
    if isinstance(a, DirectorySource) and isinstance(b, DirectorySource):
        _check_directories_fit(a, b)
    return a.token_ids if a.token_ids is not None else b.token_ids


def _check_directory_fits(directory: DirectorySource, model_side: ModelSource) -> None:
    """The directory's `[seq, hidden]` stage files must hold seq × hidden values for the model's
    hidden size and token count; otherwise it was traced on another prompt or another model
    (a tokens.json only vouches for the prompt)."""
    hidden = model_side.config.hidden_size
    implied = directory.implied_seq_len(hidden)
    if implied is None or implied[0] == len(model_side.token_ids):
        return
    seq, evidence = implied
    if seq < 0 or directory.token_ids is not None:
        raise DiffError(
            f"{directory.root}: its stage files do not fit {model_side.label} ({evidence}, "
            f"but {len(model_side.token_ids)} tokens × hidden {hidden} = "
            f"{len(model_side.token_ids) * hidden}): it comes from a model of another "
            + (
                "shape, or its tokens.json does not describe its stage files"
                if directory.token_ids is not None
                else "shape"
            )
        )
    raise TokenMismatchError(
        f"{directory.root}: its stage files were traced on a different prompt "
        f"({evidence} = {seq} tokens × hidden {hidden}) but {model_side.label} traces "
        f"{_describe_ids(model_side.token_ids)}; pass the prompt or --tokens the "
        'trace was made with (apr trace uses "What is 2+2?")'
    )


def _check_directories_fit(a: DirectorySource, b: DirectorySource) -> None:
    """The first stage file both directories hold must have the same element count; otherwise
    they were traced on different prompts or models and no cell could be compared."""
    from engine.aprt import read_aprt_header

    common = sorted(
        set(a.trace_dir.entries) & set(b.trace_dir.entries),
        key=lambda key: stage_order_key(*key),
    )
    if not common:
        return
    key = common[0]
    path_a, path_b = a.trace_dir.entries[key], b.trace_dir.entries[key]
    size_a = read_aprt_header(path_a).dim_product
    size_b = read_aprt_header(path_b).dim_product
    if size_a != size_b:
        raise TokenMismatchError(
            f"{a.root} and {b.root} were traced on different prompts (or models): "
            f"{path_a.relative_to(a.root)} holds {size_a} vs {size_b} values"
        )


SHAPE_FIELDS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
"""Config fields two models must share for their stages to be comparable element-wise.

Layer count, vocabulary and architecture may differ: the common layers still pair up (a
deeper model's extra layers show as one-sided cells, a different vocabulary makes `lm_head` a
size mismatch (diverged), a missing QKV bias or Q/K norm is a stage one side lacks), which is a
meaningful partial comparison. A different width makes every cell a size mismatch, which is not."""


def check_comparable(a: TraceSource, b: TraceSource | None) -> None:
    """DiffError when two models differ in a dimension that every stage's size depends on."""
    if not (isinstance(a, ModelSource) and isinstance(b, ModelSource)):
        return
    differ = [
        f"{field} {getattr(a.config, field)} vs {getattr(b.config, field)}"
        for field in SHAPE_FIELDS
        if getattr(a.config, field) != getattr(b.config, field)
    ]
    if differ:
        raise DiffError(
            f"{a.label} and {b.label} are models of different shapes ({', '.join(differ)}); "
            "no stage can be compared element-wise"
        )


def default_span(a: TraceSource, b: TraceSource | None) -> tuple[range | None, bool]:
    """Which layers to pair, and whether to include whole-model stages, when not told."""
    directories = [s for s in (a, b) if isinstance(s, DirectorySource)]
    if not directories:
        return None, True
    if any(isinstance(s, ModelSource) for s in (a, b)):
        # Run the model only as far as the directory can answer.
        spans = [d.per_layer_range for d in directories if d.per_layer_range]
        start = min((r.start for r in spans), default=0)
        stop = max((r.stop for r in spans), default=0)
        return range(start, stop), any(d.has_whole_model for d in directories)
    return None, True


"""Old private name, kept for callers written before it became public."""


def _explicit_span(
    a: TraceSource, b: TraceSource | None, layers: range | tuple[int, int]
) -> tuple[range, bool]:
    from engine.errors import PlanError

    if not isinstance(layers, range):
        layers = range(*layers)
    depth = max(s.num_layers for s in (a, b) if s is not None)
    if layers.start >= depth:
        raise PlanError(
            f"--layers {layers.start}..{layers.stop}: beyond the last layer "
            f"({depth} layers, 0..{depth}); nothing to compare"
        )
    return layers, layers.stop >= depth


def _cell(capture_a: Capture | None, capture_b: Capture | None) -> Cell:
    present = capture_a if capture_a is not None else capture_b
    assert present is not None
    shape = present.shape
    if capture_a is not None and capture_b is not None and len(capture_b.shape) > len(shape):
        shape = capture_b.shape  # prefer the logical shape over a directory's flat one
    stats_a = tensor_stats(capture_a.array) if capture_a is not None else None
    stats_b = tensor_stats(capture_b.array) if capture_b is not None else None
    diff = None
    if (
        capture_a is not None
        and capture_b is not None
        and capture_a.array.size == capture_b.array.size
    ):
        x, y = capture_a.array, capture_b.array
        if type(x) is not type(y):
            x, y = to_host(x), to_host(y)
        diff = diff_stats(x, y)
    ids = None
    if (
        capture_a is not None
        and capture_b is not None
        and STAGE_BY_NAME[present.stage].index_payload
    ):
        ids = index_diff(capture_a.array, capture_b.array)
    return Cell(present.layer, present.stage, tuple(shape), stats_a, stats_b, diff, ids)


def _merged(
    stream_a: Iterator[Capture], stream_b: Iterator[Capture] | None
) -> Iterator[tuple[Capture | None, Capture | None]]:
    """Ordered merge of two computation-ordered capture streams into pairs by (layer, stage)."""
    if stream_b is None:
        for capture in stream_a:
            yield capture, None
        return
    head_a = next(stream_a, None)
    head_b = next(stream_b, None)
    while head_a is not None or head_b is not None:
        key_a = stage_order_key(head_a.layer, head_a.stage) if head_a is not None else None
        key_b = stage_order_key(head_b.layer, head_b.stage) if head_b is not None else None
        if key_b is None or (key_a is not None and key_a < key_b):
            yield head_a, None
            head_a = next(stream_a, None)
        elif key_a is None or key_b < key_a:
            yield None, head_b
            head_b = next(stream_b, None)
        else:
            yield head_a, head_b
            head_a = next(stream_a, None)
            head_b = next(stream_b, None)


def compare(
    a: TraceSource,
    b: TraceSource | None,
    *,
    layers: range | tuple[int, int] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[Cell]:
    """Pair A's and B's captures by (layer, stage) and yield one Cell per pair, in order.

    `b=None` is single-model mode: every cell has only A's statistics. `layers` limits the
    per-layer stages (END exclusive); whole-model stages are included when the range reaches
    the last layer. By default two models compare every layer; a model against a directory
    runs only the layers the directory holds (plus the whole-model stages if it has them).
    Raises TokenMismatchError before any work when the sides traced different tokens.
    """
    check_comparable(a, b)
    reconcile_tokens(a, b)
    for side in (a, b):
        if isinstance(side, ModelSource):
            check_prompt_fits(side.config, len(side.token_ids), side.label, side.backend)
    for side, other in ((a, b), (b, a)):
        if isinstance(side, DirectorySource) and isinstance(other, ModelSource):
            side.shape_config = other.config
            if side.token_ids is None:
                side.token_ids = list(other.token_ids)
    if layers is None:
        span, whole_model = default_span(a, b)
    else:
        span, whole_model = _explicit_span(a, b, layers)
    stream_a = a.captures(layers=span, cancel=cancel, whole_model=whole_model)
    stream_b = b.captures(layers=span, cancel=cancel, whole_model=whole_model) if b else None
    for capture_a, capture_b in _merged(stream_a, stream_b):
        if cancel is not None and cancel.is_set():
            return
        yield _cell(capture_a, capture_b)


# --------------------------------------------------------------------------------- verdicts


def std_ratio(cell: Cell) -> float | None:
    """std(A) / std(B); inf when only B is flat, 1.0 when both are; None if a side is absent."""
    if cell.stats_a is None or cell.stats_b is None:
        return None
    std_a, std_b = cell.stats_a.std, cell.stats_b.std
    if std_b == 0.0:
        return 1.0 if std_a == 0.0 else math.inf
    return std_a / std_b


def cosine_diverged(cell: Cell, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """Both sides present and they disagree in direction (or in size, or as index payloads).

    Identical tensors never diverge (an all-zero stage has cosine 0.0 by apr's rule, but equal
    sides are equal). NaN anywhere gives cosine 0.0 and so diverges.
    """
    if cell.stats_a is None or cell.stats_b is None:
        return False
    if cell.diff is None:
        return True  # both present, different element counts
    if cell.diff.max_abs_diff == 0.0 and cell.stats_a.nan_count == cell.stats_b.nan_count == 0:
        return False
    if cell.index_diff is not None:
        return not cell.index_diff.equal  # expert ids must match exactly
    if STAGE_BY_NAME[cell.stage].index_payload:
        return True  # expert ids must match exactly
    return not cell.diff.cosine_sim >= threshold


def std_diverged(cell: Cell, band: tuple[float, float] = DEFAULT_STD_BAND) -> bool:
    ratio = std_ratio(cell)
    if ratio is None or STAGE_BY_NAME[cell.stage].index_payload:
        return False
    return not band[0] <= ratio <= band[1]


def first_divergence(cells: Iterable[Cell], threshold: float = DEFAULT_THRESHOLD) -> Cell | None:
    """The first cell in computation order whose cosine is below `threshold`."""
    return next((cell for cell in cells if cosine_diverged(cell, threshold)), None)


def first_std_divergence(
    cells: Iterable[Cell], band: tuple[float, float] = DEFAULT_STD_BAND
) -> Cell | None:
    """The first cell in computation order whose std ratio A/B leaves `band`."""
    return next((cell for cell in cells if std_diverged(cell, band)), None)


def dense_stage_names() -> tuple[str, ...]:
    return tuple(s.name for s in DENSE_STAGES)
