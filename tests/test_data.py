"""Tests of gnopt.data: token sources, splits, shard formats and the grain pipeline."""

import json
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gnopt.data import (BOS_BYTE, SHARD_MAGIC, VALIDATION_EVERY, ShardedTokens, make_pipeline,
                        max_token_ids, stdlib_corpus, text_files, token_shards,
                        validation_batches)

STREAM = np.arange(2000, dtype=np.int32)  # window w of seq_len T is w*T, …, w*T + T


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _window_ids(batches, seq_len):
    return [int(row[0]) // seq_len for inputs, _ in batches for row in inputs]


def _write_bin(path, tokens, magic=SHARD_MAGIC, version=1, count=None):
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, "<u2").tobytes())


# --- sources -----------------------------------------------------------------------------------

def test_stdlib_corpus_is_bytes_and_splits_differ():
    train = stdlib_corpus("train", max_bytes=50_000)
    validation = stdlib_corpus("validation", max_bytes=50_000)
    assert train.dtype == np.uint8 and train.shape == (50_000,)
    assert train[0] == BOS_BYTE and validation[0] == BOS_BYTE
    assert not np.array_equal(train[:1000], validation[:1000])
    np.testing.assert_array_equal(stdlib_corpus("train", max_bytes=1000), train[:1000])


def test_text_files_split_by_file_is_disjoint_and_complete(tmp_path):
    for i in range(100):
        (tmp_path / f"doc{i:03d}.txt").write_text(f"document {i}\n")
    (tmp_path / ".hidden.txt").write_text("hidden\n")

    def docs(split):
        return text_files(tmp_path, split).tobytes().decode().split(chr(BOS_BYTE))[1:]

    train, validation, everything = docs("train"), docs("validation"), docs("all")
    assert 0 < len(validation) < 20 and not set(train) & set(validation)
    assert everything == [f"document {i}\n" for i in range(100)]  # sorted file order
    assert sorted(train + validation) == sorted(everything)
    assert text_files(tmp_path / "doc000.txt", "all").tobytes() == b"\x00document 0\n"


def test_one_text_file_splits_into_a_held_out_tail(tmp_path):
    book = tmp_path / "book.txt"
    book.write_bytes(bytes(range(1, 256)) * 40)
    train, validation, everything = (text_files(book, s) for s in ("train", "validation", "all"))
    assert len(validation) == len(everything) // VALIDATION_EVERY
    np.testing.assert_array_equal(np.concatenate([train, validation]), everything)
    np.testing.assert_array_equal(text_files(book, "validation", max_bytes=7), validation[:7])
    np.testing.assert_array_equal(text_files(book, "train", max_bytes=7), train[:7])
    # A file of the validation split alone: the same rule (train would be empty by file).
    for name in (f"f{i}.txt" for i in range(100)):
        if zlib.crc32(name.encode()) % VALIDATION_EVERY == 0:
            (tmp_path / "v").mkdir()
            (tmp_path / "v" / name).write_bytes(b"x" * 400)
            break
    assert len(text_files(tmp_path / "v", "train")) == 401 - 401 // VALIDATION_EVERY


def test_max_token_ids_reads_every_shard_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = np.arange(1000, dtype=np.uint16)
    a[777] = 5000
    np.save(tmp_path / "a.npy", a)
    _write_bin(tmp_path / "b.bin", [1, 2, 3])
    tokens = token_shards([tmp_path / "a.npy", tmp_path / "b.bin"])
    assert max_token_ids(tokens) == [(str(tmp_path / "a.npy"), 5000), (str(tmp_path / "b.bin"), 3)]
    cached = json.loads((tmp_path / "cache" / "gnopt" / "token_max.json").read_text())
    assert sorted(cached.values()) == [3, 5000]
    assert max_token_ids(np.array([4, 9, 2])) == [(None, 9)]


def test_text_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        text_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        text_files(tmp_path / "empty")
    with pytest.raises(ValueError, match="split='test'"):
        text_files(tmp_path, "test")


def test_npy_and_bin_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 50257, 300), rng.integers(0, 50257, 200)
    np.save(tmp_path / "a.npy", first.astype(np.int32))
    _write_bin(tmp_path / "b.bin", second)
    np.testing.assert_array_equal(token_shards(tmp_path / "a.npy"), first)
    np.testing.assert_array_equal(token_shards(str(tmp_path / "b.bin")), second)
    joined = token_shards(tmp_path)  # a folder: its shards in sorted order
    both = np.concatenate([first, second])
    assert isinstance(joined, ShardedTokens) and len(joined) == 500
    np.testing.assert_array_equal(joined[:], both)
    index = rng.integers(0, 500, (7, 9))
    np.testing.assert_array_equal(joined[index], both[index])
    np.testing.assert_array_equal(joined[295:310], both[295:310])
    np.testing.assert_array_equal(token_shards(str(tmp_path / "*.bin")), second)


