"""``gpu`` suite: ``cost`` and ``steps-to-target`` on the 45m model, one GPU.

Sized for a budget of 15 minutes of GPU-machine time, machine start-up
included: both parts in one call of under 10 minutes on one H100/H200,
``cost`` first (about 3 minutes, compile-bound) and ``steps`` second — a
time estimate from FLOP counts and CPU compile times, not yet a measurement.
``cost`` runs the paper's 45M model (vocabulary 32000) in bf16 on 64 × 1024
tokens, the line search (and PI-Muon's trust ratio) on 8 of them: with all 64,
PI-Muon's step alone needs about 102 GiB (XLA's buffer assignment). ``steps``
runs the same model at byte-level vocabulary (256, for the default corpus) on
256 × 512 tokens per step, to four targets, with the optimizers in the order
they matter for the step goals (full GN, Muon, SOAP, AdamW, layerwise GN,
PI-Muon) and a two-point learning-rate grid for the first-order ones; its JSON
is rewritten after each optimizer, so a call cut off at its limit still
returns the optimizers it finished.
``scripts/gpu/run.sh`` is the prepared device command; ``--smoke`` runs the
same code at CI size on CPU. Each part writes ``<out>/<part>_<model>.json`` and
``.png`` (default ``results/gpu/cost_45m.json`` and ``steps_45m.json``), under
the same rule as every suite: an existing file is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from gnopt.bench import cost, steps

PARTS = ("cost", "steps")
FULL_PARTS = {
    "cost": dict(cost.FULL, model="45m", dtype="bfloat16", batch=64, seq=1024, inner_batch=8,
                 ls_batch=8, repeats=5, products=4),
    "steps": dict(steps.FULL, model="45m", vocab_size=256, dtype="bfloat16", seq=512, batch=256,
                  inner_batch=16, ls_batch=32, warmup_steps=200, warmup_batch=32, warmup_lr=1e-3,
                  target=[2.2, 2.0, 1.8, 1.6], max_steps=100, max_gn_steps=12, val_batch=32,
                  val_batches=2,
                  optimizers=["gn_full", "muon", "soap", "adamw", "gn_layerwise", "pi_muon"],
                  lr=["gn_full=0.01", "muon=0.02,0.04", "soap=3e-3,6e-3", "adamw=1e-3,3e-3",
                      "gn_layerwise=0.01", "pi_muon=0.01"]),
}
CHECKS = {"cost": cost.check, "steps": steps.plan}
RUNS = {"cost": cost.run, "steps": steps.run}
SMOKE_PARTS = {"cost": cost.SMOKE, "steps": dict(steps.SMOKE, optimizers=["adamw"])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=PARTS + ("all",), default="all",
                        help="which measurement to run (default: both, sized for one "
                             "10-minute call)")


def part_options(part: str, smoke: bool, out: str) -> argparse.Namespace:
    """The resolved options of one part (its preset, writing ``out/<part>_<model>.json``)."""
    preset = (SMOKE_PARTS if smoke else FULL_PARTS)[part]
    return argparse.Namespace(**{"peak_flops": None, **preset}, out=out,
                              name=f"{part}_{preset['model']}")


def outputs(o) -> list[str]:
    """The files the chosen parts write (checked before any part runs)."""
    parts = PARTS if o.part == "all" else (o.part,)
    names = [part_options(part, o.smoke, o.out).name for part in parts]
    return [os.path.join(o.out, name + ext) for name in names for ext in (".json", ".png")]


def run(o, argv: list[str] | None) -> dict[str, Any]:
    """Runs the chosen parts with the GPU presets; returns their records by part."""
    parts = PARTS if o.part == "all" else (o.part,)
    chosen = {part: part_options(part, o.smoke, o.out) for part in parts}
    for part, options in chosen.items():  # every part's preset checked before any runs
        CHECKS[part](options)
    return {part: RUNS[part](options, argv) for part, options in chosen.items()}
