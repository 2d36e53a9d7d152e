"""Token shards in the llm.c / nanoGPT ``.bin`` format (read and written).

A shard is a header of 256 little-endian int32 followed by the tokens:

=========  =============================================  ==================
header[0]  magic                                          header[1] version
=========  =============================================  ==================
20240520   GPT-2 style: tokens are little-endian uint16    1
20240801   LLaMA-3 style: tokens are little-endian uint32  7
=========  =============================================  ==================

``header[2]`` is the number of tokens; the rest of the header is zero. These
are the two layouts llm.c's ``dev/data`` scripts write (its FineWeb and
TinyShakespeare shards) and its trainers read, so shards move between gnopt,
llm.c and nanoGPT-style loaders (nanoGPT's own ``train.bin`` is the bare uint16
stream without this header: wrap it with :func:`write_shard`). Documents are
packed one after another, each *preceded* by the end-of-text token, as llm.c
does. :func:`write_shard` writes to a temporary name and renames, so a shard
on disk is always whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HEADER_INTS = 256
"""int32 values in a shard header."""
HEADER_BYTES = 4 * HEADER_INTS
UINT16_MAGIC, UINT16_VERSION = 20240520, 1
"""Header of shards with uint16 tokens (vocabularies up to 65,536: GPT-2, the paper's 32,000)."""
UINT32_MAGIC, UINT32_VERSION = 20240801, 7
"""Header of shards with uint32 tokens (larger vocabularies, e.g. LLaMA 3's)."""
_LAYOUTS = {UINT16_MAGIC: (UINT16_VERSION, np.dtype("<u2")),
            UINT32_MAGIC: (UINT32_VERSION, np.dtype("<u4"))}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest shard token type for ids ``0 .. vocab_size - 1``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def write_shard(path: str | os.PathLike, tokens, dtype: np.dtype | str | None = None) -> Path:
    """Writes ``tokens`` as an llm.c shard at ``path`` (atomically: a temporary file, then
    a rename).

    Args:
      path: the shard file (``.bin``).
      tokens: a 1-D array of non-negative integer ids.
      dtype: ``uint16`` or ``uint32``; ``None``: uint16 if every id fits, else uint32.

    Raises:
      ValueError: ids that do not fit, negative ids, more than 2**31 - 1 tokens.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
        raise ValueError(f"{path}: tokens must be a 1-D integer array, got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    if len(tokens) >= 1 << 31:
        raise ValueError(f"{path}: {len(tokens)} tokens; a shard holds at most 2**31 - 1")
    top = int(tokens.max()) if tokens.size else 0
    if tokens.size and int(tokens.min()) < 0:
        raise ValueError(f"{path}: negative token id {int(tokens.min())}")
    dtype = token_dtype(top + 1) if dtype is None else np.dtype(dtype).newbyteorder("<")
    magic = {np.dtype("<u2"): UINT16_MAGIC, np.dtype("<u4"): UINT32_MAGIC}.get(dtype)
    if magic is None:
        raise ValueError(f"{path}: shard tokens are uint16 or uint32, not {dtype}")
    if top > np.iinfo(dtype).max:
        raise ValueError(f"{path}: token id {top} does not fit in {dtype.name}")
    header = np.zeros(HEADER_INTS, "<i4")
    header[:3] = magic, _LAYOUTS[magic][0], len(tokens)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype, copy=False).tobytes())
    os.replace(temporary, path)
    return path


def read_header(path: str | os.PathLike) -> tuple[int, np.dtype]:
    """``(token count, token dtype)`` of a shard, after checking its header and size.

    Raises:
      ValueError: truncated file, unknown magic or version, size not matching the count.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: truncated token shard ({size} bytes, header alone is "
                         f"{HEADER_BYTES})")
    magic, version, count = (int(x) for x in np.fromfile(path, dtype="<i4", count=3))
    if magic not in _LAYOUTS:
        raise ValueError(f"{path}: bad magic {magic} in token shard header, expected "
                         f"{UINT16_MAGIC} (uint16 tokens) or {UINT32_MAGIC} (uint32)")
    expected_version, dtype = _LAYOUTS[magic]
    if version != expected_version:
        raise ValueError(f"{path}: unsupported token shard version {version}, expected "
                         f"{expected_version}")
    if size != HEADER_BYTES + dtype.itemsize * count:
        raise ValueError(f"{path}: truncated or corrupt token shard: header says {count} "
                         f"tokens ({HEADER_BYTES + dtype.itemsize * count} bytes), file has "
                         f"{size} bytes")
    return count, dtype


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a shard, memory-mapped (read-only; see :func:`read_header`)."""
    count, dtype = read_header(path)
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
