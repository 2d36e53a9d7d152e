"""``layerwise`` suite: the cost of a layerwise (block-diagonal) GGN product.

Two measurements, side by side in one process:

* XLA's FLOP count (``jit(f).lower(...).compile().cost_analysis()``, compiled
  only, never run: abstract parameters) of one GGN product on one batch, with
  its primal pass: the full GGN, the layerwise GGN as it was computed before
  issue 16 (per block a tangent pass of the zero-filled vector and a transpose,
  :class:`ZeroFilled`), and the layerwise GGN with restricted passes (per block
  a tangent from the block on and a transpose down to it, the default). At
  each ``--flop-models`` preset, ``--flop-batch`` × ``--flop-seq`` tokens.
* Wall time of trainer steps at ``--model`` (as the ``cost`` suite: B
  sequences, micro-batch b, inner Muon, line search on a fresh batch of B):
  full GN (5-point line search) and layerwise GN, zero-filled and
  restricted, with the 10-point line search of the ``cost`` suite and with
  the same 5 points as full GN (``_ls5``: the layerwise solve's own cost);
  medians of ``--repeats`` rounds taken round-robin.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

from gnopt import curvature, models
from gnopt.bench import common, cost
from gnopt.curvature import AbstractCurvature, AbstractOperator, BlockDiagonal, LinearisedModel
from gnopt.curvature import blocks as _blocks
from gnopt.train import apply_model

FULL = dict(flop_models="tiny,45m,150m", flop_batch=1, flop_seq=256, model="tiny", batch=64,
            seq=128, inner_batch=8, repeats=7, dtype="float32")
SMOKE = dict(flop_models="tiny", flop_batch=1, flop_seq=16, model="tiny", batch=4, seq=16,
             inner_batch=2, repeats=2, dtype="float32")


class ZeroFilled(BlockDiagonal):
    """The layerwise GGN as computed before issue 16 (the reference): per block a
    full tangent pass of the zero-filled vector and a full transpose, merged by block."""

    def mv(self, v):
        return AbstractOperator.block_diagonal_mv(self.operator, v, self.block_ids, self.num_blocks)

    def _terms(self, delta, objective):
        lin, ids = self.operator, self.block_ids
        tangents = [lin.jvp(_blocks.restrict(delta, ids, k)) for k in range(self.num_blocks)]
        if objective == "quadratic":
            gz = lin.output_grad()
            hus = [lin.output_hvp(u) for u in tangents]
            values = [jnp.vdot(gz, u) + 0.5 * jnp.vdot(u, hu) for u, hu in zip(tangents, hus)]
            cots = [gz + hu for hu in hus]
        else:
            shifted = [lin.outputs + u for u in tangents]
            values = [lin.loss(z) - lin.loss() for z in shifted]
            cots = [lin.output_grad(z) for z in shifted]
        return jnp.stack(values), _blocks.select([lin.vjp(c) for c in cots], ids)

    def quadratic_terms(self, delta):
        return self._terms(delta, "quadratic")

    def prox_linear_terms(self, delta):
        return self._terms(delta, "prox_linear")


class ZeroFilledLayerwise(AbstractCurvature):
    """``layerwise()`` computed the pre-issue-16 way (:class:`ZeroFilled`)."""

    def linearise(self, apply_fn, loss_fn, params, batch):
        ids, names = _blocks.leaf_block_ids(params, _blocks.default_block_labels)
        return ZeroFilled(LinearisedModel(apply_fn, loss_fn, params, batch), tuple(ids), tuple(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flop-models", help="comma-separated presets for FLOP counts (tiny,45m,150m)")
    parser.add_argument("--flop-batch", type=int, help="sequences per FLOP-counted product (1)")
    parser.add_argument("--flop-seq", type=int, help="tokens per sequence there (256)")
    parser.add_argument("--model", choices=sorted(models.PRESETS), help="preset for wall times (tiny)")
    parser.add_argument("--batch", type=int, help="outer batch B in sequences (64)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (128)")
    parser.add_argument("--inner-batch", type=int, help="micro-batch b in sequences (8)")
    parser.add_argument("--repeats", type=int, help="timed rounds (7)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (float32)")
    parser.add_argument("--name", default="layerwise", help="result file name")


def _flops(fn, *args) -> float:
    c = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((c[0] if isinstance(c, (list, tuple)) else c)["flops"])


def matmul_floor(config: models.LLaMAConfig, seq: int) -> tuple[float, float]:
    """Multiply-adds per token of the matrix products of a full and of an exact layerwise GGN product.

    With ``d = d_model``, ``f = d_ff``, ``m`` MLP matrices (2 GELU, 3 SwiGLU),
    vocabulary ``V``, ``L`` layers and ``a = seq·d`` for one attention product
    (``QKᵀ`` or ``AV``), one layer's forward costs ``p = 4d² + m·d·f + 2a`` and the
    model's ``P = L·p + d·V`` (the head; the embedding is a gather).

    * Full product: the primal pass, the tangent (``W·dx + dW·x`` for each matrix,
      both factors of an attention product) and the transpose (cotangents of ``x``
      and of ``W``): ``5P``.
    * Layerwise, blocks ``embed``, ``layers.0 … L−1``, ``norm``, ``head``
      (:func:`gnopt.curvature.blocks.default_block_labels`): one primal pass; block
      ``k`` needs a tangent from ``k`` on and a transpose down to ``k``, nothing
      before. A layer above ``k`` costs ``W·dx`` and the cotangent of ``x`` only,
      ``2(4d² + m·d·f + 4a)``; block ``k``'s own layer as in the full product,
      ``4(4d² + m·d·f + 2a)`` (its first RMSNorm's gain is in the block, so even its
      queries, keys and values see an input tangent); every block's tangent and
      transpose cross the head, ``2dV`` (the head's own block: ``dW·h`` and its
      transpose).

    This counts only what the exact block-diagonal product cannot skip, so it is
    a floor for the restricted passes (``flop_rows``); XLA's count also has the
    elementwise work. Returns ``(full, layerwise)``.
    """
    d, f, L, V = config.d_model, config.d_ff, config.n_layers, config.vocab_size
    m = 3 if config.mlp == "swiglu" else 2
    a = seq * d
    total = L * (4 * d * d + m * d * f + 2 * a) + d * V
    above = 2 * (4 * d * d + m * d * f + 4 * a)
    own = 4 * (4 * d * d + m * d * f + 2 * a)
    head = 2 * d * V
    layers = sum(own + (L - 1 - k) * above + head for k in range(L))
    embed = L * above + head
    norm_and_head = 2 * head
    return 5.0 * total, float(total + embed + layers + norm_and_head)


def flop_row(config: models.LLaMAConfig, batch: int, seq: int) -> dict[str, Any]:
    """XLA FLOPs of one product (with its primal pass) at ``config``: full, zero-filled,
    restricted, their ratios and :func:`matmul_floor`'s ratio."""
    products = {
        "full": lambda p, b, v: curvature.full().linearise(apply_model, common.LOSS, p, b).mv(v),
        "layerwise_zero_filled": lambda p, b, v: ZeroFilledLayerwise().linearise(
            apply_model, common.LOSS, p, b).mv(v),
        "layerwise_restricted": lambda p, b, v: curvature.layerwise().linearise(
            apply_model, common.LOSS, p, b).mv(v),
    }
    params = jax.eval_shape(lambda: models.LLaMA(config, key=jax.random.PRNGKey(0)))
    tokens = (jax.ShapeDtypeStruct((batch, seq), jnp.int32),) * 2
    row = {"blocks": len(_blocks.leaf_block_ids(params, _blocks.default_block_labels)[1]),
           "tokens": batch * seq}
    for key, fn in products.items():
        row[key] = _flops(fn, params, tokens, params)
    row["zero_filled_over_full"] = row["layerwise_zero_filled"] / row["full"]
    row["restricted_over_full"] = row["layerwise_restricted"] / row["full"]
    full, layerwise = matmul_floor(config, seq)
    row["matmul_floor_over_full"] = layerwise / full
    return row


