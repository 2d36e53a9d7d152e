"""Partitions of a parameter pytree into blocks for layerwise (block-diagonal) GN.

A *block labelling* assigns every leaf of the parameter pytree a hashable
label; leaves with the same label form one diagonal block of the GGN.
The default follows Abreu et al. (2025, §5.3): the embedding, each transformer
block and the head are blocks. Concretely: a leaf's block is the first entry of
its path, refined by the element index when that entry holds a sequence
(``layers[3]``). For an MLP with a ``layers`` tuple that is one block per layer.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

BlockFn = Callable[[Any], Any]


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def default_block_labels(params) -> Any:
    """Labels each leaf by its top-level field, and element index for sequences.

    Returns a pytree with the structure of ``params`` whose leaves are strings
    such as ``"embed"``, ``"layers.0"``, ``"head"``.
    """
    def label(path, _):
        if not path:
            return "params"
        first = _key_name(path[0])
        if len(path) > 1 and isinstance(path[1], jtu.SequenceKey):
            return f"{first}.{path[1].idx}"
        return first

    return jtu.tree_map_with_path(label, params)


def leaf_block_ids(params, blocks: BlockFn | Any | None) -> tuple[list[int], list[Hashable]]:
    """Flattens a labelling into one integer block id per leaf of ``params``.

    Args:
      params: the parameter pytree.
      blocks: ``None`` (a single block: the full GGN), a callable
        ``params -> labels pytree``, or a labels pytree with the structure of
        ``params``.

    Returns:
      ``(ids, names)``: ``ids[i]`` is the block index of leaf ``i`` (in
      ``jax.tree.leaves`` order) and ``names[k]`` the label of block ``k``, in
      order of first appearance.
    """
    leaves, treedef = jax.tree.flatten(params)
    if blocks is None:
        return [0] * len(leaves), ["all"]
    labels = blocks(params) if callable(blocks) else blocks
    label_leaves, label_def = jax.tree.flatten(labels)
    if label_def != treedef:
        raise ValueError(
            "block labels must have the structure of the parameters: got "
            f"{label_def} for parameters {treedef}")
    names: list[Hashable] = []
    ids = []
    for lab in label_leaves:
        if lab not in names:
            names.append(lab)
        ids.append(names.index(lab))
    return ids, names


def restrict(tree, ids: Sequence[int], block: int):
    """Zeros every leaf of ``tree`` outside ``block``."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
        [x if i == block else jnp.zeros_like(x) for x, i in zip(leaves, ids)])


def select(trees: Sequence[Any], ids: Sequence[int]):
    """Leaf ``i`` taken from ``trees[ids[i]]``: merges per-block results."""
    flat = [jax.tree.flatten(t) for t in trees]
    treedef = flat[0][1]
    return treedef.unflatten([flat[b][0][i] for i, b in enumerate(ids)])


def block_vdot(a, b, ids: Sequence[int], num_blocks: int):
    """Per-block inner products ``[⟨a_k, b_k⟩ for k in blocks]`` as an array."""
    out = [jnp.zeros(()) for _ in range(num_blocks)]
    for x, y, i in zip(jax.tree.leaves(a), jax.tree.leaves(b), ids):
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        out[i] = out[i] + jnp.vdot(x.astype(dtype), y.astype(dtype)).real
    return jnp.stack(out)


def block_scale(scales, tree, ids: Sequence[int]):
    """Multiplies each leaf by ``scales[block of the leaf]``."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
        [(scales[i] * x).astype(x.dtype) for x, i in zip(leaves, ids)])
