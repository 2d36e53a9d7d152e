"""Atomic, rotating checkpoints of a training state (orbax).

A checkpoint holds the array leaves of one pytree (parameters, optimizer state,
RNG key: anything, equinox modules included) and one JSON dict (step,
data-iterator state, counters). orbax writes each step into a temporary
directory and renames it into place only once every file is written, so a
process killed during a save leaves at most a temporary directory, which
:meth:`Checkpointer.latest_step` never reports and the next run deletes.

Only the arrays are stored; the tree structure and the non-array leaves
(activation functions, static config) come from a *template* state built the
same way as the saved one, i.e. from the same gin config.
"""

from __future__ import annotations

import os
from typing import Any

import equinox as eqx
import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the template state."""


class Checkpointer:
    """Saves and restores ``(state pytree, JSON meta)`` pairs under ``directory``.

    Args:
      directory: folder holding one sub-folder per saved step.
      keep: how many of the newest checkpoints to keep (older ones are deleted).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        """The newest fully written step, or ``None`` if there is none."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every fully written step, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes ``state``'s arrays and ``meta`` as checkpoint ``step`` (blocking)."""
        arrays = [x for x in jax.tree.leaves(state) if eqx.is_array(x)]
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Loads checkpoint ``step`` (default: the newest) into ``template``'s structure.

        Returns:
          ``(state, meta)``: ``template`` with its arrays replaced by the stored
          ones, and the stored JSON dict.

        Raises:
          FileNotFoundError: there is no such checkpoint.
          CheckpointMismatchError: the stored arrays do not fit the template.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
        arrays, static = eqx.partition(template, eqx.is_array)
        leaves, treedef = jax.tree.flatten(arrays)
        stored = list(self._manager.item_metadata(step)["state"])
        where = f"checkpoint {self.directory}/{step}"
        if len(stored) != len(leaves):
            raise CheckpointMismatchError(
                f"{where} has {len(stored)} arrays, the configured model/optimizer state has "
                f"{len(leaves)}: it does not fit (was it written with another config?)")
        for path, want, got in zip(_paths(arrays), leaves, stored):
            if want.shape != tuple(got.shape) or want.dtype != got.dtype:
                raise CheckpointMismatchError(
                    f"{where} does not fit: {path} is stored as {got.dtype}{list(got.shape)}, "
                    f"the configured state has {want.dtype}{list(want.shape)}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(leaves), meta=ocp.args.JsonRestore()),
        )
        state = eqx.combine(jax.tree.unflatten(treedef, restored.state), static)
        return state, dict(restored.meta)

    def close(self) -> None:
        """Releases orbax's resources."""
        self._manager.close()


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
