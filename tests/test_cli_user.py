"""``python -m gnopt.train`` as a new user meets it (issue 15): each test types a command in a
subprocess, as in a shell, and asserts its exit code and its one-line message.

Item → test (the command each shows is in its docstring):
1 out-of-vocabulary ids / skipped steps: ``test_out_of_vocabulary_id_in_any_shard_is_refused``,
  ``test_a_run_that_skipped_too_many_steps_fails``; 3 ``test_resume_with_another_config_*``;
4 ``test_rerun_after_no_intact_checkpoint_*``; 5 ``test_metrics_file_is_strict_json_lines``;
6 ``test_run_dir_that_is_a_file_is_refused_before_any_data``; 7 ``test_single_text_file_*``;
8 ``test_gin_file_outside_gin_folder_includes_a_repo_config``; 9 ``test_nonfinite_stop_*``.

Issue 18 item 5 (the command line): ``test_help_lists_the_gin_options_of_train``,
``test_print_config_*``, ``test_run_prints_its_config_and_its_bar_starts_after_compiling``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_cli

from gnopt import plot
from gnopt.checkpoint import Checkpointer
from gnopt.data import stdlib_corpus
from gnopt.metrics import read_metrics
from gnopt.train import EXIT_NO_INTACT_CHECKPOINT

ROOT = tiny_cli.ROOT

# A user's own optimizer module, reached from a gin file with `import flaky`: SGD whose update
# is NaN on some steps (gin `flaky.every_odd`: when the batch's first token is odd; never on
# two batches in a row here) or on every step from the `flaky.after`-th accepted one on.
FLAKY = '''
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax


class State(NamedTuple):
    count: jax.Array
    diagnostics: dict


@gin.configurable
def flaky_sgd(learning_rate=0.05, after=None):
    def init(params):
        return State(jnp.zeros((), jnp.int32), {"gain": jnp.zeros(())})

    def update(grads, state, params=None, batch=None, **extra):
        if after is None:
            bad = batch[0][0, 0] % 2 == 1
        else:
            bad = state.count >= after
        updates = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, -learning_rate * g), grads)
        return updates, State(state.count + 1, {"gain": jnp.where(bad, jnp.inf, 1.0)})

    return optax.GradientTransformationExtraArgs(init, update)
'''


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_cli.write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("jax_cache")
    with tiny_cli.compilation_cache(path):
        yield path


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A user's folder outside the repository, holding the ``flaky`` module."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "flaky.py").write_text(FLAKY)
    return folder


def gnopt_train(*args, cache: Path, cwd: Path = ROOT, pythonpath: Path | None = None):
    """``python -m gnopt.train ARGS`` in a subprocess; the token-id cache stays in ``cache``."""
    env = tiny_cli.env(cache=cache)
    env["XDG_CACHE_HOME"] = str(cache / "xdg")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (ROOT, pythonpath) if p)
    return subprocess.run([sys.executable, "-m", "gnopt.train", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600, check=False)


def message(proc, *, alone: bool = False) -> str:
    """The one ``gnopt.train:`` line on stderr (after any progress bar), checked to be alone
    there when ``alone`` (refused before any step: nothing else was printed to stderr)."""
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("gnopt.train:")]
    assert len(ours) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if alone:
        assert lines == ours, proc.stderr[-3000:]
    return ours[0]


def test_out_of_vocabulary_id_in_any_shard_is_refused(tmp_path, shards, cache):
    """Item 1: ``python -m gnopt.train --gin_file gin/tiny_adamw.gin --run_dir R
    --gin_param 'train/gnopt.data.token_shards.paths = "bad.npy"' ...`` with 40 of 400k ids
    >= the vocabulary (64) → exit 2, ``config error: token shard bad.npy has token id 103 but
    the model's output has only 64 classes (...)``; nothing built or run."""
    tokens = (np.arange(400_000) % tiny_cli.VOCAB).astype(np.uint16)
    tokens[np.linspace(1000, 399_000, 40).astype(int)] = np.arange(64, 104)
    bad = tmp_path / "bad.npy"
    np.save(bad, tokens)
    run = tmp_path / "run"
    proc = gnopt_train(*tiny_cli.argv("tiny_adamw.gin", run, (bad, shards[1]), "NUM_STEPS = 3"),
                       cache=cache)
    assert proc.returncode == 2
    assert message(proc, alone=True) == (
        f"gnopt.train: config error: token shard {bad} has token id 103 but the model's output "
        "has only 64 classes (set the model's vocab_size, e.g. "
        "gnopt.models.llama_config.vocab_size)")
    assert "model:" not in proc.stdout and not run.exists()


