"""DeepSeekMoE: shared experts plus fine-grained routed experts, auxiliary-loss-free balancing.

Routing follows DeepSeek-V3: token-to-expert affinities are sigmoids `s_i = sigmoid(u . e_i)`;
the top-k experts are chosen by `s_i + b_i`, where `b` is a per-expert balancing bias that only
steers the choice; the gates are the chosen `s_i` renormalised over the k chosen experts. The
bias is not trained by gradients: after each step the caller nudges it with
`update_expert_bias` against the measured load (overloaded experts down, idle ones up).

Dispatch never builds a [tokens x experts x capacity] one-hot and drops no token: the N*K
(token, expert) assignments are sorted by expert, the token rows gathered in that order, every
expert run on its rows, and the results un-sorted and summed per token with the gates. Two ways
to run the experts give the same outputs and gradients (to float rounding):

- 'ragged': `jax.lax.ragged_dot` on each expert's contiguous slice. GPUs and TPUs have grouped
  kernels for it; XLA:CPU lowers it densely, every row against every expert (E times the work).
- 'blocks' (`moe_blocks.py`): each expert's rows padded to whole blocks, batched matmuls over
  the blocks with each block's expert weights gathered ([NB, Bk, D] x [NB, D, F]).
  The padding is at most one block per expert, so the executed work stays within 1.25x of the
  routed work; the choice on CPU.

'auto' picks 'ragged' on GPU/TPU and 'blocks' elsewhere (`MoEConfig.dispatch`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from engram_jax import sharding
from engram_jax.config import MOE_DISPATCHES
from engram_jax.layers.ffn import FeedForward
from engram_jax.layers.moe_blocks import run_blocks


def update_expert_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Auxiliary-loss-free balancing step (DeepSeek-V3).

  Args:
    bias: [E] current balancing bias.
    load: [E] fraction of the assignments each expert received (as returned by `MoE`).
    rate: the bias update speed (gamma).

  Returns:
    [E] `bias + rate * sign(mean(load) - load)`: experts above the mean load are pushed down,
    experts below it pulled up.
  """
  return bias + rate * jnp.sign(jnp.mean(load) - load)


def route(
  scores: jax.Array, bias: jax.Array, top_k: int, routed_scaling: float
) -> tuple[jax.Array, jax.Array]:
  """Top-k selection by `scores + bias`, gates from `scores` alone.

  Args:
    scores: [N, E] sigmoid affinities (float32).
    bias: [E] balancing bias; only affects which experts are chosen.
    top_k: K, experts per token.
    routed_scaling: factor applied to the normalised gates.

  Returns:
    (gates [N, K] float32 summing to `routed_scaling` per token, expert ids [N, K] int32).
  """
  # [N, E] + [1, E] -> [N, E]; the bias carries no gradient (it is not a trained parameter).
  _, experts = jax.lax.top_k(scores + jax.lax.stop_gradient(bias)[None, :], top_k)
  # [N, E] -> [N, K]
  chosen = jnp.take_along_axis(scores, experts, axis=-1)
  gates = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * routed_scaling
  return gates, experts.astype(jnp.int32)


DISPATCHES = MOE_DISPATCHES


def resolve_dispatch(dispatch: str) -> str:
  """'ragged' or 'blocks' for a `MoEConfig.dispatch` name ('auto': by the default backend)."""
  if dispatch not in DISPATCHES:
    raise ValueError(f"dispatch: expected one of {DISPATCHES}, got {dispatch!r}")
  if dispatch == "auto":
    return "ragged" if jax.default_backend() in ("gpu", "tpu") else "blocks"
  return dispatch


def _expert_init(in_axis: int, out_axis: int):
  # Fan-in scaled per expert: axis 0 indexes experts and does not count towards the fan.
  return nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=(0,)
  )


