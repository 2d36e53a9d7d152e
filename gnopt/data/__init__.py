"""Data: token sources and grain pipelines of ``(inputs, targets)`` batches.

Example::

    train = gnopt.data.make_pipeline(gnopt.data.stdlib_corpus("train"),
                                     seq_len=128, batch_size=64, seed=0)
    inputs, targets = next(train)       # [64, 128] int32 each
    state = train.get_state()           # JSON-serialisable; train.set_state(state) resumes
"""

from gnopt.data.bin_format import read_shard, write_shard
from gnopt.data.pipeline import make_pipeline, validation_batches
from gnopt.data.sources import (BOS_BYTE, SHARD_MAGIC, VALIDATION_EVERY, ShardedTokens,
                                max_token_ids, stdlib_corpus, text_files, token_shards)

__all__ = [
    "BOS_BYTE", "SHARD_MAGIC", "VALIDATION_EVERY", "ShardedTokens", "make_pipeline", "max_token_ids",
    "read_shard", "stdlib_corpus", "text_files", "token_shards", "validation_batches", "write_shard",
]
