"""The plan of a comparison: everything decided before anything runs.

`prepare(a, b, ...)` opens both sides (`engine.sources.open_pair`) and `plan_for(a, b)` settles
what the comparison will do: the tokens both sides trace (a model without explicit tokens adopts
a trace directory's tokens.json; two token lists must agree), the layers and whether the
whole-model stages are included, the exact set of cells the run will yield (so a consumer can
tell "pending" from "never"), and which side's local error is checked against which model's
weights. Every refusal is raised here, once, with one wording; `Plan.run(cancel)` then only
pairs captures and computes statistics. The CLI, `bisect`, the explorer and the tests all
consume a Plan; none re-derives what it decided.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from engine.compare import Cell, make_cell, merged, stage_order_key
from engine.errors import DiffError, PlanError, TokenMismatchError
from engine.forward import check_token_ids
from engine.local_error import LocalError, LocalErrorTracker, local_error_supported
from engine.memory import check_prompt_fits, comparison_peak_bytes
from engine.model import Model
from engine.pipeline import IN_FLIGHT, Ahead, layer_matmul_flops, pass_blas, pipeline_blas
from engine.prefetch import PROCESS_START, cpu_times, idle_core
from engine.sources.base import TraceSource
from engine.sources.model_run import ModelSource
from engine.sources.opening import open_pair
from engine.sources.trace_dir import DirectorySource, logical_shape
from engine.stages import STAGE_BY_NAME, STAGES, WHOLE_MODEL_LAYER

_CLOSE_LOCK = threading.Lock()

CELL_WORKERS = 2
"""Threads computing pairs' statistics and the checked side's local error (engine.stats and
the float64 recipes release the GIL in their numpy work). One pool for both: a long prompt's
local error is as much work as a pass, and on a worker of its own it was the comparison's
slowest thread (py-spy, 1,024 tokens: ~55 s busy against ~45 s for each statistics worker)."""

PIPELINE_MIN_FLOPS = 1e9
"""Matmul FLOPs per layer from which a comparison on the host runs side by side (SmolLM2: ~140
tokens); below it, one step after the other on the calling thread. Side by side, the threads
hand work over a few thousand times a run (18,000 voluntary context switches in a 37-token
SmolLM2 bisect), and on a virtual machine whose host is busy every hand-over that wakes a
sleeping virtual CPU is dear. Measured, whole-process `bisect` of SmolLM2 against its Q8_0 copy
on the 2-core development VM, min of 4 interleaved runs, host steal ~30%: 37 tokens (2.6e8 FLOPs
a layer) side by side 8.66 s wall (6.37 s CPU), one step after the other 4.43 s (4.21 s CPU,
with small matrices decoded on one thread: engine.formats.quant.PARALLEL_DECODE_MIN_VALUES),
the baseline of issue 13 3.95 s; 262 tokens (1.8e9) 14.2 s side by side, 15.1 s serial. On a
quiet host an earlier measurement had 37 tokens side by side ahead, 2.15 s vs 2.36 s: the
threshold gives up that 10% for a run that does not double when the machine is shared."""

OFFLOADED_LOCAL_ERROR_STAGES = frozenset(
    {"qkv_matmul", "attn_out", "ffn_gate", "ffn_up", "ffn_out", "lm_head"}
)
"""The stages whose local error a comparison run one step after the other (`_run_serial`)
computes on a helper thread: the matrix products, whose float64 recomputation is most of the
local error's ~0.9 s of CPU in a 37-token SmolLM2 bisect, in a few numpy calls that release
the GIL. The element-wise stages' local errors are too small to be worth a hand-over. Measured,
whole-process `bisect` of SmolLM2 against its Q8_0 copy, 37 tokens, on the 2-core development
VM (min of 6 interleaved runs, host steal 11%): everything on one thread 3.92 s wall (3.98 s
CPU), these on a helper 3.60 s (4.16 s), side by side as at long prompts 3.91 s (5.06 s); the
baseline of issue 13 3.38 s (5.82 s)."""

OFFLOADED_STATISTICS = True
"""Whether a comparison run one step after the other (`_run_serial`) also computes every
cell's statistics on its helper thread when a core is idle (engine.prefetch.idle_core, the
decoding child's test): the passes then keep one core and the statistics plus the products'
local errors the other (SmolLM2 bisect: ~1.1 s of passes against ~0.55 s of statistics and
~0.7 s of local error). Measured, whole-process `bisect` of SmolLM2 against its Q8_0 copy,
37 tokens, on the 2-core development VM, host steal 0%, interleaved runs: statistics aside
min 2.29 s / median 2.67 s against 2.62 / 3.00 in place (8 pairs), 2.75 / 2.84 against 2.75 /
3.03 (6 pairs), 2.70 / 2.95 against 2.88 / 3.12 (8 pairs, `apr-tui bisect`, host steal 1%),
for ~0.25 s more CPU (the threads' hand-overs); with one busy process beside it the hand-overs
cost what they saved (median 4.06 s against 3.96 s), hence the idle-core test."""

WINDOW = 4
"""Pairs whose statistics or local error may be in flight at once: they hold their captures,
so the memory plan counts them (engine.memory.IN_FLIGHT_CAPTURES)."""


def _ready(waiting: tuple[Cell | Future[Cell], Future[LocalError] | None]) -> bool:
    """Whether a waiting cell's statistics and local error are computed (or were never sent
    away)."""
    return all(not isinstance(part, Future) or part.done() for part in waiting)


def _with_local(cell: Cell | Future[Cell], local: Future[LocalError] | None) -> Cell:
    """The cell, with its statistics and its local error from the helper thread once computed
    (errors re-raised); what was computed in place is taken as it is."""
    if isinstance(cell, Future):
        cell = cell.result()
    return cell if local is None else replace(cell, local=local.result())


def _finished(cell: Future[Cell], local: Future[LocalError] | None) -> Cell:
    """The pair's Cell with its local error, once both are computed (errors re-raised)."""
    return _with_local(cell.result(), local)


