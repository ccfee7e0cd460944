"""The `manifoldgd` command line.

Each sub-command lives in its own module that exposes ``register(subparsers)``; the parser it adds
sets ``func`` to a callable taking the parsed namespace and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import __version__

# Modules that provide sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "pipeline.distill",
    "pipeline.datasets",
    "pipeline.train_prior",
    "pipeline.prior_quality",
    "pipeline.evaluate",
    "pipeline.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manifoldgd",
        description="Training-free, manifold-guided dataset distillation on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"manifoldgd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command is not part of this build yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
