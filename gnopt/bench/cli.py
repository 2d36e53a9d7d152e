"""``python -m gnopt.bench <suite> [--smoke] [--out DIR] [--overwrite] [options]``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax

from gnopt.bench import common, cost, gpu, layerwise, nls, scaling, step_time, steps

FAST_COMPILE = "jax_disable_most_optimizations"
SUITES = {
    "cost": (cost, "GGN product / inner step / outer GN step vs gradient and AdamW"),
    "steps-to-target": (steps, "steps, tokens and time to a target loss at one large batch"),
    "step-time": (step_time, "trainer steps of gin/steps rows timed side by side, round-robin"),
    "batch-scaling": (scaling, "steps to target vs batch size, with the gradient noise scale"),
    "gpu": (gpu, "cost and steps-to-target on the 45m model, one GPU"),
    "nls": (nls, "Moré-Garbow-Hillstrom least-squares problems, GN with LM damping"),
    "layerwise": (layerwise, "layerwise GGN product FLOPs and GN step time, zero-filled vs restricted"),
}
OUTPUT_RULE = """\
where results go:
  A full run writes results/<suite>/<name>.json and .png (nls: .md; gpu:
  results/gpu/<part>_<model>.json), relative to the current folder; --out DIR
  and --name NAME change them. Each JSON records the machine, the date, the
  exact command and the git commit of the code ("commit"; "dirty": tracked
  files outside results/ differed from it). A run never replaces an existing
  file: it stops with exit code 2 before running, unless --overwrite is given;
  to keep the committed results, choose a new --name or --out instead.
  A --smoke run writes to a new temporary folder,
  $TMPDIR/gnopt-bench-<suite>-smoke-XXXXXXXX ($TMPDIR: default /tmp; the
  folder is printed at the start), and never into results/, unless --out says so."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m gnopt.bench", description=__doc__,
                                  epilog=OUTPUT_RULE,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = top.add_subparsers(dest="suite", required=True)
    for name, (module, help_text) in SUITES.items():
        sub = subs.add_parser(name, help=help_text, description=module.__doc__.splitlines()[0],
                              epilog=OUTPUT_RULE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--smoke", action="store_true",
                         help="CI-sized run on CPU (seconds), into a new temporary folder")
        sub.add_argument("--out", help=f"result folder (default results/{name}; with --smoke "
                                       f"a new temporary folder)")
        sub.add_argument("--overwrite", action="store_true",
                         help="replace existing result files (default: refuse, exit code 2)")
        module.add_arguments(sub)
    return top


def resolve(args: argparse.Namespace, module) -> argparse.Namespace:
    """Fills unset options from the suite's full or smoke preset, and the result folder."""
    preset = getattr(module, "SMOKE" if args.smoke else "FULL", {})
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None and args.smoke:  # never into results/: smoke figures are not results
        args.out = tempfile.mkdtemp(prefix=f"gnopt-bench-{args.suite}-smoke-")
        print(f"smoke run: results go to {args.out}", flush=True)
    elif args.out is None:
        args.out = os.path.join("results", args.suite)
    return args


def planned_outputs(module, args: argparse.Namespace) -> list[str]:
    """The files a run will write, for the check before it starts: the suite's
    ``outputs(args)`` where it has one, else ``out/<name>.json`` and ``.png``.
    (:func:`gnopt.bench.common.write_result` checks every JSON again when it writes.)"""
    if hasattr(module, "outputs"):
        return list(module.outputs(args))
    name = getattr(args, "name", None)
    return [os.path.join(args.out, name + ext) for ext in (".json", ".png")] if name else []


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad options or an existing result file,
    one line on stderr)."""
    args = parser().parse_args(argv)
    module = SUITES[args.suite][0]
    unoptimised = jax.config.read(FAST_COMPILE)
    jax.config.update(FAST_COMPILE, args.smoke or unoptimised)  # smoke: compile time dominates
    try:
        with common.output_rule(overwrite=args.overwrite):
            resolve(args, module)
            for path in planned_outputs(module, args):
                common.check_new(path)
            module.run(args, argv)
    except ValueError as e:
        print(f"gnopt.bench {args.suite}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        jax.config.update(FAST_COMPILE, unoptimised)
    return 0
