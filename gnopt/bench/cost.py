"""``cost`` suite: what a Gauss-Newton step costs next to a gradient / AdamW step.

Measured side by side in one process, same model, same data, every function
jitted, compiled ahead of time and warmed up, median of ``--repeats`` calls
(taken round-robin over the functions):

* ``ggn_product / gradient``: ``G v`` through one ``jax.linearize`` (primal),
  a jvp and its transpose vs ``value_and_grad``, on one micro-batch of
  ``--inner-batch`` sequences. FLOP floor ``(2 + 4 + 4)/6 = 1.67``.
* ``ggn_cached / gradient``: the marginal cost of one more product with the
  linearisation cached (``k`` products after one linearize, inside one jit:
  ``(t_k − t_1)/(k − 1)``). Floor ``(4 + 4)/6 = 1.33``.
* ``inner_step / adamw_step``: one step of :class:`gnopt.solvers.InnerOptimizer`
  with inner Muon (a whole solve of ``N = batch / inner_batch`` steps, divided
  by ``N``) vs one trainer step of AdamW on one micro-batch. Floor 1.67.
* ``gn_outer / adamw``: one trainer step of full GN (``N`` inner steps + the
  5-point line search on a fresh batch of ``B_ls`` sequences) vs one AdamW
  trainer step, per token of the step's batch. Floor
  ``(10 + 2 + 2·6·B_ls/B)/6`` (inner steps, the trainer's loss, loss at 0 and 5
  candidates): 4.0 with ``B_ls = B`` as in the paper.
* ``pi_muon_outer / gn_layerwise_outer``: a PI-Muon trainer step (same inner
  solver, layerwise, its trust ratio on the fresh batch) vs a layerwise GN step
  with the 10-point line search, per token (no FLOP floor: the layerwise
  products' cost depends on the block structure).

The outer steps run on text (the steps-to-target corpus), the rest on random
tokens: a PI-Muon step's cost depends on whether it is accepted (a rejected
step runs one more forward), and on random tokens, whose loss cannot fall below
``log V``, every step at batch 128 × 64 was rejected (2026-12-07).
Each row reports ``accepted_fraction`` where its optimizer logs ``accepted``.

Peak memory is XLA's buffer assignment of each compiled function
(``compiled.memory_analysis()``: arguments + outputs + temporaries − donated
aliases), plus the device allocator's running peak where the backend reports
one. On a GPU with a known peak, MFU uses
``6N + 12·L·d·T`` FLOPs per token (``N`` without the embedding table) times
the floor of each function. ``xla_flops`` is XLA's own count of each compiled
loop-free function, a check that no pass is duplicated (XLA counts a loop
body once, so functions with loops have none).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

import gnopt
from gnopt import curvature, data, line_search, models, solvers
from gnopt.bench import common, plots, runs
from gnopt.curvature import LinearisedModel
from gnopt.train import apply_model, make_train_step

FULL = dict(model="tiny", batch=64, seq=128, inner_batch=8, ls_batch=None, repeats=7,
            products=8, dtype="float32", max_bytes=None)
SMOKE = dict(model="tiny", batch=4, seq=16, inner_batch=2, ls_batch=None, repeats=2,
             products=3, dtype="float32", max_bytes=300_000)
GOALS = {"ggn_product": 1.8, "inner_step": 1.8, "gn_outer": 2.5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(models.PRESETS), help="LLaMA preset (tiny)")
    parser.add_argument("--batch", type=int, help="outer batch B in sequences (64)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (128)")
    parser.add_argument("--inner-batch", type=int, help="micro-batch b in sequences (8)")
    parser.add_argument("--ls-batch", type=int, help="line-search batch in sequences (B)")
    parser.add_argument("--repeats", type=int, help="timed calls per function (7)")
    parser.add_argument("--products", type=int, help="k, GGN products per cached linearisation (8)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (float32)")
    parser.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU (default: known GPUs)")
    parser.add_argument("--name", default="cost", help="result file name")


@dataclasses.dataclass
class Piece:
    """One measured function."""

    name: str
    fn: Callable  # the compiled function
    args: tuple
    tokens: int  # tokens it processes per call
    per_call: int = 1  # divide its time by this (inner steps of one solve)
    flop_factor: float | None = 1.0  # model FLOPs per token, in units of 6N + 12·L·d·T (None: no floor)
    carry: bool = False  # a donating trainer step: feed (params, state) back
    loops: bool = False  # has loops: XLA's FLOP count covers one trip of each body only


def _compile(fn, *args, donate: bool = False):
    jitted = fn if donate else jax.jit(fn)
    return jitted.lower(*args).compile()


def _batches(config, batch: int, seq: int, count: int, seed: int = 0):
    """``count`` batches of random tokens (the pieces without data-dependent branches)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), count)
    return [(jax.random.randint(k, (batch, seq), 0, config.vocab_size, jnp.int32),) * 2
            for k in keys]


