"""Optimizers: Muon + AdamW for the backbone; the tables' sparse Adam is `memory.optimizer`.

Paper Table 5 and DESIGN.md ("The table's optimizer"):
- backbone matrices (attention, FFN / expert, router, mHC and Engram projections): Muon;
- everything else in "params" (embedding, LM head, norms, biases, gains, conv kernels): AdamW,
  weight decay only on the matrices among them (the LM head);
- the tables: Adam on the rows a step actually read, at `table_lr` (5x the backbone's rate),
  no weight decay: `engram_jax.memory.optimizer.sparse_adam_update`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from engram_jax.config import OptimConfig
from engram_jax.model import SCANNED_PREFIX

MUON = "muon"
ADAMW = "adamw"

# Muon's update RMS is matched to AdamW's (Liu et al. 2025, "Muon is Scalable for LLM
# Training"), so one learning-rate schedule and one weight decay serve both optimizers.
_MUON_CONSISTENT_RMS = 0.2

# Matrices by parameter name -> (rank, reduction axes, output axes); any other axis is a batch
# axis that Muon orthogonalises independently. Names not listed here go to AdamW.
_MATRIX_AXES = {
  # Attention [D, Q, Da] / [D, G, Da]: one D x (heads * Da) projection.
  "w_q": (3, (0,), (1, 2)),
  "w_k": (3, (0,), (1, 2)),
  "w_v": (3, (0,), (1, 2)),
  # Attention output [Q, Da, D]: one (Q * Da) x D projection.
  "w_o": (3, (0, 1), (2,)),
  # Engram [Dm, M+1, D]: M key projections and one value projection fused into one array;
  # each is its own linear map, so axis 1 is a batch of M + 1 matrices Dm x D.
  "kv_kernel": (3, (0,), (2,)),
  # MoE router [D, E] and the mHC projection `proj/kernel` [M*D, 2M + M*M].
  "router": (2, (0,), (1,)),
  "kernel": (2, (0,), (1,)),
}
# SwiGLU weights: [D, F] / [F, D] in dense FFNs and shared experts, [E, D, F] / [E, F, D] for
# routed experts (a batch of E matrices): the last two axes are the matrix either way.
_SWIGLU = ("w_gate", "w_up", "w_down")
# AdamW matrices (weight decay on); the input embedding is a lookup table like the Engram
# tables and is not decayed.
_ADAMW_MATRICES = ("lm_head",)


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def _stacked(path) -> int:
  """1 for a parameter of scanned blocks (a leading "layers" axis, `model.scan_groups`), else 0."""
  keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return int(any(k.startswith(SCANNED_PREFIX) for k in keys))


def _matrix_dims(path, x) -> MuonDimensionNumbers | None:
  """Muon's view of one parameter as (a batch of) matrices, or None for a non-matrix. The
  layers axis of scanned blocks is one more batch axis: each layer's matrix is its own."""
  name = _leaf_name(path)
  if name in _SWIGLU and x.ndim >= 2:
    return MuonDimensionNumbers(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1)
  if name in _MATRIX_AXES:
    ndim, reduction, output = _MATRIX_AXES[name]
    shift = _stacked(path)
    if x.ndim == ndim + shift:
      return MuonDimensionNumbers(
        reduction_axis=tuple(a + shift for a in reduction),
        output_axis=tuple(a + shift for a in output),
      )
  return None


def param_labels(params, use_muon: bool = True):
  """Which optimizer each parameter gets: `MUON` for the matrices, `ADAMW` for the rest.

  Matrices (by name): attention `w_q`, `w_k`, `w_v`, `w_o`; FFN, shared and routed expert
  `w_gate`, `w_up`, `w_down`; the MoE `router`; mHC `proj/kernel`; Engram `kv_kernel`.
  AdamW: `embedding`, `lm_head`, norm scales, biases, mHC gains, Engram conv kernels.

  Args:
    params: the (unboxed) "params" pytree, arrays or shape structs.
    use_muon: False labels every parameter `ADAMW`.

  Returns:
    A pytree of the same structure with `MUON` / `ADAMW` leaves.
  """

  def label(path, x):
    return MUON if use_muon and _matrix_dims(path, x) is not None else ADAMW

  return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params):
  """True for the parameters that get weight decay: the matrices and the LM head.

  Not decayed: the input embedding, norm scales, biases, gains and conv kernels.
  """

  def decays(path, x):
    return _matrix_dims(path, x) is not None or _leaf_name(path) in _ADAMW_MATRICES

  return jax.tree_util.tree_map_with_path(decays, params)


def muon_dimension_numbers(params):
  """Muon's view of each matrix: `MuonDimensionNumbers` leaves, None for the non-matrices.

  Muon calls it on its share of the tree (the partition masks the other leaves out).
  """
  return jax.tree_util.tree_map_with_path(_matrix_dims, params)


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up, then constant, with DeepSeek's step decay.

  lr(s) = cfg.lr * min(1, s / warmup_steps) * decay_factor ** #{p in decay_points :
  s >= round(p * total_steps)}; with the defaults: x0.316 from 80% of training and again from
  90%.

  Args:
    cfg: the optimizer settings.
    total_steps: the length of training in steps.

  Returns:
    A schedule: step count -> float32 learning rate.
  """
  boundaries = sorted(round(p * total_steps) for p in cfg.decay_points)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    warm = jnp.minimum(step / cfg.warmup_steps, 1.0) if cfg.warmup_steps > 0 else 1.0
    decays = sum((step >= b).astype(jnp.float32) for b in boundaries)
    return cfg.lr * warm * jnp.float32(cfg.decay_factor) ** decays

  return schedule


def table_lr(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """The tables' schedule: the backbone's times `cfg.engram_lr_mult` (x5 in the paper)."""
  base = learning_rate_schedule(cfg, total_steps)
  return lambda count: base(count) * cfg.engram_lr_mult


def backbone_optimizer(cfg: OptimConfig, total_steps: int, params) -> optax.GradientTransformation:
  """Gradient clipping, then Muon for the matrices and AdamW for the rest.

  Args:
    cfg: the optimizer settings.
    total_steps: the length of training (the schedule depends on it).
    params: the (unboxed) "params" pytree (arrays or shape structs); only paths and ranks
      are read, to label the parameters.

  Returns:
    An optax transformation over `params`.
  """
  schedule = learning_rate_schedule(cfg, total_steps)
  adamw = optax.adamw(
    schedule,
    b1=cfg.adam_b1,
    b2=cfg.adam_b2,
    eps=cfg.adam_eps,
    weight_decay=cfg.weight_decay,
    mask=weight_decay_mask,
  )
  labels = param_labels(params, cfg.use_muon)
  transforms = {ADAMW: adamw}
  if MUON in jax.tree.leaves(labels):
    transforms[MUON] = optax.contrib.muon(
      lambda count: schedule(count) * cfg.muon_lr_scale,
      weight_decay=cfg.weight_decay,
      muon_weight_dimension_numbers=muon_dimension_numbers,
      consistent_rms=_MUON_CONSISTENT_RMS,
    )
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  return optax.chain(*parts, optax.partition(transforms, labels))
