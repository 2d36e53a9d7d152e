"""``batch-scaling`` suite: steps to target vs batch size, and the gradient noise scale.

From the same warm-up as ``steps-to-target``, each optimizer trains to the
target at each batch size (GN: a fixed inner micro-batch ``--inner-batch``, so
``N = B / b_inner`` inner steps grow with the batch, as in the paper), over a
small learning-rate grid per batch size. Along the AdamW runs at the largest batch,
:func:`gnopt.diagnostics.noise_scale` measures ``B_simple`` (McCandlish et al.
2018) with ``B_small = B_big / 8``: perfect scaling (steps ∝ 1/B) is expected
well below ``B_simple`` and none well above it.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

from gnopt.bench import common, plots, runs, steps

FULL = dict(steps.FULL, sizes=[16, 32, 64, 128, 256], target=[2.6], max_steps=300,
            max_gn_steps=40, optimizers=["adamw", "muon", "soap", "gn_full"],
            lr=["adamw=3e-3,6e-3", "muon=0.04,0.08", "soap=6e-3,1.2e-2", "gn_full=0.01,0.03"])
SMOKE = dict(steps.SMOKE, sizes=[4, 8], max_steps=2, max_gn_steps=1,
             optimizers=["adamw", "gn_full"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    steps.add_arguments(parser)
    parser.set_defaults(name="batch_scaling")
    parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes in sequences (16 ... 256)")


def run(o, argv: list[str] | None) -> dict[str, Any]:
    """Runs the suite with resolved options ``o``; returns the result record."""
    sizes = sorted(o.sizes)
    if len(sizes) < 2 or any(s % o.inner_batch for s in sizes):
        raise ValueError(f"--sizes {sizes}: need >= 2 sizes, each a multiple of "
                         f"--inner-batch {o.inner_batch}")
    steps.check_ls_batch(o, sizes[0])
    small = max(1, sizes[-1] // 8)
    table = steps.optimizer_table(o)
    chosen = [opt.name for opt in steps.selected(o, table)]
    grids = steps.parse_grids(o.lr, table)
    params, corpus, evaluate, meta = steps.setup(o)
    results, noise = [], None
    for size in sizes:
        for name in chosen:
            opt = table[name]
            measure = name == "adamw" and size == sizes[-1]
            if measure:
                opt = runs.with_noise_scale(opt, small)
            cap = o.max_gn_steps if opt.second_order else o.max_steps
            print(f"batch {size}:", flush=True)
            result = runs.sweep(opt, grids.get(name, opt.learning_rates), params, corpus,
                                evaluate, batch_size=size, max_steps=cap, targets=o.target,
                                eval_every=o.eval_every, ls_batch_size=o.ls_batch)
            result["batch_size"] = size
            results.append(result)
            if measure:
                noise = noise_curve(result, small, size, o.seq)
    by_target = {target: {name: {r["batch_size"]: r["by_target"][target]["steps_to_target"]
                                 for r in results if r["optimizer"] == name} for name in chosen}
                 for target in results[0]["by_target"]}
    summary = by_target[runs.target_key(min(o.target))]
    record = {"suite": "batch-scaling", "options": steps.vars_of(o), "target_metric": "val_loss",
              **meta, "steps_to_target": summary, "steps_by_target": by_target,
              "noise_scale": noise, "results": results}
    path = common.write_result(o.out, o.name, record, argv)
    plots.scaling_chart(summary, noise, min(o.target), path.replace(".json", ".png"))
    for target, table in by_target.items():
        print(f"steps to validation loss {target}")
        print(scaling_table(table, sizes, noise if table is summary else None))
    print(f"wrote {path}")
    return record


def noise_curve(result: dict, small: int, big: int, seq: int) -> dict[str, Any]:
    """``B_simple`` along the best AdamW run (sequences; tokens = × seq)."""
    best = next(r for r in result["runs"] if r["lr"] == result["best_lr"])
    points = [(p["step"], p["noise_scale"]) for p in best["curve"]
              if math.isfinite(p.get("noise_scale", math.nan))]
    values = [v for _, v in points]
    later = values[len(values) // 2:] or values
    return {"small_batch": small, "big_batch": big, "lr": best["lr"],
            "steps": [s for s, _ in points], "b_simple": values,
            "b_simple_median_second_half": float(np.median(later)) if later else None,
            "b_simple_tokens_median_second_half": float(np.median(later)) * seq if later else None}


def scaling_table(summary: dict, sizes: list[int], noise: dict | None) -> str:
    lines = [f"{'optimizer':<16}" + "".join(f"{s:>8}" for s in sizes)]
    for name, by_size in summary.items():
        lines.append(f"{name:<16}" + "".join(f"{by_size.get(s) or '-':>8}" for s in sizes))
    if noise and noise["b_simple_median_second_half"] is not None:
        lines.append(f"B_simple (AdamW, batch {noise['big_batch']}, median of the second half): "
                     f"{noise['b_simple_median_second_half']:.1f} sequences")
    return "\n".join(lines)
