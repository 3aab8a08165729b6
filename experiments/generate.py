"""Generates text from a trained run, with the Engram tables served by any memory backend.

python -m experiments.generate --workdir=runs/cpu_small/engram --prompt="And God said"
python -m experiments.generate --workdir=runs/cpu_small/engram --memory=tiered

The model and tokenizer are the run's (from its run.json); --tokenizer and --preset override
them. A tiered cache is calibrated from the prompt. Exit codes: 0 done, 1 error, 2 usage.
"""

import sys

from absl import app, flags, logging

from engram_jax import presets
from engram_jax.infer import Generator
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", "runs/cpu_small/engram", "A training run's folder.")
_PRESET = flags.DEFINE_string(
  "preset", None, f"The run's preset (default: from its run.json): {sorted(presets.PRESETS)}"
)
_TOKENIZER = flags.DEFINE_string(
  "tokenizer", None, "The run's tokenizer.json (default: the one recorded in its run.json)."
)
_PROMPT = flags.DEFINE_string("prompt", "And God said", "Text to continue.")
_TOKENS = flags.DEFINE_integer("max_new_tokens", 40, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; else sampling temperature.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
# 'sharded' serves from a mesh; generation here runs on one device.
_MEMORY = flags.DEFINE_enum(
  "memory", "host", ["device", "host", "tiered"], "Where the tables are served from."
)
_CACHE = flags.DEFINE_float("cache_fraction", 0.05, "Cache size of --memory=tiered.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  options = {"cache_fraction": _CACHE.value} if _MEMORY.value == "tiered" else {}
  try:
    gen = Generator.from_checkpoint(
      _WORKDIR.value,
      _PRESET.value,
      _MEMORY.value,
      tokenizer_file=_TOKENIZER.value,
      **options,
    )
    text = gen.generate(_PROMPT.value, _TOKENS.value, _TEMPERATURE.value, _SEED.value)
  except Exception as e:  # one line; the traceback goes to a log file
    sys.exit(cli.report("generate", e, None))
  print(_PROMPT.value + text)
  for layer, table in gen.tables.items():
    print(f"layer {layer} table ({_MEMORY.value}): {table.stats()}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("generate"))
