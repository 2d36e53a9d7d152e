"""The benchmark suites in smoke mode (CI size, CPU) and their result files."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import pytest

from gnopt import models
from gnopt.bench import SUITES, common, cost, gpu, main, runs, steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
IN_GIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                        capture_output=True).returncode == 0


def _results_state():
    """Every file under the checkout's results/ with its content hash, and git's view of it."""
    files = {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((ROOT / "results").rglob("*")) if p.is_file()}
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "results"],
                            capture_output=True, text=True).stdout if IN_GIT else ""
    return files, status


@pytest.fixture
def smoke(tmp_path, monkeypatch):
    """Runs ``python -m gnopt.bench <suite> --smoke`` as a user would: from the checkout's
    root, with the default result folder; checks that results/ is left unchanged and
    returns the temporary folder the run wrote to (temporary folders go under tmp_path)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def run(suite, *args):
        before = _results_state()
        assert main([suite, *args, "--smoke"]) == 0
        assert _results_state() == before, "a smoke run changed results/"
        out, = tmp_path.glob(f"gnopt-bench-{suite}-smoke-*")
        return out

    return run


def _load(path):
    record = json.loads(path.read_text())
    assert {"platform", "cpu", "cpu_count", "devices", "date"} <= set(record["machine"])
    assert record["command"].startswith("python -m gnopt.bench ")
    if IN_GIT:  # the code's commit, and whether the checkout differed from it
        assert len(record["commit"]) == 40 and isinstance(record["dirty"], bool)
    assert path.with_suffix(".png").stat().st_size > 1000
    return record


def test_cost_smoke(smoke):
    record = _load(smoke("cost") / "cost.json")
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


def test_steps_to_target_smoke(smoke):
    record = _load(smoke("steps-to-target", "--target", "9.0") / "steps_to_target.json")
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
    """Also: with an explicit --out, an existing file is replaced only with --overwrite."""
    old = tmp_path / "steps_to_target.json"
    old.write_text("{}")
    args = ["steps-to-target", "--smoke", "--out", str(tmp_path), "--target", "9.0", "9.5",
            "--ls-batch", "1", "--ls-stop-at-rise"]
    assert main(args) == 2 and old.read_text() == "{}"
    assert main([*args, "--overwrite"]) == 0
    record = _load(old)
    assert list(record["by_target"]) == ["9.5", "9"]
    for rows in record["by_target"].values():
        assert rows["adamw"]["steps_to_target"] == rows["gn_layerwise"]["steps_to_target"] == 1
    gn_runs = record["results"][1]["runs"]
    assert all(1 <= p["line_search_evals"] <= 10 for run in gn_runs for p in run["curve"][1:])
    # The line-search batch is 1 of the batch's 4 sequences.
    assert (4 * record["summary"]["gn_layerwise"]["tokens_to_target"]
            == 5 * record["summary"]["adamw"]["tokens_to_target"])


def test_steps_to_target_smoke_model_fields_and_decaying_baselines(tmp_path):
    assert main(["steps-to-target", "--smoke", "--out", str(tmp_path), "--optimizers", "adamw",
                 "--model-field", "d_model=16", "--model-field", "n_layers=1",
                 "--decay-steps", "6"]) == 0
    record = _load(tmp_path / "steps_to_target.json")
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


def test_batch_scaling_smoke(smoke):
    record = _load(smoke("batch-scaling", "--optimizers", "adamw", "--max-steps", "3")
                   / "batch_scaling.json")
    assert set(record["steps_to_target"]["adamw"]) == {"4", "8"}
    noise = record["noise_scale"]
    assert noise["big_batch"] == 8 and noise["small_batch"] == 1
    assert len(noise["steps"]) == len(noise["b_simple"]) >= 1  # finite values only


SMOKE_TESTED = {"cost", "steps-to-target", "batch-scaling", "gpu"}  # by the tests above and below


