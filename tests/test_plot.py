"""``python -m gnopt.plot``: loss curves of runs to an image."""

import json

import pytest

from gnopt import plot


def _write_run(run_dir, losses, val_every=2):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, start=1):
            record = {"step": step, "tokens": 512 * step, "loss": loss}
            if step % val_every == 0:
                record["val_loss"] = loss + 0.1
            f.write(json.dumps(record) + "\n")


def test_plot_writes_a_png(tmp_path, capsys):
    _write_run(tmp_path / "adamw", [5.5, 4.0, 3.5, 3.2])
    _write_run(tmp_path / "gn", [5.5, 3.0, float("nan"), 2.5])  # a NaN point is left out
    out = tmp_path / "curves.png"
    assert plot.main([str(tmp_path / "adamw"), str(tmp_path / "gn"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert capsys.readouterr().out.strip() == str(out)


def test_plot_of_a_run_without_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl records" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_legend_names_the_runs(tmp_path, monkeypatch):
    _write_run(tmp_path / "run_a", [3.0, 2.0])
    labels = []
    monkeypatch.setattr(plot.plt, "close",
                        lambda fig: labels.extend(t.get_text() for t in
                                                  fig.axes[0].get_legend().get_texts()))
    plot.plot_runs([str(tmp_path / "run_a") + "/"], str(tmp_path / "a.png"))
    assert labels == ["run_a", "run_a (val)"]


@pytest.mark.parametrize("log_y", [False, True])
def test_plot_runs_accepts_log_scale(tmp_path, log_y):
    _write_run(tmp_path / "r", [3.0, 2.0, 1.5])
    plot.plot_runs([str(tmp_path / "r")], str(tmp_path / "r.png"), log_y=log_y)
    assert (tmp_path / "r.png").exists()


def test_axes_say_nats_per_token_and_what_x_counts(tmp_path, monkeypatch):
    """Issue 18 item 5: the loss is labelled in nats per token; the x axes name what they
    count (optimizer steps, training tokens)."""
    _write_run(tmp_path / "run_a", [3.0, 2.0])
    labels = []
    monkeypatch.setattr(plot.plt, "close", lambda fig: labels.extend(
        (ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes))
    plot.plot_runs([str(tmp_path / "run_a")], str(tmp_path / "a.png"))
    assert [y for _, y in labels] == ["loss (cross-entropy, nats per token)"] * 2
    assert labels[0][0] == "optimizer steps"
    assert labels[1][0].startswith("training tokens")
