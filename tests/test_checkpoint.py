"""Checkpoints: exact round trip, rotation, mismatch errors, atomicity under kill."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gnopt.checkpoint import Checkpointer, CheckpointMismatchError
from gnopt.models import MLP


def _state(seed: int):
    model = MLP((3, 5, 2), key=jax.random.PRNGKey(seed))
    tx = optax.MultiSteps(optax.adamw(1e-3), 2)
    opt_state = tx.init(model)
    grads = jax.tree.map(jnp.ones_like, model)
    _, opt_state = tx.update(grads, opt_state, model)
    return {"params": model, "opt_state": opt_state, "rng": jax.random.PRNGKey(seed + 1)}


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
    saved = _state(0)
    meta = {"step": 7, "data_state": {"next_index": 3, "nested": [1, 2]}, "wall_s": 1.5}
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(7, saved, meta)
    restored, restored_meta = ckpt.restore(_state(1))  # template with other values
    _assert_same(restored, saved)
    assert isinstance(restored["params"], MLP)
    assert restored["params"].activation == "tanh"
    assert restored_meta == meta
    ckpt.close()


def test_keeps_newest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"step": step})
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
    _, meta = ckpt.restore(_state(0), step=2)
    assert meta == {"step": 2}
    with pytest.raises(FileNotFoundError, match="step 1"):
        ckpt.restore(_state(0), step=1)


def test_restore_into_other_model_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, _state(0), {})
    other = _state(0)
    other["params"] = MLP((3, 6, 2), key=jax.random.PRNGKey(0))
    other["opt_state"] = optax.MultiSteps(optax.adamw(1e-3), 2).init(other["params"])
    stored_as = r"does not fit: \['opt_state'\].*mu.layers\[0\].weight is stored as float32\[3, 5\]"
    with pytest.raises(CheckpointMismatchError, match=stored_as) as info:
        ckpt.restore(other)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointMismatchError, match=r"stores \[.opt_state., .params., .rng.\], the configured state has \[.params.\]"):
        ckpt.restore({"params": other["params"]})


def test_half_written_checkpoint_is_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path)
    saved = _state(0)
    ckpt.save(5, saved, {"step": 5})
    ckpt.close()
    # What a process killed during the save of step 9 leaves behind.
    partial = tmp_path / "9.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 100)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 5
    restored, meta = ckpt.restore(_state(1))
    _assert_same(restored, saved)
    assert meta == {"step": 5}
    assert not partial.exists()  # cleaned up by the next run


_SAVER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from gnopt.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.arange(10.0)}, {"step": 1})
    print("saved 1", flush=True)
    ckpt.save(2, {"w": jnp.ones(2 ** 26)}, {"step": 2})  # 256 MB: takes a while
    print("saved 2", flush=True)
""")


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    directory = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(directory)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved 1"
        deadline = time.monotonic() + 60
        while not any(p.name.startswith("2.") and "tmp" in p.name for p in directory.iterdir()):
            assert proc.poll() is None, "the second save finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    assert not (directory / "2").exists()
    ckpt = Checkpointer(directory)
    assert ckpt.latest_step() == 1
    restored, meta = ckpt.restore({"w": jnp.zeros(10)})
    np.testing.assert_array_equal(restored["w"], np.arange(10.0))
    assert meta == {"step": 1}
