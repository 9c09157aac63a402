"""The one way CLI command modules add their subcommand (no CLI or model imports here)."""

from __future__ import annotations

import argparse
from typing import Any


def add_command(sub: Any, name: str, summary: str, doc: str | None) -> argparse.ArgumentParser:
    """Subcommand ``name`` of ``sub``: ``summary`` in the command list, ``doc`` (the command
    module's docstring) as its ``--help`` description, line breaks kept."""
    return sub.add_parser(name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
