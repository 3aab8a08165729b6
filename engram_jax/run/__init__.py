"""A run's folder and checkpoints, and loading a trained run for serving.

- `folder`: the run's identity (`run.json`), the rules that keep a run from being overwritten,
  the metrics log;
- `checkpoint`: orbax checkpoints with per-leaf checksums, verified on restore;
- `checksums`: sharding-independent checksums of host bytes;
- `load_run(workdir)`: what serving needs of a run, without the training code: the model
  config and Engram hashing from the run's record, and the newest good checkpoint's params,
  balancing biases and tables (a partial restore: no optimizer state, no corpus).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from engram_jax import presets
from engram_jax.config import ExperimentConfig, ModelConfig, experiment_from_dict
from engram_jax.data import default_tokenizer_path
from engram_jax.data.tokenizer_train import SpecialTokenIds, special_token_ids
from engram_jax.hashing import EngramHashing
from engram_jax.memory.backends import padded_rows, table_key
from engram_jax.memory.base import TableState
from engram_jax.model import EngramLM, unstack_blocks
from engram_jax.run import folder
from engram_jax.run.checkpoint import Checkpointer
from engram_jax.tokenization import load_tokenizer


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A trained run, ready to serve.

  Attributes:
    workdir: the run's folder (None for an untrained model).
    experiment: its experiment config (the model's vocabulary is the tokenizer's).
    tokenizer: its tokenizer.
    special_ids: the tokenizer's pad / bos / eos ids.
    hashing: its Engram wiring (compressor, hasher, layouts), or None without Engram.
    step: the checkpoint's step.
    params: the backbone's parameters.
    balance: the MoE balancing biases.
    tables: {layer: [R, Dh] NumPy rows} of every Engram layer (padding rows dropped).
  """

  workdir: Path | None
  experiment: ExperimentConfig
  tokenizer: tokenizers.Tokenizer
  special_ids: SpecialTokenIds
  hashing: EngramHashing | None
  step: int
  params: dict
  balance: dict
  tables: dict[int, np.ndarray]

  @property
  def model_cfg(self) -> ModelConfig:
    return self.experiment.model


def _recorded_file(entry: dict, what: str, flag: str) -> str:
  """The path of a file recorded in run.json, which must still exist."""
  path = entry["path"]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the run's {what} {path} is missing; pass it with {flag}")
  return path


def abstract_model(model_cfg: ModelConfig, hashing: EngramHashing | None) -> dict:
  """Shapes of what serving restores: {"params", "balance", "tables": {key: TableState(table
  [Rp, Dh], None)}} (no optimizer state), on the first device."""
  layouts = hashing.layouts if hashing is not None else {}
  tokens = jnp.zeros((1, 1), jnp.int32)
  rows = {
    layer: jnp.zeros((1, 1, lay.num_heads, lay.dim)) for layer, lay in layouts.items()
  }  # [B, T, H, Dh]
  shapes = jax.eval_shape(
    lambda: nn.unbox(EngramLM(model_cfg).init(jax.random.key(0), tokens, rows))
  )
  tables = {
    table_key(layer): TableState(
      jax.ShapeDtypeStruct((padded_rows(lay.num_rows), lay.dim), jnp.float32), None
    )
    for layer, lay in layouts.items()
  }
  tree = {"params": shapes["params"], "balance": shapes.get("balance", {}), "tables": tables}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), tree)


def load_run(
  workdir: str | os.PathLike, *, preset: str | None = None, tokenizer_file: str | None = None
) -> LoadedRun:
  """Loads what serving needs of a trained run (see the module docstring).

  The model and tokenizer are the run's, from its `run.json`; `preset` and `tokenizer_file`
  override them (a run of an older version, without run.json, needs its preset, and its
  tokenizer unless it used the embedded one). Checkpoints are verified as in training but never
  moved: a corrupt step is skipped.

  Raises:
    FileNotFoundError: no checkpoint in `workdir`, or a recorded file is missing.
    ValueError: no run.json and no preset; a tokenizer whose vocabulary is not the run's.
    CheckpointMismatch, NoGoodCheckpoint: see `Checkpointer.restore_latest`.
  """
  workdir = Path(workdir)
  ckpt_dir = workdir / folder.CHECKPOINTS
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train a run there first")
  record = folder.read_run(workdir)
  if preset is not None:
    exp = presets.get(preset)
  elif record is not None:
    exp = experiment_from_dict(record["config"])
  else:
    raise ValueError(f"{workdir} has no {folder.RUN_FILE} (an older run): pass its --preset")
  if tokenizer_file is None:
    tokenizer_file = (
      _recorded_file(record["tokenizer"], "tokenizer", "--tokenizer")
      if record is not None
      else str(default_tokenizer_path())
    )
  tokenizer = load_tokenizer(tokenizer_file)
  vocab = tokenizer.get_vocab_size()
  if record is not None and vocab != record["config"]["model"]["vocab_size"]:
    raise ValueError(
      f"tokenizer {tokenizer_file} has {vocab} ids; the run in {workdir} was trained with a "
      f"vocabulary of {record['config']['model']['vocab_size']} (its tokenizer: "
      f"{record['tokenizer']['path']}); pass that tokenizer with --tokenizer"
    )
  model_cfg = dataclasses.replace(exp.model, vocab_size=vocab)
  exp = dataclasses.replace(exp, model=model_cfg)
  hashing = None
  if model_cfg.engram is not None:
    hashing = EngramHashing.from_tokenizer(
      model_cfg.engram, tokenizer, init_std=model_cfg.engram_init_std
    )
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  try:
    restored = ckpt.restore_latest(abstract_model(model_cfg, hashing), partial=True)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train a run there first")
  step, tree, _, _ = restored
  tables = {
    layer: np.asarray(tree["tables"][table_key(layer)].table)[: lay.num_rows]
    for layer, lay in (hashing.layouts if hashing is not None else {}).items()
  }
  # Serving decodes with unscanned blocks: a run trained with scan_layers is unstacked.
  params, balance = unstack_blocks((tree["params"], tree["balance"]), model_cfg)
  exp = dataclasses.replace(exp, model=dataclasses.replace(model_cfg, scan_layers=False))
  return LoadedRun(
    workdir=workdir,
    experiment=exp,
    tokenizer=tokenizer,
    special_ids=special_token_ids(tokenizer),
    hashing=hashing,
    step=step,
    params=params,
    balance=balance,
    tables=tables,
  )
