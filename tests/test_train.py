"""The training loop: runs, resume, non-finite guard, config errors, gin files."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gin
from gnopt import train as train_lib
from gnopt.metrics import find_diagnostics, read_metrics
from gnopt.models import MLP

GIN = Path(__file__).resolve().parents[1] / "gin"
# A smaller model and data than gin/base/tiny.gin, so a step compiles and runs fast.
SMALL = [
    "gnopt.models.llama_config.d_model = 16",
    "gnopt.models.llama_config.n_layers = 1",
    "gnopt.models.llama_config.n_heads = 2",
    "gnopt.models.llama_config.d_ff = 32",
    "gnopt.data.stdlib_corpus.max_bytes = 200_000",
    "train.seq_len = 32",
    "train.batch_size = 8",
    "train.eval_batches = 1",
]


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache(tmp_path_factory):
    """Runs of one config compile the same step: compile it once per module."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(autouse=True)
def _fresh_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _run(run_dir, *params, gin_file="tiny_adamw.gin", extra=()):
    """``python -m gnopt.train`` in this process; returns the exit code."""
    gin.clear_config()
    argv = ["--gin_file", str(GIN / gin_file), *extra]
    if run_dir is not None:
        argv += ["--run_dir", str(run_dir)]
    for p in [*SMALL, *params]:
        argv += ["--gin_param", p]
    return train_lib.main(argv)


def _parse(gin_file, *params):
    """Parses a gin file as ``python -m gnopt.train`` does (includes found the same way)."""
    gin.clear_config()
    train_lib.parse_gin([str(GIN / gin_file)], list(params))


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


def test_run_lowers_the_loss_and_writes_its_files(tmp_path, capsys):
    run = tmp_path / "run"
    settings = ["NUM_STEPS = 30", "train.eval_every = 10", "train.checkpoint_every = 10",
                "gnopt.transforms.warmup_cosine.warmup_steps = 3"]
    assert _run(run, *settings) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "step 30: loss" in out
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert [r["tokens"] for r in records] == [8 * 32 * s for s in range(1, 31)]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    assert all(r["nonfinite_skipped"] == 0 for r in records)
    first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-5:]])
    assert first > 5.4 and last < first - 1.0, (first, last)
    assert records[-1]["val_loss"] < records[0]["loss"] - 0.5
    assert "train.optimizer = @gnopt.transforms.adamw" in (run / "config.gin").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["20", "30"]
    # Running the finished run again does nothing.
    assert _run(run, *settings) == 0
    assert "already finished at step 30" in capsys.readouterr().out
    assert len(read_metrics(run)) == 30