def flop_rows(names, batch: int, seq: int, dtype: str) -> list[dict[str, Any]]:
    """:func:`flop_row` per preset."""
    rows = []
    for name in names:
        row = {"model": name} | flop_row(common.model_config(name, dtype=dtype, seq_len=seq),
                                         batch, seq)
        print(f"{name}: full {row['full']:.4g} FLOPs, restricted / full "
              f"{row['restricted_over_full']:.2f}, matmul floor / full "
              f"{row['matmul_floor_over_full']:.2f}", flush=True)
        rows.append(row)
    return rows


def wall_rows(o) -> list[dict[str, Any]]:
    """Median wall times of full / layerwise GN trainer steps at ``o.model``."""
    config = common.model_config(o.model, dtype=o.dtype, seq_len=o.seq)
    params = models.LLaMA(config, key=jax.random.PRNGKey(0))
    outer, fresh = cost._batches(config, o.batch, o.seq, 2, 1)
    tokens = o.batch * o.seq
    pieces = [
        cost._trainer_step(cost._gauss_newton(o.inner_batch), params, outer, fresh, tokens, None,
                           "gn_full", True),
        cost._trainer_step(cost._gauss_newton(o.inner_batch, 10, ZeroFilledLayerwise()), params,
                           outer, fresh, tokens, None, "gn_layerwise_zero_filled", True),
        cost._trainer_step(cost._gauss_newton(o.inner_batch, 10, curvature.layerwise()), params,
                           outer, fresh, tokens, None, "gn_layerwise_restricted", True),
        # the same 5-point line search as full GN: the cost of the layerwise solve alone
        cost._trainer_step(cost._gauss_newton(o.inner_batch, 5, ZeroFilledLayerwise()), params,
                           outer, fresh, tokens, None, "gn_layerwise_zero_filled_ls5", True),
        cost._trainer_step(cost._gauss_newton(o.inner_batch, 5, curvature.layerwise()), params,
                           outer, fresh, tokens, None, "gn_layerwise_restricted_ls5", True),
    ]
    rows = cost.measure(pieces, o.repeats)
    return [{"name": r["name"], "seconds": r["seconds"], "peak_bytes": r["peak_bytes"]} for r in rows]


