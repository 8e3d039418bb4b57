"""`apr-tui trace MODEL --save-tensor STAGES`: write stage tensors the way `apr trace` does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aprtui.commands import options, trace_engines
from aprtui.commands.locations import default_dir_note, model_argument
from aprtui.commands.locations import default_trace_dir as default_output_dir
from aprtui.commands.output import print_report

WRITES_FILES = True
"""SIGTERM cleans up this command's temporaries (aprtui.cli.Terminated)."""

HELP = "write APRT stage files as `apr trace --save-tensor` does (plus tokens.json)"

DESCRIPTION = """\
Run our independent forward pass over MODEL (.apr, .gguf, .safetensors or an HF directory)
and write the selected stages as APRT files, with apr's names, layout and defaults:
layer-<N>/<stage>.bin for per-layer stages, final_norm.bin and lm_head.bin (header layer
0xFFFFFFFF) at the root, layers 0..1 unless --save-tensor-layers says otherwise, and the
directory <model-stem>-trace beside the model unless --save-tensor-dir says otherwise (in the
current directory for a model inside an installed package, such as the bundled `smollm2`).
The report summarises what was written; --verbose lists every file.

Beside the stage files goes tokens.json (the token ids traced), so that `apr-tui bisect`
can check that two traces saw the same prompt. The prompt defaults to apr's own,
"What is 2+2?", encoded with the model's tokenizer (no chat template).

STAGES is `all` or a comma list of: embedding, attn_norm, qkv_matmul, qkv_bias, q_post_rope,
k_post_rope, attn_scores, attn_softmax, attention, attn_out, post_attn_residual, ffn_norm,
ffn_gate, ffn_up, ffn_silu, ffn_swigl, ffn_out, post_ffn_residual (alias layer_output),
final_norm, lm_head; moe_router, moe_ffn_out, moe_router_indices (Qwen3-MoE layers only);
apr-tui's own post_attn_norm, ffn_gelu, post_ffn_norm (Gemma only); and apr-tui's logits_all:
every position's logits, [seq, vocab], written as logits_all.bin at the root only when named.

The command refuses to write into a directory that holds anything other than stage files
and tokens.json (files it did not write) unless --force is given, and never replaces a file
that appears in it during the run. One run at a time writes a directory (it is locked).
tokens.json says "complete": true only once the run has finished; an interrupted run leaves
whole stage files marked incomplete, and a failed run (a full disk) in a directory it created
removes what it wrote. It never deletes a file it did not write."""

