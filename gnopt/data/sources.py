"""Token sources: 1-D integer token streams read from text or token shards.

Byte-level sources (vocabulary 256) concatenate documents (files), each preceded
by :data:`BOS_BYTE`, the same "separator first" packing llm.c uses for FineWeb
(its shards begin every document with the EOT token). Train/validation splits
are by file: a file goes to validation when the CRC-32 of its path relative to
the folder given (its name, for a file given directly) is divisible by
:data:`VALIDATION_EVERY`, a rule stable across machines and runs.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

BOS_BYTE = 0
"""Byte put before every document by the byte-level sources (NUL: absent from text)."""
VALIDATION_EVERY = 20
"""About one file in this many goes to the validation split."""
SHARD_MAGIC = 20240520
"""Magic number of llm.c token shards (``.bin``)."""
SHARD_HEADER_INTS = 256
_SPLITS = ("train", "validation", "all")
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})

PathLike = str | os.PathLike


def _as_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]


def _in_split(relative: str, split: str) -> bool:
    if split == "all":
        return True
    is_validation = zlib.crc32(relative.encode()) % VALIDATION_EVERY == 0
    return is_validation == (split == "validation")


def _walk(root: Path, suffixes: tuple[str, ...] | None) -> Iterable[tuple[str, Path]]:
    """``(relative posix path, path)`` of the files under ``root``, skipping hidden
    entries and :data:`_SKIPPED_DIRS`."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in _SKIPPED_DIRS]
        for name in names:
            if not name.startswith(".") and (suffixes is None or Path(name).suffix in suffixes):
                path = Path(folder, name)
                yield path.relative_to(root).as_posix(), path


def _text_files(roots: Iterable[Path], suffixes: tuple[str, ...] | None,
                split: str) -> list[Path]:
    """Files under ``roots`` (sorted per root) whose relative path is in ``split``."""
    if split not in _SPLITS:
        raise ValueError(f"split={split!r}; expected one of {_SPLITS}")
    chosen = []
    for root in roots:
        if root.is_file():
            candidates = {root.name: root}
        elif root.is_dir():
            candidates = dict(_walk(root, suffixes))
        else:
            raise FileNotFoundError(f"text source {root} does not exist")
        chosen += [candidates[rel] for rel in sorted(candidates) if _in_split(rel, split)]
    return chosen


def _byte_tokens(files: Sequence[Path], max_bytes: int | None, what: str) -> np.ndarray:
    """``[BOS, bytes of file 0, BOS, bytes of file 1, …]`` as uint8, at most ``max_bytes``."""
    chunks, total = [], 0
    for path in files:
        if max_bytes is not None and total >= max_bytes:
            break
        chunk = bytes([BOS_BYTE]) + path.read_bytes()
        chunks.append(chunk)
        total += len(chunk)
    tokens = np.frombuffer(b"".join(chunks), np.uint8)[:max_bytes]
    if tokens.size == 0:
        raise ValueError(f"{what}: empty corpus (no files with content in this split)")
    return tokens


def text_files(paths: PathLike | Sequence[PathLike], split: str = "train", *,
               suffixes: Sequence[str] | None = None,
               max_bytes: int | None = None) -> np.ndarray:
    """Byte-level tokens (uint8, vocabulary 256) of text files.

    Args:
      paths: files and/or folders (searched recursively, hidden entries and
        ``__pycache__``/``site-packages`` skipped), read in sorted order.
      split: ``"train"``, ``"validation"`` or ``"all"`` (split by file, see the
        module docstring).
      suffixes: keep only files with these suffixes (e.g. ``(".txt",)``).
      max_bytes: stop reading once this many tokens are collected.

    Raises:
      FileNotFoundError: a path does not exist.
      ValueError: nothing to read in this split.
    """
    roots = _as_paths(paths)
    files = _text_files(roots, None if suffixes is None else tuple(suffixes), split)
    return _byte_tokens(files, max_bytes, f"text_files({[str(r) for r in roots]}, split={split!r})")


