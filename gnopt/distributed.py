"""Scale-out on JAX's own sharding: meshes, ``NamedSharding``, multi-host start-up.

A mesh has two axes, ``data`` and ``fsdp`` (either may have size 1):

* the batch is sharded over both axes together (every device holds
  ``B / (data · fsdp)`` sequences), so all devices compute — the usual
  data-parallel + fully-sharded (ZeRO-3) layout;
* parameters and optimizer state are sharded over ``fsdp``: each array of rank
  ≥ 2 is split along its largest dimension that ``fsdp`` divides, everything
  else is replicated. The rule depends on the shape only, so a moment buffer
  gets the same layout as its parameter.

XLA inserts the collectives: gradients and GGN products are all-reduced over
the batch axes, sharded parameters are all-gathered at use. GN's inner
micro-batches are strided slices of the batch (:func:`gnopt.solvers.split_microbatches`),
so every device works on every inner step, and line-search evaluations are
data-parallel likewise.

Multi-host: call :func:`initialize` (``jax.distributed.initialize``) first in
every process; each process then reads its own slice of the data
(``shard_index=jax.process_index()``, ``shard_count=jax.process_count()``) and
:func:`global_batch` assembles the global array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all); ``-1`` fills the rest.

    Raises:
      ValueError: when the shape does not use exactly the available devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data, fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"mesh shape data={data} x fsdp={fsdp} does not match the {n} available devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data`` and ``fsdp`` together."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def leaf_spec(shape: Sequence[int], fsdp_size: int) -> P:
    """``fsdp`` on the largest dimension it divides (rank ≥ 2), else replicated."""
    if len(shape) < 2 or fsdp_size == 1:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            return P(*[("fsdp" if j == i else None) for j in range(len(shape))])
    return P()


def tree_shardings(tree, mesh: Mesh):
    """Per-leaf ``NamedSharding`` for parameters or optimizer state (see module docs)."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), size)), tree)


def shard_tree(tree, mesh: Mesh):
    """Places ``tree`` on ``mesh`` with :func:`tree_shardings`."""
    return jax.device_put(tree, tree_shardings(tree, mesh))


class StepShardings(NamedTuple):
    """Where a training step's inputs and outputs live."""

    params: Any  # per-leaf NamedSharding of the parameters (tree_shardings)
    opt_state: Any  # per-leaf NamedSharding of the optimizer state (tree_shardings)
    batch: NamedSharding  # every batch leaf: rows over all devices (batch_sharding)
    replicated: NamedSharding  # scalars: loss, flags, diagnostics, RNG key


def step_shardings(mesh: Mesh, params, opt_state) -> StepShardings:
    """:class:`StepShardings` of ``params`` and ``opt_state`` (arrays or shape structs) on ``mesh``."""
    return StepShardings(tree_shardings(params, mesh), tree_shardings(opt_state, mesh),
                         batch_sharding(mesh), replicated(mesh))


def global_batch(local_batch, mesh: Mesh):
    """Assembles the global batch from this process's rows (single- or multi-host).

    Every leaf's leading axis is this process's share of the global batch, in
    process order; its size times the process count must divide evenly over the
    mesh's devices.
    """
    sharding = batch_sharding(mesh)
    devices = math.prod(mesh.devices.shape)

    def put(x):
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % devices:
            raise ValueError(
                f"global batch of {global_rows} rows does not split over {devices} devices "
                f"(mesh {dict(mesh.shape)})")
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, local_batch)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process (all processes must call it; no-op for one)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Multi-host start-up: ``jax.distributed.initialize`` (no-op for one process).

    On managed clusters (SLURM, Open MPI, Cloud TPU, Kubernetes) all arguments
    may be left out and JAX discovers them; elsewhere pass the coordinator's
    ``host:port`` (process 0's machine; or set ``JAX_COORDINATOR_ADDRESS``) and
    the process count, the same in every process, and this process's id
    (``0 … num_processes − 1``). See ``docs/multihost.md``.
    """
    if num_processes == 1:
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
