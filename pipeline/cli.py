"""The `manifoldgd` command line.

Each command lives in the module named in ``COMMANDS``, which exposes ``register(subparsers)``: it adds
its parser(s) and sets ``func`` to a callable taking the parsed namespace and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import __version__
from pipeline.common import log

# command -> (module that defines and runs it, one-line help), in the order `--help` lists them.
COMMANDS = {
    "distill": ("pipeline.distill.run", "distill a labelled image dataset into IPC synthetic images per class"),
    "print-config": ("pipeline.distill.run", "print the resolved config as YAML"),
    "export-dataset": ("pipeline.inputs.datasets",
                       "write a built-in dataset as PNG ImageFolders (DIR/<split>/<class>/)"),
    "train-prior": ("pipeline.prior.train",
                    "train a small class-conditional latent diffusion prior (AutoencoderKL + DiT) with Ray Train"),
    "prior-quality": ("pipeline.eval.prior_quality",
                      "fraction of unguided class-conditional samples a real-data classifier assigns to their class"),
    "evaluate": ("pipeline.eval.evaluate", "train students on a distilled set and test them on real images"),
    "benchmark": ("pipeline.eval.benchmark",
                  "baselines + ManifoldGD + the ablation ladder: table, JSON, chart, samples"),
    "demo": ("pipeline.demo", "distill the built-in mnist10k, draw a contact sheet, evaluate vs random real"),
}


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parsers of ``commands`` (default: all) and of their modules' other commands; the rest get
    a placeholder with their help line, enough for ``manifoldgd --help``."""
    parser = argparse.ArgumentParser(
        prog="manifoldgd",
        description="Training-free, manifold-guided dataset distillation on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"manifoldgd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show Ray Data's progress lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if commands is None else commands:
        if name in COMMANDS and name not in sub.choices:
            # The only import that stays lazy: a command's module pulls in torch, Ray and diffusers,
            # and `manifoldgd --help` should not wait for all of them (timings in README's Layout).
            importlib.import_module(COMMANDS[name][0]).register(sub)
    for name, (_, help_line) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_line)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    log.VERBOSE = log.VERBOSE or bool(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