def stdlib_corpus(split: str = "train", max_bytes: int | None = None) -> np.ndarray:
    """Byte-level tokens of the running interpreter's standard-library ``.py`` files.

    A corpus every machine has (about 30 MB on CPython 3.11), found through
    ``sysconfig.get_paths()["stdlib"]``; see :func:`text_files` for the rest.
    """
    return text_files(sysconfig.get_paths()["stdlib"], split, suffixes=(".py",),
                      max_bytes=max_bytes)


def _read_bin_shard(path: Path) -> np.ndarray:
    """Memory-maps an llm.c shard: 256 int32 header (magic, version 1, count), uint16 tokens."""
    size = path.stat().st_size
    header_bytes = SHARD_HEADER_INTS * 4
    if size < header_bytes:
        raise ValueError(f"{path}: truncated token shard ({size} bytes, header alone is "
                         f"{header_bytes})")
    magic, version, count = np.fromfile(path, dtype="<i4", count=3)
    if magic != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {magic} in token shard header, expected {SHARD_MAGIC}")
    if version != 1:
        raise ValueError(f"{path}: unsupported token shard version {version}, expected 1")
    if size != header_bytes + 2 * count:
        raise ValueError(f"{path}: truncated or corrupt token shard: header says {count} "
                         f"tokens ({header_bytes + 2 * count} bytes), file has {size} bytes")
    return np.memmap(path, dtype="<u2", mode="r", offset=header_bytes, shape=(int(count),))


def _read_npy_shard(path: Path) -> np.ndarray:
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: token shard must be a 1-D integer array, got shape "
                         f"{tokens.shape} dtype {tokens.dtype}")
    return tokens


_SHARD_READERS = {".bin": _read_bin_shard, ".npy": _read_npy_shard}


def _shard_paths(paths: Sequence[Path]) -> list[Path]:
    found = []
    for path in paths:
        if glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path)))
            if not matches:
                raise FileNotFoundError(f"no token shards match {path}")
            found += matches
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix in _SHARD_READERS)
            if not matches:
                raise ValueError(f"{path}: folder has no {'/'.join(_SHARD_READERS)} token shards")
            found += matches
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"token shard {path} does not exist")
    return found


class ShardedTokens:
    """Several 1-D token arrays read as one stream, without copying them.

    Supports what the pipeline needs: ``len``, ``dtype``, ``ndim`` and indexing
    by an integer array or a slice (memory-mapped shards stay on disk).
    """

    def __init__(self, shards: Sequence[np.ndarray]):
        self.shards = tuple(shards)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.dtype = np.result_type(*(s.dtype for s in self.shards))
        self.ndim = 1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty(index.shape, self.dtype)
        for s in np.unique(shard):
            chosen = shard == s
            out[chosen] = self.shards[s][index[chosen] - self.offsets[s]]
        return out


def token_shards(paths: PathLike | Sequence[PathLike]) -> np.ndarray | ShardedTokens:
    """Tokens of pre-tokenised shards: ``.npy`` (1-D integer arrays) and llm.c ``.bin``.

    ``.bin`` is the llm.c / FineWeb format: a header of 256 little-endian int32
    (magic 20240520, version 1, token count, rest unused) then ``count`` uint16
    tokens. Shards are memory-mapped.

    Args:
      paths: shard files, folders (their ``.bin``/``.npy`` files, sorted) or glob
        patterns (e.g. ``"fineweb10B/fineweb_train_*.bin"``).

    Returns:
      The one shard's array, or a :class:`ShardedTokens` joining several.

    Raises:
      FileNotFoundError: a path does not exist or a pattern matches nothing.
      ValueError: unknown suffix, bad header, truncated shard, or no tokens.
    """
    files = _shard_paths(_as_paths(paths))
    shards = []
    for path in files:
        if path.suffix not in _SHARD_READERS:
            raise ValueError(f"{path}: unknown token shard type; expected one of "
                             f"{sorted(_SHARD_READERS)}")
        shards.append(_SHARD_READERS[path.suffix](path))
    if sum(len(s) for s in shards) == 0:
        raise ValueError(f"token shards {[str(p) for p in files]}: no tokens")
    return shards[0] if len(shards) == 1 else ShardedTokens(shards)
