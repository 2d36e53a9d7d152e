"""The benchmark suites in smoke mode (CI size, CPU) and their result files."""

import json
import os
import pathlib
import subprocess

import jax
import pytest

from gnopt import models
from gnopt.bench import common, cost, gpu, main, runs, steps

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(tmp_path, *args):
    assert main([*args, "--smoke", "--out", str(tmp_path)]) == 0
    return tmp_path


def _load(path):
    record = json.loads(path.read_text())
    assert {"platform", "cpu", "cpu_count", "devices", "date"} <= set(record["machine"])
    assert record["command"].startswith("python -m gnopt.bench ")
    assert path.with_suffix(".png").stat().st_size > 1000
    return record


def test_cost_smoke(tmp_path):
    record = _load(_run(tmp_path, "cost") / "cost.json")
    rows = {r["name"]: r for r in record["rows"]}
    assert {"gradient", "ggn_product", "ggn_cached_marginal", "adamw_step", "inner_step",
            "adamw_step_B", "gn_outer"} <= set(rows)
    assert all(r["seconds"] > 0 and r["peak_bytes"] > 0 for n, r in rows.items()
               if n != "ggn_cached_marginal")
    ratios = record["ratios"]
    assert ratios["ggn_product"]["flop_floor"] == pytest.approx(10 / 6)
    assert ratios["ggn_cached"]["flop_floor"] == pytest.approx(8 / 6)
    assert ratios["gn_outer"]["flop_floor"] == pytest.approx(4.0)  # line search on B
    # XLA's own FLOP count: one shared primal pass per GGN product (two would give 2.0),
    # none per cached product.
    assert 1.5 < ratios["ggn_product"]["xla_flop_ratio"] < 1.8
    assert 1.2 < ratios["ggn_cached"]["xla_flop_ratio"] < 1.45
    assert all(r["mfu"] is None for r in record["rows"])  # CPU: no known peak


def test_steps_to_target_smoke(tmp_path):
    record = _load(_run(tmp_path, "steps-to-target", "--target", "9.0")
                   / "steps_to_target.json")
    assert record["target_metric"] == "val_loss"
    assert record["warmup"]["steps"] == 2
    summary = record["summary"]
    assert set(summary) == {"adamw", "gn_layerwise"}
    # Every run starts from the warm-up's parameters: same validation loss at step 0.
    start = record["warmup"]["final_val_loss"]
    for result in record["results"]:
        for run in result["runs"]:
            assert run["curve"][0]["val_loss"] == pytest.approx(start, rel=1e-5)
    # The target (above the start) is reached at the first step; GN counts its
    # line-search batch in the tokens.
    assert summary["adamw"]["steps_to_target"] == 1
    assert summary["gn_layerwise"]["steps_to_target"] == 1
    assert summary["gn_layerwise"]["tokens_to_target"] == 2 * summary["adamw"]["tokens_to_target"]
    assert summary["gn_layerwise"]["steps_vs_gn_full"] is None  # no gn_full in this run


def test_steps_to_target_smoke_several_targets_and_cheaper_line_search(tmp_path):
    record = _load(_run(tmp_path, "steps-to-target", "--target", "9.0", "9.5",
                        "--ls-batch", "1", "--ls-stop-at-rise") / "steps_to_target.json")
    assert list(record["by_target"]) == ["9.5", "9"]
    for rows in record["by_target"].values():
        assert rows["adamw"]["steps_to_target"] == rows["gn_layerwise"]["steps_to_target"] == 1
    gn_runs = record["results"][1]["runs"]
    assert all(1 <= p["line_search_evals"] <= 10 for run in gn_runs for p in run["curve"][1:])
    # The line-search batch is 1 of the batch's 4 sequences.
    assert (4 * record["summary"]["gn_layerwise"]["tokens_to_target"]
            == 5 * record["summary"]["adamw"]["tokens_to_target"])


def test_steps_to_target_smoke_model_fields_and_decaying_baselines(tmp_path):
    record = _load(_run(tmp_path, "steps-to-target", "--optimizers", "adamw",
                        "--model-field", "d_model=16", "--model-field", "n_layers=1",
                        "--decay-steps", "6") / "steps_to_target.json")
    assert "d_model=16, n_layers=1," in record["model"]
    assert record["options"]["decay_steps"] == 6


def test_baseline_schedule_ramps_then_holds_or_decays():
    constant = runs.baseline_schedule(1.0, warmup_steps=4)
    decaying = runs.baseline_schedule(1.0, warmup_steps=4, decay_steps=20)
    assert [float(constant(t)) for t in (0, 3, 50)] == pytest.approx([0.25, 1.0, 1.0])
    assert float(decaying(0)) == pytest.approx(0.25)
    assert float(decaying(4)) == pytest.approx(1.0)
    assert float(decaying(12)) == pytest.approx(0.55)  # half-way down the cosine to 0.1
    assert [float(decaying(t)) for t in (20, 50)] == pytest.approx([0.1, 0.1])


