"""Atomic, verified, rotating checkpoints of a training state (orbax).

A checkpoint holds the array leaves of a dict of pytrees (parameters, optimizer
state, RNG key: anything, equinox modules included), stored per top-level key
so that one key can be read alone (``restore(..., partial=True)``: the
parameters of another run), and one JSON dict (step, data-iterator state,
counters).

* **Atomic.** orbax writes each step into a temporary directory and renames it
  into place only once every file is written, so a process killed during a save
  leaves at most a temporary directory, which :meth:`Checkpointer.latest_step`
  never reports and the next run deletes.
* **Verified.** After the save, process 0 writes :data:`CHECKSUM_FILE` into the
  step's folder: size and CRC-32 of every file. A restore checks them first; a
  step whose files are missing, truncated or altered (or which has no checksum
  file: killed between orbax's rename and the checksums) is *corrupt*: it is
  moved to ``<directory>-corrupt/<step>`` with a warning naming it, and the
  previous step is used.
* **Multi-host.** Every process calls :meth:`Checkpointer.save` (orbax writes
  each array shard once, from the process that holds it, and the JSON from
  process 0); a restore reads the shards each process needs, into the
  template's shardings, which may differ from the saved ones (another mesh or
  device count). The checkpoint folder must be on a file system all processes
  share.

Only the arrays are stored; the tree structure and the non-array leaves
(activation functions, static config) come from a *template* state built the
same way as the saved one, i.e. from the same gin config.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from typing import Any

import equinox as eqx
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CHECKSUM_FILE = "gnopt_checksums.json"
"""Per-step file of ``{relative path: [bytes, crc32]}`` of every file of the step."""


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the template state."""


