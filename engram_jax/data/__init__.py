"""Training data: the embedded corpus, tokenizer training, and the grain batch pipeline."""

from engram_jax.data.corpus import (
  default_corpus_path,
  default_tokenizer_path,
  read_corpus,
  read_documents,
  read_text,
  split_documents,
)
from engram_jax.data.pipeline import (
  DataConfig,
  HashFn,
  Pipeline,
  build_pipeline,
  encode_corpus,
  encode_documents,
  split_tokens,
)
from engram_jax.data.tokenizer_train import (
  BOS_TOKEN,
  EOS_TOKEN,
  PAD_TOKEN,
  SPECIAL_TOKENS,
  SpecialTokenIds,
  special_token_ids,
  train_tokenizer,
  train_tokenizer_on_documents,
)

__all__ = [
  "BOS_TOKEN",
  "EOS_TOKEN",
  "PAD_TOKEN",
  "SPECIAL_TOKENS",
  "DataConfig",
  "HashFn",
  "Pipeline",
  "SpecialTokenIds",
  "build_pipeline",
  "default_corpus_path",
  "default_tokenizer_path",
  "encode_corpus",
  "encode_documents",
  "read_corpus",
  "read_documents",
  "read_text",
  "special_token_ids",
  "split_documents",
  "split_tokens",
  "train_tokenizer",
  "train_tokenizer_on_documents",
]