@pytest.mark.parametrize("suite", sorted(set(SUITES) - SMOKE_TESTED))
def test_every_other_suite_smokes_into_a_temporary_folder(smoke, suite):
    """A suite registered later gets the same check: its smoke run leaves results/ alone."""
    out = smoke(suite)
    assert any(out.glob("*.json"))


def test_the_prepared_device_script_runs_both_gpu_parts(tmp_path):
    """``scripts/gpu/run.sh --smoke``: the device command, same code at CI size on CPU,
    with this interpreter (not whatever ``python3`` is on PATH) and its default folder,
    which for a smoke run is a new temporary one: results/ is left unchanged."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))
    before = _results_state()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu" / "run.sh"), "--smoke"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _results_state() == before, "a smoke run changed results/"
    out, = tmp_path.glob("gnopt-bench-gpu-smoke-*")
    assert {r["name"] for r in _load(out / "cost_tiny.json")["rows"]} >= {"gn_outer"}
    steps_record = _load(out / "steps_tiny.json")
    assert steps_record["complete"] and set(steps_record["summary"]) == {"adamw"}
    log = (out / "log.txt").read_text()
    assert "jax " in log and "wrote " + str(out / "steps_tiny.json") in log
    # Run again into the same folder: refused before anything runs, the log kept.
    again = subprocess.run(["bash", str(ROOT / "scripts" / "gpu" / "run.sh"), "--smoke"],
                           env=dict(env, OUT=str(out)), capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (out / "log.txt").read_text() == log


@pytest.mark.parametrize("args, existing", [
    (["cost"], "cost.json"),
    (["cost", "--name", "mine"], "mine.png"),
    (["steps-to-target"], "steps_to_target.json"),
    (["batch-scaling"], "batch_scaling.png"),
    (["gpu"], "steps_45m.json"),
    (["gpu", "--part", "cost"], "cost_45m.png"),
])
def test_a_full_run_never_replaces_a_result_file(tmp_path, capsys, args, existing):
    """Refused with exit code 2 and one line, before anything runs (these are full-size)."""
    (tmp_path / existing).write_text("published")
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / existing} exists: pass --overwrite" in err and err.count("\n") == 1
    assert (tmp_path / existing).read_text() == "published"


def test_the_committed_results_are_refused_by_default(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    before = _results_state()
    assert main(["cost"]) == 2
    assert "results/cost/cost.json exists: pass --overwrite" in capsys.readouterr().err
    assert _results_state() == before


def test_a_run_may_rewrite_only_its_own_files(tmp_path):
    with common.output_rule():
        path = common.write_result(str(tmp_path), "r", {"x": 1}, ["cost"])
        assert common.write_result(str(tmp_path), "r", {"x": 2}, ["cost"]) == path  # its own
    with common.output_rule(), pytest.raises(ValueError, match="exists: pass --overwrite"):
        common.write_result(str(tmp_path), "r", {"x": 3}, ["cost"])
    with common.output_rule(overwrite=True):
        common.write_result(str(tmp_path), "r", {"x": 4}, ["cost"])
    assert json.loads(pathlib.Path(path).read_text())["x"] == 4


def test_git_revision_is_recorded_in_a_checkout_and_absent_outside(monkeypatch, tmp_path):
    revision = common.git_revision()
    if IN_GIT:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        assert revision["commit"] == head and isinstance(revision["dirty"], bool)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert common.git_revision() == {}


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


def test_pi_gains_reach_pi_muons_fusion_controller(tmp_path, monkeypatch):
    import argparse

    from gnopt import control

    made = []
    real = control.fusion_weight_controller
    monkeypatch.setattr(control, "fusion_weight_controller",
                        lambda **kw: made.append(kw) or real(**kw))
    o = argparse.Namespace(**dict(steps.FULL, pi_gains="0.4,0.05"))
    steps.optimizer_table(o)["pi_muon"].build(0.03)
    assert made == [dict(kp=0.4, ki=0.05, reject_below=0.0)]
    assert main(["steps-to-target", "--smoke", "--out", str(tmp_path), "--pi-gains", "0.4"]) == 2
