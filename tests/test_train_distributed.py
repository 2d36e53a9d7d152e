"""``python -m gnopt.train`` on 8 simulated CPU devices (subprocesses) equals one device:
a 2×4 mesh in one process, and two processes of 4 devices each (multi-host)."""

import json
import socket

import numpy as np
import pytest
import tiny_cli

from gnopt import distributed as dist
from gnopt.checkpoint import Checkpointer
from gnopt.metrics import read_metrics

RUNS = {  # name: (gin file, mesh)
    "adamw": ("tiny_adamw.gin", (2, 4)),
    "adamw_8x1": ("tiny_adamw.gin", (8, 1)),
    "gn_layerwise": ("tiny_gn_layerwise.gin", (2, 4)),
    "gn_full": ("tiny_gn_full.gin", (2, 4)),
}
STEPS = ["NUM_STEPS = 3"]

_TRAIN_ON_MESH = """
import json, sys
import jax
import gin
from gnopt import train as train_lib

gin.add_config_file_search_path(sys.argv[1])
placements = {}
for name, (gin_file, run_dir, params) in json.loads(sys.argv[2]).items():
    gin.clear_config()
    gin.parse_config_files_and_bindings([gin_file], params)
    summary = train_lib.train(run_dir)
    placements[name] = [
        [part + jax.tree_util.keystr(path), x.shape, str(x.sharding.spec), dict(x.sharding.mesh.shape)]
        for part in ("params", "opt_state")
        for path, x in jax.tree_util.tree_flatten_with_path(summary[part])[0]]
print(json.dumps(placements))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_cli.write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def on_mesh(tmp_path_factory, shards):
    """``(placements, run folders)`` of every run of RUNS in one 8-device subprocess."""
    root = tmp_path_factory.mktemp("mesh")
    jobs = {name: (str(tiny_cli.GIN / gin_file), str(root / name),
                   tiny_cli.bindings(shards, *STEPS, f"train.mesh = {mesh}"))
            for name, (gin_file, mesh) in RUNS.items()}
    placements = tiny_cli.run_python(_TRAIN_ON_MESH, str(tiny_cli.GIN), json.dumps(jobs), devices=8)
    return placements, {name: root / name for name in RUNS}


@pytest.fixture(scope="module")
def single(tmp_path_factory, shards):
    """Losses of each gin file of RUNS on one device (this process)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for gin_file in sorted({gin_file for gin_file, _ in RUNS.values()}):
        assert tiny_cli.run_here(tiny_cli.argv(gin_file, root / gin_file, shards, *STEPS)) == 0
        out[gin_file] = tiny_cli.losses(root / gin_file)
    return out


@pytest.mark.parametrize("name", RUNS)
def test_losses_on_the_mesh_equal_one_device(on_mesh, single, name):
    _, runs = on_mesh
    expected = single[RUNS[name][0]]
    assert len(expected) == 3 and expected[-1] < expected[0]
    np.testing.assert_allclose(tiny_cli.losses(runs[name]), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", RUNS)
def test_parameters_and_state_carry_the_asked_shardings(on_mesh, name):
    placements, _ = on_mesh
    data, fsdp = RUNS[name][1]
    sharded = 0
    for path, shape, spec, mesh in placements[name]:
        assert mesh == {"data": data, "fsdp": fsdp}, path
        assert spec == str(dist.leaf_spec(shape, fsdp)), (path, shape, spec)
        sharded += "fsdp" in spec
    assert (sharded > 0) == (fsdp > 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_equal_one_device(tmp_path, shards):
    """Multi-host on one machine: each process reads its half of every batch."""
    in_order = ["train.shuffle = False", *STEPS]  # the same rows in each global batch
    single = tmp_path / "single"
    assert tiny_cli.run_here(tiny_cli.argv("tiny_adamw.gin", single, shards, *in_order)) == 0
    run, port = tmp_path / "multi", _free_port()
    procs = [tiny_cli.start(tiny_cli.argv(
        "tiny_adamw.gin", run, shards, *in_order, "train.mesh = (2, 4)",
        f'gnopt.distributed.initialize.coordinator_address = "localhost:{port}"',
        "gnopt.distributed.initialize.num_processes = 2",
        f"gnopt.distributed.initialize.process_id = {i}"), devices=4) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "step 3: loss" in outputs[0][0] and "step 3" not in outputs[1][0]  # one reporter
    assert "data 2 x fsdp 4 (8 device(s), 2 process(es))" in outputs[0][0]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # written once
    np.testing.assert_allclose(tiny_cli.losses(run), tiny_cli.losses(single), rtol=2e-5,
                               atol=2e-6)
    assert Checkpointer(run / "checkpoints").all_steps() == [3]
    state = run / "checkpoints" / "3" / "state"
    assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0",
                                                               "ocdbt.process_1"}


def test_batch_that_does_not_split_over_the_devices_is_a_config_error(tmp_path, shards):
    proc = tiny_cli.start(tiny_cli.argv("tiny_adamw.gin", tmp_path / "r", shards,
                                        "train.batch_size = 12", *STEPS), devices=8)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [(
        "gnopt.train: config error: train.batch_size=12 must be divisible by the 8 devices of "
        "the mesh {'data': 8, 'fsdp': 1}")]
    assert not (tmp_path / "r").exists()
