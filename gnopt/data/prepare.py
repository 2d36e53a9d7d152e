"""``python -m gnopt.data.prepare``: text to train and validation token shards.

::

    python -m gnopt.data.prepare INPUT [INPUT ...] --out DIR
        [--vocab_size 32000 | --tokenizer tokenizer.json] [--text_column text]
        [--suffixes .txt .md] [--stdlib] [--val_every 20] [--shard_tokens 100000000]
        [--workers 4] [--tokenizer_train_bytes N]

Inputs are files and folders (searched recursively, hidden entries,
``__pycache__`` and ``site-packages`` skipped). A ``.jsonl`` / ``.json``
(JSON Lines) or ``.parquet`` file holds one document per row, in its
``--text_column`` (a FineWeb or C4 shard you downloaded); any other file is
one document. ``--stdlib`` adds the Python standard library's ``.py`` files
(the embedded corpus).

Writes to ``DIR``:

* ``tokenizer.json``: a byte-level BPE (GPT-2's pre-tokenizer, every byte in
  the base alphabet, so any text encodes) trained with Hugging Face
  ``tokenizers`` on the training documents to ``--vocab_size`` tokens
  (``<|endoftext|>`` is id 0), or a copy of the given ``--tokenizer``;
* ``train_000000.bin, ...`` and ``val_000000.bin, ...``: llm.c ``.bin``
  shards (:mod:`gnopt.data.bin_format`) of ``--shard_tokens`` tokens (the last
  shorter), each document preceded by the end-of-text token;
* ``manifest.json``: vocabulary size, token type, end-of-text id, token,
  document and shard counts per split, the source files, and the command.

A document goes to validation when the CRC-32 of ``"<file>:<row>"`` is
divisible by ``--val_every`` (about 1 in 20 by default): stable across
machines, runs and worker counts. Files are tokenized in parallel
(``--workers`` files at a time, and ``tokenizers`` encodes each batch of
documents on every core), and written in input order, so the output is the
same for any ``--workers``. Every file is written under a temporary name and
renamed; ``manifest.json`` is written last, so a folder with a manifest is
complete. Re-running a finished command does nothing; re-running an
interrupted one (or another command into the same folder) starts over,
deleting the folder's earlier shards first.

Then train on them, e.g. the paper's 45M model::

    python -m gnopt.train --gin_file 45m_adamw.gin \\
        --gin_param 'TRAIN_SHARDS = "DIR/train_*.bin"' --gin_param 'VAL_SHARDS = "DIR/val_*.bin"'
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import gzip
import json
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gnopt.data import bin_format
from gnopt.data.sources import _text_files

EOT_TOKEN = "<|endoftext|>"
"""The end-of-text token of trained tokenizers (id 0); each document is preceded by it."""
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
TABLE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
"""Files read as one document per row (``--text_column``)."""
_ENCODE_BATCH = 256


class PrepareError(ValueError):
    """A bad input or setting, reported as one line."""


def _is_table(path: Path) -> bool:
    return path.name.endswith(TABLE_SUFFIXES)


def find_sources(inputs: Sequence[str | os.PathLike], suffixes: Sequence[str] | None = None,
                 stdlib: bool = False) -> list[tuple[str, Path]]:
    """``(name, path)`` of every input file, in a fixed order (each input's files sorted);
    ``name`` is the path relative to the folder given (a file's own name)."""
    roots = [Path(p) for p in inputs]
    found = []
    try:
        for root in roots:
            folder_suffixes = None if suffixes is None else tuple(suffixes)
            found += _text_files([root], folder_suffixes if root.is_dir() else None)
        if stdlib:
            found += [(f"stdlib/{name}", path) for name, path in
                      _text_files([Path(sysconfig.get_paths()["stdlib"])], (".py",))]
    except FileNotFoundError as e:
        raise PrepareError(str(e)) from e
    if not found:
        raise PrepareError(f"no input files in {[str(r) for r in roots]}"
                           + (f" with suffixes {list(suffixes)}" if suffixes else ""))
    return found


def read_documents(path: Path, text_column: str = "text") -> Iterator[str]:
    """The documents of one file: the rows' ``text_column`` of JSON Lines and Parquet files,
    else the whole file (UTF-8, undecodable bytes replaced)."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq  # only for Parquet inputs

        table = pq.ParquetFile(path)
        if text_column not in table.schema_arrow.names:
            raise PrepareError(f"{path}: no column {text_column!r} (columns: "
                               f"{table.schema_arrow.names}); set --text_column")
        for batch in table.iter_batches(columns=[text_column], batch_size=1024):
            yield from (text or "" for text in batch.column(0).to_pylist())
    elif _is_table(path):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path}:{number}: not a JSON line ({e.msg})") from e
                if not isinstance(row, dict) or text_column not in row:
                    raise PrepareError(f"{path}:{number}: no field {text_column!r}; set "
                                       "--text_column")
                yield row[text_column] or ""
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def is_validation(name: str, row: int, val_every: int) -> bool:
    """Whether document ``row`` of source ``name`` belongs to the validation split."""
    return zlib.crc32(f"{name}:{row}".encode()) % val_every == 0


def _documents(sources, text_column: str, val_every: int, split: str) -> Iterator[str]:
    for name, path in sources:
        for row, text in enumerate(read_documents(path, text_column)):
            if text and is_validation(name, row, val_every) == (split == "validation"):
                yield text


def train_tokenizer(sources, vocab_size: int, *, text_column: str = "text",
                    val_every: int = 20, max_bytes: int | None = None,
                    progress: bool = True):
    """A byte-level BPE of ``vocab_size`` tokens trained on the training documents
    (``<|endoftext|>`` is id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)

    def texts():
        seen = 0
        for text in _documents(sources, text_column, val_every, "train"):
            yield text
            seen += len(text.encode())
            if max_bytes is not None and seen >= max_bytes:
                return

    tokenizer.train_from_iterator(texts(), trainer)
    return tokenizer


def _eot_id(tokenizer, eot_token: str | None) -> tuple[str, int]:
    candidates = [eot_token] if eot_token else [EOT_TOKEN, "</s>", "<|end_of_text|>", "<eos>"]
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, token_id
    raise PrepareError(f"the tokenizer has none of the end-of-text tokens {candidates}; name "
                       "its token with --eot_token")


def tokenize_file(tokenizer, eot_id: int, name: str, path: Path, *, text_column: str,
                  val_every: int, dtype: np.dtype) -> dict:
    """``{"train": tokens, "validation": tokens, "documents": {split: n}, "bytes": n}`` of one
    file; every document is preceded by ``eot_id``."""
    parts = {"train": [], "validation": []}
    counts = {"train": 0, "validation": 0}
    batch: list[tuple[str, str]] = []

    def flush():
        encodings = tokenizer.encode_batch([text for _, text in batch],
                                           add_special_tokens=False)
        for (split, _), encoding in zip(batch, encodings):
            ids = np.empty(len(encoding.ids) + 1, dtype)
            ids[0] = eot_id
            ids[1:] = encoding.ids
            parts[split].append(ids)
        batch.clear()

    for row, text in enumerate(read_documents(path, text_column)):
        if not text:
            continue
        split = "validation" if is_validation(name, row, val_every) else "train"
        counts[split] += 1
        batch.append((split, text))
        if len(batch) == _ENCODE_BATCH:
            flush()
    if batch:
        flush()
    joined = {split: np.concatenate(chunks) if chunks else np.zeros(0, dtype)
              for split, chunks in parts.items()}
    return {**joined, "documents": counts, "bytes": path.stat().st_size}


class ShardWriter:
    """Cuts a token stream into ``prefix_000000.bin, ...`` of ``shard_tokens`` tokens."""

    def __init__(self, folder: Path, prefix: str, shard_tokens: int, dtype: np.dtype):
        self.folder, self.prefix, self.shard_tokens, self.dtype = folder, prefix, shard_tokens, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            stream = np.concatenate(self.buffer)
            self._write(stream[:self.shard_tokens])
            rest = stream[self.shard_tokens:]
            self.buffer, self.buffered = [rest], len(rest)

    def close(self) -> list[dict]:
        if self.buffered:
            self._write(np.concatenate(self.buffer))
        self.buffer, self.buffered = [], 0
        return self.shards

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        bin_format.write_shard(self.folder / name, tokens, self.dtype)
        self.shards.append({"file": name, "tokens": int(len(tokens))})


def _write_json(path: Path, value) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def _clear(out: Path) -> None:
    """Deletes what an earlier (maybe interrupted) prepare wrote to ``out``: its manifest
    first (the folder is then incomplete), then its shards and temporary files."""
    (out / MANIFEST).unlink(missing_ok=True)
    for path in out.iterdir():
        stale_shard = (path.suffix == ".bin" and path.name.startswith(("train_", "val_")))
        if stale_shard or (path.name.startswith(".") and path.name.endswith(".tmp")):
            path.unlink()


def _check_arguments(out: Path, vocab_size, tokenizer, val_every: int, shard_tokens: int,
                     workers: int) -> None:
    if val_every < 2:
        raise PrepareError(f"--val_every must be >= 2, got {val_every}")
    if shard_tokens < 1 or workers < 1:
        raise PrepareError("--shard_tokens and --workers must be >= 1")
    if tokenizer is None and (vocab_size is None or vocab_size < 257):
        raise PrepareError(f"--vocab_size must be > 256 (the byte alphabet and <|endoftext|>), "
                           f"got {vocab_size}")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a folder")


def _done_before(manifest_path: Path, settings: dict) -> dict | None:
    """The manifest in ``out`` if it was prepared with the same ``settings``."""
    if not manifest_path.is_file():
        return None
    try:
        done = json.loads(manifest_path.read_text())
    except ValueError:
        return None
    return done if done.get("settings") == settings else None


def _tokenizer(sources, tokenizer, vocab_size, *, text_column, val_every, train_bytes,
               progress):
    """``(tokenizer, trained)``: the given tokenizer file, or a BPE trained on ``sources``."""
    from tokenizers import Tokenizer

    if tokenizer is None:
        return train_tokenizer(sources, vocab_size, text_column=text_column, val_every=val_every,
                               max_bytes=train_bytes, progress=progress), True
    try:
        return Tokenizer.from_file(str(tokenizer)), False
    except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exceptions
        raise PrepareError(f"--tokenizer {tokenizer}: not a tokenizers JSON file "
                           f"({str(e).splitlines()[0]})") from e


def _tokenize_into(writers: dict, sources, tok, eot_id: int, dtype, *, text_column: str,
                   val_every: int, workers: int, progress: bool) -> tuple[dict, list]:
    """Tokenizes ``sources`` on ``workers`` threads, in order, into the split ``writers``;
    returns the documents per split and the sources' descriptions."""
    documents = {split: 0 for split in writers}
    described = []
    bar = tqdm(total=len(sources), unit="file", disable=not progress, dynamic_ncols=True)
    total_tokens = 0
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        upcoming = iter(sources)

        def submit() -> None:
            source = next(upcoming, None)
            if source is not None:
                pending.append((source, pool.submit(
                    tokenize_file, tok, eot_id, *source, text_column=text_column,
                    val_every=val_every, dtype=dtype)))

        for _ in range(workers):
            submit()
        while pending:
            (name, path), future = pending.popleft()
            result = future.result()
            submit()
            for split, writer in writers.items():
                writer.add(result[split])
                documents[split] += result["documents"][split]
                total_tokens += len(result[split])
            described.append({"name": name, "path": str(path), "bytes": result["bytes"],
                              "documents": sum(result["documents"].values())})
            bar.update(1)
            bar.set_postfix(tokens=f"{total_tokens:,}", refresh=False)
    bar.close()
    return documents, described


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
            vocab_size: int | None = 32000, tokenizer: str | os.PathLike | None = None,
            text_column: str = "text", suffixes: Sequence[str] | None = None,
            stdlib: bool = False, val_every: int = 20, shard_tokens: int = 100_000_000,
            workers: int = 4, eot_token: str | None = None,
            tokenizer_train_bytes: int | None = None, progress: bool = True,
            command: str | None = None) -> dict:
    """Tokenizes ``inputs`` into shards in ``out``; returns the manifest (see the module
    docstring; ``tokenizer`` given: it is used and ``vocab_size`` ignored)."""
    out = Path(out)
    _check_arguments(out, vocab_size, tokenizer, val_every, shard_tokens, workers)
    sources = find_sources(inputs, suffixes, stdlib)
    settings = {"sources": [[name, str(path.resolve()), path.stat().st_size]
                            for name, path in sources],
                "tokenizer": None if tokenizer is None else str(Path(tokenizer).resolve()),
                "vocab_size": None if tokenizer is not None else vocab_size,
                "text_column": text_column, "val_every": val_every,
                "shard_tokens": shard_tokens, "eot_token": eot_token,
                "tokenizer_train_bytes": tokenizer_train_bytes}
    manifest_path = out / MANIFEST
    done = _done_before(manifest_path, settings)
    if done is not None:
        print(f"{out} is already prepared ({MANIFEST}); nothing to do")
        return done
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    tok, trained = _tokenizer(sources, tokenizer, vocab_size, text_column=text_column,
                              val_every=val_every, train_bytes=tokenizer_train_bytes,
                              progress=progress)
    token, eot_id = _eot_id(tok, eot_token)
    size = tok.get_vocab_size()
    dtype = bin_format.token_dtype(size)
    tok.save(str(out / f".{TOKENIZER}.tmp"))
    os.replace(out / f".{TOKENIZER}.tmp", out / TOKENIZER)

    writers = {"train": ShardWriter(out, "train", shard_tokens, dtype),
               "validation": ShardWriter(out, "val", shard_tokens, dtype)}
    documents, described = _tokenize_into(writers, sources, tok, eot_id, dtype,
                                          text_column=text_column, val_every=val_every,
                                          workers=workers, progress=progress)
    splits = {}
    for split, writer in writers.items():
        shards = writer.close()
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": documents[split],
                         "shards": shards}
    if not splits["validation"]["tokens"]:
        raise PrepareError(f"no document fell into the validation split (1 in {val_every} of "
                           f"{documents['train']}); give more documents or a smaller --val_every")
    manifest = {
        "format": "llm.c .bin: 256 int32 header (magic, version, token count), then tokens",
        "vocab_size": size, "token_dtype": dtype.name, "eot_token": token, "eot_id": eot_id,
        "tokenizer": TOKENIZER, "tokenizer_trained": trained,
        "train": splits["train"], "validation": splits["validation"],
        "sources": described, "command": command, "settings": settings,
    }
    _write_json(manifest_path, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gnopt.data.prepare",
        description="Turn text (files, folders, JSON Lines / Parquet with a text column) into "
                    "a tokenizer and llm.c .bin train/validation token shards.",
        epilog="Then: python -m gnopt.train --gin_file 45m_adamw.gin --gin_param "
               "'TRAIN_SHARDS = \"OUT/train_*.bin\"' --gin_param 'VAL_SHARDS = \"OUT/val_*.bin\"'")
    parser.add_argument("inputs", nargs="*", help="text files, folders, .jsonl/.parquet files")
    parser.add_argument("--out", required=True, help="output folder")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--vocab_size", type=int, default=32000,
                       help="train a byte-level BPE of this many tokens (default 32000, the "
                            "paper's)")
    which.add_argument("--tokenizer", help="use this tokenizer.json (Hugging Face tokenizers) "
                                           "instead of training one")
    parser.add_argument("--text_column", default="text",
                        help="column / field of the text in .jsonl and .parquet files")
    parser.add_argument("--suffixes", nargs="+",
                        help="in folders, read only files with these suffixes (e.g. .txt .md)")
    parser.add_argument("--stdlib", action="store_true",
                        help="add the Python standard library's .py files (the embedded corpus)")
    parser.add_argument("--val_every", type=int, default=20,
                        help="about 1 document in this many goes to validation (default 20)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000,
                        help="tokens per shard (default 10^8, as llm.c)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="files tokenized at once")
    parser.add_argument("--eot_token", help="end-of-text token of a given --tokenizer "
                                            "(default: <|endoftext|>, </s>, ...)")
    parser.add_argument("--tokenizer_train_bytes", type=int,
                        help="train the BPE on only the first this many bytes of text")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.inputs and not args.stdlib:
        parser.error("give input files or folders, or --stdlib")
    command = " ".join(["python -m gnopt.data.prepare", *(argv if argv is not None
                                                           else sys.argv[1:])])
    try:
        manifest = prepare(args.inputs, args.out, vocab_size=args.vocab_size,
                           tokenizer=args.tokenizer, text_column=args.text_column,
                           suffixes=args.suffixes, stdlib=args.stdlib, val_every=args.val_every,
                           shard_tokens=args.shard_tokens, workers=args.workers,
                           eot_token=args.eot_token,
                           tokenizer_train_bytes=args.tokenizer_train_bytes,
                           progress=not args.quiet, command=command)
    except PrepareError as e:
        print(f"gnopt.data.prepare: error: {e}", file=sys.stderr)
        return 2
    out = args.out
    print(f"{out}: vocabulary {manifest['vocab_size']:,}, train {manifest['train']['tokens']:,} "
          f"tokens in {len(manifest['train']['shards'])} shard(s), validation "
          f"{manifest['validation']['tokens']:,} tokens in "
          f"{len(manifest['validation']['shards'])} shard(s)")
    print(f"train: --gin_param 'TRAIN_SHARDS = \"{os.path.join(out, 'train_*.bin')}\"' "
          f"--gin_param 'VAL_SHARDS = \"{os.path.join(out, 'val_*.bin')}\"'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
