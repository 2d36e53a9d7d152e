"""Loss curves of training runs: ``python -m gnopt.plot RUN_DIR ... -o out.png``.

Two panels, loss vs optimizer step and loss vs tokens; one colour per run
(legend: the run folder's name), training loss solid, validation loss dashed
with markers. The loss is the trainer's: mean cross-entropy in nats per token
(natural log; divide by ln 2 for bits). The x axes count optimizer steps
(each one batch, or ``grad_accum_steps`` micro-batches) and training tokens
drawn (line-search batches of ``line_search_batch="next"`` included).
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from gnopt.metrics import column, read_metrics

Y_LABEL = "loss (cross-entropy, nats per token)"
X_LABELS = ("optimizer steps", "training tokens seen (line-search batches included)")


def plot_runs(run_dirs: list[str], output: str, *, log_y: bool = False) -> None:
    """Draws the runs' loss curves into ``output`` (any matplotlib format).

    Raises:
      FileNotFoundError: a run folder has no ``metrics.jsonl`` records.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        if not records:
            raise FileNotFoundError(f"no metrics.jsonl records in {run_dir}")
        name = os.path.basename(os.path.normpath(run_dir))
        color = f"C{i % 10}"
        for ax, x in zip(axes, ("step", "tokens")):
            ax.plot(*column(records, "loss", x), color=color, label=name)
            xs, ys = column(records, "val_loss", x)
            if xs:
                ax.plot(xs, ys, "o--", color=color, markersize=3, label=f"{name} (val)")
    for ax, x in zip(axes, X_LABELS):
        ax.set_xlabel(x)
        ax.set_ylabel(Y_LABEL)
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gnopt.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("-o", "--output", default="loss.png", help="image file to write")
    parser.add_argument("--log_y", action="store_true", help="logarithmic loss axis")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.run_dirs, args.output, log_y=args.log_y)
    except FileNotFoundError as e:
        print(f"gnopt.plot: error: {e}", file=sys.stderr)
        return 2
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
