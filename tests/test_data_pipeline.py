"""Tests for engram_jax/data/pipeline.py: batches, split, determinism, hash ids, checkpoints.

Most tests feed a synthetic stream `tokens = arange(N)`: every position has its own value, so
a token's value says where it came from (shift, split and epoch checks become exact).
"""

import gzip
import json
import threading

import numpy as np
import pytest

from engram_jax.data import corpus, pipeline
from engram_jax.data.pipeline import DataConfig, build_pipeline

N = 1001  # 801 training tokens = 100 windows of 8 + 1; 200 validation tokens = 24 windows.


def _config(**kw):
  args = dict(seq_len=8, batch_size=4, val_fraction=0.2, num_threads=0, seed=1)
  args.update(kw)
  return DataConfig(**args)


def _pipe(hash_fn=None, n=N, **kw):
  return build_pipeline(_config(**kw), hash_fn, tokens=np.arange(n))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys, strict=True):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["targets"], y["targets"])
    assert x["hash_ids"].keys() == y["hash_ids"].keys()
    for k in x["hash_ids"]:
      np.testing.assert_array_equal(x["hash_ids"][k], y["hash_ids"][k])


@pytest.mark.parametrize("num_threads", [0, 2])
def test_batch_shapes_dtypes_and_target_shift(num_threads):
  p = _pipe(num_threads=num_threads)
  assert (p.num_train_windows, p.num_val_batches) == (100, 6)
  for batch in [*_take(iter(p.train), 3), next(iter(p.validation))]:
    assert batch.keys() == {"tokens", "targets", "hash_ids"}
    assert batch["hash_ids"] == {}
    for key in ("tokens", "targets"):
      assert batch[key].shape == (4, 8) and batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)
    # Every row is one window: 8 consecutive tokens starting at a multiple of seq_len.
    np.testing.assert_array_equal(np.diff(batch["tokens"], axis=1), 1)
    starts = batch["tokens"][:, 0]
    assert np.all(starts[starts < 801] % 8 == 0) and np.all((starts[starts >= 801] - 801) % 8 == 0)


def test_epochs_visit_every_window_once_and_reshuffle():
  p = _pipe()
  rows = np.concatenate([b["tokens"][:, 0] for b in _take(iter(p.train), 75)])  # 3 epochs.
  epochs = rows.reshape(3, 100)
  for starts in epochs:
    np.testing.assert_array_equal(np.sort(starts), np.arange(100) * 8)
  assert not np.array_equal(epochs[0], np.arange(100) * 8)  # Shuffled...
  assert not np.array_equal(epochs[0], epochs[1])  # ...differently in each epoch.
  assert not np.array_equal(epochs[1], epochs[2])


def test_same_seed_same_batches_other_seed_differs():
  a = _take(iter(_pipe(seed=3).train), 30)
  b = _take(iter(_pipe(seed=3, num_threads=2).train), 30)
  _assert_batches_equal(a, b)
  c = _take(iter(_pipe(seed=4).train), 30)
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c, strict=True))


def test_validation_is_the_tail_disjoint_finite_and_repeatable():
  p = _pipe()
  val = list(p.validation)
  assert len(val) == p.num_val_batches == 6  # 24 windows / 4; the one-pass iterator ends.
  _assert_batches_equal(val, list(p.validation))
  val_tokens = np.concatenate([np.ravel([b["tokens"], b["targets"]]) for b in val])
  train = _take(iter(p.train), 50)  # Two epochs.
  train_tokens = np.concatenate([np.ravel([b["tokens"], b["targets"]]) for b in train])
  assert val_tokens.min() >= 801 and train_tokens.max() < 801
  assert not np.intersect1d(val_tokens, train_tokens).size
  np.testing.assert_array_equal(val[0]["tokens"][0], np.arange(801, 809))  # In order.
  assert len(list(_pipe(val_batches=2).validation)) == 2


def test_split_tokens():
  train, val = pipeline.split_tokens(np.arange(100), 0.1)
  np.testing.assert_array_equal(train, np.arange(90))
  np.testing.assert_array_equal(val, np.arange(90, 100))


def test_hash_fn_is_called_and_its_output_attached():
  seen = []
  lock = threading.Lock()

  def hash_fn(tokens):
    with lock:
      seen.append(tokens.copy())
    assert tokens.dtype == np.int64 and tokens.shape == (4, 8)
    return {3: np.stack([tokens, 2 * tokens], axis=-1), 7: (tokens % 5)[..., None]}

  p = _pipe(hash_fn, num_threads=2)
  for batch in [*_take(iter(p.train), 4), *p.validation]:
    ids = batch["hash_ids"]
    assert ids.keys() == {3, 7}
    assert ids[3].shape == (4, 8, 2) and ids[7].shape == (4, 8, 1)
    assert ids[3].dtype == ids[7].dtype == np.int32
    np.testing.assert_array_equal(ids[3][..., 1], 2 * batch["tokens"])
    np.testing.assert_array_equal(ids[7][..., 0], batch["tokens"] % 5)
    assert any(np.array_equal(s, batch["tokens"]) for s in seen)


