"""``steps-to-target`` suite: Abreu et al. (2025) Figure 1, scaled to the tiny model.

A short AdamW warm-up at a small batch gives the shared starting point (kept
in memory, every run copies it). Then, at one large batch, every optimizer
trains from it until the validation loss reaches ``--target``: steps, tokens and
step wall time to the target, each baseline over its learning-rate grid (the
best: fewest steps). Runs that miss the target stop at ``--max-steps``
(first-order) or ``--max-gn-steps`` (second-order) and are reported as not
reached. With several ``--target`` values every run goes to the lowest, and
steps to each target (with the best lr for that target) are read off the same
curves. ``--ls-batch`` shrinks the fresh batch that GN's line search and
PI-Muon's trust ratio are scored on; ``--ls-stop-at-rise`` ends GN's grid
search at the first rise. ``--ramp-steps`` sets the baselines' learning-rate
ramp; ``--decay-steps T`` gives the first-order baselines
a cosine decay to step ``T`` instead of a constant learning rate (sweep ``T``
to check that GN's lead is not the baselines' missing anneal);
``--model-field d_model=128`` (repeatable) changes the preset's shape.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import jax

from gnopt import models
from gnopt.bench import common, plots, runs

FULL = dict(model="tiny", vocab_size=None, dtype="float32", seq=64, batch=128, inner_batch=8,
            warmup_steps=150, warmup_batch=16, warmup_lr=3e-3, target=[2.45], max_steps=120,
            max_gn_steps=16, eval_every=1, val_batch=64, val_batches=4, max_bytes=None,
            optimizers=None, lr=[], ls_batch=None, ls_stop_at_rise=False, model_field=[],
            ramp_steps=5, decay_steps=None, pi_gains=None, gin_param=[], seed=0)
SMOKE = dict(FULL, seq=16, batch=4, inner_batch=2, warmup_steps=2, warmup_batch=2, max_steps=2,
             max_gn_steps=2, val_batch=2, val_batches=1, max_bytes=300_000,
             optimizers=["adamw", "gn_layerwise"], lr=["adamw=1e-2", "muon=0.02", "soap=3e-3"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(models.PRESETS), help="LLaMA preset (tiny)")
    parser.add_argument("--vocab-size", type=int, help="override the preset's vocabulary")
    parser.add_argument("--model-field", action="append", metavar="FIELD=VALUE",
                        help="override a field of the preset, e.g. d_model=128 (repeatable)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (float32)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (64)")
    parser.add_argument("--batch", type=int, help="the large batch, in sequences (128)")
    parser.add_argument("--inner-batch", type=int, help="GN inner micro-batch in sequences (8)")
    parser.add_argument("--ls-batch", type=int,
                        help="second-order line-search / trust-ratio batch in sequences, a "
                             "fresh batch each step (default: --batch, as in the paper)")
    parser.add_argument("--ls-stop-at-rise", action="store_true", default=None,
                        help="GN's grid line search stops at the first rise of the loss")
    parser.add_argument("--ramp-steps", type=int,
                        help="first-order baselines' linear lr ramp in steps (5)")
    parser.add_argument("--decay-steps", type=int,
                        help="first-order baselines decay their lr by a cosine to 0.1x at this "
                             "step (default: constant after a 5-step ramp)")
    parser.add_argument("--warmup-steps", type=int, help="AdamW warm-up steps (150)")
    parser.add_argument("--warmup-batch", type=int, help="warm-up batch in sequences (16)")
    parser.add_argument("--warmup-lr", type=float, help="warm-up peak learning rate (3e-3)")
    parser.add_argument("--target", type=float, nargs="+",
                        help="target validation loss(es) (2.45); runs stop at the lowest, "
                             "steps to each are reported")
    parser.add_argument("--max-steps", type=int, help="step cap of first-order runs (120)")
    parser.add_argument("--max-gn-steps", type=int, help="step cap of second-order runs (16)")
    parser.add_argument("--eval-every", type=int, help="validate every this many steps (1)")
    parser.add_argument("--val-batch", type=int, help="validation batch in sequences (64)")
    parser.add_argument("--val-batches", type=int, help="validation batches (4)")
    parser.add_argument("--max-bytes", type=int, help="cap on corpus bytes read (all)")
    parser.add_argument("--optimizers", nargs="+",
                        help="subset to run (all of gin/steps/), by name, or gin files of "
                             "your own (PATH.gin: its train.optimizer, swept over its "
                             "LEARNING_RATES, see gin/base/steps.gin)")
    parser.add_argument("--lr", action="append", metavar="NAME=LR[,LR...]",
                        help="replace an optimizer's learning-rate grid (repeatable)")
    parser.add_argument("--pi-gains", metavar="KP,KI",
                        help="PI-Muon rows: the fusion weight's PI gains (default 0.2,0.1)")
    parser.add_argument("--gin-param", action="append", metavar="BINDING",
                        help="a gin binding applied to every optimizer's file, e.g. "
                             "'gnopt.pi_muon.plane_damping = 0.1' (repeatable)")
    parser.add_argument("--seed", type=int,
                        help="order of the training batches, warm-up included (0); the "
                             "model's initialisation and the validation batches stay fixed")
    parser.add_argument("--name", default="steps_to_target", help="result file name")


def parse_grids(items: list[str], table: dict[str, runs.Optimizer]) -> dict[str, tuple[float, ...]]:
    """``["adamw=1e-3,3e-3"]`` -> ``{"adamw": (1e-3, 3e-3)}``; unknown names are errors."""
    grids = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in table or not values:
            raise ValueError(f"--lr {item!r}: expected NAME=LR[,LR...] with NAME in {sorted(table)}")
        grids[name] = tuple(float(v) for v in values.split(","))
    return grids


def parse_model_fields(items: list[str]) -> dict[str, Any]:
    """``["d_model=128", "mlp=swiglu"]`` -> ``{"d_model": 128, "mlp": "swiglu"}`` (numbers parsed)."""
    fields = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--model-field {item!r}: expected FIELD=VALUE, e.g. d_model=128")
        fields[name] = _number_or_text(value)
    return fields


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def selected(o, table: dict[str, runs.Optimizer]) -> list[runs.Optimizer]:
    names = o.optimizers or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"--optimizers: unknown {unknown}; known: {sorted(table)}")
    return [table[n] for n in names]


def model_config(o) -> models.LLaMAConfig:
    """The preset with ``--vocab-size`` and ``--model-field`` applied."""
    overrides = parse_model_fields(o.model_field)
    if o.vocab_size:
        overrides["vocab_size"] = o.vocab_size
    return common.model_config(o.model, dtype=o.dtype, seq_len=o.seq, **overrides)


def setup(o) -> tuple[Any, runs.Data, Any, dict]:
    """Model config, corpus, evaluator and warmed-up parameters."""
    config = model_config(o)
    corpus = runs.Data.stdlib(o.seq, val_batch=o.val_batch, val_batches=o.val_batches,
                              max_bytes=o.max_bytes, seed=o.seed)
    evaluate = runs.make_evaluator(corpus.val_batches)
    params = models.LLaMA(config, key=jax.random.PRNGKey(0))
    print(f"{models.describe(params)}", flush=True)
    params, warm = runs.warm_up(params, corpus, evaluate, steps=o.warmup_steps,
                                batch_size=o.warmup_batch, lr=o.warmup_lr)
    print(f"warm-up: {o.warmup_steps} AdamW steps at batch {o.warmup_batch}: validation loss "
          f"{warm['curve'][0]['val_loss']:.4f} -> {warm['final_val_loss']:.4f}", flush=True)
    return params, corpus, evaluate, {"model": models.describe(params),
                                      "warmup": {k: v for k, v in warm.items() if k != "optimizer"}}


def optimizer_table(o) -> dict[str, runs.Optimizer]:
    """The optimizers of ``gin/steps/`` (and the gin files among ``--optimizers``) with the
    options' ramp, decay, inner batch, line search, PI gains and ``--gin-param`` bound."""
    if o.ramp_steps < 0:
        raise ValueError(f"--ramp-steps {o.ramp_steps} must be >= 0")
    if o.decay_steps is not None and o.decay_steps <= o.ramp_steps:
        raise ValueError(f"--decay-steps {o.decay_steps} must exceed --ramp-steps {o.ramp_steps}")
    bindings = [f"RAMP_STEPS = {o.ramp_steps}", f"DECAY_STEPS = {o.decay_steps}",
                f"INNER_BATCH = {o.inner_batch}", f"LS_STOP_AT_RISE = {bool(o.ls_stop_at_rise)}"]
    if o.pi_gains is not None:
        try:
            gains = tuple(float(x) for x in o.pi_gains.split(","))
        except ValueError:
            gains = ()
        if len(gains) != 2 or min(gains) < 0:
            raise ValueError(f"--pi-gains {o.pi_gains!r} must be two numbers >= 0, KP,KI")
        bindings += [f"gnopt.control.fusion_weight_controller.kp = {gains[0]!r}",
                     f"gnopt.control.fusion_weight_controller.ki = {gains[1]!r}"]
    bindings += o.gin_param or []
    table = runs.optimizers(bindings)
    for path in (o.optimizers or []):
        if path.endswith(".gin"):
            table[path] = dataclasses.replace(runs.from_gin(path, bindings), name=path)
    return table


