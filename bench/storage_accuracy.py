"""The accuracy cost of each row storage type (float32, bfloat16, int8 with a per-row scale, mxfp8).

Restores the newest checkpoint of a trained run, then evaluates its validation loss with the
Engram tables as trained, round-tripped through each storage type, and zeroed (a reference
point). The measurement is `bench.accuracy.storage_accuracy`.

    make train                             # writes runs/cpu_small/engram
    python -m bench.storage_accuracy
    python -m bench.storage_accuracy --workdir=runs/other/engram --preset=tiny
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from bench import accuracy
from engram_jax import presets
from engram_jax.memory import storage

_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/cpu_small/engram", "A trained run's folder (holding checkpoints/)."
)
_PRESET = flags.DEFINE_string(
  "preset", "cpu_small", f"The run's preset: {sorted(presets.PRESETS)}."
)
_STORAGES = flags.DEFINE_list("storages", list(storage.STORAGE_TYPES), "Storage types to measure.")
_CORPUS = flags.DEFINE_multi_string("corpus", [], "The run's text files (default: embedded).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The run's tokenizer.json (default: embedded).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  try:
    result = accuracy.storage_accuracy(
      _WORKDIR.value,
      _PRESET.value,
      tuple(_STORAGES.value),
      corpus_files=tuple(_CORPUS.value),
      tokenizer_file=_TOKENIZER.value,
    )
  except FileNotFoundError as e:
    sys.exit(f"{type(e).__name__}: {e}")
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(accuracy.format_table(result))


if __name__ == "__main__":
  app.run(main)
