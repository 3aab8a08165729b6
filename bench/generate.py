"""Generation speed: cached incremental decoding against re-running the whole sequence.

`Generator.generate` prefills the prompt once and then runs one token per step with the
attention keys/values and the Engram convolution state cached; the baseline,
`Generator.greedy_without_cache`, runs the full forward over the (padded) sequence for every
new token. Both use the same untrained model of the preset and its Engram tables in
the chosen memory backend, produce the same tokens (checked), and run interleaved in one
process; the script prints tokens/s of each and their ratio.

    python -m bench.generate [--preset cpu_small --new_tokens 96 --memory device]
"""

from __future__ import annotations

from absl import app, flags

from bench.common import best_times
from engram_jax.infer import Generator

_PRESET = flags.DEFINE_string("preset", "cpu_small", "A preset (untrained weights).")
_MEMORY = flags.DEFINE_string("memory", "device", "Memory backend of the Engram tables.")
_PROMPT = flags.DEFINE_string(
  "prompt", "In the beginning God created the heaven and the earth.", "The prompt."
)
_NEW = flags.DEFINE_integer("new_tokens", 96, "Tokens generated per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls of each method.")


def measure(preset: str, memory: str, prompt: str, new_tokens: int, repeats: int) -> dict:
  """Times both methods (interleaved, best of `repeats`, after warm-up calls)."""
  gen = Generator.untrained(preset, memory)
  methods = {
    "cached": lambda: gen.generate(prompt, new_tokens),
    "full_forward": lambda: gen.greedy_without_cache(prompt, new_tokens),
  }
  # Warm-up (compiles every shape used) and the check that both give the same tokens.
  cached_text = methods["cached"]()
  reference = methods["full_forward"]()
  full_text, produced = gen.tokenizer.decode(reference), len(reference)
  if cached_text != full_text:
    raise AssertionError(f"the methods disagree: {cached_text!r} vs {full_text!r}")
  best = best_times(methods, repeats)
  return {
    "prompt_tokens": len(gen.tokenizer.encode(prompt).ids),
    "new_tokens": new_tokens,
    "produced_tokens": produced,
    "cached_tok_s": produced / best["cached"],
    "full_forward_tok_s": produced / best["full_forward"],
    "speedup": best["full_forward"] / best["cached"],
  }


def main(argv):
  del argv
  r = measure(_PRESET.value, _MEMORY.value, _PROMPT.value, _NEW.value, _REPEATS.value)
  print(
    f"preset {_PRESET.value}, memory {_MEMORY.value}: prompt {r['prompt_tokens']} tokens, "
    f"{r['produced_tokens']} new tokens per call, same text from both methods"
  )
  print(f"full forward per token: {r['full_forward_tok_s']:9.1f} tokens/s")
  print(f"cached decoding:        {r['cached_tok_s']:9.1f} tokens/s")
  print(f"speedup:                {r['speedup']:9.2f}x (best of {_REPEATS.value}, interleaved)")


if __name__ == "__main__":
  app.run(main)