def _cancel_pending(*pools: ThreadPoolExecutor) -> None:
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)


Side = str
"""`"a"` or `"b"`."""


@dataclass(frozen=True)
class LocalCheck:
    """How local error is computed in this run: the captures of `side` are recomputed stage by
    stage from that side's own inputs, with the weights of `weights`.

    The checked side is the reference B, except when B is our own pass over a model and A is
    not (then A, the foreign path, is the one to check); two models: B with A's weights, so a
    re-quantized copy shows its weight noise and an altered copy a spike.
    """

    side: Side
    weights: Model | None
    """None when neither side is a model file: only the recipes that need no weights run."""
    weights_label: str | None
    note: str | None = None
    """Why local error is limited in this run (shown with the report), or None."""


@dataclass
class Plan:
    """A comparison, fully decided; `run` yields its cells in computation order."""

    a: TraceSource
    b: TraceSource | None
    token_ids: tuple[int, ...] | None
    """The ids both sides trace; None only for two trace directories without tokens.json."""
    layers: range
    """The per-layer rows of the comparison (END exclusive)."""
    whole_model: bool
    """Whether `final_norm` / `lm_head` are part of the run."""
    stages: tuple[str, ...]
    """The stages at least one side produces, in computation order."""
    cells: tuple[tuple[int, str], ...]
    """Every (layer, stage) the run yields, in computation order; any other is never computed."""
    local: LocalCheck | None
    """None in single-model mode."""
    closed: bool = False

    @property
    def expected(self) -> int:
        return len(self.cells)

    @property
    def seq_len(self) -> int | None:
        return None if self.token_ids is None else len(self.token_ids)

    @property
    def single_model(self) -> bool:
        return self.b is None

    def working_memory(self) -> int:
        """Host bytes the run holds at its peak (engine.memory.comparison_peak_bytes of each
        model side; 0 when neither side is a model or the token count is unknown)."""
        if self.seq_len is None:
            return 0
        return sum(
            comparison_peak_bytes(side.config, self.seq_len)
            for side in (self.a, self.b)
            if isinstance(side, ModelSource)
        )

    def run(self, cancel: threading.Event | None = None) -> Iterator[Cell]:
        """Pair both sides' captures and yield one Cell per (layer, stage), in order.

        On the host the work runs side by side (engine.pipeline): each side's pass in its own
        thread, at most IN_FLIGHT captures ahead; the statistics of a pair and the local error
        of its checked side on a small pool (the tracker takes each capture in order, as an
        input of later stages, and hands out a job that reads a snapshot of its inputs). Cells
        come out in computation order all the same, at most WINDOW pairs in flight.
        """
        if not self._concurrent():
            yield from self._run_serial(cancel)
            return
        with ExitStack() as stack:
            stack.enter_context(pipeline_blas())
            stream_a, stream_b = self._streams(cancel, stack, ahead=True)
            tracker = self._tracker()
            pool = stack.enter_context(ThreadPoolExecutor(CELL_WORKERS, "cell-work"))
            stack.callback(_cancel_pending, pool)
            pending: deque[tuple[Future[Cell], Future[LocalError] | None]] = deque()
            for capture_a, capture_b in merged(stream_a, stream_b):
                if cancel is not None and cancel.is_set():
                    return
                local = (
                    None
                    if tracker is None
                    else pool.submit(self._local_job(tracker, capture_a, capture_b))
                )
                cell = pool.submit(make_cell, capture_a, capture_b, seq_len=self.seq_len)
                pending.append((cell, local))
                if len(pending) >= WINDOW:
                    yield _finished(*pending.popleft())
            while pending:
                if cancel is not None and cancel.is_set():
                    return
                yield _finished(*pending.popleft())

    def _run_serial(self, cancel: threading.Event | None) -> Iterator[Cell]:
        """`run` one step after the other: CuPy passes (one device stream) and short prompts,
        whose per-stage work is too small for a thread per part to pay (PIPELINE_MIN_FLOPS).

        On the host some parts still run beside the passes, on one helper thread, a hand-over
        or two per cell: the local error of the matrix products (OFFLOADED_LOCAL_ERROR_STAGES,
        each a float64 product of a few milliseconds that releases the GIL), and, when a core
        is idle (OFFLOADED_STATISTICS), every cell's statistics. The element-wise stages'
        local errors, too small to be worth a hand-over, run in place. The cells come out in
        computation order all the same, at most WINDOW of them waiting."""
        with ExitStack() as stack:
            config = self._checked_config()
            if config is not None and self.seq_len is not None:
                stack.enter_context(pass_blas(config, self.seq_len))
            stream_a, stream_b = self._streams(cancel, stack, ahead=False)
            tracker = self._tracker()
            helper, statistics_aside = None, False
            if self._on_host():
                statistics_aside = OFFLOADED_STATISTICS and idle_core(PROCESS_START, cpu_times())
                if tracker is not None or statistics_aside:
                    helper = stack.enter_context(ThreadPoolExecutor(1, "cell-work"))
                    stack.callback(_cancel_pending, helper)
            waiting: deque[tuple[Cell | Future[Cell], Future[LocalError] | None]] = deque()
            for capture_a, capture_b in merged(stream_a, stream_b):
                if cancel is not None and cancel.is_set():
                    return
                job = None if tracker is None else self._local_job(tracker, capture_a, capture_b)
                stage = (capture_a if capture_a is not None else capture_b).stage
                offloaded = (
                    job is not None and helper is not None and stage in OFFLOADED_LOCAL_ERROR_STAGES
                )
                local_later = helper.submit(job) if offloaded else None
                local = None if offloaded or job is None else job()
                if statistics_aside:
                    cell = helper.submit(
                        make_cell, capture_a, capture_b, seq_len=self.seq_len, local=local
                    )
                else:
                    cell = make_cell(capture_a, capture_b, seq_len=self.seq_len, local=local)
                waiting.append((cell, local_later))
                while waiting and (_ready(waiting[0]) or len(waiting) > WINDOW):
                    if cancel is not None and cancel.is_set():
                        return
                    yield _with_local(*waiting.popleft())
            while waiting:
                if cancel is not None and cancel.is_set():
                    return
                yield _with_local(*waiting.popleft())

    def _on_host(self) -> bool:
        """Whether every side's pass runs on the host (numpy), not on a CuPy device."""
        return all(
            getattr(getattr(side, "backend", None), "name", "numpy") == "numpy"
            for side in (self.a, self.b)
            if side is not None
        )

    def _concurrent(self) -> bool:
        """Threads pay on the host for prompts with enough work per stage (PIPELINE_MIN_FLOPS);
        a CuPy pass keeps its single stream."""
        on_host = self._on_host()
        config = self._checked_config()
        if not on_host or config is None or self.seq_len is None:
            return on_host
        return layer_matmul_flops(config, self.seq_len) >= PIPELINE_MIN_FLOPS

    def _streams(self, cancel: threading.Event | None, stack: ExitStack, *, ahead: bool):
        """Both sides' capture iterators (B None in single-model mode), run ahead if asked."""
        streams = []
        for name, side in (("a", self.a), ("b", self.b)):
            if side is None:
                streams.append(None)
                continue
            stream = side.captures(layers=self.layers, cancel=cancel, whole_model=self.whole_model)
            if ahead:
                stream = stack.enter_context(Ahead(stream, IN_FLIGHT, name=f"side-{name}"))
            streams.append(stream)
        return streams[0], streams[1]

    def _tracker(self) -> LocalErrorTracker | None:
        if self.local is None:
            return None
        checked = self.b if self.local.side == "b" else self.a
        depth = checked.config.num_layers if isinstance(checked, ModelSource) else None
        return LocalErrorTracker(self.local.weights, self.token_ids, self._checked_config(), depth)

    def _local_job(
        self, tracker: LocalErrorTracker, capture_a, capture_b
    ) -> Callable[[], LocalError]:
        """The local error of this pair's checked side, to compute on any thread (taken in
        computation order: the tracker keeps it as an input of later stages)."""
        assert self.local is not None
        checked = capture_b if self.local.side == "b" else capture_a
        if checked is None:
            return partial(LocalError, None, (), "the checked side does not produce this stage")
        return tracker.job(checked)

    def _checked_config(self):
        for side in (self.a, self.b):
            if isinstance(side, ModelSource):
                return side.config
        return None

    def close(self) -> None:
        """Close both sides; safe to call more than once and from two threads."""
        with _CLOSE_LOCK:
            if self.closed:
                return
            self.closed = True
        for side in (self.a, self.b):
            if side is not None:
                side.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare(
    spec_a: str | Path,
    spec_b: str | Path | None,
    *,
    prompt: str | None = None,
    token_ids: list[int] | None = None,
    layers: range | tuple[int, int] | None = None,
    device: str = "auto",
) -> Plan:
    """Open both sides and plan their comparison; on any refusal both are closed again."""
    a, b = open_pair(spec_a, spec_b, prompt=prompt, token_ids=token_ids, device=device)
    try:
        return plan_for(a, b, layers=layers)
    except BaseException:
        a.close()
        if b is not None:
            b.close()
        raise


