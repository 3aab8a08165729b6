"""The training state and the pure, jitted train and eval steps.

One step: rows are fetched from each Engram layer's table with the hash ids that came with the
batch -> forward -> cross-entropy -> gradients w.r.t. the backbone parameters (optax: Muon +
AdamW) and w.r.t. the fetched rows (sparse lazy Adam on the touched rows only) -> the MoE
balancing biases move against the measured expert load (auxiliary-loss-free balancing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from engram_jax.config import ModelConfig, OptimConfig
from engram_jax.layers.moe import update_expert_bias
from engram_jax.memory import device
from engram_jax.memory.table import TableLayout
from engram_jax.model import EngramLM
from engram_jax.train import optimizer as opt_lib

Batch = dict  # {"tokens": [B, T], "targets": [B, T], "hash_ids": {layer: [B, T, H]}}


def table_key(layer: int) -> str:
  """The key of an Engram layer's table in the state (strings keep checkpoints readable)."""
  return f"layer_{layer}"


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the backbone's parameters (unboxed).
    opt_state: the backbone optimizer's state.
    balance: the MoE balancing biases (the "balance" collection).
    tables: {table_key(layer): [R, Dh]} Engram tables.
    table_opt: {table_key(layer): TableOptState} their sparse Adam moments.
  """

  step: jax.Array
  params: dict
  opt_state: optax.OptState
  balance: dict
  tables: dict
  table_opt: dict


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The model, its tables' layouts and optimizers, with the functions built from them.

  Attributes:
    model_cfg: the model.
    optim_cfg: the optimizers.
    total_steps: length of training (the schedules depend on it).
    layouts: {layer: TableLayout} of every Engram layer.
  """

  model_cfg: ModelConfig
  optim_cfg: OptimConfig
  total_steps: int
  layouts: dict[int, TableLayout]

  @property
  def model(self) -> EngramLM:
    return EngramLM(self.model_cfg)

  def dummy_batch(self, batch_size: int, seq_len: int) -> Batch:
    """A zero batch of the right shapes (for initialisation and shape inference)."""
    b, t = batch_size, seq_len
    return {
        "tokens": jnp.zeros((b, t), jnp.int32),
        "targets": jnp.zeros((b, t), jnp.int32),
        "hash_ids": {layer: jnp.zeros((b, t, lay.num_heads), jnp.int32)
                     for layer, lay in self.layouts.items()},
    }

  def _backbone_tx(self, params) -> optax.GradientTransformation:
    return opt_lib.backbone_optimizer(self.optim_cfg, self.total_steps, params)

  def init(self, key: jax.Array, batch_size: int, seq_len: int) -> TrainState:
    """A fresh state (jit it, or run it under `jax.eval_shape` to get shapes only)."""
    k_model, k_tables = jax.random.split(key)
    batch = self.dummy_batch(batch_size, seq_len)
    rows = self.fetch_rows({table_key(layer): jnp.zeros((lay.num_rows, lay.dim))
                            for layer, lay in self.layouts.items()}, batch["hash_ids"])
    variables = nn.unbox(self.model.init(k_model, batch["tokens"], rows))
    params = variables["params"]
    tables, table_opt = {}, {}
    for i, (layer, layout) in enumerate(sorted(self.layouts.items())):
      table = layout.init(jax.random.fold_in(k_tables, i))
      tables[table_key(layer)] = table
      table_opt[table_key(layer)] = opt_lib.init_table_state(table)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self._backbone_tx(params).init(params),
        balance=variables.get("balance", {}),
        tables=tables,
        table_opt=table_opt,
    )

  def fetch_rows(self, tables: dict, hash_ids: dict) -> dict[int, jax.Array]:
    """{layer: [B, T, H, Dh]} rows of every Engram layer."""
    return {
        layer: device.fetch(layout, tables[table_key(layer)], hash_ids[layer])
        for layer, layout in self.layouts.items()
    }

  def _forward(self, params, balance, rows, batch):
    (logits, load), state = self.model.apply(
        {"params": params, "balance": balance}, batch["tokens"], rows,
        mutable=["intermediates"],
    )
    # [B, T, V] with [B, T] targets -> scalar
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    gates = jax.tree.leaves(state.get("intermediates", {}))
    gate = jnp.mean(jnp.stack([g.mean() for g in gates])) if gates else jnp.float32(0)
    return loss, (load, gate)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    """One optimizer step; pure (jit with `donate_argnums=0`)."""
    rows = self.fetch_rows(state.tables, batch["hash_ids"])
    grad_fn = jax.value_and_grad(self._forward, argnums=(0, 2), has_aux=True)
    (loss, (load, gate)), (g_params, g_rows) = grad_fn(
        state.params, state.balance, rows, batch
    )
    tx = self._backbone_tx(state.params)
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    lr = opt_lib.learning_rate_schedule(self.optim_cfg, self.total_steps)(state.step)
    table_lr = lr * self.optim_cfg.engram_lr_mult
    tables, table_opt = dict(state.tables), dict(state.table_opt)
    for layer, layout in self.layouts.items():
      key = table_key(layer)
      ids = layout.row_ids(batch["hash_ids"][layer]).reshape(-1)  # [B, T, H] -> [N]
      grads = g_rows[layer].reshape(-1, layout.dim)  # [B, T, H, Dh] -> [N, Dh]
      tables[key], table_opt[key] = opt_lib.sparse_adam_update(
          state.tables[key], state.table_opt[key], ids, grads, table_lr, self.optim_cfg
      )

    balance = self._rebalance(state.balance, load)
    metrics = {
        "loss": loss,
        "lr": lr,
        "grad_norm": optax.tree.norm(g_params),
        # Of the updated parameters: a checkpoint is written only while this stays finite.
        "param_norm": optax.tree.norm(params),
        "engram_gate": gate,
        # max load / mean load over experts, averaged over MoE layers: 1.0 is perfect balance.
        "max_load": (jnp.mean(jnp.max(load, axis=-1) * load.shape[-1])
                     if load.size else jnp.float32(1.0)),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, balance=balance,
        tables=tables, table_opt=table_opt,
    )
    return new_state, metrics

  def _rebalance(self, balance: dict, load: jax.Array) -> dict:
    if not balance or self.model_cfg.moe is None:
      return balance
    rate = self.model_cfg.moe.balance_rate
    moe_layers = [i for i in range(self.model_cfg.num_layers) if self.model_cfg.is_moe_layer(i)]
    new = jax.tree.map(lambda x: x, balance)
    for j, i in enumerate(moe_layers):
      block = new[f"block_{i}"]["moe"]
      block["expert_bias"] = update_expert_bias(block["expert_bias"], load[j], rate)
    return new

  def eval_step(self, state: TrainState, batch: Batch) -> dict:
    """Validation loss of one batch."""
    rows = self.fetch_rows(state.tables, batch["hash_ids"])
    loss, (_, gate) = self._forward(state.params, state.balance, rows, batch)
    return {"loss": loss, "engram_gate": gate}

  def jitted(self) -> tuple[Callable, Callable]:
    """(train_step with the state donated, eval_step), both jitted."""
    return jax.jit(self.train_step, donate_argnums=0), jax.jit(self.eval_step)
