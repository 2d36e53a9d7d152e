"""The benchmark suites in smoke mode (CI size, CPU) and their result files."""

import hashlib
import json
import os
import pathlib
import statistics
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
    assert 0.0 < rows["pi_muon_outer"]["accepted_fraction"] <= 1.0
    assert rows["gradient"]["accepted_fraction"] is None


def test_cost_outer_steps_run_on_text():
    """The outer batches are next-token pairs of the steps-to-target corpus (Python source),
    not random tokens: a PI-Muon step's cost depends on whether it is accepted."""
    (inputs, targets), fresh = cost._text_batches(2, 32, 2, 300_000)
    assert inputs.shape == targets.shape == fresh[0].shape == (2, 32)
    assert (inputs[:, 1:] == targets[:, :-1]).all()
    ascii_text = [32 <= b < 127 or b in (9, 10, 13) for b in inputs.ravel().tolist()]
    assert sum(ascii_text) / len(ascii_text) > 0.95  # random bytes: about 0.4


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


def test_ramp_schedule_ramps_then_holds_or_decays():
    from gnopt.transforms import ramp

    constant = ramp(1.0, warmup_steps=4)
    decaying = ramp(1.0, warmup_steps=4, decay_steps=20)
    assert [float(constant(t)) for t in (0, 3, 50)] == pytest.approx([0.25, 1.0, 1.0])
    assert float(decaying(0)) == pytest.approx(0.25)
    assert float(decaying(4)) == pytest.approx(1.0)
    assert float(decaying(12)) == pytest.approx(0.55)  # half-way down the cosine to 0.1
    assert [float(decaying(t)) for t in (20, 50)] == pytest.approx([0.1, 0.1])


def _options(**changes):
    import argparse

    return argparse.Namespace(**dict(steps.FULL, **changes))


def test_the_optimizer_table_is_gin_steps():
    """Issue 16 item 5: one table of optimizers, the files of gin/steps/ (which
    ``python -m gnopt.train`` runs too, tests/test_train.py); whether a row is
    second-order comes from its builder's stated requirements."""
    table = steps.optimizer_table(_options())
    files = sorted(p.stem for p in (ROOT / "gin" / "steps").glob("*.gin"))
    assert sorted(table) == files
    assert {"adamw", "muon", "soap", "shampoo", "kfac", "gn_full", "gn_layerwise",
            "gn_prox_linear", "pi_muon", "pi_muon_literal", "pi_muon_interpolate"} <= set(table)
    second = {name for name, opt in table.items() if opt.second_order}
    assert second == {n for n in files if n.startswith(("gn_", "pi_muon"))}
    assert table["muon"].learning_rates == (0.04, 0.08, 0.16)
    for opt in table.values():
        tx = opt.build(opt.learning_rates[0], 10)
        assert callable(tx.init) and callable(tx.update)


def test_steps_gin_macros_default_to_the_suites_options():
    """``python -m gnopt.train --gin_file steps/X.gin`` runs X as the suite does by default."""
    import gin

    from gnopt import train as train_lib

    gin.clear_config()
    train_lib.parse_gin([str(ROOT / "gin" / "base" / "steps.gin")])
    defaults = {k: gin.query_parameter(f"%{k}") for k in
                ("RAMP_STEPS", "DECAY_STEPS", "INNER_BATCH", "LS_STOP_AT_RISE")}
    gin.clear_config()
    assert defaults == {"RAMP_STEPS": steps.FULL["ramp_steps"],
                        "DECAY_STEPS": steps.FULL["decay_steps"],
                        "INNER_BATCH": steps.FULL["inner_batch"],
                        "LS_STOP_AT_RISE": steps.FULL["ls_stop_at_rise"]}


def _adam_learning_rates(opt, lr, n):
    """Adam's first updates of one parameter under a constant gradient are ``−η_t``."""
    import jax.numpy as jnp

    tx = opt.build(lr, n)
    params = jnp.zeros((1,))
    state, rates = tx.init(params), []
    for _ in range(n):
        updates, state = tx.update(jnp.ones((1,)), state, params)
        rates.append(-float(updates[0]))
    return rates


def test_options_reach_the_gin_files():
    """--ramp-steps, --decay-steps and --gin-param become bindings of every file."""
    from gnopt.transforms import ramp

    table = steps.optimizer_table(_options(ramp_steps=3, decay_steps=8))
    expected = [float(ramp(0.01, 3, 8)(t)) for t in range(10)]
    assert _adam_learning_rates(table["adamw"], 0.01, 10) == pytest.approx(expected, rel=1e-4)
    table = steps.optimizer_table(_options(gin_param=["gnopt.pi_muon.plane_damping = -1.0"]))
    with pytest.raises(ValueError, match="plane_damping"):
        table["pi_muon"].build(0.03, 10)