class MoE(nn.Module):
  """DeepSeekMoE feed-forward layer.

  Params (logical axis names): `router` [D, E] ("embed", "expert"); `w_gate`, `w_up` [E, D, F]
  ("expert", "embed", "mlp"); `w_down` [E, F, D] ("expert", "mlp", "embed"); with
  `num_shared > 0`, a `shared` `FeedForward` of width `num_shared * expert_hidden` (the shared
  experts are always on and summed, which is one SwiGLU of the concatenated width).
  Collection "balance": `expert_bias` [E] ("expert",), zeros at init. The module only reads
  it: pass it with the params at apply time and update it outside the gradient step with
  `update_expert_bias` (on the unboxed value, `flax.linen.unbox`).

  Attributes:
    num_experts: E, routed experts.
    top_k: K, routed experts per token.
    expert_hidden: F, hidden width of one routed (and one shared) expert.
    num_shared: number of shared experts (0 for none).
    routed_scaling: factor on the routed gates (they sum to it per token).
    dtype: compute dtype of the experts; the router always runs in float32.
    param_dtype: dtype of the weights.
    dispatch: how the routed experts run: 'ragged', 'blocks' or 'auto' (see the module
      docstring).
    capacity_slack: expert parallelism's capacity factor (`MoEConfig.capacity_slack`).
    expert_exchange: 'all_to_all' or 'replicated' (`MoEConfig.expert_exchange`).
    block_gather_mib: the 'blocks' dispatch's gather budget (`MoEConfig.block_gather_mib`).
  """

  num_experts: int
  top_k: int
  expert_hidden: int
  num_shared: int = 1
  routed_scaling: float = 1.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  dispatch: str = "auto"
  capacity_slack: float = 2.0
  expert_exchange: str = "all_to_all"
  block_gather_mib: float = 256.0

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Routes every token to its top-k experts and adds the shared experts.

    Shapes: B batch, T sequence, N = B*T tokens, D model width, E experts, K top-k, F expert
    hidden width.

    Args:
      x: [B, T, D] inputs.

    Returns:
      (y [B, T, D] in `dtype`, load [E] float32: the fraction of the N*K assignments that went
      to each expert; it sums to 1).
    """
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
    b, t, d = x.shape
    e, k, f = self.num_experts, self.top_k, self.expert_hidden
    n = b * t

    router = self.param(
      "router",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "expert")),
      (d, e),
      self.param_dtype,
    )
    w_gate = self.param(
      "w_gate",
      nn.with_logical_partitioning(_expert_init(1, 2), ("expert", "embed", "mlp")),
      (e, d, f),
      self.param_dtype,
    )
    w_up = self.param(
      "w_up",
      nn.with_logical_partitioning(_expert_init(1, 2), ("expert", "embed", "mlp")),
      (e, d, f),
      self.param_dtype,
    )
    w_down = self.param(
      "w_down",
      nn.with_logical_partitioning(_expert_init(1, 2), ("expert", "mlp", "embed")),
      (e, f, d),
      self.param_dtype,
    )
    bias = self.variable(
      "balance",
      "expert_bias",
      nn.with_logical_partitioning(jnp.zeros, ("expert",)),
      (e,),
      jnp.float32,
    ).value

    parallel = _expert_mesh(e, b)
    if parallel is not None:
      y, counts = self._expert_parallel(x, router, w_gate, w_up, w_down, bias, *parallel)
      return self._add_shared(x, y), counts / (n * k)

    # [B, T, D] -> [N, D]
    tokens = x.reshape(n, d)
    # [N, D] x [D, E] -> [N, E]; routing decisions are made in float32.
    logits = jnp.einsum("nd,de->ne", tokens.astype(jnp.float32), router.astype(jnp.float32))
    gates, experts = route(jax.nn.sigmoid(logits), bias, k, self.routed_scaling)

    # [N, K] -> [N*K]: assignment a = token * K + slot.
    flat_experts = experts.reshape(n * k)
    group_sizes = jnp.bincount(flat_experts, length=e).astype(jnp.int32)
    # Stable sort keeps each expert's tokens in token order; `order` lists assignment ids.
    order = jnp.argsort(flat_experts, stable=True)
    # [N, D] -> [N*K, D]: token rows in expert order.
    sorted_tokens = tokens.astype(self.dtype)[order // k]
    routed = self._run_experts(sorted_tokens, w_gate, w_up, w_down, group_sizes)
    # Inverse permutation: position of each assignment in the sorted order.
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    # [N*K, D] -> [N, K, D]: back to assignment order.
    routed = routed[inverse].reshape(n, k, d)
    # [N, K, D] x [N, K] -> [N, D]: gate-weighted sum over each token's experts.
    y = jnp.einsum("nkd,nk->nd", routed.astype(jnp.float32), gates).astype(self.dtype)
    # [N, D] -> [B, T, D]
    y = y.reshape(b, t, d)
    load = group_sizes.astype(jnp.float32) / (n * k)
    return self._add_shared(x, y), load

  def _add_shared(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """y [B, T, D] plus the shared experts of x [B, T, D] (if any)."""
    if self.num_shared == 0:
      return y
    shared = FeedForward(
      hidden_dim=self.num_shared * self.expert_hidden,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="shared",
    )
    return y + shared(x)

  def _expert_parallel(self, x, router, w_gate, w_up, w_down, bias, mesh, specs):
    """The routed experts on a mesh, inside `shard_map`: split over the expert axes (if any),
    each device's tokens dispatched locally.

    Every device holds the tokens of its batch shard (the same on every device of its expert
    group) and E / EP experts; it routes its tokens (the router and biases are global), runs
    its own experts on the assignments they received, and the expert group sums the partial
    outputs (`psum`). Dropless: a device runs at most C = `capacity_slack` x (its even share of
    the N_loc * K assignments) rows, and one that received more runs all N_loc * K instead
    (`lax.cond`). The counts of every expert are summed over the whole batch.

    Returns:
      (y [B, T, D] in `dtype` without the shared experts, counts [E] float32 over the batch).
    """
    expert_axes, batch_axes, x_spec, w_spec = specs
    k = self.top_k
    ep = math.prod(mesh.shape[a] for a in expert_axes)

    def local(x, router, w_gate, w_up, w_down, bias):
      b, t, d = x.shape
      n, e_loc = b * t, w_gate.shape[0]
      tokens = x.reshape(n, d)  # [B_loc, T, D] -> [N_loc, D]
      me = 0
      if expert_axes:
        bias = jax.lax.all_gather(bias, expert_axes, tiled=True)  # [E / EP] -> [E]
        me = jax.lax.axis_index(expert_axes)
      # [N_loc, D] x [D, E] -> [N_loc, E] in float32, as in the one-device path
      logits = jnp.einsum("nd,de->ne", tokens.astype(jnp.float32), router.astype(jnp.float32))
      gates, experts = route(jax.nn.sigmoid(logits), bias, k, self.routed_scaling)
      mine = experts // e_loc == me  # [N_loc, K]
      # [N_loc, K] -> [N_loc*K]: this device's expert of each assignment, e_loc for others.
      key = jnp.where(mine, experts % e_loc, e_loc).reshape(n * k)
      sizes = jnp.bincount(key, length=e_loc + 1).astype(jnp.int32)  # [E_loc + 1]
      order = jnp.argsort(key, stable=True)  # this device's assignments first
      inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
      # A zero expert after the local ones takes the rows past this device's assignments.
      pad = lambda w: jnp.concatenate([w, jnp.zeros((1, *w.shape[1:]), w.dtype)])

      def run(rows: int):
        def go():
          group = sizes[:e_loc]
          extra = rows - jnp.sum(group)  # >= 0 on the path that runs
          out = self._run_experts(
            tokens.astype(self.dtype)[order[:rows] // k],  # [C, D]
            pad(w_gate),
            pad(w_up),
            pad(w_down),
            jnp.concatenate([group, extra[None]]),
          )  # [C, D]
          # [C, D] -> [N_loc*K, D]: each assignment's row; zero for other devices' experts
          picked = out[jnp.minimum(inverse, rows - 1)]
          return jnp.where(key[:, None] < e_loc, picked, 0).astype(self.dtype)

        return go

      def replicated():
        c = min(n * k, 8 * math.ceil(self.capacity_slack * n * k / ep / 8))
        overflow = jnp.sum(sizes[:e_loc]) > c
        routed = jax.lax.cond(overflow, run(n * k), run(c)) if c < n * k else run(n * k)()
        # [N_loc, K, D] x [N_loc, K] -> [N_loc, D], then summed over the expert group
        y = jnp.einsum("nkd,nk->nd", routed.reshape(n, k, d).astype(jnp.float32), gates)
        return jax.lax.psum(y, expert_axes) if expert_axes else y

      counts = sizes[:e_loc]
      if expert_axes and self.expert_exchange == "all_to_all" and n % ep == 0:
        weights = (pad(w_gate), pad(w_up), pad(w_down))
        y = self._exchange(tokens, gates, experts, weights, me, ep, expert_axes, replicated)
      else:
        y = replicated()
      if expert_axes:
        counts = jax.lax.all_gather(counts, expert_axes, tiled=True)  # [E / EP] -> [E]
      y = y.astype(self.dtype)
      if batch_axes:
        counts = jax.lax.psum(counts, batch_axes)
      return y.reshape(b, t, d), counts.astype(jnp.float32)

    w_in = P(*w_spec)  # [E, D, F] and [E, F, D]: split over the expert axes only
    mapped = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(x_spec, P(), w_in, w_in, w_in, P(w_spec[0])),
      out_specs=(x_spec, P()),
      # y is summed over the expert group and the counts over every split, so both are the
      # same on the devices out_specs say; the per-device cond hides that from the checker.
      check_vma=False,
    )
    return mapped(x, router, w_gate, w_up, w_down, bias)

  def _exchange(self, tokens, gates, experts, weights, me, ep, axes, replicated):
    """The expert group's tokens to their experts' devices and back, by `all_to_all`.

    The group's N_loc tokens (the same on each of its EP devices) are split: device `me` sends
    the A = N_loc / EP * K assignments of its slice, in one bucket of Cb rows per destination
    device (Cb = `capacity_slack` x A / EP), each row with its local expert; every device runs
    its experts on the EP * Cb rows it received and sends the outputs back; the group gathers
    the slices' outputs. If any device of the group has a bucket larger than Cb (`pmax`, so all
    agree), the group takes `replicated` instead: no assignment is dropped.

    Args:
      tokens: [N_loc, D] the group's tokens; gates, experts: [N_loc, K] their routing.
      weights: this device's (w_gate, w_up, w_down), each with a zero expert appended
        ([E_loc + 1, ...]: it takes the buckets' empty places).
      me: this device's index in the group; ep: EP; axes: the expert mesh axes.
      replicated: the fallback, () -> [N_loc, D] float32.

    Returns:
      [N_loc, D] float32: the routed experts' gate-weighted sum for every token of the group.
    """
    n, d = tokens.shape
    k = experts.shape[1]
    e_loc = weights[0].shape[0] - 1
    m = n // ep  # tokens of this device's slice
    a = m * k
    mine = lambda x: jax.lax.dynamic_slice_in_dim(x, me * m, m)  # [N_loc, ...] -> [m, ...]
    flat = mine(experts).reshape(a)  # [m, K] -> [A]
    owner, local = flat // e_loc, flat % e_loc  # destination device, its expert
    order = jnp.argsort(owner, stable=True)
    sizes = jnp.bincount(owner, length=ep)  # [EP]
    starts = jnp.cumsum(sizes) - sizes
    # Each assignment's place in its destination's bucket: [A].
    pos = (
      jnp.zeros((a,), jnp.int32)
      .at[order]
      .set((jnp.arange(a) - starts[owner[order]]).astype(jnp.int32))
    )
    cb = min(a, 8 * math.ceil(self.capacity_slack * a / ep / 8))
    overflow = jax.lax.pmax((jnp.max(sizes) > cb).astype(jnp.int32), axes) > 0

    def fast():
      rows = mine(tokens).astype(self.dtype)[jnp.arange(a) // k]  # [A, D]
      send = jnp.zeros((ep, cb, d), self.dtype).at[owner, pos].set(rows, mode="drop")
      send_e = jnp.full((ep, cb), e_loc, jnp.int32).at[owner, pos].set(local, mode="drop")
      exchange = lambda x: jax.lax.all_to_all(x, axes, 0, 0, tiled=True)
      recv = exchange(send).reshape(ep * cb, d)  # [EP, Cb, D] -> [EP * Cb, D]
      recv_e = exchange(send_e).reshape(ep * cb)  # empty places name the zero expert
      by_expert = jnp.argsort(recv_e, stable=True)
      group = jnp.bincount(recv_e, length=e_loc + 1).astype(jnp.int32)  # [E_loc + 1]
      out = self._run_experts(recv[by_expert], *weights, group)  # [EP * Cb, D]
      out = jnp.zeros_like(out).at[by_expert].set(out).reshape(ep, cb, d)
      back = exchange(out)  # back[o, p]: the output of the assignment sent to o at p
      routed = back[owner, jnp.minimum(pos, cb - 1)]  # [A, D]
      # [m, K, D] x [m, K] -> [m, D]
      y = jnp.einsum("nkd,nk->nd", routed.reshape(m, k, d).astype(jnp.float32), mine(gates))
      return jax.lax.all_gather(y, axes, tiled=True)  # [m, D] -> [N_loc, D]

    return jax.lax.cond(overflow, replicated, fast)

  def _run_experts(
    self,
    rows: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    group_sizes: jax.Array,
  ) -> jax.Array:
    """SwiGLU of each expert on its contiguous block of rows.

    Args:
      rows: [N*K, D] token rows sorted by expert.
      w_gate: [E, D, F] gate weights.
      w_up: [E, D, F] up weights.
      w_down: [E, F, D] down weights.
      group_sizes: [E] rows per expert, summing to N*K.

    Returns:
      [N*K, D] expert outputs in `dtype`, in the same (sorted) order.
    """
    dt = self.dtype
    if resolve_dispatch(self.dispatch) == "blocks":
      weights = (w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt))
      return run_blocks(rows, *weights, group_sizes, int(self.block_gather_mib * 2**20))
    # [N*K, D] x [E, D, F] -> [N*K, F]
    gate = jax.lax.ragged_dot(rows, w_gate.astype(dt), group_sizes)
    # [N*K, D] x [E, D, F] -> [N*K, F]
    up = jax.lax.ragged_dot(rows, w_up.astype(dt), group_sizes)
    hidden = jax.nn.silu(gate) * up
    # [N*K, F] x [E, F, D] -> [N*K, D]
    return jax.lax.ragged_dot(hidden, w_down.astype(dt), group_sizes)


def _expert_mesh(num_experts: int, batch: int):
  """(mesh, (expert axes, batch axes, x spec, weight spec)) when the model is traced on a
  mesh (`sharding.model_mesh`) that splits the batch or (evenly) the experts; else None.
  Without an expert split, each device runs every expert on its own tokens (the weights
  gathered, as FSDP does): the sort of the assignments stays local."""
  current = sharding.current_mesh()
  if current is None:
    return None
  mesh, rules = current
  axes = lambda entry: entry if isinstance(entry, tuple) else (entry,) if entry else ()
  w_spec = sharding.logical_spec(("expert", None, None), (num_experts, 1, 1), mesh, rules)
  x_spec = sharding.logical_spec(("batch", None, None), (batch, 1, 1), mesh, rules)
  expert_axes, batch_axes = axes(w_spec[0]), axes(x_spec[0])
  if not expert_axes and not batch_axes:
    return None  # nothing split: the one-device path
  if set(batch_axes) & set(expert_axes):
    return None  # tokens split over the expert axes too: not this scheme
  return mesh, (expert_axes, batch_axes, x_spec, w_spec)
