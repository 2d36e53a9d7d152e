"""Sharded training on 8 simulated CPU devices equals one device (subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gnopt import distributed as dist


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("distributed_check.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("optimizer", ["adamw", "gn_full", "gn_layerwise"])
@pytest.mark.parametrize("mesh", ["2x4", "8x1"])
def test_sharded_losses_equal_single_device(results, optimizer, mesh):
    single = results[f"{optimizer}/1"]["losses"]
    sharded = results[f"{optimizer}/{mesh}"]
    np.testing.assert_allclose(sharded["losses"], single, rtol=2e-5, atol=2e-6)
    assert single[-1] < single[0]
    assert sharded["shardings_ok"]


def test_leaf_spec_and_mesh_errors():
    assert dist.leaf_spec((6, 8), 4) == jax.sharding.PartitionSpec(None, "fsdp")
    assert dist.leaf_spec((8, 6), 4) == jax.sharding.PartitionSpec("fsdp", None)
    assert dist.leaf_spec((8,), 4) == jax.sharding.PartitionSpec()
    assert dist.leaf_spec((3, 5), 4) == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="does not match"):
        dist.make_mesh(3, 1)
