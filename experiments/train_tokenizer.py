"""Trains a byte-level BPE tokenizer on text files and writes its tokenizer.json.

  python -m experiments.train_tokenizer --output=data/tokenizer.json
  python -m experiments.train_tokenizer --input=a.txt,b.txt.xz --input=c.txt.gz \
      --vocab_size=16384 --output=runs/tok/tokenizer.json

Without --input the embedded default corpus is used (that is how data/tokenizer.json was made).
"""

import time

from absl import app, flags, logging

from engram_jax.data import corpus, tokenizer_train

_INPUT = flags.DEFINE_multi_string(
  "input",
  [],
  "Text file(s): .txt, .txt.gz or .txt.xz; repeatable, or a comma list. "
  "Default: the embedded corpus.",
)
_VOCAB_SIZE = flags.DEFINE_integer(
  "vocab_size", tokenizer_train.DEFAULT_VOCAB_SIZE, "Vocabulary size, special tokens included."
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the tokenizer.json (required).")
_MIN_FREQUENCY = flags.DEFINE_integer("min_frequency", 2, "Least count of a pair to merge it.")


def main(argv):
  del argv
  files = [p for arg in _INPUT.value for p in arg.split(",") if p]
  files = files or [corpus.default_corpus_path()]
  start = time.perf_counter()
  tok = tokenizer_train.train_tokenizer(
    files, _VOCAB_SIZE.value, _OUTPUT.value, min_frequency=_MIN_FREQUENCY.value
  )
  logging.info(
    "%d ids in %.1f s -> %s", tok.get_vocab_size(), time.perf_counter() - start, _OUTPUT.value
  )


if __name__ == "__main__":
  # Required only when run as a script, so importing this module (tests) adds no required flag.
  flags.mark_flag_as_required("output")
  app.run(main)