def run(o, argv: list[str] | None) -> dict[str, Any]:
    flops = flop_rows(o.flop_models.split(","), o.flop_batch, o.flop_seq, o.dtype)
    walls = wall_rows(o)
    by = {r["name"]: r["seconds"] for r in walls}
    ratios = {key: value / by["gn_full"] for key, value in by.items() if key != "gn_full"}
    options = {k: getattr(o, k) for k in FULL}
    record = {"suite": "layerwise", "options": options, "flops": flops, "wall": walls,
              "wall_over_gn_full": ratios}
    path = common.write_result(o.out, o.name, record, argv)
    print(table(record))
    print(f"wrote {path}")
    return record


def outputs(o) -> list[str]:
    import os
    return [os.path.join(o.out, o.name + ".json")]


def table(record: dict) -> str:
    lines = [f"{'model':<7}{'K':>4}{'full GFLOP':>12}{'zero-filled':>13}{'restricted':>12}"
             f"{'matmul floor':>14}"]
    for r in record["flops"]:
        lines.append(f"{r['model']:<7}{r['blocks']:>4}{r['full'] / 1e9:>12.2f}"
                     f"{r['zero_filled_over_full']:>12.2f}x{r['restricted_over_full']:>11.2f}x"
                     f"{r['matmul_floor_over_full']:>13.2f}x")
    for r in record["wall"]:
        lines.append(f"{r['name']:<28}{1e3 * r['seconds']:>10.1f} ms")
    for key, value in record["wall_over_gn_full"].items():
        lines.append(f"{key} / gn_full: {value:.2f}")
    return "\n".join(lines)
