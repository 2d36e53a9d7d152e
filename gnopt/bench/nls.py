"""``nls`` suite: the Moré–Garbow–Hillstrom least-squares problems, GN with LM damping.

Every problem of :mod:`gnopt.testing.mgh` (Moré, Garbow & Hillstrom, ACM TOMS
7:17–41, 1981; the 35 at their standard sizes) is solved from its standard
starting point by :func:`gnopt.gauss_newton` as a user would call it: the
residual ``r(x)`` as ``apply_fn``, the loss ``½‖r‖²``, the full GGN ``JᵀJ``,
CG, no line search, float64, and a Levenberg–Marquardt damping controller
(:func:`gnopt.control.nielsen_damping`, or the PI rule
:func:`gnopt.control.damping_controller` with ``reject_below=0``). One set of
CG and controller settings serves every problem (no per-problem tuning).

A run stops at the first outer step whose ``f = Σ r²`` (the paper's
convention, ``2 × loss``) meets the published minimum ``f*`` —
``f ≤ f*·(1 + 1e-5) + 1e-14`` (the paper gives ``f*`` to 6 significant digits;
the absolute ``1e-14`` is the floor for ``f* = 0``) — or after ``--max-steps``.
Reported per problem: ``f`` at the end, outer steps (rejected ones included),
kept and rejected steps, GGN products, whether ``f`` ever rose across kept
steps (measured in float64 by this suite, not by the transform), and whether
a minimum the paper lists besides ``f*`` (local, or at infinity) was reached.

GGN products, as computed by the transform per outer step: the CG iterations,
plus one for CG's initial residual ``−g − (G + δI)Δ0`` (computed also when
the warm start ``Δ0`` is zero), plus one for the trust ratio's ``ΔᵀGΔ`` (a
tangent pass only, counted as a whole product). Besides these, each step
costs one gradient (transpose pass) and three forward passes (the
linearisation, ``L(θ)``, ``L(θ + Δ)``) and a second linearisation for ρ.

Writes ``<out>/<name>.json`` (every run, every controller, per-step ``f``)
and ``<out>/<name>.md`` (the table of the headline controller, the first of
``--controllers``, and a summary of all).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gnopt
from gnopt import control
from gnopt.bench import common
from gnopt.metrics import find_diagnostics
from gnopt.testing import mgh

CONTROLLERS = ("nielsen", "pi")
FULL = dict(problems=None, max_steps=200, controllers=["pi", "nielsen"], cg_iters=100,
            cg_tol=1e-8, cg_residual_tol=1e-10, warm_start=1.0)
SMOKE = dict(FULL, problems=[5], max_steps=20)
RTOL, ATOL = 1e-5, 1e-14
RULE = (f"reached: f <= f*·(1 + {RTOL:g}) + {ATOL:g} with f = Σ r² (the paper's convention, "
        f"2 × the loss ½‖r‖²); f* is the paper's value, given to 6 significant digits")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problems", type=int, nargs="+",
                        help="MGH problem numbers, 1-35 (all)")
    parser.add_argument("--max-steps", type=int, help="outer-step cap per problem (200)")
    parser.add_argument("--controllers", nargs="+", choices=CONTROLLERS,
                        help="damping controllers to run; the first is the table's "
                             "(pi nielsen)")
    parser.add_argument("--cg-iters", type=int, help="CG iteration cap per outer step (100)")
    parser.add_argument("--cg-tol", type=float, help="CG relative-progress tolerance (1e-8)")
    parser.add_argument("--cg-residual-tol", type=float,
                        help="CG stops at ‖r‖ <= this × ‖g‖ (1e-10)")
    parser.add_argument("--warm-start", type=float,
                        help="factor on the last step as CG's next start (1.0)")
    parser.add_argument("--name", default="nls", help="result file name")


def outputs(o) -> list[str]:
    return [os.path.join(o.out, o.name + ext) for ext in (".json", ".md")]


def make_controller(name: str) -> control.AbstractController:
    """The LM damping rules compared (one setting each for all problems)."""
    if name == "nielsen":
        return control.nielsen_damping(1e-3, damping_min=1e-12, damping_max=1e12)
    if name == "pi":
        return control.damping_controller(damping0=1e-3, damping_min=1e-12, damping_max=1e12,
                                          reject_below=0.0)
    raise ValueError(f"unknown controller {name!r}; known: {CONTROLLERS}")


def controller_settings(name: str) -> str:
    return repr(make_controller(name))


def status_of(f: float, problem: mgh.MGHProblem) -> tuple[bool, float | None]:
    """``(reached f*, the other listed minimum reached or None)`` under :data:`RULE`."""
    def near(target):
        return math.isfinite(f) and f <= target * (1 + RTOL) + ATOL and (
            target == problem.f_star or f >= target * (1 - RTOL) - ATOL)
    others = [g for g in problem.other_minima if near(g)]
    return near(problem.f_star), (others[0] if others else None)


def _jitted_step(tx, problem: mgh.MGHProblem, batch) -> Callable:
    """``(x, state) -> (x', state', f(x'), (accepted, CG iterations, ρ, damping))``."""

    @jax.jit
    def step(x, state):
        updates, state = tx.update(None, state, x, batch=batch)
        x = optax.apply_updates(x, updates)
        d = find_diagnostics(state)
        return x, state, problem.value(x), (d["accepted"], d["cg_iterations"], d["rho"],
                                            d["damping"])

    return step


def solve(problem: mgh.MGHProblem, controller: str, o) -> dict[str, Any]:
    """One LM-damped GN run on one problem; returns its record."""
    solver = gnopt.solvers.cg(max_iters=o.cg_iters, tol=o.cg_tol,
                              residual_tol=o.cg_residual_tol)
    tx = gnopt.gauss_newton(problem.apply_fn, mgh.half_sum_of_squares, solver=solver,
                            curvature=gnopt.curvature.full(), line_search=None,
                            damping=make_controller(controller), warm_start=o.warm_start)
    batch = problem.batch()
    x = problem.initial_params()
    if x.dtype != jnp.float64:
        raise RuntimeError("the nls suite needs jax_enable_x64")

    step = _jitted_step(tx, problem, batch)
    start = time.perf_counter()
    state = tx.init(x)
    f0 = float(problem.value(x))
    f, curve, kept = f0, [f0], 0
    rejected = cg_iterations = 0
    max_rise, reached_at = 0.0, None
    compile_s = None
    reached, _ = status_of(f0, problem)
    steps = 0
    while not reached and steps < o.max_steps:
        x_new, state, f_new, (accepted, iters, rho, damping) = step(x, state)
        f_new = float(f_new)
        if compile_s is None:
            compile_s = time.perf_counter() - start
        steps += 1
        cg_iterations += int(iters)
        if bool(accepted):
            kept += 1
            max_rise = max(max_rise, f_new - f) if math.isfinite(f_new) else math.inf
            f = f_new
        else:
            rejected += 1
            if not np.array_equal(np.asarray(x_new), np.asarray(x)):
                raise RuntimeError(f"MGH {problem.number}: a rejected step moved the parameters")
        x = x_new
        curve.append(f)
        reached, _ = status_of(f, problem)
        if reached:
            reached_at = steps
    wall = time.perf_counter() - start
    _, other = status_of(f, problem)
    status = ("reached" if reached else "listed local minimum" if other is not None
              else "not reached")
    return {
        "number": problem.number, "name": problem.name, "n": problem.n, "m": problem.m,
        "f_star": problem.f_star, "other_minima": list(problem.other_minima),
        "f0": f0, "f": f, "relative_error": (abs(f - problem.f_star) / problem.f_star
                                             if problem.f_star else None),
        "status": status, "reached": reached, "reached_step": reached_at,
        "local_minimum": other, "below_f_star": f < problem.f_star * (1 - RTOL) - ATOL,
        "outer_steps": steps, "kept_steps": kept, "rejected_steps": rejected,
        "cg_iterations": cg_iterations,
        "ggn_products": cg_iterations + 2 * steps,
        "max_rise": max_rise, "rose": max_rise > 0,
        "final_damping": float(state.controller.output), "final_rho": float(rho) if steps else None,
        "x": [float(v) for v in np.asarray(x)],
        "wall_s": wall, "compile_s": compile_s, "f_curve": curve,
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "problems": len(rows),
        "reached": sum(r["reached"] for r in rows),
        "listed_local_minimum": sum(r["status"] == "listed local minimum" for r in rows),
        "rose_across_kept_steps": [r["number"] for r in rows if r["rose"]],
        "not_reached": [r["number"] for r in rows if not r["reached"]],
        "outer_steps": sum(r["outer_steps"] for r in rows),
        "rejected_steps": sum(r["rejected_steps"] for r in rows),
        "ggn_products": sum(r["ggn_products"] for r in rows),
        "wall_s": sum(r["wall_s"] for r in rows),
        "compile_s": sum(r["compile_s"] or 0.0 for r in rows),
    }


def _g(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.6g}"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of one controller's runs."""
    lines = ["| # | problem | n | m | f* (paper) | f reached | outer steps | GGN products "
             "| rejected | status |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        status = r["status"] + (f" ({_g(r['local_minimum'])})" if r["local_minimum"] else "")
        if r["rose"]:
            status += "; ROSE"
        lines.append(f"| {r['number']} | {r['name']} | {r['n']} | {r['m']} | {_g(r['f_star'])} "
                     f"| {_g(r['f'])} | {r['outer_steps']} | {r['ggn_products']} "
                     f"| {r['rejected_steps']} | {status} |")
    return "\n".join(lines)


def summary_table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = ["| controller | reached f* | listed local minimum | loss rose across kept steps "
             "| outer steps | rejected | GGN products | wall s | of which compiling |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['reached']} / {s['problems']} | {s['listed_local_minimum']} "
                     f"| {s['rose_across_kept_steps'] or 'never'} | {s['outer_steps']} "
                     f"| {s['rejected_steps']} | {s['ggn_products']} | {s['wall_s']:.1f} "
                     f"| {s['compile_s']:.1f} |")
    return "\n".join(lines)


def run(o, argv: list[str] | None) -> dict[str, Any]:
    """Runs the suite with resolved options ``o``; returns the result record."""
    numbers = o.problems or [p.number for p in mgh.PROBLEMS]
    bad = sorted(set(numbers) - set(range(1, 36)))
    if bad:
        raise ValueError(f"--problems {bad}: MGH problems are numbered 1-35")
    if o.max_steps < 1 or o.cg_iters < 1:
        raise ValueError("--max-steps and --cg-iters must be >= 1")
    controllers = list(dict.fromkeys(o.controllers))
    x64 = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        problems = [mgh.make(k) for k in numbers]  # built under x64
        started = time.perf_counter()
        results = {}
        for name in controllers:
            rows = []
            for problem in problems:
                row = solve(problem, name, o)
                rows.append(row)
                print(f"{name:8s} MGH {problem.number:2d} {problem.name:<30.30s} "
                      f"f {row['f']:<12.6g} f* {problem.f_star:<11.6g} {row['status']:<20s} "
                      f"steps {row['outer_steps']:3d} (rejected {row['rejected_steps']:3d}) "
                      f"GGN {row['ggn_products']:5d}  {row['wall_s']:.2f} s", flush=True)
            results[name] = rows
        wall = time.perf_counter() - started
    finally:
        jax.config.update("jax_enable_x64", x64)
    summaries = {name: summarise(rows) for name, rows in results.items()}
    headline = controllers[0]
    record = {
        "suite": "nls", "options": {k: v for k, v in vars(o).items() if k != "suite"},
        "reference": "J. J. Moré, B. S. Garbow, K. E. Hillstrom, Testing unconstrained "
                     "optimization software, ACM TOMS 7(1):17-41, 1981",
        "rule": RULE, "headline": headline, "wall_s": wall,
        "settings": {
            "transform": "gnopt.gauss_newton(curvature=full(), line_search=None, "
                         f"warm_start={o.warm_start}), float64",
            "loss": "½‖r‖² (gnopt.testing.mgh.half_sum_of_squares)",
            "cg": f"gnopt.solvers.cg(max_iters={o.cg_iters}, tol={o.cg_tol}, "
                  f"residual_tol={o.cg_residual_tol})",
            "controllers": {name: controller_settings(name) for name in controllers},
            "ggn_products": "CG iterations + 1 per step (CG's initial residual) + 1 per "
                            "step (the trust ratio's tangent pass)",
        },
        "summary": summaries, "results": results,
    }
    path = common.write_result(o.out, o.name, record, argv)
    markdown = (f"{summary_table(summaries)}\n\nHeadline controller: {headline}; {RULE}.\n\n"
                f"{table(results[headline])}\n")
    md_path = os.path.join(o.out, o.name + ".md")
    common.check_new(md_path)
    with open(md_path, "w") as f:
        f.write(markdown)
    print(summary_table(summaries))
    print(f"wrote {path} and {md_path} ({wall:.1f} s)")
    return record