class CheckpointCorruptError(RuntimeError):
    """Checkpoints exist but none of them is intact."""


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_checksums(folder: str) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of the files under ``folder`` (the checksum file aside)."""
    sums = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, folder)
            if not relative.startswith(CHECKSUM_FILE):
                sums[relative] = [os.path.getsize(path), _crc32(path)]
    return sums


def _sync(name: str) -> None:
    """Waits for every process (multi-host); nothing with one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Saves and restores ``(state dict, JSON meta)`` pairs under ``directory``.

    Args:
      directory: folder holding one sub-folder per saved step.
      keep: how many of the newest checkpoints to keep (older ones are deleted).
      create: create ``directory`` if missing, delete orbax's leftover temporary
        folders in it and move corrupt steps aside; ``False`` to read another
        run's checkpoints without changing anything (corrupt steps are skipped).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, create: bool = True):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        self._writable = create
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=create,
                create=create,
            ),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        """The newest fully written step (not yet verified), or ``None`` if there is none."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every fully written step, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict[str, Any], meta: dict) -> None:
        """Writes ``state``'s arrays and ``meta`` as checkpoint ``step`` (blocking).

        Every process must call it (multi-host). A step saved already is left as is.
        """
        if step in self.all_steps():
            return
        arrays = {key: [x for x in jax.tree.leaves(tree) if eqx.is_array(x)]
                  for key, tree in state.items()}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            folder = self._step_dir(step)
            sums = _file_checksums(folder)
            temporary = os.path.join(folder, CHECKSUM_FILE + ".tmp")
            with open(temporary, "w") as f:
                json.dump(sums, f)
            os.replace(temporary, os.path.join(folder, CHECKSUM_FILE))
        _sync(f"gnopt_checkpoint_saved_{step}")

    def verify(self, step: int) -> str | None:
        """``None`` if step ``step``'s files match their checksums, else what is wrong."""
        folder = self._step_dir(step)
        try:
            with open(os.path.join(folder, CHECKSUM_FILE)) as f:
                expected = json.load(f)
        except FileNotFoundError:
            return f"no {CHECKSUM_FILE} (the save did not finish)"
        except ValueError:
            return f"{CHECKSUM_FILE} is not valid JSON"
        for relative, (size, crc) in sorted(expected.items()):
            path = os.path.join(folder, relative)
            if not os.path.isfile(path):
                return f"{relative} is missing"
            if os.path.getsize(path) != size:
                return f"{relative} has {os.path.getsize(path)} bytes, {size} were written"
            if _crc32(path) != crc:
                return f"{relative} does not match its checksum"
        return None

    def restore(self, template: dict[str, Any], step: int | None = None, *,
                partial: bool = False) -> tuple[dict[str, Any], dict]:
        """Loads checkpoint ``step`` (default: the newest intact one) into ``template``.

        Args:
          template: a state dict like the saved one; its arrays' shardings are
            those of the restored arrays.
          step: the step to load; ``None``: the newest step that verifies, after
            moving newer corrupt ones aside (``create=False``: skipping them)
            with a warning naming each.
          partial: ``template`` holds only some of the saved keys (e.g.
            ``{"params": ...}``); the others are not read.

        Returns:
          ``(state, meta)``: ``template`` with its arrays replaced by the stored
          ones, and the stored JSON dict.

        Raises:
          FileNotFoundError: there is no such checkpoint.
          CheckpointCorruptError: ``step`` (or, for ``step=None``, every step) is corrupt.
          CheckpointMismatchError: the stored arrays do not fit the template.
        """
        steps = self.all_steps()
        _sync("gnopt_checkpoint_listed")  # every process has the list before one moves a step
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
            problem = self.verify(step)
            if problem:
                raise CheckpointCorruptError(f"checkpoint {self._step_dir(step)} is corrupt: {problem}")
            return self._read(template, step, partial)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for candidate in reversed(steps):
            problem = self.verify(candidate)
            if problem is None:
                try:
                    return self._read(template, candidate, partial)
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # noqa: BLE001 -- whatever orbax raises on bad files
                    problem = f"unreadable: {type(e).__name__}: {str(e).splitlines()[0]}"
            action = f"moved it to {self._quarantine(candidate)}" if self._writable else "skipped it"
            warnings.warn(f"checkpoint step {candidate} in {self.directory} is corrupt ({problem}); "
                          f"{action}, trying the previous step", stacklevel=2)
        raise CheckpointCorruptError(f"no intact checkpoint in {self.directory}: every step "
                                     "was corrupt")

    def close(self) -> None:
        """Releases orbax's resources."""
        self._manager.close()

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _quarantine(self, step: int) -> str:
        """Moves step ``step`` to ``<directory>-corrupt/<step>[-n]`` (process 0); returns where."""
        target = base = os.path.join(f"{self.directory}-corrupt", str(step))
        n = 0
        while os.path.exists(target):
            n += 1
            target = f"{base}-{n}"
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(self._step_dir(step), target)
        _sync(f"gnopt_checkpoint_quarantine_{step}")
        self._manager.reload()
        return target

    def _read(self, template: dict[str, Any], step: int, partial: bool) -> tuple[dict, dict]:
        """Checks the stored arrays against ``template`` and reads them into it."""
        where = f"checkpoint {self._step_dir(step)}"
        stored = self._manager.item_metadata(step)["state"]
        parts = {key: eqx.partition(tree, eqx.is_array) for key, tree in template.items()}
        leaves = {key: jax.tree.leaves(arrays) for key, (arrays, _) in parts.items()}
        missing = sorted(set(leaves) - set(stored))
        if missing or (not partial and set(stored) != set(leaves)):
            raise CheckpointMismatchError(
                f"{where} stores {sorted(stored)}, the configured state has {sorted(leaves)}")
        num_stored, num_wanted = (sum(len(tree[key]) for key in leaves) for tree in (stored, leaves))
        if num_stored != num_wanted:
            raise CheckpointMismatchError(
                f"{where} has {num_stored} arrays, the configured model/optimizer state has "
                f"{num_wanted}: it does not fit (was it written with another config?)")
        for key, (arrays, _) in sorted(parts.items()):
            for path, want, got in zip(_paths(arrays), leaves[key], stored[key]):
                if want.shape != tuple(got.shape) or want.dtype != got.dtype:
                    raise CheckpointMismatchError(
                        f"{where} does not fit: [{key!r}]{path} is stored as "
                        f"{got.dtype}{list(got.shape)}, the configured state has "
                        f"{want.dtype}{list(want.shape)}")
        items = {"state": ocp.args.PyTreeRestore(
            item=leaves, restore_args=ocp.checkpoint_utils.construct_restore_args(leaves),
            partial_restore=partial), "meta": ocp.args.JsonRestore()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = {key: eqx.combine(jax.tree.unflatten(jax.tree.structure(arrays),
                                                     restored.state[key]), static)
                 for key, (arrays, static) in parts.items()}
        return state, dict(restored.meta)


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
