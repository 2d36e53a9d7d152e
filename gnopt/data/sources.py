"""Token sources: 1-D integer token streams read from text or token shards.

Byte-level sources (vocabulary 256) concatenate documents (files), each preceded
by :data:`BOS_BYTE`, the same "separator first" packing llm.c uses for FineWeb
(its shards begin every document with the EOT token). Train/validation splits
are by file: a file goes to validation when the CRC-32 of its path relative to
the folder given (its name, for a file given directly) is divisible by
:data:`VALIDATION_EVERY`, a rule stable across machines and runs. When that
leaves one split without files (a single text file, or a few), the split is
by position instead: validation is the last ``1/VALIDATION_EVERY`` of the
byte stream (the *held-out tail*) and train is the rest.

:func:`max_token_ids` reads every token of a stream once (memory-mapped shards
in chunks), to check ids against a model's vocabulary before training; results
for shard files are cached by path, size and modification time.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gnopt.data import bin_format

BOS_BYTE = 0
"""Byte put before every document by the byte-level sources (NUL: absent from text)."""
VALIDATION_EVERY = 20
"""About one file in this many goes to the validation split."""
SHARD_MAGIC = bin_format.UINT16_MAGIC
"""Magic number of llm.c token shards with uint16 tokens (``.bin``)."""
SHARD_HEADER_INTS = bin_format.HEADER_INTS
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


def _text_files(roots: Iterable[Path], suffixes: tuple[str, ...] | None) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the files under ``roots`` (sorted per root)."""
    chosen = []
    for root in roots:
        if root.is_file():
            candidates = {root.name: root}
        elif root.is_dir():
            candidates = dict(_walk(root, suffixes))
        else:
            raise FileNotFoundError(f"text source {root} does not exist")
        chosen += [(rel, candidates[rel]) for rel in sorted(candidates)]
    return chosen


def _byte_range(files: Sequence[Path], start: int, stop: int | None) -> bytes:
    """Bytes ``[start, stop)`` of ``[BOS, bytes of file 0, BOS, bytes of file 1, …]``."""
    chunks, position = [], 0
    for path in files:
        if stop is not None and position >= stop:
            break
        size = 1 + path.stat().st_size
        lo, hi = max(start - position, 0), size if stop is None else min(size, stop - position)
        if lo < hi:
            if lo == 0:
                chunks.append(bytes([BOS_BYTE]))
                lo = 1
            with open(path, "rb") as f:
                f.seek(lo - 1)
                chunks.append(f.read(hi - lo))
        position += size
    return b"".join(chunks)


def _stream_size(files: Sequence[Path]) -> int:
    return sum(1 + path.stat().st_size for path in files)


def text_files(paths: PathLike | Sequence[PathLike], split: str = "train", *,
               suffixes: Sequence[str] | None = None,
               max_bytes: int | None = None) -> np.ndarray:
    """Byte-level tokens (uint8, vocabulary 256) of text files.

    Args:
      paths: files and/or folders (searched recursively, hidden entries and
        ``__pycache__``/``site-packages`` skipped), read in sorted order.
      split: ``"train"``, ``"validation"`` or ``"all"``: split by file, or,
        when that leaves a split empty (e.g. one file), by position: the last
        ``1/VALIDATION_EVERY`` of the bytes is validation (see the module
        docstring).
      suffixes: keep only files with these suffixes (e.g. ``(".txt",)``).
      max_bytes: stop reading once this many tokens are collected.

    Raises:
      FileNotFoundError: a path does not exist.
      ValueError: nothing to read in this split.
    """
    if split not in _SPLITS:
        raise ValueError(f"split={split!r}; expected one of {_SPLITS}")
    roots = _as_paths(paths)
    what = f"text_files({[str(r) for r in roots]}, split={split!r})"
    found = _text_files(roots, None if suffixes is None else tuple(suffixes))
    files = [path for _, path in found]
    if split == "all":
        start, stop = 0, None
    else:
        chosen = [path for rel, path in found if _in_split(rel, split)]
        if chosen and len(chosen) < len(files):  # both splits have files
            files, start, stop = chosen, 0, None
        else:  # the held-out tail
            total = _stream_size(files)
            cut = total - total // VALIDATION_EVERY
            start, stop = (0, cut) if split == "train" else (cut, None)
    if max_bytes is not None:
        stop = start + max_bytes if stop is None else min(stop, start + max_bytes)
    tokens = np.frombuffer(_byte_range(files, start, stop), np.uint8)
    if tokens.size == 0:
        raise ValueError(f"{what}: empty corpus (no files with content in this split)")
    return tokens


