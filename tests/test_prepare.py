"""Issue 18 item 1: ``python -m gnopt.data.prepare`` (text → tokenizer → llm.c ``.bin``
shards → manifest), the shard format, and the whole path a README user follows: raw text →
shards → steps of the 45M preset → TensorBoard events.

Item → test: shard format ``test_bin_shards_*``; prepare ``test_prepare_*``; the path
``test_raw_text_to_45m_steps_to_tensorboard``.
"""

import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import gin
from gnopt import train as train_lib
from gnopt.data import prepare, read_shard, token_shards, write_shard
from gnopt.metrics import read_metrics

ROWS = 30
VOCAB = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of standard-library files, and the same texts as JSON Lines and Parquet rows
    (with a second column, so the text column must be picked)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:25]
    (root / "src").mkdir()
    for path in files:
        shutil.copy(path, root / "src" / path.name)
    texts = [path.read_text()[:1500] for path in files[:ROWS]] * 2
    texts = texts[:ROWS]
    (root / "rows.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                             for i, t in enumerate(texts)))
    pq.write_table(pa.table({"id": list(range(ROWS)), "text": texts}), root / "rows.parquet")
    return root


def _inputs(corpus):
    return [corpus / "src", corpus / "rows.jsonl", corpus / "rows.parquet"]


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shards"
    manifest = prepare.prepare(_inputs(corpus), out, vocab_size=VOCAB, shard_tokens=50_000,
                               workers=3, progress=False, command="test")
    return out, manifest


def _stream(out, prefix):
    return np.concatenate([read_shard(p) for p in sorted(out.glob(f"{prefix}_*.bin"))])


def test_bin_shards_round_trip_in_the_llm_c_layout(tmp_path):
    """uint16 shards: magic 20240520, version 1; uint32: 20240801, version 7; header[2] the
    count, 256 int32 in all, tokens after (what llm.c's dev/data writes)."""
    small, large = np.array([0, 7, 65535]), np.array([0, 7, 65536, 2**32 - 1])
    for tokens, magic, version, itemsize in ((small, 20240520, 1, 2),
                                             (large, 20240801, 7, 4)):
        path = write_shard(tmp_path / f"{magic}.bin", tokens)
        header = np.fromfile(path, "<i4", count=256)
        assert list(header[:3]) == [magic, version, len(tokens)] and not header[3:].any()
        assert path.stat().st_size == 1024 + itemsize * len(tokens)
        raw = np.frombuffer(path.read_bytes()[1024:], f"<u{itemsize}")
        np.testing.assert_array_equal(raw, tokens)
        np.testing.assert_array_equal(read_shard(path), tokens)
        np.testing.assert_array_equal(token_shards(path), tokens)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="does not fit in uint16"):
        write_shard(tmp_path / "x.bin", large, "uint16")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "20240801.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_shard(tmp_path / "cut.bin")


def test_prepare_writes_tokenizer_shards_and_manifest(prepared, corpus):
    from tokenizers import Tokenizer

    out, manifest = prepared
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert manifest["vocab_size"] == tokenizer.get_vocab_size() == VOCAB
    assert manifest["eot_id"] == tokenizer.token_to_id("<|endoftext|>") == 0
    assert manifest["token_dtype"] == "uint16" and manifest["command"] == "test"
    documents = len(list((corpus / "src").iterdir())) + 2 * ROWS
    assert manifest["train"]["documents"] + manifest["validation"]["documents"] == documents
    assert manifest["validation"]["documents"] >= 1
    assert [s["name"] for s in manifest["sources"]][-2:] == ["rows.jsonl", "rows.parquet"]
    for split, prefix in (("train", "train"), ("validation", "val")):
        shards = manifest[split]["shards"]
        assert [s["file"] for s in shards] == sorted(p.name for p in out.glob(f"{prefix}_*.bin"))
        assert [s["tokens"] for s in shards] == [len(read_shard(out / s["file"])) for s in shards]
        stream = _stream(out, prefix)
        assert len(stream) == manifest[split]["tokens"]
        assert stream[0] == 0 and (stream == 0).sum() == manifest[split]["documents"]
        assert stream.max() < VOCAB
    assert all(s["tokens"] == 50_000 for s in manifest["train"]["shards"][:-1])
    # A training document decodes back to its text.
    stream = _stream(out, "train")
    starts = np.flatnonzero(stream == 0)
    text = tokenizer.decode(stream[starts[0] + 1:starts[1]].tolist())
    first = sorted((corpus / "src").iterdir())
    assert text in [p.read_text() for p in first]


