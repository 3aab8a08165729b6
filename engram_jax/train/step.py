"""The training state and the pure, jitted train and eval steps.

One step: rows are fetched from each Engram layer's table with the hash ids that came with the
batch -> forward -> cross-entropy -> gradients w.r.t. the backbone parameters (optax: Muon +
AdamW) and w.r.t. the fetched rows (sparse lazy Adam on the touched rows only) -> the MoE
balancing biases move against the measured expert load (auxiliary-loss-free balancing).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from engram_jax import model as model_lib
from engram_jax import sharding as sharding_lib
from engram_jax.config import LOGICAL_RULES, MemoryConfig, ModelConfig, OptimConfig
from engram_jax.layers.moe import update_expert_bias
from engram_jax.memory import backends as backend_lib
from engram_jax.memory.backends import table_key
from engram_jax.memory.table import TableLayout
from engram_jax.model import EngramLM
from engram_jax.train import optimizer as opt_lib

Batch = dict  # {"tokens": [B, T], "targets": [B, T], "hash_ids": {layer: [B, T, H]}}


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the backbone's parameters (unboxed).
    opt_state: the backbone optimizer's state.
    balance: the MoE balancing biases (the "balance" collection).
    tables: {table_key(layer): the state of the trainer's memory backend} the Engram tables,
      their sparse Adam moments and whatever the backend derives from them (a tiered cache).
  """

  step: jax.Array
  params: dict
  opt_state: optax.OptState
  balance: dict
  tables: dict


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The model, its tables' layouts and optimizers, with the functions built from them.

  Attributes:
    model_cfg: the model.
    optim_cfg: the optimizers.
    total_steps: length of training (the schedules depend on it).
    layouts: {layer: TableLayout} of every Engram layer.
    backend: where the tables live and how they are read (`memory.backend`), on its mesh
      (the mesh of the whole state).
    rules: logical axis name -> mesh axes (`MeshConfig.rules`): how the parameters and the
      optimizer state split over the mesh.
  """

  model_cfg: ModelConfig
  optim_cfg: OptimConfig
  total_steps: int
  layouts: dict[int, TableLayout]
  backend: backend_lib.Backend = dataclasses.field(
    default_factory=lambda: backend_lib.backend(MemoryConfig())
  )
  rules: tuple[str, ...] = LOGICAL_RULES

  @property
  def model(self) -> EngramLM:
    return EngramLM(self.model_cfg)

  def dummy_batch(self, batch_size: int, seq_len: int) -> Batch:
    """A zero batch of the right shapes (for initialisation and shape inference)."""
    b, t = batch_size, seq_len
    return {
      "tokens": jnp.zeros((b, t), jnp.int32),
      "targets": jnp.zeros((b, t), jnp.int32),
      "hash_ids": {
        layer: jnp.zeros((b, t, lay.num_heads), jnp.int32) for layer, lay in self.layouts.items()
      },
    }

  def _backbone_tx(self, params) -> optax.GradientTransformation:
    return opt_lib.backbone_optimizer(self.optim_cfg, self.total_steps, params)

  def init(self, key: jax.Array, batch_size: int, seq_len: int) -> TrainState:
    """A fresh, unplaced state (jit it, or run it under `jax.eval_shape` for shapes only);
    `place` then moves it where the shardings say."""
    k_model, k_tables = jax.random.split(key)
    batch = self.dummy_batch(batch_size, seq_len)
    rows = {
      layer: jnp.zeros((batch_size, seq_len, lay.num_heads, lay.dim))
      for layer, lay in self.layouts.items()
    }
    # Initialised unscanned, then stacked: the same values with or without `scan_layers`.
    unscanned = EngramLM(dataclasses.replace(self.model_cfg, scan_layers=False))
    variables = nn.unbox(unscanned.init(k_model, batch["tokens"], rows))
    variables = model_lib.stack_blocks(variables, self.model_cfg)
    params = variables["params"]
    tables = {
      table_key(layer): self.backend.init(layout.init(jax.random.fold_in(k_tables, i)))
      for i, (layer, layout) in enumerate(sorted(self.layouts.items()))
    }
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self._backbone_tx(params).init(params),
      balance=variables.get("balance", {}),
      tables=tables,
    )

  def logical_names(self) -> dict:
    """{"params": ..., "balance": ...}: each variable's logical axis names (a PartitionSpec
    of names, as the layers declare them; empty for an unnamed leaf)."""
    return _logical_names(self.model_cfg, tuple(sorted(self.layouts.items())))

  def shardings(self, state: TrainState) -> TrainState:
    """Where every leaf of `state` goes: the tables by the backend; the parameters by their
    logical names through `rules`, each optimizer moment like its parameter; the rest
    replicated (everything, without a mesh)."""
    mesh = self.backend.mesh
    rep = sharding_lib.replicated(mesh)
    out = jax.tree.map(lambda _: rep, state.replace(tables={}))
    if mesh is not None:
      params = sharding_lib.logical_shardings(
        self.logical_names()["params"], state.params, mesh, self.rules
      )
      opt_state = sharding_lib.follow_params(state.opt_state, state.params, params, mesh)
      out = out.replace(params=params, opt_state=opt_state)
    return out.replace(tables={k: self.backend.shardings(v) for k, v in state.tables.items()})

  def create_state(self, key: jax.Array, batch_size: int, seq_len: int) -> TrainState:
    """A fresh state, placed. On a mesh it is built in its shardings (`jit` with
    `out_shardings` from the abstract state): no device ever holds the whole state."""
    init = lambda k: self.init(k, batch_size, seq_len)
    if self.backend.mesh is None:
      return self.place(jax.jit(init)(key))
    abstract = self.abstract_state(batch_size, seq_len)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return self.place(jax.jit(init, out_shardings=shardings)(key))

  def place(self, state: TrainState) -> TrainState:
    """Moves a state (fresh or restored) to its shardings."""
    placed = jax.tree.map(
      jax.device_put, state.replace(tables={}), self.shardings(state.replace(tables={}))
    )
    return placed.replace(tables={k: self.backend.place(v) for k, v in state.tables.items()})

  def abstract_state(self, batch_size: int, seq_len: int) -> TrainState:
    """Shapes, dtypes and target shardings of the state, without allocating it."""
    shapes = jax.eval_shape(lambda k: self.init(k, batch_size, seq_len), jax.random.key(0))
    return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes,
      self.shardings(shapes),
    )

  def checkpoint_tree(self, state: TrainState) -> dict:
    """What a checkpoint holds of a state (the same for every memory backend): the step,
    params, optimizer state, balancing biases and each table with its moments."""
    return {
      "step": state.step,
      "params": state.params,
      "opt_state": state.opt_state,
      "balance": state.balance,
      "tables": {k: self.backend.persistent(v) for k, v in state.tables.items()},
    }

  def from_checkpoint_tree(self, tree: dict) -> TrainState:
    """A state from `checkpoint_tree`'s form (what the backend derives, e.g. a tiered cache,
    is empty until `calibrate`)."""
    tables = {k: self.backend.from_persistent(v) for k, v in tree["tables"].items()}
    return TrainState(**(tree | {"tables": tables}))

  def shard_batch(self, batch: Batch) -> Batch:
    """Puts a host batch on the devices, split over the data axis when there is a mesh."""
    return jax.device_put(batch, sharding_lib.batch_sharding(self.backend.mesh))

  def calibrate(self, state: TrainState, batches) -> TrainState:
    """Lets the backend derive what it keeps from the tables (a tiered cache) from the row ids
    of host `batches`; `batches` is read (once) only if the backend needs it."""
    once = _ReadOnce(batches)
    tables = dict(state.tables)
    for layer, layout in self.layouts.items():
      ids = _RowIds(once, layer, layout)  # [B, T, H] flat row ids per batch
      tables[table_key(layer)] = self.backend.calibrate(state.tables[table_key(layer)], ids)
    return state.replace(tables=tables)

  def fetch_rows(self, state: TrainState, hash_ids: dict) -> dict[int, jax.Array]:
    """{layer: [B, T, H, Dh]} rows of every Engram layer."""
    return {
      layer: self.backend.lookup(state.tables[table_key(layer)], layout.row_ids(hash_ids[layer]))
      for layer, layout in self.layouts.items()
    }

  def _forward(self, params, balance, rows, batch):
    # On a mesh, the MoE layers split their experts over its expert axis.
    with sharding_lib.model_mesh(self.backend.mesh, self.rules):
      (logits, load), state = self.model.apply(
        {"params": params, "balance": balance},
        batch["tokens"],
        rows,
        mutable=["intermediates"],
      )
    # [B, T, V] with [B, T] targets -> scalar
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    gates = jax.tree.leaves(state.get("intermediates", {}))
    gate = jnp.mean(jnp.stack([g.mean() for g in gates])) if gates else jnp.float32(0)
    return loss, (load, gate)

  def gradients(self, state: TrainState, batch: Batch):
    """The forward and backward of a step (pure): ((loss, (load, gate)), (gradients w.r.t. the
    params, {layer: gradients w.r.t. the fetched rows [B, T, H, Dh]}))."""
    rows = self.fetch_rows(state, batch["hash_ids"])
    grad_fn = jax.value_and_grad(self._forward, argnums=(0, 2), has_aux=True)
    return grad_fn(state.params, state.balance, rows, batch)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    """One optimizer step; pure (jit with `donate_argnums=0`)."""
    (loss, (load, gate)), (g_params, g_rows) = self.gradients(state, batch)
    tx = self._backbone_tx(state.params)
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    lr = opt_lib.learning_rate_schedule(self.optim_cfg, self.total_steps)(state.step)
    table_lr = opt_lib.table_lr(self.optim_cfg, self.total_steps)(state.step)
    tables = dict(state.tables)
    for layer, layout in self.layouts.items():
      key = table_key(layer)
      tables[key] = self.backend.update(
        state.tables[key],
        layout.row_ids(batch["hash_ids"][layer]),
        g_rows[layer],
        table_lr,
        self.optim_cfg,
      )

    balance = self._rebalance(state.balance, load)
    if self.backend.mesh is not None:  # the new state keeps the shardings of the old
      target = self.shardings(state)
      params = jax.lax.with_sharding_constraint(params, target.params)
      opt_state = jax.lax.with_sharding_constraint(opt_state, target.opt_state)
    metrics = {
      "loss": loss,
      "lr": lr,
      "grad_norm": optax.tree.norm(g_params),
      # Of the updated parameters: a checkpoint is written only while this stays finite.
      "param_norm": optax.tree.norm(params),
      "engram_gate": gate,
      # max load / mean load over experts, averaged over MoE layers: 1.0 is perfect balance.
      "max_load": (
        jnp.mean(jnp.max(load, axis=-1) * load.shape[-1]) if load.size else jnp.float32(1.0)
      ),
    }
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      balance=balance,
      tables=tables,
    )
    return new_state, metrics

  def _rebalance(self, balance: dict, load: jax.Array) -> dict:
    if not balance or self.model_cfg.moe is None:
      return balance
    rate = self.model_cfg.moe.balance_rate
    moe_layers = [i for i in range(self.model_cfg.num_layers) if self.model_cfg.is_moe_layer(i)]
    new = model_lib.unstack_blocks(jax.tree.map(lambda x: x, balance), self.model_cfg)
    for j, i in enumerate(moe_layers):
      block = new[f"block_{i}"]["moe"]
      block["expert_bias"] = update_expert_bias(block["expert_bias"], load[j], rate)
    return model_lib.stack_blocks(new, self.model_cfg)

  def eval_step(self, state: TrainState, batch: Batch) -> dict:
    """Validation loss of one batch."""
    rows = self.fetch_rows(state, batch["hash_ids"])
    loss, (_, gate) = self._forward(state.params, state.balance, rows, batch)
    return {"loss": loss, "engram_gate": gate}

  def jitted(
    self, batch_size: int | None = None, seq_len: int | None = None
  ) -> tuple[Callable, Callable]:
    """(train_step with the state donated, eval_step), both jitted.

    On a mesh, given the batch shape, both are jitted with explicit shardings: the state in and
    out where `shardings` puts it, the batch split over (data, fsdp) and the metrics
    replicated, so a step never reshards its inputs or leaves its outputs where XLA chose.
    """
    mesh = self.backend.mesh
    if mesh is None or batch_size is None or seq_len is None:
      return jax.jit(self.train_step, donate_argnums=0), jax.jit(self.eval_step)
    state = self.shardings(
      jax.eval_shape(lambda k: self.init(k, batch_size, seq_len), jax.random.key(0))
    )
    batch, metrics = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
    train = jax.jit(
      self.train_step,
      in_shardings=(state, batch),
      out_shardings=(state, metrics),
      donate_argnums=0,
    )
    return train, jax.jit(self.eval_step, in_shardings=(state, batch), out_shardings=metrics)


@functools.lru_cache(maxsize=16)
def _logical_names(model_cfg: ModelConfig, layouts: tuple) -> dict:
  """The logical-name PartitionSpecs of a model's variables, from its abstract init."""
  t = 4
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
  rows = {
    layer: jax.ShapeDtypeStruct((1, t, lay.num_heads, lay.dim), jnp.float32)
    for layer, lay in layouts
  }
  boxed = jax.eval_shape(EngramLM(model_cfg).init, jax.random.key(0), tokens, rows)
  return nn.get_partition_spec(boxed)


class _ReadOnce:
  """An iterable that reads its source the first time it is iterated, and replays it after."""

  def __init__(self, source):
    self._source, self._items = source, None

  def __iter__(self):
    def replay():
      if self._items is None:
        self._items = list(self._source)
      yield from self._items

    return replay()


class _RowIds:
  """The flat row ids [B, T, H] of one layer in each batch of a `_ReadOnce` (lazily)."""

  def __init__(self, batches: _ReadOnce, layer: int, layout: TableLayout):
    self._batches, self._layer, self._layout = batches, layer, layout

  def __iter__(self):
    for b in self._batches:
      yield np.asarray(b["hash_ids"][self._layer]) + self._layout.offsets
