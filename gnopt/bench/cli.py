"""``python -m gnopt.bench <suite> [--smoke] [--out DIR] [options]``."""

from __future__ import annotations

import argparse
import os
import sys

import jax

from gnopt.bench import cost, gpu, scaling, steps

FAST_COMPILE = "jax_disable_most_optimizations"
SUITES = {
    "cost": (cost, "GGN product / inner step / outer GN step vs gradient and AdamW"),
    "steps-to-target": (steps, "steps, tokens and time to a target loss at one large batch"),
    "batch-scaling": (scaling, "steps to target vs batch size, with the gradient noise scale"),
    "gpu": (gpu, "cost and steps-to-target on the 45m model, one GPU"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m gnopt.bench", description=__doc__)
    subs = top.add_subparsers(dest="suite", required=True)
    for name, (module, help_text) in SUITES.items():
        sub = subs.add_parser(name, help=help_text, description=module.__doc__.splitlines()[0])
        sub.add_argument("--smoke", action="store_true", help="CI-sized run on CPU (seconds)")
        sub.add_argument("--out", help=f"result folder (default results/{name})")
        module.add_arguments(sub)
    return top


def resolve(args: argparse.Namespace, module) -> argparse.Namespace:
    """Fills unset options from the suite's full or smoke preset."""
    preset = getattr(module, "SMOKE" if args.smoke else "FULL", {})
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join("results", args.suite)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad options, one line on stderr)."""
    args = parser().parse_args(argv)
    module = SUITES[args.suite][0]
    unoptimised = jax.config.read(FAST_COMPILE)
    jax.config.update(FAST_COMPILE, args.smoke or unoptimised)  # smoke: compile time dominates
    try:
        module.run(resolve(args, module), argv)
    except ValueError as e:
        print(f"gnopt.bench {args.suite}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        jax.config.update(FAST_COMPILE, unoptimised)
    return 0
