"""``gpu`` suite: ``cost`` and ``steps-to-target`` on the 45m model, one GPU.

Sized so each part (``--part cost`` / ``--part steps``) finishes within 10
minutes on one H100/H200 (estimated from FLOP counts, not yet measured): cost
at the paper's 45M model (vocabulary 32000) in bf16 on 64 × 1024 tokens;
steps-to-target with the same model at byte-level vocabulary (256, for the
default corpus), 256 × 512 tokens per step. ``--smoke`` runs the same code at
CI size on CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

from gnopt.bench import cost, steps

PARTS = ("cost", "steps")
FULL_PARTS = {
    "cost": dict(cost.FULL, model="45m", dtype="bfloat16", batch=64, seq=1024, inner_batch=8,
                 repeats=5, products=4),
    "steps": dict(steps.FULL, model="45m", vocab_size=256, dtype="bfloat16", seq=512, batch=256,
                  inner_batch=16, warmup_steps=200, warmup_batch=32, warmup_lr=1e-3,
                  target=[1.6], max_steps=200, max_gn_steps=30, val_batch=32, val_batches=4),
}
SMOKE_PARTS = {"cost": cost.SMOKE, "steps": dict(steps.SMOKE, optimizers=["adamw"])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=PARTS + ("all",), default="all",
                        help="which measurement to run (each fits in 10 minutes)")


def run(o, argv: list[str] | None) -> dict[str, Any]:
    """Runs the chosen parts with the GPU presets; returns their records by part."""
    presets = SMOKE_PARTS if o.smoke else FULL_PARTS
    out = {}
    for part in PARTS if o.part == "all" else (o.part,):
        options = argparse.Namespace(**{"peak_flops": None, **presets[part]}, out=o.out,
                                     name=f"{part}_{presets[part]['model']}")
        out[part] = (cost.run if part == "cost" else steps.run)(options, argv)
    return out