EPILOG = """\
examples:
  apr-tui trace model.gguf --save-tensor all
  apr-tui trace model.apr --save-tensor attn_norm,ffn_swigl,lm_head --save-tensor-layers 0..4
  apr-tui trace model.gguf --save-tensor all --tokens 1,2,3 --save-tensor-dir /tmp/mine
  apr-tui trace ./hf-model --engine hf --dtype float16 --save-tensor all
  apr-tui trace model.gguf --engine llama.cpp --save-tensor all --save-tensor-layers 0..30

exit codes: 0 written, 2 bad input (unreadable model, bad plan, refused directory)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="model file (.apr/.gguf/.safetensors) or HF dir; `smollm2` for the bundled GGUF",
    )
    options.add_prompt_options(parser)
    parser.add_argument(
        "--save-tensor",
        required=True,
        metavar="STAGES",
        help="`all` or a comma list of stage names (apr's grammar)",
    )
    parser.add_argument(
        "--save-tensor-dir", metavar="DIR", help="output directory (default <model-stem>-trace)"
    )
    parser.add_argument(
        "--save-tensor-layers",
        default="0..1",
        metavar="START..END",
        help="layers to save, END exclusive (default 0..1: layer 0 only)",
    )
    options.add_device_option(parser)
    trace_engines.add_arguments(parser)  # --engine hf|llama.cpp, --dtype (issue 14)
    parser.add_argument(
        "--force",
        action="store_true",
        help="write even into a directory holding files other than stage files",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="list every file written (default: a summary per layer range)",
    )


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


def _check_output_dir(directory: Path, force: bool) -> None:
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


def _check_earlier_tokens(directory: Path, force: bool, token_ids: list[int]) -> None:
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


def _layers_line(plan, num_layers: int, args: argparse.Namespace) -> str:
    """The layer range saved, and when the asked range runs past the model, that it was cut
    there (apr's grammar clips silently; a user reading `0..99` back would think 99 layers)."""
    asked = args.save_tensor_layers
    end = min(plan.layer_end, num_layers)
    if not any(s.per_layer for s in plan.stages):
        return f"{asked} (no per-layer stage requested)"
    saved = f"{plan.layer_start}..{end}"
    if plan.layer_end > num_layers:
        return (
            f"{saved} ({end - plan.layer_start} layers): {asked} was asked, and the model has "
            f"{num_layers} layers (0..{num_layers})"
        )
    return saved


def summarize_written(directory: Path, written: list[Path]) -> list[str]:
    """What a run wrote, in a few lines: runs of layers that hold the same stage files, then
    the whole-model files (a 30-layer `all` trace is 2 lines, not 483)."""
    from engine.stages import STAGE_BY_NAME

    order = {name: index for index, name in enumerate(STAGE_BY_NAME)}
    per_layer: dict[int, list[str]] = {}
    whole: list[str] = []
    for path in written:
        relative = path.relative_to(directory)
        if len(relative.parts) == 2 and relative.parts[0].startswith("layer-"):
            per_layer.setdefault(int(relative.parts[0][6:]), []).append(path.stem)
        else:
            whole.append(relative.name)
    lines = []
    runs: list[tuple[int, int, tuple[str, ...]]] = []
    for layer in sorted(per_layer):
        stages = tuple(sorted(per_layer[layer], key=lambda name: order.get(name, len(order))))
        if runs and runs[-1][1] == layer and runs[-1][2] == stages:
            runs[-1] = (runs[-1][0], layer + 1, stages)
        else:
            runs.append((layer, layer + 1, stages))
    for start, end, stages in runs:
        where = f"layer-{start}/" if end == start + 1 else f"layer-{start}/ … layer-{end - 1}/"
        names = (
            ", ".join(stages)
            if len(stages) <= 6
            else f"{len(stages)} stages ({stages[0]} … {stages[-1]})"
        )
        lines.append(f"{directory}/{where}  {names}")
    if whole:
        lines.append(f"{directory}/  {', '.join(sorted(whole))}")
    return lines


def _human(size: int) -> str:
    """Bytes as B / KiB / MiB / GiB with one decimal."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _check_layers_reach(plan, config, text: str) -> None:
    """A layer range wholly past the model would write no per-layer file at all."""
    from engine.errors import PlanError

    wants_layers = any(s.per_layer for s in plan.stages)
    if wants_layers and plan.layer_start >= config.num_layers:
        raise PlanError(
            f"--save-tensor-layers {text}: the model has {config.num_layers} layers "
            f"(0..{config.num_layers}), so no layer in this range exists"
        )


class _Interrupt:
    """Ctrl+C during the pass: finish the stage file being written, then stop.

    The first SIGINT sets `cancel` (the forward pass checks it between stages), so no stage
    file is ever cut short; the command then raises KeyboardInterrupt (exit 130). A second
    Ctrl+C interrupts at once, as usual.
    """

    def __init__(self) -> None:
        import threading

        self.cancel = threading.Event()
        self._previous = None

    def __enter__(self) -> _Interrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            if self._previous is signal.default_int_handler:
                signal.signal(signal.SIGINT, self._handle)
            else:
                self._previous = None
        return self

    def _handle(self, signum: int, frame: object) -> None:
        import signal

        self.cancel.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Progress:
    """Layer progress on stderr: a rich bar on a terminal, one plain line per layer otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("[cyan]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("layers"),
                console=Console(stderr=True),
                transient=True,
            )
            self.task = None

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            sys.stderr.write(f"{self.label}: layer {done}/{total}\n")
            sys.stderr.flush()
            return
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done)


LONG_RUN_BYTES = 256 * 1024 * 1024
"""A run that writes more than this is announced before it starts (files, bytes, memory)."""


def _run_cost(plan, config, seq_len: int, stage_names: list[str]) -> tuple[int, int, int]:
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


def _check_cost(directory: Path, cost: tuple[int, int, int], seq_len: int, label: str) -> None:
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