def _text_batches(batch: int, seq: int, count: int, max_bytes: int | None):
    """``count`` batches of the steps-to-target corpus, for the outer steps: PI-Muon's
    cost depends on the data (a rejected step runs one more forward; on random
    tokens PI-Muon's steps at 128 × 64 were all rejected)."""
    pipeline = runs.Data(data.stdlib_corpus("train", max_bytes=max_bytes), [], seq).pipeline(batch)
    return [next(pipeline) for _ in range(count)]


def _inner_solver(inner_batch: int):
    return solvers.inner_optimizer(gnopt.inner_muon(1e-2), inner_batch)


def _gauss_newton(inner_batch: int, ls_points: int = 5, curv=None):
    return gnopt.gauss_newton(
        apply_model, common.LOSS, solver=_inner_solver(inner_batch),
        curvature=curv or curvature.full(), line_search=line_search.grid(ls_points))


def _pi_muon(inner_batch: int):
    return gnopt.pi_muon(apply_model, common.LOSS, 0.02, damping=0.0,
                         solver=_inner_solver(inner_batch))


def _trainer_step(tx, params, batch, ls_batch, tokens, flop_factor, name, second_order):
    step = make_train_step(tx, common.LOSS, check_grads=not second_order)
    state = common.copy_tree(tx.init(params))
    params = common.copy_tree(params)
    compiled = _compile(step, params, state, batch, ls_batch, donate=True)
    return Piece(name, compiled, (params, state, batch, ls_batch), tokens,
                 flop_factor=flop_factor, carry=True, loops=second_order)


def pieces(config, params, o) -> list[Piece]:
    """The measured functions of one configuration ``o`` (resolved options)."""
    b, big, seq = o.inner_batch, o.batch, o.seq
    ls_big = o.ls_batch or big
    micro = _batches(config, b, seq, 1)[0]
    outer, fresh = _text_batches(max(big, ls_big), seq, 2, o.max_bytes)
    outer = jax.tree.map(lambda x: x[:big], outer)
    ls_batch = jax.tree.map(lambda x: x[:ls_big], fresh)
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(3), x.shape, x.dtype), params)

    def gradient(p, batch):
        return jax.value_and_grad(common.batch_loss)(p, batch)

    def ggn_product(p, batch, v):
        return LinearisedModel(apply_model, common.LOSS, p, batch).ggn_mvp(v)

    def ggn_cached(k):
        def products(p, batch, u):  # unrolled, so that XLA counts every product
            lin = LinearisedModel(apply_model, common.LOSS, p, batch)
            for _ in range(k):
                gu = lin.ggn_mvp(u)
                u = otu.tree_scale(1.0 / (otu.tree_norm(gu) + 1e-30), gu)
            return u
        return products

    solver = _inner_solver(b)
    num_inner = big // b

    def inner_solve(p, batch):
        return solver.solve(apply_model, common.LOSS, curvature.full(), p, batch,
                            otu.tree_zeros_like(p), 0.0)

    ls_floor = (10 + 2 + 2 * 6 * ls_big / big) / 6
    k = o.products
    out = [
        Piece("gradient", _compile(gradient, params, micro), (params, micro), b * seq),
        Piece("ggn_product", _compile(ggn_product, params, micro, v), (params, micro, v), b * seq,
              flop_factor=10 / 6),
        Piece("ggn_cached_1", _compile(ggn_cached(1), params, micro, v), (params, micro, v),
              b * seq, flop_factor=10 / 6),
        Piece(f"ggn_cached_{k}", _compile(ggn_cached(k), params, micro, v), (params, micro, v),
              b * seq, flop_factor=(2 + 8 * k) / 6),
        _trainer_step(gnopt.transforms.adamw(1e-3), params, micro, None, b * seq, 1.0,
                      "adamw_step", False),
        Piece("inner_step", _compile(inner_solve, params, outer), (params, outer), b * seq,
              per_call=num_inner, flop_factor=10 / 6, loops=True),
        _trainer_step(gnopt.transforms.adamw(1e-3), params, outer, None, big * seq, 1.0,
                      "adamw_step_B", False),
        _trainer_step(_gauss_newton(b), params, outer, ls_batch, big * seq, ls_floor,
                      "gn_outer", True),
        _trainer_step(_gauss_newton(b, 10, curvature.layerwise()), params, outer, ls_batch,
                      big * seq, None, "gn_layerwise_outer", True),
        _trainer_step(_pi_muon(b), params, outer, ls_batch, big * seq, None, "pi_muon_outer",
                      True),
    ]
    return out


