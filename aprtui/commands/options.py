"""Options several commands share, so that each means the same thing everywhere."""

from __future__ import annotations

import argparse

from engine.defaults import DEFAULT_THRESHOLD
from engine.tokenizer import DEFAULT_PROMPT

DEVICES = ("auto", "cpu", "cuda")


def cosine_threshold(text: str) -> float:
    """argparse type of `--threshold`: a cosine in [-1, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a cosine in [-1, 1], got {text}")
    return value


class _Given(argparse.Action):
    """Stores the value and records that the user gave the flag (`threshold_given`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def add_threshold(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--threshold",
        type=cosine_threshold,
        default=DEFAULT_THRESHOLD,
        action=_Given,
        metavar="X",
        help=f"{help_text} (default {DEFAULT_THRESHOLD}, apr's documented Q4K noise floor)",
    )
    parser.set_defaults(threshold_given=False)


def prompt_text(text: str) -> str:
    """argparse type of `--prompt`: text that is valid UTF-8 (a command line that is not comes
    in with surrogate escapes, which a tokenizer cannot take)."""
    from engine.tokenizer import check_prompt_text

    try:
        return check_prompt_text(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    """`--prompt TEXT | --tokens IDS`, mutually exclusive."""
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt",
        type=prompt_text,
        metavar="TEXT",
        help=f"prompt to trace (default {DEFAULT_PROMPT!r})",
    )
    prompt.add_argument(
        "--tokens", metavar="IDS", help="comma-separated token ids to trace, e.g. 1,2,3"
    )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the forward pass runs (default auto: CUDA via CuPy when available)",
    )


def parse_layers(text: str | None) -> range | None:
    """`--layers START..END` (END exclusive) as a range, or None when not given; a one-line
    PlanError naming the flag otherwise. One parser for the explorer and bisect."""
    from engine.errors import PlanError
    from engine.stages import parse_layer_range

    if text is None:
        return None
    try:
        start, end = parse_layer_range(text)
    except PlanError as error:
        reason = str(error).split(": ", 1)[-1]
        raise PlanError(f"--layers {text!r}: {reason}") from None
    return range(start, end)