@pytest.mark.parametrize("gin_file,params", [
    ("tiny_adamw.gin", ["gnopt.transforms.warmup_cosine.warmup_steps = 2"]),
    pytest.param("tiny_gn_full.gin", ["gnopt.solvers.inner_optimizer.inner_batch_size = 4"],
                 marks=pytest.mark.slow),
])
def test_resumed_run_repeats_the_uninterrupted_one(tmp_path, gin_file, params):
    common = ["NUM_STEPS = 7", "train.eval_every = 3", "train.checkpoint_every = 2",
              "train.keep_checkpoints = 5", *params]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _run(straight, *common, gin_file=gin_file) == 0
    # Stop after step 5; then pretend the process was killed after logging step 5
    # but before its checkpoint was written: resume from step 4.
    assert _run(resumed, *common, "train.num_steps = 5", gin_file=gin_file) == 0
    shutil.rmtree(resumed / "checkpoints" / "5")
    assert len(read_metrics(resumed)) == 5
    assert _run(resumed, *common, gin_file=gin_file) == 0
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 8))
    for key in ("loss", "tokens", "val_loss"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    # TensorBoard: the redone step 5 is purged, as in metrics.jsonl (issue 18 item 2).
    losses = _tensorboard_scalars(resumed)["loss"]
    assert [step for step, _ in losses] == list(range(1, 8))
    np.testing.assert_allclose([v for _, v in losses], [r["loss"] for r in a], rtol=1e-6)


def _tensorboard_scalars(run_dir):
    """``{tag: [(step, value), ...]}`` read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_gauss_newton_diagnostics_are_logged_to_jsonl_and_tensorboard(tmp_path):
    """GN diagnostics are logged; and (issue 18 item 2) every scalar of ``metrics.jsonl``
    (loss, val_loss, step size, ρ, damping, CG iterations, tokens/s, skipped steps) is a
    TensorBoard scalar of the same name and value, read back with TensorBoard's
    ``EventAccumulator``; the operative config is a text entry."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "cg"
    assert _run(run, "NUM_STEPS = 3", "train.eval_every = 3", "gnopt.solvers.cg.max_iters = 3",
                "gnopt.gauss_newton.damping = @gnopt.control.damping_controller()",
                gin_file="tiny_gn_cg.gin") == 0
    records = read_metrics(run)
    for key in ("loss_before", "step_size", "update_norm", "line_search_loss"):
        assert np.isfinite(records[-1][key]), key
    assert records[-1]["tokens"] == 3 * 2 * 8 * 32  # a fresh line-search batch per step
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    scalars = _tensorboard_scalars(run)
    for key in ("loss", "val_loss", "step_size", "rho", "damping", "cg_iterations",
                "tokens_per_s", "skipped", "nonfinite_skipped", "tokens", "wall_s"):
        expected = [(r["step"], r[key]) for r in records
                    if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
        assert expected, key
        steps, values = zip(*scalars[key])
        assert list(steps) == [s for s, _ in expected], key
        np.testing.assert_allclose(values, [float(v) for _, v in expected], rtol=1e-6,
                                   err_msg=key)
    assert [s for s, _ in scalars["tokens_per_s"]] == [2, 3]  # the compiling step left out
    events = EventAccumulator(str(run))
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]


def _mse(outputs, targets):
    return 0.5 * jnp.mean((outputs - targets) ** 2)


def _toy_problem():
    model = MLP((3, 4, 2), key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    return model, (x, jnp.sin(x[:, :2]))


def test_chunked_loss_and_gradient_equal_the_whole_batch():
    model, batch = _toy_problem()
    whole = train_lib.chunked_value_and_grad(_mse, model, batch)
    chunked = train_lib.chunked_value_and_grad(_mse, model, batch, chunk_size=2)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    model, batch = _toy_problem()
    halves = [jax.tree.map(lambda x: x[:4], batch), jax.tree.map(lambda x: x[4:], batch)]
    plain, _ = train_lib.build_optimizer(lambda: optax.adam(0.1), loss_fn=_mse, total_steps=1)
    accum, _ = train_lib.build_optimizer(lambda: optax.adam(0.1), loss_fn=_mse, total_steps=1,
                                         grad_accum_steps=2)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the step donates its inputs
    expected, *_ = train_lib.make_train_step(plain, _mse)(copy(model), plain.init(model), batch,
                                                          None)
    step = train_lib.make_train_step(accum, _mse)
    params, state = copy(model), accum.init(model)
    for i, half in enumerate(halves):
        params, state, *_ = step(params, state, half, None)
        if i == 0:  # nothing applied before the last micro-batch
            assert all(np.array_equal(a, b) for a, b in
                       zip(jax.tree.leaves(params), jax.tree.leaves(model)))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _nan_from(count: int) -> optax.GradientTransformation:
    """SGD whose updates are NaN from its ``count``-th step on (0-based)."""

    def update(updates, state, params=None):
        bad = state >= count
        return jax.tree.map(lambda g: jnp.where(bad, jnp.nan, -0.1 * g), updates), state + 1

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


gin.external_configurable(_nan_from, name="nan_from", module="test_train")


def test_nonfinite_step_keeps_parameters_and_state():
    model = MLP((3, 4, 2), key=jax.random.PRNGKey(0))
    tx = optax.with_extra_args_support(_nan_from(1))
    step = train_lib.make_train_step(tx, lambda out, y: jnp.mean((out - y) ** 2))
    batch = (jnp.ones((5, 3)), jnp.zeros((5, 2)))
    params, state, loss, ok, diag = step(model, tx.init(model), batch, None)
    assert bool(ok) and np.isfinite(loss) and diag == {}
    before = jax.tree.map(np.asarray, (params, state))
    params, state, loss, ok, _ = step(params, state, batch, None)
    assert not bool(ok)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves((params, state))):
        np.testing.assert_array_equal(x, y)


def test_run_stops_after_too_many_nonfinite_steps(tmp_path, capsys):
    run = tmp_path / "nan"
    code = _run(run, "train.optimizer = @test_train.nan_from", "test_train.nan_from.count = 2",
                "train.max_nonfinite_in_a_row = 3", "NUM_STEPS = 10", "train.eval_every = 0")
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("gnopt.train: stopped at step 5: 3 non-finite steps in a row"), err
    records = read_metrics(run)
    assert [r["nonfinite_skipped"] for r in records] == [0, 0, 1, 2, 3]


def test_target_loss_stops_the_run(tmp_path, capsys):
    run = tmp_path / "target"
    settings = ["NUM_STEPS = 50", "train.target_loss = 5.0", "train.target_metric = 'loss'",
                "train.eval_every = 0", "gnopt.transforms.warmup_cosine.warmup_steps = 1"]
    assert _run(run, *settings) == 0
    steps = [r["step"] for r in read_metrics(run)]
    assert 1 < len(steps) < 50 and read_metrics(run)[-1]["loss"] <= 5.0
    capsys.readouterr()
    assert _run(run, *settings) == 0
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("binding,message", [
    ("train.num_stepz = 3", "doesn't have a parameter named 'num_stepz'"),
    ("trian.num_steps = 3", "No configurable matching 'trian'"),
    ("train.optimizer = @optax.adamx", "No configurable matching reference '@optax.adamx'"),
    ("train.batch_size = -1", "train.batch_size must be a positive int, got -1"),
    ("train.line_search_batch = 'fresh'", "train.line_search_batch must be one of"),
    ("train.num_steps = True", "train.num_steps must be a positive int, got True"),
    ("train.max_skipped_fraction = 1.5",
     "train.max_skipped_fraction must be a number in [0, 1], got 1.5"),
    ("train.shuffle = 'no'", "train.shuffle must be True or False, got 'no'"),
    ("train.data = 'corpus.txt'", "train.data must be a function or gin reference (@name)"),
    ("train.seed = %SEED", "gin macro SEED is not defined (add --gin_param 'SEED = ...')"),
    ("gnopt.models.llama_config.name = '7b'", "unknown LLaMA config '7b'"),
    ("gnopt.transforms.warmup_cosine.warmup_steps = 1000",
     "total_steps (300) must exceed warmup_steps (1000)"),
    ("gnopt.models.llama_config.vocab_size = 100", "token id"),
    ("train.grad_accum_steps = 2\ntrain.optimizer = @gnopt.gauss_newton",
     "grad_accum_steps > 1 needs a first-order optimizer"),
])
def test_config_errors_are_one_line_and_run_nothing(tmp_path, capsys, binding, message):
    run = tmp_path / "bad"
    assert _run(run, binding) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gnopt.train: config error:"), captured.err
    assert message in err[0]
    assert not run.exists() and "parameters" not in captured.out


def test_unset_paper_data_is_a_clear_error(capsys):
    assert train_lib.main(["--gin_file", str(GIN / "45m_adamw.gin"), "--dry_run"]) == 2
    assert "token shard <set TRAIN_SHARDS> does not exist" in capsys.readouterr().err


def test_find_diagnostics_searches_nested_states():
    from typing import NamedTuple

    class WithDiag(NamedTuple):
        count: jax.Array
        diagnostics: dict

    state = (optax.EmptyState(), {"inner": [WithDiag(jnp.zeros(()), {"a": jnp.ones(())})]},
             WithDiag(jnp.zeros(()), {"b": jnp.zeros(())}))
    assert sorted(find_diagnostics(state)) == ["a", "b"]


ALL_GIN_FILES = sorted(str(p.relative_to(GIN)) for p in [*GIN.glob("*.gin"),
                                                          *GIN.glob("steps/*.gin")])
TINY_GIN_FILES = [f for f in ALL_GIN_FILES if not f.startswith(("45m", "150m"))]


def test_gin_files_exist():
    expected = {"quickstart.gin", "tiny_adamw.gin", "tiny_muon.gin", "tiny_lion.gin",
                "tiny_soap.gin", "tiny_shampoo.gin", "tiny_kfac.gin", "tiny_gn_full.gin",
                "tiny_gn_layerwise.gin", "tiny_gn_cg.gin", "tiny_gn_prox_linear.gin",
                "45m_adamw.gin", "45m_gn.gin", "150m_adamw.gin", "150m_gn.gin"}
    assert expected <= set(ALL_GIN_FILES)


@pytest.mark.parametrize("gin_file", ALL_GIN_FILES)
def test_gin_file_builds_and_traces_a_step(gin_file):
    """Every config, at its own sizes: model, optimizer state and one step, abstractly
    (traced, not compiled: ``train(mode="shapes")``)."""
    _parse(gin_file)
    summary = train_lib.train(mode="shapes")
    assert summary["num_params"] > 0 and "memory" not in summary


def test_shapes_only_reports_the_compiled_steps_peak_memory(capsys):
    """Issue 18 item 6: ``--shapes_only`` compiles the step for the mesh and prints XLA's
    memory analysis per device; AdamW's arguments hold parameters and both moments."""
    assert _run(None, extra=["--shapes_only"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("peak memory per device of the compiled step: ")
    assert out[-2].endswith("on 1 device(s), mesh data 1 x fsdp 1")
    assert out[-1].startswith("shapes check passed: ")
    _parse("tiny_adamw.gin", *SMALL)
    summary = train_lib.train(mode="memory")
    memory, params = summary["memory"], summary["num_params"]
    assert memory["arguments"] >= 3 * 4 * params  # float32 θ, μ, ν
    assert memory["peak"] >= memory["arguments"] + memory["temporaries"]


@pytest.mark.slow
@pytest.mark.parametrize("gin_file", TINY_GIN_FILES)
def test_tiny_gin_file_dry_run(gin_file, tmp_path, capsys):
    """``--dry_run`` (one real step) of every laptop config, shrunk."""
    assert _run(tmp_path / "dry", "train.batch_size = 16",
                "gnopt.solvers.inner_optimizer.inner_batch_size = 8",
                "gnopt.solvers.prox_linear.inner_batch_size = 8",
                gin_file=gin_file, extra=["--dry_run"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("step 1: loss") and "val_loss" in line
    assert not (tmp_path / "dry").exists()
