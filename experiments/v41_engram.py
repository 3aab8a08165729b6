"""Runs DeepSeek-V4.1's Engram layers from a checkpoint over a prompt, token by token.

python -m experiments.v41_engram --checkpoint=DIR --prompt="The capital of France is"
python -m experiments.v41_engram --checkpoint=tests/data/v41/engram.safetensors \\
    --config=tests/data/v41/config.json --tokenizer=tests/data/demo_vectors_tokenizer.json

--checkpoint is a safetensors file or a directory of shards (config.json and tokenizer.json are
looked up there unless given). For each token it prints the compressed id, every Engram layer's
row ids (offsets added: 2 x 24 at full size) and each residual stream's gate. Only the Engram
layers are run (the rest of the V4.1 backbone is out of scope): their input streams are the
token's row of the checkpoint's token embedding (`embed.weight`) copied to every stream when the
checkpoint has it, else seeded random streams, so the gates show the mechanism, not the values
of the full model. Exit codes: 0 done, 1 error, 2 usage.
"""

import pathlib
import sys

import numpy as np
from absl import app, flags, logging

from engram_jax.interop.safetensors import Checkpoint
from engram_jax.interop.v41 import V41Engram
from experiments import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A safetensors file or a shard directory.")
_CONFIG = flags.DEFINE_string("config", None, "config.json (default: next to the checkpoint).")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer", None, "tokenizer.json (default: next to the checkpoint)."
)
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Text to run.")
_CACHE = flags.DEFINE_float("cache_fraction", 0.01, "Share of the rows in the device cache.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random streams (no embedding tensor).")
EMBEDDING = "embed.weight"


def _beside(checkpoint: pathlib.Path, given: str | None, name: str) -> pathlib.Path:
  if given:
    return pathlib.Path(given)
  folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
  return folder / name


def input_streams(engram: V41Engram, checkpoint: Checkpoint, ids: np.ndarray, seed: int):
  """[1, T, hc, D] streams: the token embeddings on every stream, or seeded random ones; and
  which it was."""
  cfg = engram.config
  if EMBEDDING in checkpoint and checkpoint.info(EMBEDDING).shape[1:] == (cfg.dim,):
    rows = np.asarray(checkpoint.array(EMBEDDING)[ids[0]], np.float32)  # [T, D]
    return np.broadcast_to(rows[None, :, None, :], (1, ids.shape[1], cfg.hc_mult, cfg.dim)), (
      "token embeddings"
    )
  rng = np.random.default_rng(seed)
  return rng.standard_normal((1, ids.shape[1], cfg.hc_mult, cfg.dim)).astype(np.float32), (
    f"random streams (seed {seed})"
  )


def report(engram: V41Engram, checkpoint: Checkpoint, text: str, seed: int) -> list[str]:
  """One line per token: compressed id, every layer's row ids, every stream's gate."""
  ids = np.asarray([engram.tokenizer.encode(text).ids], np.int64)  # [1, T]
  hidden, source = input_streams(engram, checkpoint, ids, seed)
  hashes = engram.hash_ids(ids)
  gates = {layer: np.asarray(engram.gates(hidden, ids, layer))[0] for layer in hashes}
  lines = [f"{ids.shape[1]} tokens; Engram layers {list(hashes)}; input streams: {source}"]
  compressed = engram.compressor(ids)[0]
  for t in range(ids.shape[1]):
    piece = engram.tokenizer.id_to_token(int(ids[0, t]))
    lines.append(f"[{t}] token {int(ids[0, t])} {piece!r} -> compressed {int(compressed[t])}")
    for layer, per_head in hashes.items():
      rows = np.asarray(engram.layouts[layer].row_ids(per_head[0, t]))
      gate = " ".join(f"{g:.3f}" for g in gates[layer][t])
      lines.append(f"    layer {layer}: rows {rows.tolist()}  gates {gate}")
  return lines


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not _CHECKPOINT.value:
    raise app.UsageError("--checkpoint: expected a safetensors file or a shard directory")
  try:
    path = pathlib.Path(_CHECKPOINT.value)
    engram = V41Engram.from_checkpoint(
      _beside(path, _CONFIG.value, "config.json"),
      path,
      _beside(path, _TOKENIZER.value, "tokenizer.json"),
      cache_fraction=_CACHE.value,
    )
    lines = report(engram, Checkpoint.open(path), _PROMPT.value, _SEED.value)
  except Exception as e:  # one line; the traceback goes to a log file
    sys.exit(cli.report("v41_engram", e, None))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("v41_engram"))
