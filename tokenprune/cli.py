"""The ``tokenprune`` command (also ``python -m tokenprune``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import TokenpruneError
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


def _cmd_compat(args: argparse.Namespace) -> int:
    from . import compat

    if args.action == "install":
        written = compat.install_hook(force=args.force)
        print(f"wrote {written}" if written else "torchvision's ops load here (or it is absent): no hook needed")
    elif args.action == "uninstall":
        print(f"removed {compat.hook_path()}" if compat.uninstall_hook() else "no hook was installed")
    else:
        where = f"installed at {compat.hook_path()}" if compat.hook_path().exists() else "not installed"
        print(f"hook {where}; torchvision ops available: {compat.torchvision_ops_available()}")
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

    # each command's module adds its own parser; the converter's is argparse only (it loads
    # the conversion code when the command runs)
    from .doctor import add_doctor_parser
    from .experiments.sweep import add_sweep_parser
    from .run import add_run_parser
    from .tools.sharegpt4v.cli import add_convert_parser

    add_run_parser(sub)
    add_sweep_parser(sub)
    add_convert_parser(sub)
    add_doctor_parser(sub)
    compat = sub.add_parser(
        "compat",
        help="install the start-up hook that lets timm/transformers import beside a broken torchvision",
        description="Where torchvision's C++ ops cannot load beside this torch, programs that import timm "
        "or transformers before tokenprune (accelerate launch does) fail. 'install' writes a one-line .pth "
        "hook into this environment that runs tokenprune's shim right before the first import of torchvision "
        "(only where it is needed, unless --force).",
    )
    compat.add_argument("action", choices=["install", "uninstall", "status"])
    compat.add_argument("--force", action="store_true", help="install even where torchvision works")
    compat.set_defaults(func=_cmd_compat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TokenpruneError as error:  # our errors are written for people: no traceback
        print(f"tokenprune {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
