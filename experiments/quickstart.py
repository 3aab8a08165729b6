"""Quickstart: hash a sentence and run an Engram layer on it (`make demo`).

python -m experiments.quickstart [--text "..."] [--tokenizer data/tokenizer.json]
"""

from absl import app, flags

from engram_jax.data import default_tokenizer_path
from engram_jax.quickstart import EXAMPLE, explain, format_rows

_TEXT = flags.DEFINE_string("text", EXAMPLE, "Sentence to hash.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: the embedded one).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the table, layer and hidden states.")


def main(argv):
  del argv
  rows = explain(_TEXT.value, _TOKENIZER.value or default_tokenizer_path(), seed=_SEED.value)
  print(format_rows(rows))


if __name__ == "__main__":
  app.run(main)