def plan_for(
    a: TraceSource,
    b: TraceSource | None,
    *,
    layers: range | tuple[int, int] | None = None,
) -> Plan:
    """Plan the comparison of two open sources (`b=None`: single-model mode).

    `layers` limits the per-layer stages (END exclusive; it must lie within the deeper side);
    whole-model stages are included when the range reaches the last layer. By default two
    models compare every layer and a model against a directory runs only the layers the
    directory holds (plus the whole-model stages if it has them).
    """
    check_comparable(a, b)
    token_ids = reconcile_tokens(a, b)
    models = [side for side in (a, b) if isinstance(side, ModelSource)]
    for side in models:
        side.token_ids = check_token_ids(side.token_ids, side.config, side.label)
    if models:
        check_prompt_fits(
            [(side.config, side.label, side.backend) for side in models],
            len(models[0].token_ids),
        )
    for side, other in ((a, b), (b, a)):
        if isinstance(side, DirectorySource) and isinstance(other, ModelSource):
            side.shape_config = other.config
            if side.token_ids is None:
                side.token_ids = list(other.token_ids)
    if token_ids is None:
        token_ids = next((s.token_ids for s in (a, b) if s is not None and s.token_ids), None)
    if layers is None:
        span, whole_model = default_span(a, b)
    else:
        span, whole_model = explicit_span(a, b, layers)
    cells = planned_cells(a, b, span, whole_model)
    stages = tuple(s.name for s in STAGES if any(name == s.name for _, name in cells))
    return Plan(
        a=a,
        b=b,
        token_ids=None if token_ids is None else tuple(token_ids),
        layers=span,
        whole_model=whole_model,
        stages=stages,
        cells=cells,
        local=local_check(a, b),
    )


