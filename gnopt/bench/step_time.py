"""``step-time`` suite: trainer steps of ``gin/steps`` rows timed side by side, round-robin.

The steps-to-target suite runs its optimizers one after another, so its
seconds per step carry whatever the machine did meanwhile. Here every chosen
row (``--optimizers``, the first is the reference) starts from the same warmed-up
parameters (the steps-to-target warm-up), is compiled ahead of time and warmed up
by two steps; then each timed round gives every row one step on the same fresh
batch pair (the step's batch and the next one, the second-order rows' trust /
line-search batch), each row carrying its own parameters and state. Reported:
each row's median over ``--repeats`` rounds, its ratio to the reference's
median, and the fraction of accepted steps where the row reports one (a
rejected PI-Muon step runs one more forward).

On glibc, ``malloc`` moves its mmap and trim thresholds with what was freed
last, and a step that allocates and frees many large buffers (the ten
line-search forwards of layerwise GN) can then page-fault on every call: we
measured one layerwise GN step at batch 128 × 64 at 1.32 s beside 0.77 s with
both thresholds fixed (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``).
Those variables are recorded in the result; set them to compare like with like.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import jax

from gnopt import models
from gnopt.bench import common, runs, steps
from gnopt.train import make_train_step

FULL = dict(steps.FULL, optimizers=["gn_layerwise", "pi_muon"], repeats=7)
SMOKE = dict(steps.SMOKE, optimizers=["gn_layerwise", "pi_muon"], repeats=2, lr=[])
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_",
                       "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(models.PRESETS), help="LLaMA preset (tiny)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (64)")
    parser.add_argument("--batch", type=int, help="the step's batch, in sequences (128)")
    parser.add_argument("--inner-batch", type=int, help="GN inner micro-batch in sequences (8)")
    parser.add_argument("--ls-batch", type=int,
                        help="second-order line-search / trust-ratio batch in sequences (--batch)")
    parser.add_argument("--optimizers", nargs="+",
                        help="gin/steps rows (or PATH.gin) to time; the first is the reference "
                             "(gn_layerwise pi_muon)")
    parser.add_argument("--lr", action="append", metavar="NAME=LR",
                        help="a row's learning rate (default: the middle of its grid)")
    parser.add_argument("--gin-param", action="append", metavar="BINDING",
                        help="a gin binding applied to every row's file (repeatable)")
    parser.add_argument("--repeats", type=int, help="timed rounds (7)")
    parser.add_argument("--name", default="step_time", help="result file name")


def outputs(o) -> list[str]:
    return [os.path.join(o.out, o.name + ".json")]


def _for(opt: runs.Optimizer, pair):
    """The step's batch and, for a second-order row only, the fresh one (as in the
    steps-to-target runs)."""
    return pair if opt.second_order else (pair[0], None)


def run(o, argv: list[str] | None) -> dict[str, Any]:
    """Runs the suite with resolved options ``o``; returns the result record."""
    if o.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {o.repeats}")
    chosen, grids = steps.plan(o)  # each row at the middle of its grid (--lr replaces the grid)
    rows = [(opt, grids[opt.name][len(grids[opt.name]) // 2]) for opt in chosen]
    params, corpus, _, meta = steps.setup(o)
    pipeline = corpus.pipeline(o.batch)
    pairs = [(next(pipeline), jax.tree.map(lambda x: x[:o.ls_batch], next(pipeline)))
             for _ in range(o.repeats + 2)]
    carried = []
    for opt, lr in rows:
        tx = opt.build(lr, o.repeats + 2)
        step = make_train_step(tx, common.LOSS, check_grads=not opt.second_order)
        state = common.copy_tree(tx.init(params))
        compiled = step.lower(params, state, *_for(opt, pairs[0])).compile()
        carried.append([compiled, common.copy_tree(params), state, opt])
    seconds = [[] for _ in rows]
    accepted = [[] for _ in rows]
    for i, pair in enumerate(pairs):
        for k, entry in enumerate(carried):
            start = time.perf_counter()
            out = jax.block_until_ready(entry[0](entry[1], entry[2], *_for(entry[3], pair)))
            if i >= 2:  # the first two calls of an executable are slower
                seconds[k].append(time.perf_counter() - start)
                if "accepted" in out[4]:
                    accepted[k].append(float(out[4]["accepted"]))
            entry[1], entry[2] = out[0], out[1]
    reference = statistics.median(seconds[0])
    table = [{"optimizer": opt.name, "lr": lr, "median_s": statistics.median(t),
              "ratio": statistics.median(t) / reference, "seconds": t,
              "accepted_fraction": statistics.fmean(a) if a else None}
             for (opt, lr), t, a in zip(rows, seconds, accepted)]
    record = {"suite": "step-time", "options": {k: getattr(o, k) for k in FULL},
              "allocator": {v: os.environ.get(v) for v in ALLOCATOR_VARIABLES},
              **meta, "rows": table}
    path = common.write_result(o.out, o.name, record, argv)
    for r in table:
        acc = "-" if r["accepted_fraction"] is None else f"{r['accepted_fraction']:.2f}"
        print(f"{r['optimizer']:<24}{1e3 * r['median_s']:>10.1f} ms{r['ratio']:>8.3f}x  accepted {acc}")
    print(f"wrote {path}")
    return record
