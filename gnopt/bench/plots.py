"""The benchmark figures (matplotlib, written as PNG)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_chart(summary: dict, path: str) -> None:
    """Measured time ratios next to their FLOP floors and goals; peak memory per function."""
    ratios = summary["ratios"]
    names = list(ratios)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], [ratios[n]["ratio"] for n in names], 0.4, label="measured time")
    left.bar([x + 0.2 for x in xs], [ratios[n]["flop_floor"] or 0.0 for n in names], 0.4,
             label="FLOP floor")
    for x, n in zip(xs, names):
        if ratios[n]["goal"]:
            left.hlines(ratios[n]["goal"], x - 0.4, x + 0.4, colors="red", linestyles="--",
                        label="goal" if x == 0 else None)
    left.set_xticks(list(xs), [f"{n}\n/ {ratios[n]['denominator']}" for n in names], fontsize=8)
    left.set_ylabel("time ratio (per token)")
    left.legend(fontsize=8)
    rows = summary["rows"]
    right.barh([r["name"] for r in rows], [r["peak_bytes"] / 2**20 for r in rows])
    right.set_xlabel("peak memory of the compiled function (MiB)")
    right.invert_yaxis()
    _save(fig, path)


def _best_run(result: dict) -> dict:
    return next(r for r in result["runs"] if r["lr"] == result["best_lr"])


def loss_curves(results: list[dict], targets: list[float], path: str, title: str = "") -> None:
    """Validation loss vs step and vs step wall time, best learning rate of each optimizer."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    start = max(_best_run(r)["curve"][0]["val_loss"] for r in results)
    for i, result in enumerate(results):
        curve = _best_run(result)["curve"]
        label = f"{result['optimizer']} (lr {result['best_lr']:g})"
        for ax, x in zip(axes, ("step", "wall_s")):
            ax.plot([p[x] for p in curve], [p["val_loss"] for p in curve], color=f"C{i % 10}",
                    label=label)
    for ax, x in zip(axes, ("optimizer step", "step wall time (s)")):
        for i, target in enumerate(targets):
            ax.axhline(target, color="black", linestyle=":", linewidth=1,
                       label="target" if i == 0 else None)
        ax.set_xlabel(x)
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=start + 0.3)  # a diverging run leaves the frame
        ax.grid(alpha=0.3)
    axes[0].set_xscale("symlog", linthresh=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def scaling_chart(steps: dict, noise: dict | None, target: float, path: str) -> None:
    """Steps to target vs batch (log-log) with ``B_simple``; ``B_simple`` along AdamW."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, by_size) in enumerate(steps.items()):
        pts = sorted((int(b), s) for b, s in by_size.items() if s)
        if pts:
            left.plot(*zip(*pts), "o-", color=f"C{i % 10}", label=name)
            b0, s0 = pts[0]
            left.plot([b for b, _ in pts], [s0 * b0 / b for b, _ in pts], ":", color=f"C{i % 10}",
                      linewidth=1)
    if noise and noise["b_simple_median_second_half"]:
        left.axvline(noise["b_simple_median_second_half"], color="gray", linestyle="--",
                     label="B_simple (AdamW)")
        right.plot(noise["steps"], noise["b_simple"], color="gray")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("batch size (sequences)")
    left.set_ylabel(f"steps to validation loss {target}")
    left.set_title("dotted: perfect scaling from the smallest batch", fontsize=9)
    left.legend(fontsize=8)
    right.set_xlabel("AdamW step (largest batch)")
    right.set_ylabel("B_simple (sequences)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    _save(fig, path)


FUSION_PANELS = (("lambda", "fusion weight λ"), ("rho", "trust ratio ρ"),
                 ("plane_a", "coefficient a on u (plane)"),
                 ("plane_c", "coefficient c on s⊥ (plane)"))
"""The per-step diagnostics of a fused (PI-Muon) run that :func:`fusion_diagnostics` draws."""


def fusion_diagnostics(results: list[dict], path: str, title: str = "") -> bool:
    """``λ``, ``ρ`` and the plane's coefficients ``a``, ``c`` (``parallel="plane"`` rows only)
    per step for each result whose best run logged ``lambda`` (the fused optimizers);
    rejected steps marked ``x``.
    Writes nothing and returns ``False`` when no result did."""
    fused = [r for r in results if any("lambda" in p for p in _best_run(r)["curve"])]
    if not fused:
        return False
    fig, axes = plt.subplots(1, len(FUSION_PANELS), figsize=(4 * len(FUSION_PANELS), 3.8))
    for i, result in enumerate(fused):
        curve = [p for p in _best_run(result)["curve"] if "lambda" in p]
        for ax, (key, label) in zip(axes, FUSION_PANELS):
            if key.startswith("plane_") and not any(p.get(key) for p in curve):
                continue  # another fusion: its plane coefficients are logged as 0
            steps = [p["step"] for p in curve]
            ax.plot(steps, [p.get(key, float("nan")) for p in curve], "o-", markersize=3,
                    color=f"C{i % 10}", label=f"{result['optimizer']} (lr {result['best_lr']:g})")
            rejected = [p for p in curve if not p.get("accepted", 1)]
            ax.plot([p["step"] for p in rejected], [p.get(key, float("nan")) for p in rejected],
                    "x", color="black", markersize=7)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="gray", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)
    return True