@pytest.mark.parametrize(
  ("bad", "error", "match"),
  [
    (lambda t: {0: t}, ValueError, r"shape \(4, 8\)"),
    (lambda t: {0: t[:, :4, None]}, ValueError, "expected"),
    (lambda t: {0: t[..., None] + 2**31}, ValueError, "overflows int32"),
    (lambda t: {0: t[..., None] * 0.5}, TypeError, "dtype"),
    (lambda t: [t], TypeError, "layer_id"),
  ],
)
def test_bad_hash_fn_output_raises(bad, error, match):
  with pytest.raises(error, match=match):
    next(iter(_pipe(bad).train))


@pytest.mark.parametrize("num_threads", [0, 2])
def test_restored_iterator_continues_exactly(num_threads):
  hash_fn = lambda t: {2: (t * 7 % 1009)[..., None]}
  it = iter(_pipe(hash_fn, num_threads=num_threads).train)
  _take(it, 23)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
  expected = _take(it, 6)  # Crosses the end of the first epoch (25 batches).
  fresh = iter(_pipe(hash_fn, num_threads=num_threads).train)
  assert not np.array_equal(next(fresh)["tokens"], expected[0]["tokens"])
  restored = iter(_pipe(hash_fn, num_threads=num_threads).train)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 6), expected)


def test_config_and_size_errors(tmp_path):
  with pytest.raises(ValueError, match="seq_len"):
    DataConfig(seq_len=1)
  with pytest.raises(ValueError, match="val_fraction"):
    DataConfig(val_fraction=0.0)
  with pytest.raises(ValueError, match="batch_size"):
    DataConfig(batch_size=0)
  with pytest.raises(ValueError, match=r"training split .* fewer than one batch"):
    _pipe(batch_size=101)
  with pytest.raises(ValueError, match=r"validation split .* fewer than one batch"):
    _pipe(batch_size=25)
  with pytest.raises(ValueError, match=r"1-D"):
    build_pipeline(_config(), tokens=np.zeros((2, 600), np.int32))
  with pytest.raises(FileNotFoundError, match=r"absent\.txt"):
    build_pipeline(_config(corpus_files=str(tmp_path / "absent.txt")))


@pytest.fixture(scope="module")
def chapters():
  return corpus.read_documents(corpus.default_corpus_path())[:8]


def test_encode_corpus_puts_eos_after_each_document(tmp_path, chapters, monkeypatch):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt.gz"
  a.write_text("\n\n".join(chapters[:5]) + "\n")
  with gzip.open(b, "wt") as f:
    f.write("\n\n".join(chapters[5:]))
  cfg = _config(corpus_files=(str(a), b))
  tokens = pipeline.encode_corpus(cfg)
  assert tokens.dtype == np.int32 and tokens[-1] == 2
  pieces = np.split(tokens, np.flatnonzero(tokens == 2) + 1)[:-1]
  assert len(pieces) == len(chapters)
  p = build_pipeline(cfg, tokens=tokens)
  for piece, chapter in zip(pieces, chapters, strict=True):
    assert p.tokenizer.decode(piece[:-1].tolist()) == chapter
  # The cache file is written once and then read instead of the corpus.
  cached = pipeline.encode_corpus(cfg, cache_dir=tmp_path / "cache")
  assert len(list((tmp_path / "cache").glob("tokens-*.npy"))) == 1

  def no_reading(*args, **kwargs):
    raise AssertionError("the corpus was read again")

  monkeypatch.setattr(pipeline.corpus, "read_documents", no_reading)
  np.testing.assert_array_equal(pipeline.encode_corpus(cfg, cache_dir=tmp_path / "cache"), cached)
  np.testing.assert_array_equal(cached, tokens)


def test_default_corpus_pipeline_end_to_end():
  p = build_pipeline(DataConfig(seq_len=64, batch_size=4, num_threads=0))
  assert p.vocab_size == 8192 and p.special_ids.pad == 0
  assert p.num_train_windows > 14_000 and p.num_val_batches > 70  # val_fraction 0.02
  text = corpus.read_text(corpus.default_corpus_path())
  batch = next(iter(p.train))
  for row in np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1):
    for piece in np.split(row, np.flatnonzero(row == p.special_ids.eos)):
      piece = piece[piece != p.special_ids.eos].tolist()
      assert p.tokenizer.decode(piece) in text
  last_val = list(p.validation)[-1]
  assert "Revelation 22" in text[-3000:]
  assert p.tokenizer.decode(last_val["targets"][-1].tolist()) in text[-30_000:]
