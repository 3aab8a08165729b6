"""The grain input pipeline: packed token windows plus the Engram hash ids of every layer.

The corpus is tokenized once, in memory: documents (see `corpus.split_documents`) are encoded
with the fast batch encoder and joined with `<|eos|>` after each, giving one token stream. No
padding is ever needed: the stream is cut into windows of `seq_len + 1` tokens that overlap by
one token, so every token but the first is a target once; a batch holds `tokens = w[:, :-1]` and
`targets = w[:, 1:]`.

Split: the last `val_fraction` of the token stream is the validation set, the rest is the
training set, each cut into windows on its own, so no token is in both (a contiguous held-out
tail, as for the classic language-modelling benchmarks; shuffled windows from one text would
leak neighbouring context into validation).

The training set is shuffled with `seed`, reshuffled differently (and deterministically) in
every epoch, repeated forever and batched; its iterator's `get_state()` / `set_state()` save and
restore the position exactly (grain's index-based `MapDataset`, so a batch depends only on the
seed and its step number). Validation is one pass in order, optionally capped.

Hash ids are computed on the host, per batch, by a caller-supplied `hash_fn`, in grain's reader
threads, ahead of the training step (paper §2.5: ids known before the forward pass).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import grain
import numpy as np
import tokenizers
from absl import logging

from engram_jax.config import TrainConfig
from engram_jax.data import corpus, tokenizer_train
from engram_jax.tokenization import load_tokenizer

# tokens [B, T] (int64) -> {layer_id: hash ids [B, T, H]}
HashFn = Callable[[np.ndarray], dict[int, np.ndarray]]
Batch = dict  # {"tokens": [B, T], "targets": [B, T], "hash_ids": {layer_id: [B, T, H]}}
_INT32 = np.iinfo(np.int32)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to cut it into batches.

  Attributes:
    corpus_files: text files (plain, `.gz`, `.xz`); empty: the embedded default corpus.
    tokenizer_file: a tokenizer.json with `<|pad|>`, `<|bos|>`, `<|eos|>`; None: the embedded one.
    seq_len: T, tokens per sequence (each window holds T + 1 tokens).
    batch_size: B, sequences per batch (training and validation).
    val_fraction: the share of the token stream held out for validation (its tail).
    val_batches: cap on validation batches per pass; None: one full pass.
    seed: shuffling seed of the training set.
    separator: document separator within a file; None: one document per file.
    num_threads: grain reader threads (they also run `hash_fn`); 0: read in the caller's thread.
    prefetch: batches read ahead (only with num_threads > 0).
  """

  corpus_files: tuple[str, ...] = ()
  tokenizer_file: str | None = None
  # The knobs a training run also has take its defaults (one default per knob).
  seq_len: int = TrainConfig.seq_len
  batch_size: int = TrainConfig.batch_size
  val_fraction: float = TrainConfig.val_fraction
  val_batches: int | None = None
  seed: int = TrainConfig.seed
  separator: str | None = corpus.DEFAULT_SEPARATOR
  num_threads: int = 2
  prefetch: int = 4

  def __post_init__(self):
    files = self.corpus_files
    if isinstance(files, (str, Path)):  # A lone path is a one-file corpus.
      files = (files,)
    object.__setattr__(self, "corpus_files", tuple(str(p) for p in files))
    if self.tokenizer_file is not None:
      object.__setattr__(self, "tokenizer_file", str(self.tokenizer_file))
    checks = [
      ("seq_len", self.seq_len >= 2, "an int >= 2"),
      ("batch_size", self.batch_size >= 1, "an int >= 1"),
      ("val_fraction", 0.0 < self.val_fraction < 1.0, "a float in (0, 1)"),
      ("val_batches", self.val_batches is None or self.val_batches >= 1, "None or >= 1"),
      ("num_threads", self.num_threads >= 0, "an int >= 0"),
      ("prefetch", self.prefetch >= 0, "an int >= 0"),
    ]
    for name, ok, expected in checks:
      if not ok:
        raise ValueError(f"DataConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

  def corpus_paths(self) -> list[Path]:
    """The corpus files (the embedded default corpus when none are configured)."""
    return [Path(p) for p in self.corpus_files] or [corpus.default_corpus_path()]

  def tokenizer_path(self) -> Path:
    """The tokenizer.json (the embedded default tokenizer when none is configured)."""
    return Path(self.tokenizer_file) if self.tokenizer_file else corpus.default_tokenizer_path()


def encode_documents(
  documents: Sequence[str], tok: tokenizers.Tokenizer, eos_id: int
) -> np.ndarray:
  """Encodes documents into one token stream, `eos_id` after each document.

  Args:
    documents: the texts.
    tok: the tokenizer (its own special-token template, if any, is not applied).
    eos_id: the end-of-document id.

  Returns:
    int32 [N] token ids.
  """
  encodings = tok.encode_batch_fast(list(documents), add_special_tokens=False)
  eos = np.array([eos_id], np.int32)
  parts = []
  for enc in encodings:
    parts.append(np.asarray(enc.ids, np.int32))
    parts.append(eos)
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def _cache_key(paths: Sequence[Path], tok: tokenizers.Tokenizer, config: DataConfig) -> str:
  h = hashlib.sha256()
  h.update(tok.to_str().encode())
  h.update(repr(config.separator).encode())
  for p in paths:
    data = p.read_bytes()
    h.update(len(data).to_bytes(8, "little"))  # Length first: file boundaries are unambiguous.
    h.update(data)
  return h.hexdigest()[:24]


def encode_corpus(
  config: DataConfig,
  cache_dir: corpus.PathLike | None = None,
  *,
  tokenizer: tokenizers.Tokenizer | None = None,
) -> np.ndarray:
  """Reads and tokenizes the configured corpus.

  Args:
    config: which corpus, tokenizer and document separator.
    cache_dir: if given, the token array is stored there as `tokens-<key>.npy` (the key hashes
      the corpus bytes, the tokenizer and the separator) and reused on the next call.
    tokenizer: the configured tokenizer, if the caller has loaded it already.

  Returns:
    int32 [N] token ids, `<|eos|>` after every document.

  Raises:
    FileNotFoundError: a corpus file or the tokenizer does not exist.
    ValueError: an empty corpus file, or a tokenizer without the special tokens.
  """
  paths = config.corpus_paths()
  tok = tokenizer or load_tokenizer(config.tokenizer_path())
  eos = tokenizer_train.special_token_ids(tok).eos
  cache_file = None
  if cache_dir is not None:
    cache_file = Path(cache_dir) / f"tokens-{_cache_key(paths, tok, config)}.npy"
    if cache_file.is_file():
      logging.info("reading cached tokens from %s", cache_file)
      return np.load(cache_file)
  tokens = encode_documents(corpus.read_documents(paths, config.separator), tok, eos)
  logging.info("tokenized %d files into %d tokens", len(paths), tokens.size)
  if cache_file is not None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp.npy")
    np.save(tmp, tokens)
    tmp.replace(cache_file)  # Atomic: a reader never sees half a file.
  return tokens


class Windows(Sequence):
  """Random-access windows of `seq_len + 1` tokens over a stream, overlapping by one token."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = tokens
    self.seq_len = seq_len
    self._n = max(0, (tokens.size - 1) // seq_len)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> np.ndarray:
    """Window i: tokens[i * T : i * T + T + 1], int32 [T + 1]."""
    if not 0 <= i < self._n:
      raise IndexError(f"window {i} out of range [0, {self._n})")
    start = i * self.seq_len
    return self.tokens[start : start + self.seq_len + 1]


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits a token stream into (train, validation): the validation set is the tail.

  Args:
    tokens: [N] token ids.
    val_fraction: the share of tokens held out, in (0, 1).

  Returns:
    ([N - n_val], [n_val]) views, n_val = round(val_fraction * N).
  """
  cut = tokens.size - round(val_fraction * tokens.size)
  return tokens[:cut], tokens[cut:]


class _MakeBatch:
  """Stacked windows [B, T + 1] -> the batch dict, with hash ids from `hash_fn` if given."""

  def __init__(self, hash_fn: HashFn | None):
    self.hash_fn = hash_fn

  def __call__(self, windows: np.ndarray) -> Batch:
    windows = np.asarray(windows, np.int32)
    tokens = np.ascontiguousarray(windows[:, :-1])  # [B, T + 1] -> [B, T]
    targets = np.ascontiguousarray(windows[:, 1:])  # [B, T + 1] -> [B, T]
    hash_ids = {}
    if self.hash_fn is not None:
      raw = self.hash_fn(tokens.astype(np.int64))
      if not isinstance(raw, dict):
        raise TypeError(f"hash_fn must return {{layer_id: [B, T, H]}}, got {type(raw).__name__}")
      hash_ids = {layer: _check_hash_ids(layer, ids, tokens.shape) for layer, ids in raw.items()}
    return {"tokens": tokens, "targets": targets, "hash_ids": hash_ids}


def _check_hash_ids(layer, ids, bt: tuple[int, int]) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 3 or ids.shape[:2] != bt:
    raise ValueError(
      f"hash_fn: layer {layer} ids have shape {ids.shape}, expected [B, T, H] with B, T = {bt}"
    )
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"hash_fn: layer {layer} ids have dtype {ids.dtype}, expected integers")
  if ids.size and (ids.min() < _INT32.min or ids.max() > _INT32.max):
    raise ValueError(f"hash_fn: layer {layer} ids range [{ids.min()}, {ids.max()}] overflows int32")
  return ids.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """The datasets of one corpus.

  `iter(pipeline.train)` is an endless iterator of batches whose `get_state()` (a small
  JSON-serialisable dict) and `set_state(state)` checkpoint its position;
  `iter(pipeline.validation)` is one pass over the validation batches, the same every time.
  Each batch is {"tokens": int32 [B, T], "targets": int32 [B, T], "hash_ids": {layer_id: int32
  [B, T, H]}} (`hash_ids` is empty without a `hash_fn`).

  Attributes:
    config: the data config.
    tokenizer: the tokenizer the corpus was encoded with.
    special_ids: raw ids of `<|pad|>`, `<|bos|>`, `<|eos|>`.
    train: the training batches (infinite).
    validation: the validation batches (finite).
    num_train_windows: sequences per training epoch.
    num_val_batches: batches per validation pass.
  """

  config: DataConfig
  tokenizer: tokenizers.Tokenizer
  special_ids: tokenizer_train.SpecialTokenIds
  train: grain.IterDataset
  validation: grain.IterDataset
  num_train_windows: int
  num_val_batches: int

  @property
  def vocab_size(self) -> int:
    """V, the tokenizer's number of ids."""
    return self.tokenizer.get_vocab_size()