def _write(directory: Path, capture, overwrite) -> Path:
    """One capture to its stage file (its directory already made); a lazy attention capture is
    streamed block by block. `overwrite`: the predicate on stage paths the run may replace."""
    from engine.aprt import write_aprt, write_stage_stream
    from engine.stages import STAGE_BY_NAME, WHOLE_MODEL_LAYER, stage_path

    if hasattr(capture.array, "blocks"):
        blocks = (block for _, block in capture.array.blocks())
        return write_stage_stream(
            directory, capture.stage, capture.layer, capture.array.size, blocks, overwrite=overwrite
        )
    per_layer = STAGE_BY_NAME[capture.stage].per_layer
    path = stage_path(directory, capture.stage, capture.layer)
    header_layer = capture.layer if per_layer else WHOLE_MODEL_LAYER
    return write_aprt(path, header_layer, capture.array, overwrite=overwrite(path))


WRITE_AHEAD_BYTES = 64 * 1024 * 1024
"""Bytes of captures waiting for the writer thread before the pass waits for it."""


class _Writer:
    """Stage files written by a background thread while the pass computes the next stages.

    Creating a file costs a few milliseconds of system calls (483 of them for a full SmolLM2
    trace: ~1 s); the thread overlaps them with the arithmetic. In order, at most
    WRITE_AHEAD_BYTES of captures queued (the pass waits beyond that), and a lazy attention
    capture (streamed block by block) is written by the pass itself after the queue drains,
    so memory stays bounded. A failed write is raised at the next submit or at the end.
    """

    def __init__(self, out, overwrite) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out = out
        """The run's TraceOutput: directories are made and written files recorded through it,
        on the calling thread, so a failed run takes back exactly what it made."""
        self.directory = out.directory
        self.overwrite = overwrite
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aprt-writer")
        self.pending: list = []  # (future, nbytes)
        self.written: list[Path] = []
        self.made: set[Path] = set()

    def submit(self, capture) -> None:
        from engine.stages import stage_path

        parent = stage_path(self.directory, capture.stage, capture.layer).parent
        if parent not in self.made:  # one mkdir per layer directory, on this thread
            self.out.mkdir(parent)
            self.made.add(parent)
        if hasattr(capture.array, "blocks"):
            self._drain(0)
            self.written.append(self.out.record(_write(self.directory, capture, self.overwrite)))
            return
        nbytes = int(capture.array.nbytes)
        self._drain(WRITE_AHEAD_BYTES - nbytes)
        future = self.pool.submit(_write, self.directory, capture, self.overwrite)
        self.pending.append((future, nbytes))

    def _drain(self, budget: int) -> None:
        """Collect finished writes in order; wait while the queue holds more than budget."""
        while self.pending and (
            self.pending[0][0].done() or sum(n for _, n in self.pending) > budget
        ):
            future, _ = self.pending.pop(0)
            self.written.append(self.out.record(future.result()))

    def close(self) -> list[Path]:
        """Wait for every queued write (also after an interrupt) and return the paths."""
        try:
            while self.pending:
                future, _ = self.pending.pop(0)
                self.written.append(self.out.record(future.result()))
        finally:
            self.pool.shutdown(wait=True)
        return self.written


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from engine.backend import resolve_backend
    from engine.errors import AprTuiError
    from engine.formats import open_model
    from engine.forward import check_token_ids, trace
    from engine.pipeline import pass_blas
    from engine.stages import SaveTensorPlan
    from engine.tokenizer import DEFAULT_PROMPT, encode_prompt, parse_token_ids
    from engine.trace_directory import write_tokens_json
    from engine.trace_output import TraceOutput

    if args.engine != "apr" or args.dtype is not None:  # another engine's stages (issue 14)
        return trace_engines.run_engine(args)
    model_path = model_argument(args.model)
    if args.save_tensor_dir is not None and not args.save_tensor_dir.strip():
        raise AprTuiError("--save-tensor-dir: empty path (leave the flag out for <stem>-trace)")
    directory = (
        Path(args.save_tensor_dir) if args.save_tensor_dir else default_output_dir(model_path)
    )
    plan = SaveTensorPlan.parse(args.save_tensor, args.save_tensor_layers, directory)
    backend = resolve_backend(args.device)
    token_ids = parse_token_ids(args.tokens) if args.tokens is not None else None
    _check_output_dir(directory, args.force)

    with open_model(model_path) as model:
        prompt = None
        if token_ids is None:
            prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
            token_ids = encode_prompt(model, prompt)
        token_ids = check_token_ids(token_ids, model.config, str(model_path))
        _check_layers_reach(plan, model.config, args.save_tensor_layers)
        stage_names = list(dict.fromkeys(s.name for s in plan.stages))  # duplicate = one file
        cost = _run_cost(plan, model.config, len(token_ids), stage_names)
        _check_cost(directory, cost, len(token_ids), str(model_path))
        with TraceOutput(directory) as out:
            # Checked again under the directory lock: what another run did meanwhile counts.
            _check_output_dir(directory, args.force)
            _check_earlier_tokens(directory, args.force, token_ids)
            # Only the stage files vetted just now may be replaced; one that appears later
            # (another process) is refused unless --force (engine.fileio.OutputExistsError).
            replaceable = {path for path in directory.rglob("*.bin") if path.is_file()}

            def may_replace(path: Path) -> bool:
                return args.force or path in replaceable

            # tokens.json first, marked incomplete: it marks the directory as ours, also after
            # an interrupted run, and says the stage files are not all there yet.
            out.record(write_tokens_json(directory, token_ids, prompt, model_path, complete=False))
            # Stage files are written by a background thread while the pass computes on.
            writer = _Writer(out, may_replace)
            try:
                with (
                    _Progress(f"tracing {model_path.name}") as progress,
                    _Interrupt() as interrupt,
                    pass_blas(model.config, len(token_ids)),
                ):
                    for capture in trace(
                        model,
                        token_ids,
                        backend=backend,
                        stages=stage_names,
                        layers=(plan.layer_start, plan.layer_end),
                        on_layer=progress.update,
                        cancel=interrupt.cancel,
                    ):
                        if plan.should_save(capture.stage, capture.layer):
                            writer.submit(capture)
            finally:
                written = writer.close()
            if interrupt.cancel.is_set():
                raise KeyboardInterrupt
            # The run's last write: the directory is complete.
            write_tokens_json(directory, token_ids, prompt, model_path, complete=True)
        config = model.config

    ours = set(written)
    stale = [p for p in directory.rglob("*.bin") if p not in ours] if directory.exists() else []
    lines: list[str] = ["[bold cyan]=== apr-tui trace --save-tensor ===[/]"]
    lines.append(f"Model:        {escape(str(model_path))}")
    lines.append(f"Stages:       {escape(args.save_tensor)}")
    lines.append(f"Layers:       {escape(_layers_line(plan, config.num_layers, args))}")
    where = "" if args.save_tensor_dir else default_dir_note(model_path)
    lines.append(f"Output dir:   {escape(str(directory))}" + (f" ({where})" if where else ""))
    lines.append(f"Device:       {escape(backend.device_name)}")
    lines.append("")
    if prompt is not None:
        quoted = prompt.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'Test prompt:  "{escape(quoted)}"')
    else:
        lines.append("Test prompt:  (token ids given with --tokens)")
    lines.append(f"Token ids:    {token_ids} ({len(token_ids)} tokens)")
    lines.append("")
    total_bytes = sum(path.stat().st_size for path in written)
    lines.append(
        f"[bold green]Wrote[/] {len(written)} stage tensor file(s), {_human(total_bytes)}, "
        f"and tokens.json:"
    )
    if args.verbose:
        lines += [f"  {escape(str(p))} ({p.stat().st_size} bytes)" for p in sorted(written)]
        lines.append(f"  {escape(str(directory / 'tokens.json'))}")
    else:
        lines += [f"  {escape(line)}" for line in summarize_written(directory, written)]
        lines.append("  (--verbose lists every file)")
    if stale:
        lines.append(f"  (and {len(stale)} stage file(s) from an earlier run, left untouched)")
    lines.append("")
    if any(name in stage_names for name in ("final_norm", "lm_head", "logits_all")):
        lines.append(
            f"Forward pass succeeded — {config.num_layers} layer activations, "
            f"{config.vocab_size} logits"
        )
    else:
        layers_run = min(plan.layer_end, config.num_layers)
        lines.append(
            f"Forward pass succeeded — {layers_run} of {config.num_layers} layers run "
            "(no whole-model stage requested, so the pass stopped after the last saved layer)"
        )
    lines.append(
        f"Compare with another trace or model: apr-tui bisect {escape(str(model_path))} "
        f"{escape(str(directory))}"
    )
    print_report(*lines)
    return 0