@pytest.fixture(scope="module")
def flaky_run(tmp_path_factory, shards, cache, user_dir):
    """A run whose update is NaN on about half of its 8 steps, never 10 in a row."""
    run = tmp_path_factory.mktemp("flaky") / "run"
    config = user_dir / "flaky.gin"
    config.write_text("include 'tiny_adamw.gin'\nimport flaky\n"
                      "train.optimizer = @flaky.flaky_sgd\nNUM_STEPS = 8\n")
    args = tiny_cli.argv("tiny_adamw.gin", run, shards)
    args[1] = config
    return gnopt_train(*args, cache=cache, pythonpath=user_dir), run


def test_a_run_that_skipped_too_many_steps_fails(flaky_run):
    """Item 1: ``python -m gnopt.train --gin_file flaky.gin --run_dir R ...`` (about half of the
    steps non-finite, never 10 in a row) → exit 1, ``gnopt.train: 4 of 8 steps were skipped as
    non-finite (50%), more than train.max_skipped_fraction = 0.1: ...``; each record says
    whether its step was skipped."""
    proc, run = flaky_run
    records = read_metrics(run)
    skipped = sum(r["skipped"] for r in records)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert 2 <= skipped <= 6 and records[-1]["nonfinite_skipped"] == skipped
    assert [r["step"] for r in records] == list(range(1, 9))
    assert message(proc).startswith(
        f"gnopt.train: {skipped} of 8 steps were skipped as non-finite ({skipped / 8:.0%}), more "
        "than train.max_skipped_fraction = 0.1: the run did not train as configured")