def _too_small(split: str, n_windows: int, n_tokens: int, config: DataConfig) -> ValueError:
  files = ", ".join(str(p) for p in config.corpus_paths())
  return ValueError(
    f"the {split} split of {files} has {n_tokens} tokens = {n_windows} windows of seq_len + 1 = "
    f"{config.seq_len + 1} tokens, fewer than one batch of batch_size = {config.batch_size}; "
    "use a smaller seq_len or batch_size, a different val_fraction, or more text"
  )


def build_pipeline(
  config: DataConfig,
  hash_fn: HashFn | None = None,
  *,
  tokens: np.ndarray | None = None,
  cache_dir: corpus.PathLike | None = None,
) -> Pipeline:
  """Builds the training and validation datasets.

  Args:
    config: what to read and how to batch it.
    hash_fn: tokens int64 [B, T] (raw ids) -> {layer_id: hash ids [B, T, H]}, integers that fit
      int32; e.g. tokenizer compression composed with `NgramHasher.hash_all`. It runs in grain's
      reader threads, so it must be thread-safe. None: no hash ids (`hash_ids` is {}).
    tokens: the already-encoded token stream, int [N] (e.g. from `encode_corpus`, to build
      several pipelines over one corpus); None: read and encode the configured corpus.
    cache_dir: passed to `encode_corpus` when `tokens` is None.

  Returns:
    The pipeline.

  Raises:
    ValueError: a split is too small for one batch, or a config / corpus problem.
  """
  tok = load_tokenizer(config.tokenizer_path())
  special = tokenizer_train.special_token_ids(tok)
  if tokens is None:
    tokens = encode_corpus(config, cache_dir, tokenizer=tok)
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 1:
    raise ValueError(f"tokens: expected a 1-D token stream [N], got shape {tokens.shape}")
  train_tokens, val_tokens = split_tokens(tokens, config.val_fraction)
  train_windows = Windows(train_tokens, config.seq_len)
  val_windows = Windows(val_tokens, config.seq_len)
  b = config.batch_size
  if len(train_windows) < b:
    raise _too_small("training", len(train_windows), train_tokens.size, config)
  if len(val_windows) < b:
    raise _too_small("validation", len(val_windows), val_tokens.size, config)

  make_batch = _MakeBatch(hash_fn)
  read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch)
  train = (
    grain.MapDataset.source(train_windows)
    .shuffle(seed=config.seed)
    .repeat(None)  # Reseeds the shuffle in every epoch.
    .batch(b, drop_remainder=True)  # [T + 1] x B -> [B, T + 1]; batches may span epochs.
    .map(make_batch)
    .to_iter_dataset(read)
  )
  val = grain.MapDataset.source(val_windows).batch(b, drop_remainder=True)
  if config.val_batches is not None:
    val = val[: config.val_batches]
  validation = val.map(make_batch).to_iter_dataset(read)
  logging.info(
    "data: %d tokens; %d training windows, %d validation batches of [%d, %d]",
    tokens.size,
    len(train_windows),
    len(val),
    b,
    config.seq_len,
  )
  return Pipeline(
    config=config,
    tokenizer=tok,
    special_ids=special,
    train=train,
    validation=validation,
    num_train_windows=len(train_windows),
    num_val_batches=len(val),
  )