def plan(o) -> tuple[list[runs.Optimizer], dict[str, tuple[float, ...]]]:
    """Checks resolved options ``o``; returns the chosen optimizers and their lr grids."""
    table = optimizer_table(o)
    grids = parse_grids(o.lr, table)
    chosen = selected(o, table)
    if o.batch % o.inner_batch:
        raise ValueError(f"--batch {o.batch} must be a multiple of --inner-batch {o.inner_batch}")
    check_ls_batch(o, o.batch)
    model_config(o)
    return chosen, {opt.name: grids.get(opt.name, opt.learning_rates) for opt in chosen}


def run(o, argv: list[str] | None) -> dict[str, Any]:
    """Runs the suite with resolved options ``o``; returns the result record."""
    chosen, grids = plan(o)
    params, corpus, evaluate, meta = setup(o)
    results, files = [], gin_files(chosen)
    for opt in chosen:
        cap = o.max_gn_steps if opt.second_order else o.max_steps
        results.append(runs.sweep(opt, grids[opt.name], params, corpus,
                                  evaluate, batch_size=o.batch, max_steps=cap, targets=o.target,
                                  eval_every=o.eval_every, ls_batch_size=o.ls_batch))
        # Written after each sweep, so that a run cut off by a time limit keeps what it finished.
        summary, by_target = summarise(results), summarise_targets(results)
        record = {"suite": "steps-to-target", "options": vars_of(o), "target_metric": "val_loss",
                  "complete": len(results) == len(chosen), **meta, **files,
                  "summary": summary,
                  "by_target": by_target, "results": results}
        path = common.write_result(o.out, o.name, record, argv)
    title = f"batch {o.batch} x {o.seq} tokens, best learning rate of each"
    plots.loss_curves(results, o.target, path.replace(".json", ".png"), title=title)
    if plots.fusion_diagnostics(results, path.replace(".json", "_fusion.png"), title=title):
        print(f"wrote {path.replace('.json', '_fusion.png')}")
    print(steps_table(summary, by_target, o.target))
    print(f"wrote {path}")
    return record


