"""``tokenprune convert sharegpt4v SRC DST``: the argument parser and its handler.

Cheap to import (argparse only): the conversion itself loads when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from tokenprune.errors import TokenpruneError
from tokenprune.runtime import DTYPES

__all__ = ["add_convert_parser", "main", "run_convert_sharegpt4v"]


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``convert sharegpt4v SRC DST [options]`` to an ``add_subparsers()`` object; returns ``convert``."""
    convert = subparsers.add_parser(
        "convert",
        help="convert a released checkpoint to a transformers checkpoint",
        description="Convert a released checkpoint to a transformers checkpoint folder.",
    )
    formats = convert.add_subparsers(dest="format", required=True, metavar="FORMAT")
    sharegpt4v = formats.add_parser(
        "sharegpt4v",
        help="ShareGPT4V / LLaVA-1.5 (original LLaVA layout) -> LlavaForConditionalGeneration",
        description=(
            "Convert a ShareGPT4V or LLaVA-1.5 checkpoint in the original LLaVA layout "
            "(LlavaLlamaForCausalLM / Share4VLlamaForCausalLM) to a transformers "
            "LlavaForConditionalGeneration folder with its LlavaProcessor."
        ),
    )
    sharegpt4v.add_argument(
        "src",
        metavar="SRC",
        help="original checkpoint folder (config.json, weights, tokenizer)",
    )
    sharegpt4v.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty)")
    sharegpt4v.add_argument(
        "--vision-config",
        metavar="PATH",
        help="CLIP vision config.json (or its folder); default: read off the weights",
    )
    sharegpt4v.add_argument(
        "--vision-tower",
        metavar="PATH",
        help="local CLIP checkpoint folder; required when SRC holds no vision tower weights",
    )
    sharegpt4v.add_argument("--dtype", choices=sorted(n for n, d in DTYPES.items() if d is not None), help="cast floating tensors (default: keep)")
    sharegpt4v.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    sharegpt4v.set_defaults(func=run_convert_sharegpt4v)
    return convert


def run_convert_sharegpt4v(args: argparse.Namespace) -> int:
    """Handler of ``tokenprune convert sharegpt4v``: 0 on success, 2 with a message on a tokenprune error."""
    from .convert import convert_sharegpt4v

    try:
        out = convert_sharegpt4v(
            args.src,
            args.dst,
            vision_config=args.vision_config,
            vision_tower=args.vision_tower,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
        )
    except TokenpruneError as error:
        print(f"tokenprune convert sharegpt4v: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone ``convert`` command line (``tokenprune convert ...`` without the rest of the CLI)."""
    parser = argparse.ArgumentParser(prog="tokenprune")
    add_convert_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))
