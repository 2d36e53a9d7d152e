"""Grain pipelines that turn a token stream into ``(inputs, targets)`` batches.

The stream is cut into windows of ``seq_len + 1`` tokens with stride ``seq_len``
(window ``i`` is ``tokens[i·T : i·T + T + 1]``; consecutive windows share one
token, so every token but the first is a target exactly once per epoch).
Documents are already packed by the sources (separator first, see
:mod:`gnopt.data.sources`); windows ignore document boundaries, like GPT-2 /
llm.c training. A batch is ``inputs = window[:, :-1]``,
``targets = window[:, 1:]``, both ``[B, T]`` int32.
"""

from __future__ import annotations

import grain
import numpy as np

from gnopt.data.sources import ShardedTokens

Batch = tuple[np.ndarray, np.ndarray]


def _as_stream(tokens) -> np.ndarray | ShardedTokens:
    stream = tokens if isinstance(tokens, ShardedTokens) else np.asarray(tokens)
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got ndim {stream.ndim} "
                         f"dtype {stream.dtype}")
    return stream


def _num_windows(stream, seq_len: int, needed: int, what: str) -> int:
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    count = max(len(stream) - 1, 0) // seq_len
    if count < needed:
        raise ValueError(f"{len(stream)} tokens make {count} windows of seq_len+1={seq_len + 1}, "
                         f"fewer than the {needed} needed for {what}")
    return count


class _Windows:
    """Grain map: window indices ``[B]`` → ``(inputs, targets)`` ``[B, T]`` int32."""

    def __init__(self, stream, seq_len: int):
        self.stream = stream
        self.offsets = np.arange(seq_len + 1)
        self.seq_len = seq_len

    def __call__(self, indices: np.ndarray) -> Batch:
        windows = np.asarray(self.stream[indices[:, None] * self.seq_len + self.offsets], np.int32)
        return windows[:, :-1], windows[:, 1:]


def make_pipeline(tokens, *, seq_len: int, batch_size: int, seed: int = 0,
                  shuffle: bool = True, num_epochs: int | None = None,
                  shard_index: int = 0, shard_count: int = 1,
                  prefetch: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator of training batches ``(inputs, targets)``.

    Windows (see the module docstring) are split between ``shard_count``
    processes (window ``i`` goes to shard ``i mod shard_count``; every shard gets
    the same number), shuffled per epoch with ``seed`` (a new permutation each
    epoch), and batched; the last partial batch of a finite run is dropped.
    Batches may straddle an epoch boundary.

    Args:
      tokens: 1-D integer array, memmap or :class:`ShardedTokens`.
      seq_len: ``T``, tokens per input row.
      batch_size: ``B``, rows per batch (per process).
      seed: shuffle seed.
      shuffle: shuffle windows; ``False`` reads them in order.
      num_epochs: passes over the windows; ``None`` repeats forever.
      shard_index, shard_count: this process's slice of the windows
        (``jax.process_index()``, ``jax.process_count()`` for multi-host).
      prefetch: batches prepared ahead by one background thread (0: none). No
        worker processes are started.

    Returns:
      A grain iterator; ``it.get_state()`` is a JSON-serialisable dict and
      ``it.set_state(state)`` resumes exactly where ``state`` was taken.
    """
    stream = _as_stream(tokens)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    per_shard = _num_windows(stream, seq_len, batch_size * shard_count,
                             f"batch_size={batch_size} on each of {shard_count} shard(s)"
                             ) // shard_count
    dataset = grain.MapDataset.range(shard_index, per_shard * shard_count, shard_count)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = (dataset.repeat(num_epochs)
               .batch(batch_size, drop_remainder=True)
               .map(_Windows(stream, seq_len)))
    options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


def validation_batches(tokens, *, seq_len: int, batch_size: int,
                       num_batches: int) -> list[Batch]:
    """A fixed list of ``num_batches`` batches for evaluation.

    The ``num_batches · batch_size`` windows are spread evenly over the stream
    (window ``⌊j · n / k⌋`` for ``j < k``), so a small evaluation still samples
    the whole validation set; the result is the same on every call.
    """
    stream = _as_stream(tokens)
    needed = num_batches * batch_size
    if not isinstance(num_batches, int) or num_batches <= 0:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    count = _num_windows(stream, seq_len, needed,
                         f"{num_batches} validation batches of {batch_size}")
    indices = (np.arange(needed) * count // needed).reshape(num_batches, batch_size)
    windows = _Windows(stream, seq_len)
    return [windows(rows) for rows in indices]
