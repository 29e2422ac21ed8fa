"""Command-line arguments shared by the examples, each checked while parsing, before any model loads.

A bad value stops the script at once with argparse's usage line and a message naming the argument, the
value received and what is allowed, e.g. ``needle.py: error: argument --depth: 1.5 is out of range;
expected 0 <= depth <= 1``.
"""

from __future__ import annotations

import argparse

import torch

from flexprefill_hf import FlexPrefillConfig


def int_at_least(minimum: int):
    """An argparse ``type`` accepting an int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int; expected an int >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range; expected an int >= {minimum}")
        return value

    return parse


def float_between(name: str, low: float, high: float):
    """An argparse ``type`` accepting a float with ``low <= value <= high`` (NaN is refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected {low:g} <= {name} <= {high:g}") from None
        if not low <= value <= high:  # also False for NaN
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {low:g} <= {name} <= {high:g}")
        return value

    return parse


def config_float(field: str):
    """An argparse ``type`` for a float field of :class:`FlexPrefillConfig`: the value is checked by the
    config itself, so the message is the config's (``gamma=1.5 is not supported; expected 0 < gamma <= 1``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a float for {field}") from None
        try:
            FlexPrefillConfig(**{field: value})
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return parse


def device(text: str) -> str:
    """An argparse ``type`` for ``--device``: "auto" (accelerate's device map) or a torch device string;
    a CUDA device must exist on this machine."""
    if text == "auto":
        return text
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} needs a CUDA device and this machine has none; expected cpu")
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range; this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
            )
    return text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype."""
    parser.add_argument("--model", default=None, help="Hugging Face id or folder; default: embedded SmolLM2-135M")
    parser.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: float32 on the CPU, bfloat16 on a GPU")


def config_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, fields) -> dict:
    """The FlexPrefillConfig fields given on the command line, checked together as one config (a bad
    combination stops the parser); what ``patch_model(model, **overrides)`` applies on top of the preset."""
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    try:
        FlexPrefillConfig(**overrides)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    return overrides


def load(args: argparse.Namespace):
    """(model, tokenizer) for the parsed --model, --device and --dtype."""
    from flexprefill_hf.models import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, device=args.device, dtype=dtype)