def local_check(a: TraceSource, b: TraceSource | None) -> LocalCheck | None:
    """Which side's local error is computed, with which weights (see LocalCheck)."""
    if b is None:
        return None
    side = "a" if isinstance(b, ModelSource) and not isinstance(a, ModelSource) else "b"
    checked, other = (a, b) if side == "a" else (b, a)
    owner = other if isinstance(other, ModelSource) else checked
    if not isinstance(owner, ModelSource):
        return LocalCheck(
            side, None, None, "neither side is a model file: only weight-free stages are checked"
        )
    supported, reason = local_error_supported(owner.config)
    return LocalCheck(side, owner.model, owner.label, None if supported else reason)


def planned_cells(
    a: TraceSource, b: TraceSource | None, layers: range, whole_model: bool
) -> tuple[tuple[int, str], ...]:
    """The (layer, stage) keys the run will yield: the union of what each side produces."""
    keys: set[tuple[int, str]] = set()
    for side in (a, b):
        if side is None:
            continue
        if isinstance(side, DirectorySource):
            for layer, name in side.trace_dir.entries:
                if layer == WHOLE_MODEL_LAYER:
                    if whole_model:
                        keys.add((layer, name))
                elif layer in layers:
                    keys.add((layer, name))
            continue
        depth = side.num_layers
        for name in side.stages:
            if not STAGE_BY_NAME[name].per_layer:
                if whole_model:
                    keys.add((WHOLE_MODEL_LAYER, name))
                continue
            for layer in layers:
                if layer < depth and (name != "embedding" or layer == 0):
                    keys.add((layer, name))
    return tuple(sorted(keys, key=lambda key: stage_order_key(*key)))