def test_prepare_is_deterministic_restartable_and_takes_a_given_tokenizer(prepared, corpus,
                                                                           tmp_path, capsys):
    """One worker gives the same bytes as three; an interrupted folder (stale shard, temporary
    file, no manifest) is started over; a finished one is left alone; a given tokenizer.json
    gives the same shards as the one it was trained into."""
    out, manifest = prepared
    again = tmp_path / "again"
    again.mkdir()
    (again / "train_000099.bin").write_bytes(b"stale")
    (again / ".train_000000.bin.1.tmp").write_bytes(b"partial")
    assert prepare.main([*map(str, _inputs(corpus)), "--out", str(again), "--vocab_size",
                         str(VOCAB), "--shard_tokens", "50000", "--workers", "1",
                         "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in again.iterdir()) == names
    for name in names:
        if name != "manifest.json":
            assert (again / name).read_bytes() == (out / name).read_bytes(), name
    stamp = os.stat(again / "train_000000.bin").st_mtime_ns
    capsys.readouterr()
    assert prepare.main([*map(str, _inputs(corpus)), "--out", str(again), "--vocab_size",
                         str(VOCAB), "--shard_tokens", "50000", "--quiet"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert os.stat(again / "train_000000.bin").st_mtime_ns == stamp

    given = prepare.prepare(_inputs(corpus), tmp_path / "given", tokenizer=out / "tokenizer.json",
                            shard_tokens=50_000, progress=False)
    assert not given["tokenizer_trained"]
    for prefix in ("train", "val"):
        np.testing.assert_array_equal(_stream(tmp_path / "given", prefix), _stream(out, prefix))


def test_prepare_errors_are_one_line(corpus, tmp_path, capsys):
    args = ["--out", str(tmp_path / "o"), "--vocab_size", str(VOCAB), "--quiet"]
    assert prepare.main([str(corpus / "rows.parquet"), "--text_column", "body", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'body'" in err[0], err
    assert prepare.main([str(corpus / "rows.jsonl"), "--text_column", "body", *args]) == 2
    assert "no field 'body'; set --text_column" in capsys.readouterr().err
    assert prepare.main([str(tmp_path / "nowhere"), *args]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_raw_text_to_45m_steps_to_tensorboard(prepared, tmp_path, capsys):
    """The README's path in CI size: the shards above (vocabulary 400) → ``python -m
    gnopt.train --gin_file 45m_adamw.gin`` (the 45M preset; batch, length, steps and the
    vocabulary shrunk by --gin_param) → finite validation loss → TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, manifest = prepared
    run = tmp_path / "run"
    params = [f'TRAIN_SHARDS = "{out}/train_*.bin"', f'VAL_SHARDS = "{out}/val_*.bin"',
              f"gnopt.models.llama_config.vocab_size = {manifest['vocab_size']}",
              "NUM_STEPS = 2", "WARMUP_STEPS = 1", "train.batch_size = 2",
              "train.grad_accum_steps = 1", "train.seq_len = 32", "train.eval_every = 2",
              "train.eval_batches = 1"]
    gin.clear_config()
    try:
        code = train_lib.main(["--gin_file", "45m_adamw.gin", "--run_dir", str(run),
                               *[arg for p in params for arg in ("--gin_param", p)]])
    finally:
        gin.clear_config()
    assert code == 0
    assert "d_model=512, n_layers=4" in capsys.readouterr().out
    record = read_metrics(run)[-1]
    assert record["step"] == 2 and np.isfinite(record["val_loss"])
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss")] == [2]
    assert events.Scalars("val_loss")[0].value == pytest.approx(record["val_loss"], rel=1e-6)
