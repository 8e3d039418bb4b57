"""`apr-tui trace MODEL --save-tensor STAGES`: write stage tensors the way `apr trace` does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aprtui.commands import options, trace_engines
from aprtui.commands.locations import default_dir_note, model_argument
from aprtui.commands.locations import default_trace_dir as default_output_dir
from aprtui.commands.output import Line, print_lines
from aprtui.commands.trace_checks import (
    check_cost,
    check_earlier_tokens,
    check_layers_reach,
    check_output_dir,
    run_cost,
)
from aprtui.commands.trace_writer import Interrupt, Progress, Writer

WRITES_FILES = True
SHOWS_STEP_PROGRESS = True
"""Long engine steps (a big APR file's footer check) show progress on stderr (aprtui.cli)."""
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


def run(args: argparse.Namespace) -> int:
    from engine.backend import resolve_backend
    from engine.errors import AprTuiError
    from engine.formats import open_model
    from engine.forward import check_token_ids, trace
    from engine.model import context_warning
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
    check_output_dir(directory, args.force)

    with open_model(model_path) as model:
        prompt = None
        if token_ids is None:
            prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
            token_ids = encode_prompt(model, prompt)
        token_ids = check_token_ids(token_ids, model.config, str(model_path))
        beyond = context_warning(model.config, len(token_ids), model_path.name)
        if beyond is not None:  # a position bug may be the point: run, and say so
            print(beyond, file=sys.stderr, flush=True)
        check_layers_reach(plan, model.config, args.save_tensor_layers)
        stage_names = list(dict.fromkeys(s.name for s in plan.stages))  # duplicate = one file
        cost = run_cost(plan, model.config, len(token_ids), stage_names)
        check_cost(directory, cost, len(token_ids), str(model_path))
        with TraceOutput(directory) as out:
            # Checked again under the directory lock: what another run did meanwhile counts.
            check_output_dir(directory, args.force)
            check_earlier_tokens(directory, args.force, token_ids)
            # Only the stage files vetted just now may be replaced; one that appears later
            # (another process) is refused unless --force (engine.fileio.OutputExistsError).
            replaceable = {path for path in directory.rglob("*.bin") if path.is_file()}

            def may_replace(path: Path) -> bool:
                return args.force or path in replaceable

            # tokens.json first, marked incomplete: it marks the directory as ours, also after
            # an interrupted run, and says the stage files are not all there yet.
            out.record(write_tokens_json(directory, token_ids, prompt, model_path, complete=False))
            # Big stage files are written by a background thread while the pass computes on.
            files, size, _ = cost
            writer = Writer(out, may_replace, file_bytes=size / max(files, 1))
            nonfinite = NonFinite()
            try:
                with (
                    Progress(f"tracing {model_path.name}") as progress,
                    Interrupt() as interrupt,
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
                            nonfinite.check(capture)
            finally:
                written = writer.close()
            if interrupt.cancel.is_set():
                raise KeyboardInterrupt
            # The run's last write: the directory is complete.
            write_tokens_json(directory, token_ids, prompt, model_path, complete=True)
        config = model.config

    ours = set(written)
    stale = [p for p in directory.rglob("*.bin") if p not in ours] if directory.exists() else []
    lines: list[Line] = [("=== apr-tui trace --save-tensor ===", "bold cyan")]
    lines.append(f"Model:        {model_path}")
    lines.append(f"Stages:       {args.save_tensor}")
    lines.append(f"Layers:       {_layers_line(plan, config.num_layers, args)}")
    where = "" if args.save_tensor_dir else default_dir_note(model_path)
    lines.append(f"Output dir:   {directory}" + (f" ({where})" if where else ""))
    lines.append(f"Device:       {backend.device_name}")
    lines.append("")
    if prompt is not None:
        lines.append(f'Test prompt:  "{shown_prompt(prompt)}"')
    else:
        lines.append("Test prompt:  (token ids given with --tokens)")
    lines.append(f"Token ids:    {shown_ids(token_ids)} ({len(token_ids)} tokens)")
    lines.append("")
    total_bytes = sum(path.stat().st_size for path in written)
    lines.append(
        [
            ("Wrote", "bold green"),
            f" {len(written)} stage tensor file(s), {_human(total_bytes)}, and tokens.json:",
        ]
    )
    if args.verbose:
        lines += [f"  {p} ({p.stat().st_size} bytes)" for p in sorted(written)]
        lines.append(f"  {directory / 'tokens.json'}")
    else:
        lines += [f"  {line}" for line in summarize_written(directory, written)]
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
    lines += nonfinite.report()
    lines.append(f"Compare with another trace or model: apr-tui bisect {model_path} {directory}")
    print_lines(lines)
    return 0


SHOWN_IDS = 64
"""Token ids the report lists in full; a longer prompt's list is cut in the middle (tokens.json
holds them all): 20,000 ids made one 60 KB line."""


def shown_ids(token_ids: list[int]) -> str:
    """The ids as `[1, 2, 3]`, or `[1, 2, …, 9]` past SHOWN_IDS (the first and last halves)."""
    if len(token_ids) <= SHOWN_IDS:
        return str(list(token_ids))
    half = SHOWN_IDS // 2
    head = ", ".join(map(str, token_ids[:half]))
    tail = ", ".join(map(str, token_ids[-half:]))
    return f"[{head}, …, {tail}]"


def shown_prompt(prompt: str) -> str:
    """The prompt inside the report's quotes: backslash and quote escaped, then every control
    character and line separator written as an escape (engine.errors.printable: `\\n`,
    `\\x1b`, `\\u2028`), so that no newline breaks the report and no escape sequence reaches
    the terminal (an ESC[31m in a prompt turned it red)."""
    from engine.errors import printable

    return printable(prompt.replace("\\", "\\\\").replace('"', '\\"'))


FINITE_CHECKED = ("post_ffn_residual", "final_norm", "lm_head", "logits_all")
"""The saved stages `trace` checks for NaN and Inf (the layers' outputs and the model's): a
non-finite value anywhere in a pass reaches them, so they say whether the run produced
garbage, at the cost of one [seq, hidden] scan a layer. Where it began is `bisect`'s job."""


class NonFinite:
    """NaN and Inf in the saved FINITE_CHECKED stages of a trace, for its report."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str, int, int]] = []  # (layer, stage, non-finite, values)

    def check(self, capture) -> None:
        if capture.stage not in FINITE_CHECKED or hasattr(capture.array, "blocks"):
            return
        import numpy as np

        from engine.backend import to_host

        values = np.asarray(to_host(capture.array))
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            self.found.append((capture.layer, capture.stage, bad, int(values.size)))

    def report(self) -> list[Line]:
        """A warning line per checked stage with NaN or Inf (the first layer's and the model's
        outputs), or nothing."""
        from engine.stages import WHOLE_MODEL_LAYER

        if not self.found:
            return []
        layers = [f for f in self.found if f[0] != WHOLE_MODEL_LAYER]
        shown = ([layers[0]] if layers else []) + [f for f in self.found if f not in layers]
        lines: list[Line] = []
        for layer, stage, bad, size in shown:
            where = stage if layer == WHOLE_MODEL_LAYER else f"layer {layer} {stage}"
            first = (
                " (the first layer with any)" if layers and (layer, stage) == layers[0][:2] else ""
            )
            lines.append(
                [("warning:", "bold yellow"), f" {where}: {bad} of {size} values NaN or Inf{first}"]
            )
        return lines
