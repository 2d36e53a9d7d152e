"""``train.init_from``: a new run starts from another run's parameters (the paper's
shared AdamW warm-up) with a fresh optimizer state at step 0."""

import jax
import numpy as np
import optax.tree_utils as otu
import pytest
import tiny_cli

from gnopt.checkpoint import Checkpointer
from gnopt.metrics import read_metrics

FROZEN = ["train.optimizer = @optax.sgd", "optax.sgd.learning_rate = 0.0"]  # params kept as loaded


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("jax_cache")
    with tiny_cli.compilation_cache(path):
        yield tiny_cli.write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def warmup(tmp_path_factory, shards):
    """A 3-step AdamW warm-up with checkpoints at every step; its final parameters."""
    run = tmp_path_factory.mktemp("warmup")
    summary = tiny_cli.train_here("tiny_adamw.gin", run, shards, "NUM_STEPS = 3",
                                  "train.checkpoint_every = 1", "train.keep_checkpoints = 3")
    return run, summary["params"]


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _start(run, shards, init_from, *params, gin_file="tiny_adamw.gin"):
    return tiny_cli.train_here(gin_file, run, shards, "NUM_STEPS = 3", "train.num_steps = 1",
                               f'train.init_from = "{init_from}"', *params)


def test_parameters_come_from_the_run_or_the_step_folder(tmp_path, shards, warmup):
    source, final = warmup
    summary = _start(tmp_path / "a", shards, source, *FROZEN)
    _assert_same(summary["params"], final)
    assert [(r["step"], r["tokens"]) for r in read_metrics(tmp_path / "a")] == [(1, 256)]
    summary = _start(tmp_path / "b", shards, source / "checkpoints" / "2", *FROZEN)
    stored, _ = Checkpointer(source / "checkpoints").restore({"params": final}, 2, partial=True)
    _assert_same(summary["params"], stored["params"])
    with pytest.raises(AssertionError):
        _assert_same(stored["params"], final)


def test_optimizer_state_is_fresh_and_every_optimizer_starts_from_the_same_loss(
        tmp_path, shards, warmup, capsys):
    source, _ = warmup
    frozen_loss = _start(tmp_path / "frozen", shards, source, *FROZEN)["loss"]
    adamw = _start(tmp_path / "adamw", shards, source)
    assert [int(c) for c in otu.tree_get_all_with_path(adamw["opt_state"], "count")[0][1:]] == [1]
    gn_run = tmp_path / "gn"
    gn = _start(gn_run, shards, source, gin_file="tiny_gn_layerwise.gin")
    assert [r["step"] for r in read_metrics(gn_run)] == [1]
    # The step's loss is that of the parameters before it, on the same first batch.
    np.testing.assert_allclose([adamw["loss"], gn["loss"]], frozen_loss, rtol=1e-6)
    fresh = tiny_cli.losses(source)[0]  # the warm-up's first loss: random parameters
    assert frozen_loss < fresh - 0.02
    capsys.readouterr()
    # A run with a checkpoint of its own resumes it; init_from no longer applies.
    tiny_cli.train_here("tiny_gn_layerwise.gin", gn_run, shards, "NUM_STEPS = 3",
                        "train.num_steps = 2", f'train.init_from = "{source}"')
    out = capsys.readouterr().out
    assert "resuming" in out and "parameters from" not in out


@pytest.mark.parametrize("init_from,params,message", [
    ("{tmp}/nowhere", [], "train.init_from='{tmp}/nowhere' is not a run or checkpoint folder"),
    ("{tmp}", [], "train.init_from='{tmp}': no checkpoint in {tmp}"),
    ("{source}/checkpoints/7", [], "no checkpoint of step 7 in {source}/checkpoints"),
    ("{source}", ["gnopt.models.llama_config.d_model = 16"], "does not fit: ['params']"),
])
def test_bad_init_from_is_refused_before_compute(tmp_path, shards, warmup, capsys, init_from, params,
                                         message):
    paths = {"tmp": tmp_path, "source": warmup[0]}
    args = tiny_cli.argv("tiny_adamw.gin", tmp_path / "run", shards, "NUM_STEPS = 3",
                         f'train.init_from = "{init_from.format(**paths)}"', *params)
    assert tiny_cli.run_here(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(**paths) in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