def test_skipped_steps_are_counted_in_the_summary_line(flaky_run, tmp_path, user_dir, cache,
                                                       capsys, monkeypatch):
    """Item 1: the same run allowed to skip them (``--gin_param
    'train.max_skipped_fraction = 1.0'``) → exit 0, ``step 8: loss ..., N steps skipped
    (non-finite)``."""
    proc, run = flaky_run
    skipped = read_metrics(run)[-1]["nonfinite_skipped"]
    monkeypatch.syspath_prepend(str(user_dir))  # `import flaky` in the gin file, in this process
    args = tiny_cli.argv("tiny_adamw.gin", tmp_path / "run", tiny_cli.write_shards(tmp_path),
                         "train.max_skipped_fraction = 1.0")
    args[1] = str(user_dir / "flaky.gin")
    assert tiny_cli.run_here(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("step 8: loss") and last.endswith(
        f", {skipped} steps skipped (non-finite)"), last


def test_metrics_file_is_strict_json_lines(flaky_run, tmp_path):
    """Item 5: the same run's ``metrics.jsonl`` (an infinite diagnostic on skipped steps) has
    ``null``, never ``NaN``/``Infinity``; ``python -m gnopt.plot R`` still draws it."""
    proc, run = flaky_run
    assert proc.returncode == 1
    message(proc)

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [r["gain"] for r in records if r["skipped"]] == [None] * sum(r["skipped"]
                                                                      for r in records)
    assert all(r["gain"] == 1.0 for r in records if not r["skipped"])
    assert plot.main([str(run), "-o", str(tmp_path / "curves.png")]) == 0


def test_nonfinite_stop_names_the_quantity_and_saves_the_last_good_state(tmp_path, shards, cache,
                                                                        user_dir):
    """Item 9: ``python -m gnopt.train --gin_file broken.gin --run_dir R`` (updates NaN from the
    3rd step on, train.max_nonfinite_in_a_row = 3) → exit 1, ``gnopt.train: stopped at step 5:
    3 non-finite steps in a row; step 5 had a non-finite update (in .embed.weight and ... more of
    ... leaves); finite loss (...) and gradient; the parameters and optimizer state of step 2,
    the last finite one, are saved as the checkpoint of step 5 in R/checkpoints; ...``."""
    config = user_dir / "broken.gin"
    config.write_text("include 'tiny_adamw.gin'\nimport flaky\n"
                      "train.optimizer = @flaky.flaky_sgd\nflaky_sgd.after = 2\n"
                      "train.max_nonfinite_in_a_row = 3\nNUM_STEPS = 20\n")
    run = tmp_path / "run"
    args = tiny_cli.argv("tiny_adamw.gin", run, shards)
    args[1] = config
    proc = gnopt_train(*args, cache=cache, pythonpath=user_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = message(proc)
    assert line.startswith("gnopt.train: stopped at step 5: 3 non-finite steps in a row; step 5 "
                           "had a non-finite update (in ."), line
    assert "; finite loss (" in line and "and gradient;" in line
    assert (f"the parameters and optimizer state of step 2, the last finite one, are saved as the "
            f"checkpoint of step 5 in {run / 'checkpoints'}") in line
    assert Checkpointer(run / "checkpoints").all_steps() == [5]
    meta = json.loads((run / "checkpoints" / "5" / "meta" / "metadata").read_text())
    assert meta["stop_reason"] == "nonfinite" and meta["nonfinite_skipped"] == 3


def test_resume_with_another_config_is_refused_then_recorded(tmp_path, shards, cache):
    """Item 3: after 2 steps, ``python -m gnopt.train ... --gin_param
    'gnopt.transforms.warmup_cosine.peak = 0.01'`` → exit 2, ``gnopt.train: R was run with
    another config (warmup_cosine.peak: 0.003 -> 0.01); re-run with --allow_config_change ...``;
    with ``--allow_config_change`` → exit 0, and R/configs holds both configs
    (``from_step_1.gin``, ``from_step_3.gin``)."""
    run = tmp_path / "run"
    first = tiny_cli.argv("tiny_adamw.gin", run, shards, "NUM_STEPS = 4", "train.num_steps = 2")
    assert tiny_cli.run_here(first) == 0
    config_before = (run / "config.gin").read_text()
    metrics_before = (run / "metrics.jsonl").read_text()
    # A longer run (train.num_steps does not change a step: not a difference) at a new peak.
    changed = tiny_cli.argv("tiny_adamw.gin", run, shards, "NUM_STEPS = 4",
                            "gnopt.transforms.warmup_cosine.peak = 0.01")
    proc = gnopt_train(*changed, cache=cache)
    assert proc.returncode == 2
    assert message(proc, alone=True) == (
        f"gnopt.train: {run} was run with another config (warmup_cosine.peak: 0.003 -> 0.01); "
        "re-run with --allow_config_change to continue with this one (every config used is kept "
        f"in {run / 'configs'}), or give another --run_dir")
    assert (run / "config.gin").read_text() == config_before
    assert (run / "metrics.jsonl").read_text() == metrics_before

    proc = gnopt_train(*changed, "--allow_config_change", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("step 4: loss")
    kept = sorted(p.name for p in (run / "configs").iterdir())
    assert kept == ["from_step_1.gin", "from_step_3.gin"]
    assert "warmup_cosine.peak = 0.003" in (run / "configs" / kept[0]).read_text()
    assert "warmup_cosine.peak = 0.01" in (run / "configs" / kept[1]).read_text()
    assert "steps 3, 4, ..." in (run / "configs" / kept[1]).read_text()
    assert "warmup_cosine.peak = 0.01" in (run / "config.gin").read_text()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_rerun_after_no_intact_checkpoint_keeps_the_metrics(tmp_path, shards, cache, capsys):
    """Item 4: after exit 4 (``no intact checkpoint ...; re-run with --restart ...``), the same
    ``python -m gnopt.train ...`` → exit 2, ``gnopt.train: R holds an earlier run (metrics.jsonl
    to step 2) but no intact checkpoint to resume from (the damaged ones are in
    R/checkpoints-corrupt); re-run with --restart ...``, metrics untouched; with
    ``--restart`` → exit 0 from step 0."""
    run = tmp_path / "run"
    args = tiny_cli.argv("tiny_adamw.gin", run, shards, "NUM_STEPS = 2")
    assert tiny_cli.run_here(args) == 0
    capsys.readouterr()
    (run / "checkpoints" / "2" / "gnopt_checksums.json").unlink()  # killed while saving
    with pytest.warns(UserWarning, match="checkpoint step 2"):
        assert tiny_cli.run_here(args) == EXIT_NO_INTACT_CHECKPOINT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        f"moved to {run / 'checkpoints'}-corrupt; re-run with --restart to start over from step 0")
    metrics = (run / "metrics.jsonl").read_text()

    proc = gnopt_train(*args, cache=cache)
    assert proc.returncode == 2
    assert message(proc, alone=True) == (
        f"gnopt.train: {run} holds an earlier run (metrics.jsonl to step 2) but no intact "
        f"checkpoint to resume from (the damaged ones are in {run / 'checkpoints'}-corrupt); "
        "re-run with --restart to start it over from step 0 (its metrics and checkpoints are "
        "deleted), or give another --run_dir")
    assert (run / "metrics.jsonl").read_text() == metrics

    proc = gnopt_train(*args, "--restart", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--restart: deleted metrics.jsonl, config.gin, configs, checkpoints, " in proc.stdout
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert not (run / "checkpoints-corrupt").exists()
    assert Checkpointer(run / "checkpoints").all_steps() == [2]


def test_run_dir_that_is_a_file_is_refused_before_any_data(tmp_path, cache):
    """Item 6: ``python -m gnopt.train --gin_file gin/tiny_adamw.gin --run_dir notes.txt`` →
    exit 2, ``gnopt.train: --run_dir notes.txt is a file, not a folder``, before any data (the
    shards named here do not even exist) or model."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    nowhere = (tmp_path / "no_train.npy", tmp_path / "no_val.npy")
    proc = gnopt_train(*tiny_cli.argv("tiny_adamw.gin", notes, nowhere), cache=cache)
    assert proc.returncode == 2
    assert message(proc, alone=True) == f"gnopt.train: --run_dir {notes} is a file, not a folder"
    assert proc.stdout == "" and notes.read_text() == "mine\n"


def _text_file_params(path: Path, *extra: str) -> list[str]:
    params = [*tiny_cli.TINY[1:6], "train.seq_len = 16", "train.batch_size = 16",
              "train.data = @gnopt.data.text_files", f'gnopt.data.text_files.paths = "{path}"',
              "gnopt.transforms.warmup_cosine.warmup_steps = 1", "NUM_STEPS = 2",
              "train.eval_every = 2", "train.eval_batches = 2", *extra]
    return [arg for p in params for arg in ("--gin_param", p)]


def test_single_text_file_trains_with_its_held_out_tail(tmp_path, cache, capsys):
    """Item 7: ``python -m gnopt.train --gin_file gin/tiny_adamw.gin --run_dir R --gin_param
    'train.data = @gnopt.data.text_files' --gin_param 'gnopt.data.text_files.paths =
    "book.txt"'`` → exit 0, ``step 2: loss ..., val_loss ...`` (validation: the last 1/20 of
    the text); a file too small for that → exit 2, ``config error: validation data: ...; give
    a larger set with train.val_data, or lower train.eval_batches, or set train.eval_every =
    0``."""
    book = tmp_path / "book.txt"
    book.write_bytes(stdlib_corpus(max_bytes=120_000).tobytes().replace(b"\0", b"\n"))
    run = tmp_path / "run"
    proc = gnopt_train("--gin_file", ROOT / "gin" / "tiny_adamw.gin", "--run_dir", run,
                       *_text_file_params(book), cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("step 2: loss") and ", val_loss " in last, last
    assert "val_loss" in read_metrics(run)[-1]

    note = tmp_path / "note.txt"
    note.write_text("a short note\n" * 100)
    code = tiny_cli.run_here(["--gin_file", str(ROOT / "gin" / "tiny_adamw.gin"), "--run_dir",
                              str(tmp_path / "small"), *_text_file_params(note)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("gnopt.train: config error: validation data: 65 tokens make 4 "
                             "windows"), err[0]
    assert err[0].endswith("give a larger set with train.val_data, or lower train.eval_batches, "
                           "or set train.eval_every = 0")


def test_gin_file_outside_gin_folder_includes_a_repo_config(tmp_path, cache, capsys):
    """Item 8: in a folder of one's own, ``python -m gnopt.train --gin_file my.gin
    --shapes_only`` where my.gin has ``include 'parts/base.gin'`` (next to my.gin) and that
    has ``include '<repo>/gin/quickstart.gin'`` (which includes ``base/tiny_gn.gin``) → exit 0,
    ``shapes check passed: ...``; an include that exists nowhere → exit 2, ``config error:
    include 'nowhere.gin' in my.gin: no such file in <its folder> or <repo>/gin``."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "base.gin").write_text(f"include '{ROOT / 'gin' / 'quickstart.gin'}'\n")
    mine = tmp_path / "my.gin"
    mine.write_text("include 'parts/base.gin'\nNUM_STEPS = 5\n")
    proc = gnopt_train("--gin_file", "my.gin", "--shapes_only", cache=cache, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("shapes check passed: ")

    wrong = tmp_path / "wrong.gin"
    wrong.write_text("include 'nowhere.gin'\n")
    assert tiny_cli.run_here(["--gin_file", str(wrong), "--shapes_only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gnopt.train: config error: include 'nowhere.gin' in {wrong}: no such file "
                   f"in {tmp_path} or {ROOT / 'gin'}"], err


def test_help_lists_the_gin_options_of_train(capsys):
    """``python -m gnopt.train --help`` → every gin-configurable argument of ``train`` with
    its default and description, e.g. ``train.batch_size = 16``."""
    import inspect

    from gnopt import train as train_lib

    with pytest.raises(SystemExit) as exit_info:
        train_lib.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    hidden = {"run_dir", "mode", "restart", "allow_config_change"}
    for name in inspect.signature(train_lib.train).parameters:
        assert (f"  train.{name} = " in out) != (name in hidden), name
    assert "  train.batch_size = 16\n      [B, T] of one (micro-)batch" in out
    assert "train.loss_fn = %gnopt.losses.softmax_cross_entropy" in out
    assert "--print_config" in out


def test_print_config_without_a_gin_file_is_the_quickstart(tmp_path, monkeypatch, capsys):
    """``python -m gnopt.train --print_config`` (no ``--gin_file``: quickstart.gin) → exit 0,
    the operative config (layerwise GN, 30 steps), nothing run or written."""
    monkeypatch.chdir(tmp_path)
    assert tiny_cli.run_here(["--print_config"]) == 0
    out = capsys.readouterr().out
    assert "gauss_newton.curvature = @gnopt.curvature.layerwise()" in out
    assert "train.num_steps = %NUM_STEPS" in out and "NUM_STEPS = 30" in out
    assert "model:" not in out and not list(tmp_path.iterdir())


def test_run_prints_its_config_and_its_bar_starts_after_compiling(tmp_path, shards, cache,
                                                                  capsys, monkeypatch):
    """A run prints its operative config first; the progress bar (its rate and ETA) starts
    after the first step, which compiles, with a line saying how long that took."""
    from gnopt import train as train_lib

    made = []

    class Bar(train_lib.tqdm):
        def __init__(self, *args, **kwargs):
            made.append(kwargs["initial"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train_lib, "tqdm", Bar)
    with tiny_cli.compilation_cache(cache):
        code = tiny_cli.run_here(tiny_cli.argv("tiny_adamw.gin", tmp_path / "run", shards,
                                               "NUM_STEPS = 3"))
    assert code == 0
    out = capsys.readouterr().out
    assert made == [1]
    config = out.index("operative gin config (RUN_DIR/config.gin):")
    assert out.index("  train.batch_size = 16", config) < out.index("step 1 (compiling")
    assert out.strip().splitlines()[-1].startswith("step 3: loss")
