"""`apr-tui trace --engine hf|llama.cpp`: write another engine's stages as an APRT directory.

The same plan, output directory rules and tokens.json as `apr-tui trace` (aprtui.commands.trace),
with the stages taken from HF transformers (`--dtype float32|float16|bfloat16`) or from
llama.cpp's own graph instead of our forward pass, and a `source.json` beside them that records
the engine and every setting that changes its numbers. So the "HF FP16 oracle" dump of a
bisection session is one command:

    apr-tui trace ./Qwen2.5-0.5B --engine hf --dtype float16 --save-tensor all
"""

from __future__ import annotations

import argparse
from pathlib import Path

ENGINES = ("apr", "hf", "llama.cpp")
"""`apr` is our own forward pass (the default)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="apr",
        help="who runs the model: apr-tui's own forward pass (default), HF transformers "
        "(the [hf] extra) or llama.cpp (llama-cpp-python; GGUF only)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="--engine hf: the torch dtype the model runs in (default float32)",
    )


def run_engine(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from aprtui.commands import trace as trace_command
    from aprtui.commands.trace_checks import check_earlier_tokens, check_output_dir
    from aprtui.commands.trace_writer import Interrupt
    from engine.aprt import write_stage
    from engine.errors import AprTuiError
    from engine.sources.provenance import SOURCE_FILE, write_source_record
    from engine.sources.specs import open_spec
    from engine.stages import SaveTensorPlan
    from engine.tokenizer import parse_token_ids
    from engine.trace_directory import write_tokens_json

    if args.dtype is not None and args.engine != "hf":
        raise AprTuiError(f"--dtype: only --engine hf runs in a chosen dtype, not {args.engine}")
    model_path = Path(args.model)
    if args.save_tensor_dir is not None and not args.save_tensor_dir.strip():
        raise AprTuiError("--save-tensor-dir: empty path (leave the flag out for <stem>-trace)")
    directory = (
        Path(args.save_tensor_dir)
        if args.save_tensor_dir
        else trace_command.default_output_dir(model_path)
    )
    plan = SaveTensorPlan.parse(args.save_tensor, args.save_tensor_layers, directory)
    token_ids = parse_token_ids(args.tokens) if args.tokens is not None else None
    check_output_dir(directory, args.force)
    settings = {"dtype": args.dtype or "float32"} if args.engine == "hf" else {}
    spec = f"{args.engine}:{model_path}"
    source = open_spec(
        spec, token_ids=token_ids, prompt=args.prompt, device=args.device, settings=settings
    )
    written: list[Path] = []
    with source:
        if plan.layer_start >= source.num_layers and any(s.per_layer for s in plan.stages):
            raise AprTuiError(
                f"--save-tensor-layers {args.save_tensor_layers}: the model has "
                f"{source.num_layers} layers (0..{source.num_layers}), so no layer in this "
                "range exists"
            )
        check_earlier_tokens(directory, args.force, source.token_ids)
        write_tokens_json(directory, source.token_ids, source.prompt, model_path)
        wanted = {s.name for s in plan.stages}
        layers = range(plan.layer_start, min(plan.layer_end, source.num_layers))
        whole = any(not s.per_layer for s in plan.stages)
        with Interrupt() as interrupt:
            for capture in source.captures(
                layers=layers, cancel=interrupt.cancel, whole_model=whole
            ):
                if plan.should_save(capture.stage, capture.layer):
                    written.append(
                        write_stage(directory, capture.stage, capture.layer, capture.array)
                    )
        if interrupt.cancel.is_set():
            raise KeyboardInterrupt
        record = source.record()
        write_source_record(directory, record)
        missing = sorted(wanted & set(source.not_produced))
        description = source.description

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold cyan]=== apr-tui trace --engine {escape(args.engine)} ===[/]")
    console.print(f"Model:        {escape(str(model_path))}")
    console.print(f"Source:       {escape(description)}")
    console.print(f"Stages:       {escape(args.save_tensor)}")
    console.print(f"Layers:       {escape(args.save_tensor_layers)}")
    console.print(f"Output dir:   {escape(str(directory))}")
    console.print(f"Token ids:    {source.token_ids} ({len(source.token_ids)} tokens)")
    console.print()
    console.print(
        f"[bold green]Wrote[/] {len(written)} stage tensor file(s), tokens.json and {SOURCE_FILE}"
    )
    for path in sorted(written):
        console.print(f"  {escape(str(path))} ({path.stat().st_size} bytes)")
    for name in missing:
        console.print(
            f"  not produced by this engine: {name} ({escape(source.not_produced[name])})"
        )
    for name, meaning in record.get("conventions", {}).items():
        if name in wanted:
            console.print(f"  convention: {name}: {escape(meaning)}")
    console.print(
        f"Compare with our forward pass: apr-tui bisect {escape(str(model_path))} "
        f"{escape(str(directory))}"
    )
    return 0
