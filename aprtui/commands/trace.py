"""`apr-tui trace MODEL --save-tensor STAGES`: write stage tensors the way `apr trace` does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aprtui.commands import options

HELP = "write APRT stage files as `apr trace --save-tensor` does (plus tokens.json)"

DESCRIPTION = """\
Run our independent forward pass over MODEL (.apr, .gguf, .safetensors or an HF directory)
and write the selected stages as APRT files, with apr's names, layout and defaults:
layer-<N>/<stage>.bin for per-layer stages, final_norm.bin and lm_head.bin (header layer
0xFFFFFFFF) at the root, layers 0..1 unless --save-tensor-layers says otherwise, and the
directory <model-stem>-trace beside the model unless --save-tensor-dir says otherwise.

Beside the stage files goes tokens.json (the token ids traced), so that `apr-tui bisect`
can check that two traces saw the same prompt. The prompt defaults to apr's own,
"What is 2+2?", encoded with the model's tokenizer (no chat template).

STAGES is `all` or a comma list of: embedding, attn_norm, qkv_matmul, qkv_bias, q_post_rope,
k_post_rope, attn_scores, attn_softmax, attention, attn_out, post_attn_residual, ffn_norm,
ffn_gate, ffn_up, ffn_silu, ffn_swigl, ffn_out, post_ffn_residual (alias layer_output),
final_norm, lm_head (the moe_* stages are accepted and never produced by dense models).

The command refuses to write into a directory that holds anything other than stage files
and tokens.json (files it did not write) unless --force is given; it never deletes a file."""

EPILOG = """\
examples:
  apr-tui trace model.gguf --save-tensor all
  apr-tui trace model.apr --save-tensor attn_norm,ffn_swigl,lm_head --save-tensor-layers 0..4
  apr-tui trace model.gguf --save-tensor all --tokens 1,2,3 --save-tensor-dir /tmp/mine

exit codes: 0 written, 2 bad input (unreadable model, bad plan, refused directory)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="model file (.apr/.gguf/.safetensors) or HF dir"
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
    parser.add_argument(
        "--force",
        action="store_true",
        help="write even into a directory holding files other than stage files",
    )


def default_output_dir(model: Path) -> Path:
    """apr's `default_output_dir`: `<model parent>/<model file stem>-trace` (§1.5)."""
    return model.parent / f"{model.stem}-trace"


def foreign_files(directory: Path) -> list[Path]:
    """Everything under `directory` that is not a stage file in apr's layout or tokens.json."""
    from engine.aprt import TOKENS_FILE
    from engine.stages import STAGE_BY_NAME

    per_layer = {f"{s.name}.bin" for s in STAGE_BY_NAME.values() if s.per_layer}
    whole = {f"{s.name}.bin" for s in STAGE_BY_NAME.values() if not s.per_layer}
    found = []
    for child in sorted(directory.iterdir()):
        if child.is_file() and (child.name in whole or child.name == TOKENS_FILE):
            continue
        is_layer_dir = (
            child.is_dir()
            and child.name.startswith("layer-")
            and child.name[6:].isascii()
            and child.name[6:].isdigit()
        )
        if not is_layer_dir:
            found.append(child)
            continue
        for grandchild in sorted(child.iterdir()):
            if not (grandchild.is_file() and grandchild.name in per_layer):
                found.append(grandchild)
    return found


def _check_output_dir(directory: Path, force: bool) -> None:
    from engine.errors import AprTuiError

    if directory.exists() and not directory.is_dir():
        raise AprTuiError(f"--save-tensor-dir {directory}: exists and is not a directory")
    if not directory.exists() or force:
        return
    foreign = foreign_files(directory)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise AprTuiError(
            f"{directory}: holds files apr-tui trace did not write ({foreign[0]}{more}); "
            "choose another --save-tensor-dir or pass --force"
        )


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


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from engine.aprt import write_stage, write_tokens_json
    from engine.backend import resolve_backend
    from engine.formats import open_model
    from engine.forward import trace
    from engine.stages import SaveTensorPlan
    from engine.tokenizer import DEFAULT_PROMPT, encode_prompt, parse_token_ids

    model_path = Path(args.model)
    directory = (
        Path(args.save_tensor_dir) if args.save_tensor_dir else default_output_dir(model_path)
    )
    plan = SaveTensorPlan.parse(args.save_tensor, args.save_tensor_layers, directory)
    backend = resolve_backend(args.device)
    token_ids = parse_token_ids(args.tokens) if args.tokens is not None else None
    _check_output_dir(directory, args.force)

    written: list[Path] = []
    with open_model(model_path) as model:
        prompt = None
        if token_ids is None:
            prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
            token_ids = encode_prompt(model, prompt)
        stage_names = list(dict.fromkeys(s.name for s in plan.stages))  # a duplicate = one file
        with _Progress(f"tracing {model_path.name}") as progress:
            for capture in trace(
                model,
                token_ids,
                backend=backend,
                stages=stage_names,
                layers=(plan.layer_start, plan.layer_end),
                on_layer=progress.update,
            ):
                if plan.should_save(capture.stage, capture.layer):
                    written.append(
                        write_stage(directory, capture.stage, capture.layer, capture.array)
                    )
        write_tokens_json(directory, token_ids, prompt, model_path)
        config = model.config

    console = Console(highlight=False, soft_wrap=True)
    console.print("[bold cyan]=== apr-tui trace --save-tensor ===[/]")
    console.print(f"Model:        {escape(str(model_path))}")
    console.print(f"Stages:       {escape(args.save_tensor)}")
    console.print(f"Layers:       {escape(args.save_tensor_layers)}")
    console.print(f"Output dir:   {escape(str(directory))}")
    console.print(f"Device:       {escape(backend.device_name)}")
    console.print()
    if prompt is not None:
        quoted = prompt.replace("\\", "\\\\").replace('"', '\\"')
        console.print(f'Test prompt:  "{escape(quoted)}"')
    else:
        console.print("Test prompt:  (token ids given with --tokens)")
    console.print(f"Token ids:    {token_ids} ({len(token_ids)} tokens)")
    console.print()
    console.print(f"[bold green]Wrote[/] {len(written)} stage tensor file(s):")
    for path in sorted(written):
        console.print(f"  {escape(str(path))} ({path.stat().st_size} bytes)")
    ours = set(written)
    stale = [p for p in directory.rglob("*.bin") if p not in ours] if directory.exists() else []
    if stale:
        console.print(f"  (and {len(stale)} stage file(s) from an earlier run, left untouched)")
    console.print(f"  {escape(str(directory / 'tokens.json'))}")
    console.print()
    if any(name in stage_names for name in ("final_norm", "lm_head")):
        console.print(
            f"Forward pass succeeded — {config.num_layers} layer activations, "
            f"{config.vocab_size} logits"
        )
    else:
        layers_run = min(plan.layer_end, config.num_layers)
        console.print(
            f"Forward pass succeeded — {layers_run} of {config.num_layers} layers run "
            "(no whole-model stage requested, so the pass stopped after the last saved layer)"
        )
    console.print(
        f"Compare with another trace or model: apr-tui bisect {escape(str(model_path))} "
        f"{escape(str(directory))}"
    )
    return 0