def gin_files(chosen: list[runs.Optimizer]) -> dict[str, Any]:
    """``{"gin_files": {path: text}}`` of the rows given as gin files of your own (so that a
    result names what it ran); ``{}`` when there are none."""
    texts = {opt.name: Path(opt.name).read_text() for opt in chosen if opt.name.endswith(".gin")}
    return {"gin_files": texts} if texts else {}


def vars_of(o) -> dict[str, Any]:
    return {k: v for k, v in vars(o).items() if k not in ("func", "out")}


def check_ls_batch(o, batch: int) -> None:
    if o.ls_batch is not None and not 0 < o.ls_batch <= batch:
        raise ValueError(f"--ls-batch {o.ls_batch} must be in 1..{batch} (the batch)")


def summarise(results: list[dict]) -> dict[str, Any]:
    """Best run of each optimizer (lowest target) and step ratios against full GN."""
    rows = {r["optimizer"]: {k: r[k] for k in ("best_lr", "grid", "steps_to_target",
                                                "tokens_to_target", "wall_s_to_target")}
            for r in results}
    for r in results:
        best = next(run for run in r["runs"] if run["lr"] == r["best_lr"])
        rows[r["optimizer"]].update(final_val_loss=best["final_val_loss"], steps_run=best["steps"],
                                    seconds_per_step=best["curve"][-1]["wall_s"] / max(1, best["steps"]))
    _add_ratios(rows)
    return rows


def summarise_targets(results: list[dict]) -> dict[str, dict]:
    """``{target: {optimizer: best lr, steps, tokens, wall s, steps / full GN's}}``."""
    by_target = {}
    for target in results[0]["by_target"]:
        by_target[target] = {r["optimizer"]: dict(r["by_target"][target]) for r in results}
        _add_ratios(by_target[target])
    return by_target


def _add_ratios(rows: dict[str, dict]) -> None:
    gn = rows.get("gn_full", {}).get("steps_to_target")
    for row in rows.values():
        row["steps_vs_gn_full"] = (row["steps_to_target"] / gn
                                   if gn and row["steps_to_target"] else None)


def steps_table(summary: dict, by_target: dict, targets: list[float]) -> str:
    lines = [f"target validation loss {min(targets)}",
             f"{'optimizer':<16}{'best lr':>9}{'steps':>7}{'tokens':>10}{'wall s':>8}"
             f"{'s/step':>8}{'final val':>10}{'vs GN':>7}"]
    for name, r in summary.items():
        reached = r["steps_to_target"] is not None
        steps = r["steps_to_target"] if reached else f">{r['steps_run']}"
        ratio = "-" if r["steps_vs_gn_full"] is None else f"{r['steps_vs_gn_full']:.1f}x"
        lines.append(f"{name:<16}{r['best_lr']:>9g}{steps:>7}"
                     f"{(r['tokens_to_target'] or 0):>10}{(r['wall_s_to_target'] or 0):>8.1f}"
                     f"{r['seconds_per_step']:>8.2f}{r['final_val_loss']:>10.4f}{ratio:>7}")
    if len(by_target) > 1:
        lines.append("steps to each target (best lr for that target; x = steps / full GN's)")
        lines.append(f"{'optimizer':<16}" + "".join(f"{t:>14}" for t in by_target))
        for name in next(iter(by_target.values())):
            cells = []
            for rows in by_target.values():
                r = rows[name]
                ratio = "" if r["steps_vs_gn_full"] is None else f" {r['steps_vs_gn_full']:.1f}x"
                cells.append(f"{(r['steps_to_target'] or '-')}{ratio}")
            lines.append(f"{name:<16}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)