def test_sharded_tokens_feed_the_same_batches_as_one_array(tmp_path):
    np.save(tmp_path / "a.npy", STREAM[:777])
    _write_bin(tmp_path / "b.bin", STREAM[777:])
    joined = token_shards([tmp_path / "a.npy", tmp_path / "b.bin"])
    for (x1, y1), (x2, y2) in zip(_take(make_pipeline(joined, seq_len=16, batch_size=8), 5),
                                  _take(make_pipeline(STREAM, seq_len=16, batch_size=8), 5)):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_token_shard_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        token_shards(tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match=r"no token shards match .*\*\.bin"):
        token_shards(str(tmp_path / "*.bin"))
    with pytest.raises(ValueError, match="has no .bin/.npy token shards"):
        token_shards(tmp_path)
    _write_bin(tmp_path / "magic.bin", [1, 2, 3], magic=12345)
    with pytest.raises(ValueError, match="magic.bin: bad magic 12345"):
        token_shards(tmp_path / "magic.bin")
    _write_bin(tmp_path / "version.bin", [1, 2, 3], version=7)
    with pytest.raises(ValueError, match="version.bin: unsupported token shard version 7"):
        token_shards(tmp_path / "version.bin")
    _write_bin(tmp_path / "cut.bin", [1, 2, 3], count=10)
    with pytest.raises(ValueError, match="cut.bin: truncated.*10 tokens"):
        token_shards(tmp_path / "cut.bin")
    (tmp_path / "stub.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="stub.bin: truncated token shard"):
        token_shards(tmp_path / "stub.bin")
    np.save(tmp_path / "matrix.npy", np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="matrix.npy: token shard must be a 1-D integer"):
        token_shards(tmp_path / "matrix.npy")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: unknown token shard type"):
        token_shards(tmp_path / "notes.txt")


# --- pipeline ----------------------------------------------------------------------------------

def test_batches_are_shifted_windows_of_the_stream():
    inputs, targets = next(make_pipeline(STREAM, seq_len=16, batch_size=4))
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == targets.dtype == np.int32
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(inputs - inputs[:, :1], np.broadcast_to(np.arange(16), (4, 16)))
    np.testing.assert_array_equal(targets, inputs + 1)
    assert np.all(inputs[:, 0] % 16 == 0)


def test_same_seed_same_batches_other_seed_differs():
    first = _window_ids(_take(make_pipeline(STREAM, seq_len=16, batch_size=4, seed=3), 6), 16)
    again = _window_ids(_take(make_pipeline(STREAM, seq_len=16, batch_size=4, seed=3), 6), 16)
    other = _window_ids(_take(make_pipeline(STREAM, seq_len=16, batch_size=4, seed=4), 6), 16)
    assert first == again != other


def test_epochs_cover_every_window_once_in_new_orders():
    windows = (len(STREAM) - 1) // 16  # 124
    batches = _take(make_pipeline(STREAM, seq_len=16, batch_size=4, num_epochs=2), 62)
    ids = _window_ids(batches, 16)
    assert sorted(ids[:windows]) == sorted(ids[windows:]) == list(range(windows))
    assert ids[:windows] != ids[windows:] and ids[:windows] != list(range(windows))
    ordered = _window_ids(_take(make_pipeline(STREAM, seq_len=16, batch_size=4,
                                              shuffle=False), 3), 16)
    assert ordered == list(range(12))
    finite = make_pipeline(STREAM[:100], seq_len=16, batch_size=3, num_epochs=1)
    assert len(list(finite)) == 2  # 6 windows, batches of 3


@given(steps=st.integers(0, 40), seq_len=st.sampled_from([4, 16]),
       prefetch=st.sampled_from([0, 2]))
def test_resume_from_state_equals_uninterrupted(steps, seq_len, prefetch):
    kwargs = dict(seq_len=seq_len, batch_size=5, seed=11, prefetch=prefetch)
    reference = make_pipeline(STREAM, **kwargs)
    uninterrupted = _take(reference, steps + 6)
    interrupted = make_pipeline(STREAM, **kwargs)
    _take(interrupted, steps)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = make_pipeline(STREAM, **kwargs)
    resumed.set_state(state)
    for (x1, y1), (x2, y2) in zip(_take(resumed, 6), uninterrupted[steps:]):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_two_shards_split_the_windows():
    kwargs = dict(seq_len=16, batch_size=2, num_epochs=1, seed=5)
    halves = [_window_ids(list(make_pipeline(STREAM, shard_index=i, shard_count=2, **kwargs)), 16)
              for i in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 62
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == list(range(124))


def test_validation_batches_are_fixed_and_spread():
    batches = validation_batches(STREAM, seq_len=16, batch_size=3, num_batches=4)
    assert len(batches) == 4 and batches[0][0].shape == (3, 16)
    again = validation_batches(STREAM, seq_len=16, batch_size=3, num_batches=4)
    for (x1, y1), (x2, y2) in zip(batches, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    ids = _window_ids(batches, 16)
    assert ids == [j * 124 // 12 for j in range(12)]  # evenly spread over the 124 windows
    np.testing.assert_array_equal(batches[2][1], batches[2][0] + 1)


def test_pipeline_errors():
    with pytest.raises(ValueError, match="fewer than the 200 needed"):
        make_pipeline(STREAM, seq_len=16, batch_size=100, shard_count=2)
    with pytest.raises(ValueError, match="shard_index=2 must be in"):
        make_pipeline(STREAM, seq_len=16, batch_size=1, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="1-D integer array"):
        make_pipeline(STREAM.reshape(2, -1), seq_len=16, batch_size=1)
    with pytest.raises(ValueError, match="1-D integer array"):
        make_pipeline(STREAM.astype(np.float32), seq_len=16, batch_size=1)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        make_pipeline(STREAM, seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match="fewer than the 1000 needed"):
        validation_batches(STREAM, seq_len=16, batch_size=10, num_batches=100)


def test_pipeline_runs_on_the_stdlib_corpus():
    tokens = stdlib_corpus("validation", max_bytes=20_000)
    inputs, targets = next(make_pipeline(tokens, seq_len=128, batch_size=8))
    assert inputs.shape == (8, 128) and inputs.max() < 256 and inputs.min() >= 0