def describe_ids(ids: list[int]) -> str:
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
                f"token ids differ: {a.label} has {describe_ids(a.token_ids)}, "
                f"{b.label} has {describe_ids(b.token_ids)}; trace both with the same "
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
        _check_every_row_stage(directory, model_side)
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
        f"{describe_ids(model_side.token_ids)}; pass the prompt or --tokens the "
        'trace was made with (apr trace uses "What is 2+2?")'
    )


def _check_every_row_stage(directory: DirectorySource, model_side: ModelSource) -> None:
    """Every per-token stage file of the directory (`[seq, width]` in its logical shape,
    engine.sources.trace_dir.logical_shape) that holds whole rows of its width must hold seq of
    them: one with another number of rows was written on another prompt (`trace --force` over
    a directory traced on another prompt leaves the earlier run's other stages beside the new
    tokens.json), and comparing it would report a divergence that is only a mix-up. A file of
    one row (a last-token-only stage) or of another width (a model of another FFN size) is left
    to the comparison of its cell. Headers only: 12 bytes a file."""
    from engine.aprt import read_aprt_header

    config, seq = model_side.config, len(model_side.token_ids)
    for (_layer, stage), path in directory.trace_dir.entries.items():
        shape = logical_shape(stage, config, seq)
        if len(shape) != 2 or shape[0] != seq or not shape[1]:
            continue  # not one row a token (attention scores, MoE routing, the last-token head)
        width = shape[1]
        count = read_aprt_header(path).dim_product
        rows, rest = divmod(count, width)
        if rest == 0 and rows not in (seq, 1):
            raise DiffError(
                f"{path}: holds {rows} rows of {width} values, not the {seq} tokens of "
                f"{directory.root} and {model_side.label}: the directory mixes runs (a trace "
                "--force over one made on another prompt?); trace into a fresh directory"
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


def depth_of(a: TraceSource, b: TraceSource | None) -> int:
    return max(s.num_layers for s in (a, b) if s is not None)


def default_span(a: TraceSource, b: TraceSource | None) -> tuple[range, bool]:
    """Which layers to pair, and whether to include whole-model stages, when not told."""
    directories = [s for s in (a, b) if isinstance(s, DirectorySource)]
    if directories and any(isinstance(s, ModelSource) for s in (a, b)):
        # Run the model only as far as the directory can answer.
        spans = [d.per_layer_range for d in directories if d.per_layer_range]
        start = min((r.start for r in spans), default=0)
        stop = max((r.stop for r in spans), default=0)
        return range(start, stop), any(d.has_whole_model for d in directories)
    return range(depth_of(a, b)), True


def explicit_span(
    a: TraceSource, b: TraceSource | None, layers: range | tuple[int, int]
) -> tuple[range, bool]:
    """`--layers START..END` checked against the deeper side: never silently clipped."""
    if not isinstance(layers, range):
        layers = range(*layers)
    depth = depth_of(a, b)
    if layers.start >= depth or layers.stop > depth:
        raise PlanError(
            f"--layers {layers.start}..{layers.stop}: the model has {depth} layers "
            f"(0..{depth}); nothing to compare beyond layer {depth - 1}"
        )
    return layers, layers.stop >= depth