def stdlib_corpus(split: str = "train", max_bytes: int | None = None) -> np.ndarray:
    """Byte-level tokens of the running interpreter's standard-library ``.py`` files.

    A corpus every machine has (about 30 MB on CPython 3.11), found through
    ``sysconfig.get_paths()["stdlib"]``; see :func:`text_files` for the rest.
    """
    return text_files(sysconfig.get_paths()["stdlib"], split, suffixes=(".py",),
                      max_bytes=max_bytes)


def _read_bin_shard(path: Path) -> np.ndarray:
    """Memory-maps an llm.c shard (see :mod:`gnopt.data.bin_format`)."""
    return bin_format.read_shard(path)


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


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root, "gnopt", "token_max.json")


_MAX_IDS: dict[str, int] = {}


def _shard_max(shard: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest id of one shard; a memory-mapped one is read in chunks, cached on disk."""
    if len(shard) == 0:
        return -1
    filename = getattr(shard, "filename", None)
    if not isinstance(shard, np.memmap) or not filename:
        return int(np.max(shard))
    stat = os.stat(filename)
    key = (f"{os.path.realpath(filename)}:{stat.st_size}:{stat.st_mtime_ns}:{shard.offset}:"
           f"{shard.dtype.str}")
    if key not in _MAX_IDS:
        cache = _cache_file()
        try:
            stored = json.loads(cache.read_text())
        except (OSError, ValueError):
            stored = {}
        if isinstance(stored, dict) and isinstance(stored.get(key), int):
            _MAX_IDS[key] = stored[key]
        else:
            _MAX_IDS[key] = max(int(np.max(shard[i:i + chunk]))
                                for i in range(0, len(shard), chunk))
            stored = stored if isinstance(stored, dict) else {}
            stored[key] = _MAX_IDS[key]
            try:  # best effort: a read-only home only costs the pass next time
                cache.parent.mkdir(parents=True, exist_ok=True)
                temporary = cache.with_suffix(f".{os.getpid()}.tmp")
                temporary.write_text(json.dumps(stored))
                os.replace(temporary, cache)
            except OSError:
                pass
    return _MAX_IDS[key]


def max_token_ids(tokens) -> list[tuple[str | None, int]]:
    """``(file or None, largest token id)`` of each shard of a token stream.

    Every token is read once: an in-memory array directly, a memory-mapped shard
    in chunks of 16M tokens. Results for shard files are cached (in memory and in
    ``$XDG_CACHE_HOME/gnopt/token_max.json``, default ``~/.cache``) by path,
    size and modification time, so checking the same shards again is free.
    """
    shards = tokens.shards if isinstance(tokens, ShardedTokens) else [
        tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)]
    return [(str(s.filename) if getattr(s, "filename", None) else None, _shard_max(s))
            for s in shards]


def token_shards(paths: PathLike | Sequence[PathLike]) -> np.ndarray | ShardedTokens:
    """Tokens of pre-tokenised shards: ``.npy`` (1-D integer arrays) and llm.c ``.bin``.

    ``.bin`` is the llm.c / FineWeb format (:mod:`gnopt.data.bin_format`): a
    header of 256 little-endian int32 (magic 20240520, version 1, token count,
    rest zero) then ``count`` uint16 tokens, or magic 20240801, version 7 and
    uint32 tokens; ``python -m gnopt.data.prepare`` writes them. Shards are
    memory-mapped.

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