def _run_record(lr, losses):
    curve = [{"step": i, "tokens": 10 * i, "wall_s": 0.5 * i, "val_loss": v}
             for i, v in enumerate(losses)]
    return {"lr": lr, "curve": curve, "final_val_loss": losses[-1]}


def test_best_run_per_target_from_the_curves():
    fast_early = _run_record(0.1, [3.0, 2.5, 2.4, 2.35, 2.3])
    fast_late = _run_record(0.2, [3.0, 2.7, 2.45, 2.2])
    assert runs.reached(fast_early["curve"], 3.0)["step"] == 1  # step 0 never counts
    assert runs.reached(fast_late["curve"], 2.0) is None
    assert runs.best_at([fast_early, fast_late], 2.5) == {
        "best_lr": 0.1, "steps_to_target": 1, "tokens_to_target": 10, "wall_s_to_target": 0.5}
    assert runs.best_at([fast_early, fast_late], 2.3)["best_lr"] == 0.2
    assert runs.best_at([fast_early, fast_late], 2.3)["steps_to_target"] == 3
    # Nobody reaches it: the lowest final loss, with no steps.
    assert runs.best_at([fast_early, fast_late], 1.0) == {
        "best_lr": 0.2, "steps_to_target": None, "tokens_to_target": None,
        "wall_s_to_target": None}


def test_batch_scaling_smoke(tmp_path):
    record = _load(_run(tmp_path, "batch-scaling", "--optimizers", "adamw", "--max-steps", "3")
                   / "batch_scaling.json")
    assert set(record["steps_to_target"]["adamw"]) == {"4", "8"}
    noise = record["noise_scale"]
    assert noise["big_batch"] == 8 and noise["small_batch"] == 1
    assert len(noise["steps"]) == len(noise["b_simple"]) >= 1  # finite values only


def test_the_prepared_device_script_runs_both_gpu_parts(tmp_path):
    """``scripts/gpu/run.sh --smoke``: the device command, same code at CI size on CPU."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu" / "run.sh"), "--smoke"],
                          env=dict(os.environ, OUT=str(tmp_path)), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {r["name"] for r in _load(tmp_path / "cost_tiny.json")["rows"]} >= {"gn_outer"}
    steps_record = _load(tmp_path / "steps_tiny.json")
    assert steps_record["complete"] and set(steps_record["summary"]) == {"adamw"}
    log = (tmp_path / "log.txt").read_text()
    assert "jax " in log and "wrote " + str(tmp_path / "steps_tiny.json") in log


@pytest.mark.parametrize("part", gpu.PARTS)
def test_the_gpu_presets_are_valid(part):
    """The full-size GPU presets pass every option check (no GPU needed to find a typo)."""
    options = gpu.part_options(part, smoke=False, out="unused")
    if part == "cost":
        assert cost.check(options).d_model == 512
    else:
        chosen, grids = steps.plan(options)
        assert [opt.name for opt in chosen][:3] == ["gn_full", "muon", "soap"]
        assert all(grids.values()) and steps.model_config(options).vocab_size == 256


@pytest.mark.parametrize("args, message", [
    (["cost", "--batch", "5"], "--batch 5 must be a multiple of --inner-batch 2"),
    (["steps-to-target", "--optimizers", "nope"], "--optimizers: unknown ['nope']"),
    (["steps-to-target", "--lr", "adamw"], "--lr 'adamw': expected NAME=LR"),
    (["steps-to-target", "--ls-batch", "5"], "--ls-batch 5 must be in 1..4 (the batch)"),
    (["batch-scaling", "--ls-batch", "8"], "--ls-batch 8 must be in 1..4 (the batch)"),
    (["steps-to-target", "--model-field", "d_model"], "--model-field 'd_model': expected FIELD=VALUE"),
    (["steps-to-target", "--model-field", "width=3"], "unknown LLaMAConfig field(s) ['width']"),
    (["steps-to-target", "--decay-steps", "5"], "--decay-steps 5 must exceed --ramp-steps 5"),
    (["steps-to-target", "--ramp-steps", "-1"], "--ramp-steps -1 must be >= 0"),
    (["batch-scaling", "--ramp-steps", "2", "--decay-steps", "2"],
     "--decay-steps 2 must exceed --ramp-steps 2"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, args, message):
    assert main([*args, "--smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_flops_per_token_convention():
    config = models.llama_config("tiny", seq_len=32)
    params = jax.eval_shape(lambda: models.LLaMA(config, key=jax.random.PRNGKey(0)))
    n = models.count_params(params) - 256 * 64
    assert common.flops_per_token(config, params) == 6 * n + 12 * 2 * 64 * 32