def test_a_users_gin_file_is_a_row(tmp_path):
    user = tmp_path / "my_adamw.gin"
    user.write_text("include 'steps/adamw.gin'\nLEARNING_RATES = [1e-3]\n"
                    "gnopt.transforms.adamw.weight_decay = 0.0\n")
    table = steps.optimizer_table(_options(optimizers=[str(user), "muon"]))
    assert table[str(user)].learning_rates == (1e-3,)
    assert steps.selected(_options(optimizers=[str(user)]), table)[0].name == str(user)
    assert main(["steps-to-target", "--smoke", "--out", str(tmp_path), "--optimizers",
                 str(user)]) == 0
    record = _load(tmp_path / "steps_to_target.json")
    assert record["gin_files"] == {str(user): user.read_text()}
    assert [r["optimizer"] for r in record["results"]] == [str(user)]


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


def test_step_time_smoke_times_the_rows_side_by_side(smoke, monkeypatch):
    """Every row gets ``--repeats`` timed steps; the ratio is each row's median over the
    first row's; accepted fractions only where the optimizer reports acceptance; the
    allocator's environment is recorded."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "268435456")
    out = smoke("step-time", "--optimizers", "pi_muon", "gn_layerwise", "muon", "--repeats", "3")
    record = json.loads((out / "step_time.json").read_text())
    assert record["command"].startswith("python -m gnopt.bench step-time")
    assert record["allocator"]["MALLOC_TRIM_THRESHOLD_"] == "268435456"
    rows = record["rows"]
    assert [r["optimizer"] for r in rows] == ["pi_muon", "gn_layerwise", "muon"]
    for r in rows:
        assert len(r["seconds"]) == 3 and min(r["seconds"]) > 0
        assert r["median_s"] == statistics.median(r["seconds"])
        assert r["ratio"] == pytest.approx(r["median_s"] / rows[0]["median_s"])
    assert 0.0 <= rows[0]["accepted_fraction"] <= 1.0 and rows[2]["accepted_fraction"] is None


SMOKE_TESTED = {"cost", "steps-to-target", "batch-scaling", "gpu", "step-time"}  # by the tests here


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
    from gnopt import control

    made = []
    real = control.PIController.__init__
    monkeypatch.setattr(control.PIController, "__init__",
                        lambda self, *a, **kw: made.append(kw) or real(self, *a, **kw))
    steps.optimizer_table(_options(pi_gains="0.4,0.05"))["pi_muon"].build(0.03, 10)
    assert [(kw.get("kp"), kw.get("ki")) for kw in made] == [(0.4, 0.05)]
    assert main(["steps-to-target", "--smoke", "--out", str(tmp_path), "--pi-gains", "0.4"]) == 2


def test_fusion_diagnostics_plot_only_for_fused_runs(tmp_path):
    from gnopt.bench import plots

    def result(name, with_lambda):
        curve = [{"step": 0, "val_loss": 3.0}]
        for step in (1, 2, 3):
            point = {"step": step, "val_loss": 3.0 - 0.1 * step}
            if with_lambda:
                point.update({"lambda": 0.5 + 0.1 * step, "rho": 0.9, "plane_a": 0.7,
                              "plane_c": 0.2, "accepted": float(step != 2)})
            curve.append(point)
        return {"optimizer": name, "best_lr": 0.03, "runs": [{"lr": 0.03, "curve": curve}]}

    path = tmp_path / "fusion.png"
    assert not plots.fusion_diagnostics([result("gn_layerwise", False)], str(path))
    assert not path.exists()
    assert plots.fusion_diagnostics([result("gn_layerwise", False), result("pi_muon", True)],
                                    str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text, message", [
    ("include 'base/tiny.gin'\nLEARNING_RATES = [1e-3]\n", "sets no train.optimizer"),
    ("train.optimizer = @gnopt.transforms.adamw\n", "defines no LEARNING_RATES"),
])
def test_a_gin_row_without_an_optimizer_or_a_grid_exits_2(tmp_path, capsys, text, message):
    user = tmp_path / "mine.gin"
    user.write_text(text)
    assert main(["steps-to-target", "--smoke", "--out", str(tmp_path), "--optimizers",
                 str(user)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(user) in err and err.count("\n") == 1
