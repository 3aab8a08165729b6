"""Ahead-of-time memory check: compile a config's full train step for its mesh without
allocating the model, and read what each device would hold.

Everything is abstract: the state's shapes and shardings come from `jax.eval_shape` of the
init (`Trainer.abstract_state`), the batch is a shape struct, and `jit(...).lower(...)
.compile()` partitions the step for the mesh; the compiled executable's memory analysis gives
the bytes of one device (arguments, outputs, temporaries). On CPU with simulated devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`) this checks a config for N accelerators
without them; the figures are XLA:CPU's (a GPU's compiler fuses and schedules differently).

The Engram tables' layouts come from the config alone (`hashing.table_sizes_for_layers`: the
same prime sizes a tokenizer-built hasher gives), so no tokenizer or corpus is read.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from engram_jax import sharding as sharding_lib
from engram_jax.config import ExperimentConfig
from engram_jax.hashing import table_sizes_for_layers
from engram_jax.memory import backends as backend_lib
from engram_jax.memory.table import TableLayout
from engram_jax.train.step import Trainer


def layouts_of(exp: ExperimentConfig) -> dict[int, TableLayout]:
  """{layer: TableLayout} of the config's Engram layers (empty without Engram)."""
  e = exp.model.engram
  if e is None:
    return {}
  sizes = table_sizes_for_layers(e.table_bases, e.heads_per_ngram, e.layer_ids)
  return {
    layer: TableLayout(tuple(s), e.head_dim, exp.model.engram_init_std)
    for layer, s in sizes.items()
  }


def _nbytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _replicated(x) -> bool:
  s = x.sharding
  if not isinstance(s, NamedSharding):
    return True
  return all(d is None for d in s.spec) or math.prod(s.mesh.shape.values()) == 1


def memory_report(exp: ExperimentConfig) -> dict:
  """Compiles `exp`'s train step for its mesh (abstractly) and reports memory.

  Returns:
    {"preset", "devices", "mesh" {axis: size}, "batch_size", "seq_len", "memory",
    "state_bytes_total" (params + optimizer state + tables), "bytes_per_device" {"arguments",
    "outputs", "temp", "total"}, "largest_replicated_bytes", "largest_replicated"} (the largest
    array of the state that is not split, and its path).

  Raises:
    ValueError: a mesh with more devices than jax sees.
  """
  mesh = sharding_lib.make_mesh(exp.mesh)
  backend = backend_lib.backend(exp.memory, mesh, table_axes=exp.mesh.table_axes)
  trainer = Trainer(exp.model, exp.optim, exp.train.steps, layouts_of(exp), backend, exp.mesh.rules)
  b, t = exp.train.batch_size, exp.train.seq_len
  state = trainer.abstract_state(b, t)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
    jax.eval_shape(lambda: trainer.dummy_batch(b, t)),
  )
  step = jax.jit(trainer.train_step, donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  analysis = compiled.memory_analysis()
  per_device = {
    "arguments": int(analysis.argument_size_in_bytes),
    "outputs": int(analysis.output_size_in_bytes),
    "temp": int(analysis.temp_size_in_bytes),
  }
  # Donated arguments alias their outputs: count those bytes once.
  aliased = int(getattr(analysis, "alias_size_in_bytes", 0))
  per_device["total"] = (
    per_device["arguments"] + per_device["outputs"] + per_device["temp"] - aliased
  )
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  replicated = [(jax.tree_util.keystr(p), _nbytes(x)) for p, x in leaves if _replicated(x)]
  largest = max(replicated, key=lambda r: r[1], default=("", 0))
  return {
    "preset": exp.name,
    "devices": exp.mesh.devices,
    "mesh": exp.mesh.shape,
    "batch_size": b,
    "seq_len": t,
    "memory": exp.memory.kind,
    "scan_layers": exp.model.scan_layers,
    "remat": exp.model.remat,
    "moe_dispatch": exp.model.moe.dispatch if exp.model.moe is not None else None,
    "state_bytes_total": int(sum(_nbytes(x) for _, x in leaves)),
    "bytes_per_device": per_device,
    "largest_replicated_bytes": int(largest[1]),
    "largest_replicated": largest[0],
    "platform": jax.devices()[0].platform,
    "jax": jax.__version__,
    "params_split": sum(not _replicated(x) for x in jax.tree.leaves(state.params)),
  }
