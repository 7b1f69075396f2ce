"""The ``strpnet`` program: one command, subcommands, ``--help`` on each.

Each subcommand lives in its own module under ``strpnet_core.commands`` and exposes
``register(subparsers: argparse._SubParsersAction) -> None``, which adds its parser and sets
``func=<callable(args) -> int>``. Modules are imported lazily so ``strpnet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("synth", "validate", "preprocess", "train", "simulate", "predict", "report")


def _available_commands() -> list[str]:
    found = []
    for name in COMMANDS:
        if importlib.util.find_spec(f"strpnet_core.commands.{name}") is not None:
            found.append(name)
    return found


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``strpnet`` with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="strpnet",
        description="ST-RPNet federated: glioblastoma recurrence location and risk from longitudinal MRI.",
    )
    parser.add_argument("--version", action="version", version=f"strpnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _available_commands():
        importlib.import_module(f"strpnet_core.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``strpnet`` console script; returns the process exit code."""
    # Privacy: Flower's telemetry is off, and SuperLinks never install dependencies at run time.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request (the SuperLink's health)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
