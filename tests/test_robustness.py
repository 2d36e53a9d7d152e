"""Faults and bad input: corrupt checkpoints, a vanishing token shard, SIGTERM,
resuming on another device count. Every resumed run must repeat an
uninterrupted one."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_cli

from gnopt.checkpoint import CHECKSUM_FILE, CheckpointCorruptError, Checkpointer
from gnopt.metrics import read_metrics
from gnopt.train import EXIT_DATA_MISSING, EXIT_SIGTERM

LONG = 300  # steps of the interrupted runs: far more than run before they are stopped


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_cli.write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A compilation cache shared by this module's runs, here and in subprocesses."""
    path = tmp_path_factory.mktemp("jax_cache")
    with tiny_cli.compilation_cache(path):
        yield path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards, cache):
    """Losses of the uninterrupted AdamW run of ``LONG`` steps on one device."""
    run = tmp_path_factory.mktemp("straight")
    assert tiny_cli.run_here(tiny_cli.argv("tiny_adamw.gin", run, shards, f"NUM_STEPS = {LONG}",
                                           "train.checkpoint_every = 0")) == 0
    return tiny_cli.losses(run)


def _adamw(run, shards, *params):
    return tiny_cli.argv("tiny_adamw.gin", run, shards, f"NUM_STEPS = {LONG}",
                         "train.checkpoint_every = 0", *params)


def _wait_for_steps(run: Path, proc, count: int = 2) -> None:
    """Waits until the subprocess has logged ``count`` steps."""
    deadline = time.monotonic() + 120
    metrics = run / "metrics.jsonl"
    while not metrics.exists() or metrics.read_text().count("\n") < count:  # whole lines only
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run logged no steps"
        time.sleep(0.005)


def _assert_repeats(run: Path, straight: list[float]) -> None:
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, LONG + 1))
    np.testing.assert_allclose(tiny_cli.losses(run), straight, rtol=1e-6)


def test_sigterm_saves_the_current_step_and_the_run_resumes(tmp_path, shards, straight, cache):
    run = tmp_path / "run"
    args = _adamw(run, shards)
    proc = tiny_cli.start(args, cache=cache)
    _wait_for_steps(run, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM == 143, err[-3000:]
    stopped = read_metrics(run)[-1]["step"]
    assert 2 <= stopped < LONG
    assert f"stopped by SIGTERM after step {stopped} (checkpoint saved)" in err
    assert Checkpointer(run / "checkpoints").all_steps() == [stopped]
    assert tiny_cli.run_here(args) == 0
    _assert_repeats(run, straight)


def test_vanished_token_shard_is_named_and_the_run_resumes_once_it_is_back(
        tmp_path, shards, straight, cache, capsys):
    own = tmp_path / "train.npy"  # a copy: this test moves it away
    shutil.copy(shards[0], own)
    run = tmp_path / "run"
    args = _adamw(run, (own, shards[1]))
    proc = tiny_cli.start(args, cache=cache)
    _wait_for_steps(run, proc)
    proc.send_signal(signal.SIGSTOP)  # hold it while the file goes
    own.rename(tmp_path / "elsewhere.npy")
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_DATA_MISSING, err[-3000:]
    stopped = read_metrics(run)[-1]["step"]
    line = err.strip().splitlines()[-1]
    assert line == (f"gnopt.train: token shard {own} disappeared after step {stopped}; "
                    f"checkpoint of step {stopped} in {run / 'checkpoints'}; put it back and "
                    "re-run the same command to resume"), line
    assert tiny_cli.run_here(args) == 2  # still gone: a config error, nothing run
    assert f"token shard {own} does not exist" in capsys.readouterr().err
    (tmp_path / "elsewhere.npy").rename(own)
    assert tiny_cli.run_here(args) == 0
    assert f"from step {stopped}" in capsys.readouterr().out
    _assert_repeats(run, straight)


def _largest_data_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and "/d/" in p.as_posix()),
               key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    path = _largest_data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(step_dir: Path) -> None:
    path = _largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _garble])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, shards, straight,
                                                                  damage):
    run = tmp_path / "run"
    every_2 = ["train.checkpoint_every = 2", "train.keep_checkpoints = 3"]
    assert tiny_cli.run_here(_adamw(run, shards, *every_2, "train.num_steps = 6")) == 0
    damage(run / "checkpoints" / "6")
    with pytest.warns(UserWarning, match=r"checkpoint step 6 in .* is corrupt \(.*\); moved it "
                                         r"to .*checkpoints-corrupt/6, trying the previous step"):
        assert tiny_cli.run_here(_adamw(run, shards, *every_2, "train.num_steps = 8")) == 0
    assert (run / "checkpoints-corrupt" / "6").is_dir()
    assert Checkpointer(run / "checkpoints").all_steps() == [4, 6, 8]  # 6 written again
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    np.testing.assert_allclose(tiny_cli.losses(run), straight[:8], rtol=1e-6)


def _state(value: float):
    return {"params": {"w": jnp.full((4, 3), float(value))}, "rng": jax.random.PRNGKey(0)}


def test_checkpointer_reports_each_corrupt_step_and_reads_another_run_without_moving(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", keep=5)
    for step in (1, 2, 3, 4):
        ckpt.save(step, _state(step), {"step": step})
    (tmp_path / "c" / "4" / CHECKSUM_FILE).unlink()  # killed before the checksums were written
    json_file = tmp_path / "c" / "3" / "meta" / "metadata"
    json_file.write_text(json_file.read_text().replace("3", "9"))
    _truncate(tmp_path / "c" / "2")
    reader = Checkpointer(tmp_path / "c", create=False)
    with pytest.warns(UserWarning) as caught:
        state, meta = reader.restore(_state(0.0))
    assert [str(w.message).split(" (")[0] for w in caught] == [
        f"checkpoint step {s} in {tmp_path / 'c'} is corrupt" for s in (4, 3, 2)]
    assert "skipped it" in str(caught[0].message) and CHECKSUM_FILE in str(caught[0].message)
    assert "meta/metadata does not match its checksum" in str(caught[1].message)
    assert "bytes" in str(caught[2].message)
    assert meta == {"step": 1} and float(state["params"]["w"][0, 0]) == 1.0
    assert ckpt.all_steps() == [1, 2, 3, 4]  # the reader moved nothing
    with pytest.raises(CheckpointCorruptError, match="c/3 is corrupt: meta/metadata does not match"):
        ckpt.restore(_state(0.0), step=3)
    _garble(tmp_path / "c" / "1")
    with pytest.warns(UserWarning), pytest.raises(CheckpointCorruptError, match="no intact"):
        ckpt.restore(_state(0.0))
    assert ckpt.all_steps() == []
    assert sorted(os.listdir(tmp_path / "c-corrupt")) == ["1", "2", "3", "4"]


def test_run_checkpointed_on_one_device_resumes_on_a_2x4_mesh(tmp_path, shards, straight, cache):
    run = tmp_path / "run"
    assert tiny_cli.run_here(_adamw(run, shards, "train.num_steps = 2")) == 0
    proc = tiny_cli.start(_adamw(run, shards, "train.num_steps = 4", "train.mesh = (2, 4)"),
                          devices=8, cache=cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "mesh: data 2 x fsdp 4 (8 device(s)" in out and "from step 2" in out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    np.testing.assert_allclose(tiny_cli.losses(run), straight[:4], rtol=2e-5, atol=2e-6)
    meta = json.loads((run / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["step"] == 4