def measure(pieces_: list[Piece], repeats: int) -> list[dict[str, Any]]:
    """Times and sizes the compiled functions.

    Each is warmed up (2 calls), then the timed calls go round-robin over all
    functions, ``repeats`` rounds, so that a change of machine load hits every
    function alike; each time is the median of its rounds.
    """
    calls, device_peaks, verdicts = [], [], [[] for _ in pieces_]
    for piece, verdict in zip(pieces_, verdicts):
        args = list(piece.args)

        def call(piece=piece, args=args, verdict=verdict):
            result = piece.fn(*args)
            if piece.carry:
                args[0], args[1] = result[0], result[1]
                if "accepted" in result[4]:
                    verdict.append(result[4]["accepted"])
            return result

        for _ in range(2):  # the first calls of an executable are slower
            jax.block_until_ready(call())
        calls.append(call)
        device_peaks.append((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"))
    times = [[common.seconds(call) for call in calls] for _ in range(repeats)]
    rows = []
    for i, piece in enumerate(pieces_):
        seconds = statistics.median(t[i] for t in times) / piece.per_call
        memory = piece.fn.memory_analysis()
        cost = piece.fn.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        rows.append({
            "name": piece.name, "seconds": seconds, "tokens": piece.tokens,
            "seconds_per_token": seconds / piece.tokens,
            "peak_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                           + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
            "temp_bytes": memory.temp_size_in_bytes,
            "device_peak_bytes_so_far": device_peaks[i],
            "xla_flops": None if piece.loops else float(cost.get("flops", float("nan"))),
            "flop_factor": piece.flop_factor,
            # fraction of the timed steps the optimizer accepted (None: it does not say)
            "accepted_fraction": (statistics.fmean(float(a) for a in verdicts[i][2:])
                                  if verdicts[i] else None),
        })
    return rows


COMPARISONS = (
    # (ratio, numerator row, denominator row); compared per token
    ("ggn_product", "ggn_product", "gradient"),
    ("ggn_cached", "ggn_cached_marginal", "gradient"),
    ("inner_step", "inner_step", "adamw_step"),
    ("gn_outer", "gn_outer", "adamw_step_B"),
    ("pi_muon_outer", "pi_muon_outer", "gn_layerwise_outer"),
)


def summarise(rows: list[dict], o, config, params, peak: float | None) -> dict[str, Any]:
    """Derives the marginal cached product, ratios, floors and MFU from raw rows."""
    by_name = {r["name"]: r for r in rows}
    one, many = by_name["ggn_cached_1"], by_name[f"ggn_cached_{o.products}"]
    k = o.products
    marginal = dict(one, name="ggn_cached_marginal",
                    seconds=(many["seconds"] - one["seconds"]) / (k - 1),
                    xla_flops=(many["xla_flops"] - one["xla_flops"]) / (k - 1),
                    flop_factor=8 / 6, peak_bytes=many["peak_bytes"])
    marginal["seconds_per_token"] = marginal["seconds"] / marginal["tokens"]
    rows = rows + [marginal]
    by_name["ggn_cached_marginal"] = marginal
    per_token = common.flops_per_token(config, params)
    for r in rows:
        known = r["flop_factor"] is not None
        model_flops = r["flop_factor"] * per_token * r["tokens"] if known else None
        r["model_flops"] = model_flops
        r["mfu"] = model_flops / r["seconds"] / peak if peak and known else None
    ratios = {}
    for key, num, den in COMPARISONS:
        a, b = by_name[num], by_name[den]
        ratios[key] = {
            "numerator": num, "denominator": den,
            "ratio": a["seconds_per_token"] / b["seconds_per_token"],
            "flop_floor": (None if None in (a["flop_factor"], b["flop_factor"])
                           else a["flop_factor"] / b["flop_factor"]),
            "xla_flop_ratio": (None if a["xla_flops"] is None else
                               (a["xla_flops"] / a["tokens"]) / (b["xla_flops"] / b["tokens"])),
            "memory_ratio": a["peak_bytes"] / b["peak_bytes"],
            "goal": GOALS.get(key),
        }
    return {"rows": rows, "ratios": ratios, "flops_per_token": per_token}


def check(o) -> models.LLaMAConfig:
    """Checks resolved options ``o``; returns the model's config."""
    if o.batch % o.inner_batch:
        raise ValueError(f"--batch {o.batch} must be a multiple of --inner-batch {o.inner_batch}")
    if o.products < 2:
        raise ValueError(f"--products must be >= 2, got {o.products}")
    return common.model_config(o.model, dtype=o.dtype, seq_len=o.seq)


def run(o, argv: list[str] | None) -> dict[str, Any]:
    """Runs the suite with resolved options ``o``; returns the result record."""
    config = check(o)
    params = models.LLaMA(config, key=jax.random.PRNGKey(0))
    print(f"cost: {models.describe(params)}; batch {o.batch} x {o.seq}, micro-batch "
          f"{o.inner_batch}, line-search batch {o.ls_batch or o.batch}", flush=True)
    rows = measure(pieces(config, params, o), o.repeats)
    summary = summarise(rows, o, config, params, common.peak_flops(o.peak_flops))
    options = {k: getattr(o, k) for k in FULL}
    record = {"suite": "cost", "options": options, "model": models.describe(params), **summary}
    path = common.write_result(o.out, o.name, record, argv)
    plots.cost_chart(summary, path.replace(".json", ".png"))
    print(table(summary))
    print(f"wrote {path}")
    return record


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return format("-", spec.split(".")[0])
    return format(value * scale, spec)


def table(summary: dict) -> str:
    """The printed table: raw rows, then the ratios against their floors."""
    lines = [f"{'function':<22}{'ms':>10}{'us/token':>10}{'peak MiB':>9}{'GFLOP':>9}{'MFU %':>7}"]
    for r in summary["rows"]:
        lines.append(f"{r['name']:<22}{1e3 * r['seconds']:>10.2f}{1e6 * r['seconds_per_token']:>10.3f}"
                     f"{r['peak_bytes'] / 2**20:>9.1f}{_fmt(r['xla_flops'], '>9.3f', 1e-9)}"
                     f"{_fmt(r['mfu'], '>7.1f', 100)}")
    lines.append(f"{'ratio':<14}{'measured':>9}{'floor':>7}{'XLA FLOPs':>10}{'memory':>8}{'goal':>6}")
    for key, r in summary["ratios"].items():
        lines.append(f"{key:<14}{r['ratio']:>9.2f}{_fmt(r['flop_floor'], '>7.2f')}"
                     f"{_fmt(r['xla_flop_ratio'], '>10.2f')}{r['memory_ratio']:>8.2f}"
                     f"{_fmt(r['goal'], '>6.1f')}")
    return "\n".join(lines)
