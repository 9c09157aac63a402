"""The ``tokenprune`` command (also ``python -m tokenprune``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .registry import REGISTRIES

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    stages = [args.stage.rstrip("s")] if args.stage else list(REGISTRIES)
    for stage in stages:
        registry = REGISTRIES[stage]
        names = registry.list(args.pattern)
        print(f"{stage}s ({len(names)}):")
        if not names:
            print("  (none registered)")
        width = max((len(n) for n in names), default=0)
        for name in names:
            print(f"  {name:<{width}}  {registry.summary(name)}".rstrip())
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenprune",
        description="Training-free visual-token pruning for vision-language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", help="show registered adapters, allocators, selectors and presets")
    listing.add_argument(
        "stage",
        nargs="?",
        choices=["adapters", "allocators", "selectors", "adapter", "allocator", "selector"],
        help="only this stage",
    )
    listing.add_argument("--pattern", default="*", help="shell-style wildcard, e.g. 'hired*'")
    listing.set_defaults(func=_cmd_list)

    from tokenprune.adapters.sharegpt4v_convert import add_convert_parser

    add_convert_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
