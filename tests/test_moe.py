"""Tests for engram_jax/layers/moe.py: both dispatches against a dense reference, routing rules,
the block layout and the executed work."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import sharding
from engram_jax.config import LOGICAL_RULES, MeshConfig
from engram_jax.layers.moe import MoE, route, update_expert_bias
from engram_jax.layers.moe_blocks import block_layout, block_rows, run_blocks

B, T, D = 2, 5, 8
E, K, F = 6, 2, 4
N = B * T


def _module(**kw):
  args = dict(num_experts=E, top_k=K, expert_hidden=F, num_shared=1, routed_scaling=1.0)
  args.update(kw)
  return MoE(**args)


def _setup(**kw):
  module = _module(**kw)
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  variables = nn.unbox(jax.jit(module.init)(jax.random.key(1), x))
  return module, variables, x


def _swiglu(x, w_gate, w_up, w_down):
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def dense_reference(variables, x, top_k, routed_scaling):
  """Every expert on every token, masked by the routing weights (no sorting, no ragged_dot)."""
  p = variables["params"]
  bias = variables["balance"]["expert_bias"]
  tokens = x.reshape(N, D)
  scores = jax.nn.sigmoid(tokens @ p["router"])
  # Selection by score + bias via a full descending sort (independent of lax.top_k).
  chosen = jnp.argsort(-(scores + bias[None, :]), axis=-1)[:, :top_k]
  picked = jnp.take_along_axis(scores, chosen, axis=-1)
  gates = picked / jnp.sum(picked, axis=-1, keepdims=True) * routed_scaling
  weights = jnp.sum(jax.nn.one_hot(chosen, E) * gates[:, :, None], axis=1)  # [N, E]
  hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", tokens, p["w_gate"])) * jnp.einsum(
    "nd,edf->nef", tokens, p["w_up"]
  )
  per_expert = jnp.einsum("nef,efd->ned", hidden, p["w_down"])
  routed = jnp.einsum("ne,ned->nd", weights, per_expert)
  shared = p["shared"]
  y = routed + _swiglu(tokens, shared["w_gate"], shared["w_up"], shared["w_down"])
  return y.reshape(B, T, D), chosen


_dense = jax.jit(dense_reference, static_argnums=(2, 3))


class MoETest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_ragged_matches_dense_forward(self):
    module, variables, x = _setup()
    y, load = self.variant(module.apply)(variables, x)
    expected, _ = _dense(variables, x, K, 1.0)
    chex.assert_shape([y, load], [(B, T, D), (E,)])
    chex.assert_trees_all_close(y, expected, atol=1e-5, rtol=1e-5)

  def test_ragged_matches_dense_gradients(self):
    module, variables, x = _setup(routed_scaling=2.0)
    cot = jax.random.normal(jax.random.key(5), (B, T, D))

    def loss_ragged(params, x_):
      y, _ = module.apply({**variables, "params": params}, x_)
      return jnp.sum(y * cot)

    def loss_dense(params, x_):
      y, _ = dense_reference({**variables, "params": params}, x_, K, 2.0)
      return jnp.sum(y * cot)

    grad = jax.jit(jax.grad(loss_ragged, argnums=(0, 1)))
    got = grad(variables["params"], x)
    want = jax.jit(jax.grad(loss_dense, argnums=(0, 1)))(variables["params"], x)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-4)
    # Every routed weight and the router get a gradient (the gates carry the router's).
    for name in ("router", "w_gate", "w_up", "w_down"):
      self.assertGreater(float(jnp.max(jnp.abs(got[0][name]))), 0.0, msg=name)

  def test_bias_steers_selection_but_not_gates(self):
    scores = jnp.array([[0.9, 0.8, 0.1, 0.2]])
    bias = jnp.array([0.0, 0.0, 1.0, 0.0])
    gates, experts = route(scores, bias, 2, 1.0)
    # Without the bias experts {0, 1} win; with it expert 2 displaces expert 1.
    self.assertEqual(set(np.asarray(experts[0]).tolist()), {0, 2})
    picked = {int(e): float(g) for e, g in zip(experts[0], gates[0], strict=True)}
    np.testing.assert_allclose(picked[0], 0.9 / 1.0, rtol=1e-6)
    np.testing.assert_allclose(picked[2], 0.1 / 1.0, rtol=1e-6)

  def test_bias_in_module_flips_choice_with_unbiased_gates(self):
    module, variables, x = _setup()
    _, unbiased_choice = _dense(variables, x, K, 1.0)
    # A large bias on expert 3 puts it in every token's top-k, which the scores alone do not.
    bias = jnp.zeros((E,)).at[3].set(10.0)
    flipped = {**variables, "balance": {"expert_bias": bias}}
    y, load = jax.jit(module.apply)(flipped, x)
    expected, choice = _dense(flipped, x, K, 1.0)
    self.assertTrue(bool(jnp.all(jnp.any(choice == 3, axis=-1))))
    self.assertFalse(bool(jnp.all(jnp.any(unbiased_choice == 3, axis=-1))))
    np.testing.assert_allclose(load[3], 1.0 / K, rtol=1e-6)
    chex.assert_trees_all_close(y, expected, atol=1e-5, rtol=1e-5)

  def test_gates_sum_to_routed_scaling(self):
    scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (N, E)))
    bias = jax.random.normal(jax.random.key(4), (E,))
    gates, experts = route(scores, bias, K, 2.5)
    chex.assert_shape([gates, experts], [(N, K), (N, K)])
    np.testing.assert_allclose(jnp.sum(gates, axis=-1), np.full(N, 2.5), rtol=1e-6)
    self.assertTrue(bool(jnp.all(gates > 0.0)))

  def test_load_sums_to_one_and_counts_assignments(self):
    module, variables, x = _setup()
    _, load = jax.jit(module.apply)(variables, x)
    _, choice = _dense(variables, x, K, 1.0)
    counts = np.bincount(np.asarray(choice).ravel(), minlength=E)
    np.testing.assert_allclose(load, counts / (N * K), rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(load), 1.0, rtol=1e-6)

  def test_update_expert_bias_pushes_overloaded_experts_down(self):
    bias = jnp.array([0.0, 0.5, -0.5, 0.0])
    load = jnp.array([0.5, 0.25, 0.25, 0.0])
    new = update_expert_bias(bias, load, 0.1)
    np.testing.assert_allclose(new, [-0.1, 0.5, -0.5, 0.1], atol=1e-7)

  def test_no_token_dropped_when_all_pick_one_expert(self):
    module, variables, x = _setup(top_k=1, num_shared=0)
    crowded = {**variables, "balance": {"expert_bias": jnp.zeros((E,)).at[0].set(100.0)}}
    y, load = jax.jit(module.apply)(crowded, x)
    np.testing.assert_allclose(load, np.eye(E)[0], atol=0.0)
    p = crowded["params"]
    # top_k=1: the gate is s/s = 1, so every token is expert 0's full SwiGLU.
    expected = _swiglu(x, p["w_gate"][0], p["w_up"][0], p["w_down"][0])
    chex.assert_trees_all_close(y, expected, atol=1e-5, rtol=1e-5)
    self.assertTrue(bool(jnp.all(jnp.abs(y) > 0.0)))

  def test_params_and_balance_collection(self):
    module = _module()
    x = jnp.zeros((B, T, D))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    specs = nn.get_partition_spec(variables)
    self.assertEqual(tuple(specs["params"]["router"]), ("embed", "expert"))
    self.assertEqual(tuple(specs["params"]["w_gate"]), ("expert", "embed", "mlp"))
    self.assertEqual(tuple(specs["params"]["w_down"]), ("expert", "mlp", "embed"))
    self.assertEqual(tuple(specs["balance"]["expert_bias"]), ("expert",))
    unboxed = nn.unbox(variables)
    np.testing.assert_array_equal(unboxed["balance"]["expert_bias"], np.zeros(E))
    chex.assert_shape(unboxed["params"]["w_up"], (E, D, F))
    chex.assert_shape(unboxed["params"]["shared"]["w_gate"], (D, F))

  def test_bfloat16_compute_path(self):
    module, variables, x = _setup(dtype=jnp.bfloat16)
    y, load = jax.jit(module.apply)(variables, x)
    expected, _ = _dense(variables, x, K, 1.0)
    self.assertEqual(y.dtype, jnp.bfloat16)
    self.assertEqual(load.dtype, jnp.float32)
    chex.assert_trees_all_close(y.astype(jnp.float32), expected, atol=5e-2, rtol=5e-2)


_BIASES = {
  "balanced": jnp.zeros((E,)),
  "one expert takes all": jnp.zeros((E,)).at[3].set(100.0),
  "two experts idle": jnp.zeros((E,)).at[0].set(-100.0).at[5].set(-100.0),
}


# A gather budget of three blocks' weights (block_rows(N * K, E) = 8 rows; D x F float32):
# the 'blocks' dispatch then loops over chunks of blocks.
_THREE_BLOCKS_MIB = 3 * D * F * 4 / 2**20


def _gradients(apply, variables, x, cot):
  """The gradients of sum(y * cot) w.r.t. the parameters and x, y = apply(variables, x)[0]."""
  loss = lambda params, x_: jnp.sum(apply({**variables, "params": params}, x_)[0] * cot)
  return jax.grad(loss, argnums=(0, 1))(variables["params"], x)


@functools.cache
def _dispatch(dispatch):
  """(variables, x, forward, gradients) of the MoE with `dispatch`: compiled once for every
  bias case (the biases are arguments, not constants)."""
  kw = {"dispatch": dispatch}
  if dispatch == "blocks in chunks":
    kw = {"dispatch": "blocks", "block_gather_mib": _THREE_BLOCKS_MIB}
  module, variables, x = _setup(routed_scaling=2.0, **kw)
  return variables, x, jax.jit(module.apply), jax.jit(functools.partial(_gradients, module.apply))


_dense_gradients = jax.jit(
  functools.partial(_gradients, lambda v, x_: dense_reference(v, x_, K, 2.0))
)


@pytest.mark.parametrize("dispatch", ["ragged", "blocks", "blocks in chunks"])
@pytest.mark.parametrize("case", sorted(_BIASES))
def test_every_dispatch_matches_dense(dispatch, case):
  variables, x, apply, gradients = _dispatch(dispatch)
  variables = {**variables, "balance": {"expert_bias": _BIASES[case]}}
  cot = jax.random.normal(jax.random.key(5), (B, T, D))
  y, load = apply(variables, x)
  want_y, _ = _dense(variables, x, K, 2.0)
  chex.assert_trees_all_close(y, want_y, atol=1e-5, rtol=1e-5)
  if case == "one expert takes all":
    assert float(load[3]) == 0.5  # K = 2: every token's first choice
  if case == "two experts idle":
    assert float(load[0]) == float(load[5]) == 0.0
  got, want = gradients(variables, x, cot), _dense_gradients(variables, x, cot)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-4)


def test_block_layout_pads_each_expert_to_whole_blocks():
  sizes = jnp.array([3, 0, 5, 1], jnp.int32)  # rows sorted by expert: 0 0 0 2 2 2 2 2 3
  dest, owner = block_layout(sizes, 9, 2)
  dest, owner = np.asarray(dest), np.asarray(owner)
  expert = np.repeat(np.arange(4), np.asarray(sizes))
  assert len(set(dest.tolist())) == 9  # no two rows share a place
  np.testing.assert_array_equal(owner[dest // 2], expert)  # each row in a block of its expert
  assert owner.shape == (-(-9 // 2) + 4,)  # the static bound: one extra block per expert
  np.testing.assert_array_equal(owner[:5], [0, 0, 2, 2, 2])  # expert 1 owns none
  assert block_rows(2048, 16) == 32 and block_rows(128, 4) == 8


def test_blocks_execute_close_to_the_routed_work():
  n, d, f, e = 2048, 128, 128, 16  # the cpu_small MoE: N * K = 1024 tokens x top-2 rows
  rows = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w_in = jax.ShapeDtypeStruct((e, d, f), jnp.float32)
  w_out = jax.ShapeDtypeStruct((e, f, d), jnp.float32)
  sizes = jax.ShapeDtypeStruct((e,), jnp.int32)
  routed = 6 * n * d * f  # gate, up and down matmuls, 2 FLOPs per multiply-add

  def flops(fn):
    cost = jax.jit(fn).lower(rows, w_in, w_in, w_out, sizes).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  run = lambda *a: run_blocks(*a, gather_bytes=2**30)
  forward = flops(run)
  backward = flops(jax.grad(lambda *a: jnp.sum(run(*a)), argnums=(0, 1, 2, 3)))
  assert forward <= 1.3 * routed, forward / routed
  assert backward <= 1.3 * 3 * routed, backward / routed
  dense = flops(
    lambda r, g, u, w, s: jax.lax.ragged_dot(
      jax.nn.silu(jax.lax.ragged_dot(r, g, s)) * jax.lax.ragged_dot(r, u, s), w, s
    )
  )
  assert dense > 8 * routed  # XLA:CPU's ragged_dot: every row against every expert


def test_blocks_loop_over_chunks_only_past_the_gather_budget():
  rows, sizes = jnp.ones((N * K, D)), jnp.array([4, 0, 6, 2, 5, 3], jnp.int32)
  w_in, w_out = jnp.ones((E, D, F)), jnp.ones((E, F, D))
  one_matrix = D * F * 4

  def scans(budget):  # the block layout's searchsorted is a scan too
    jaxpr = jax.make_jaxpr(lambda *a: run_blocks(*a, gather_bytes=budget))
    return str(jaxpr(rows, w_in, w_in, w_out, sizes)).count("scan[")

  assert scans(3 * one_matrix) == scans(1000 * one_matrix) + 1
  want = run_blocks(rows, w_in, w_in, w_out, sizes, gather_bytes=1000 * one_matrix)
  for budget in (1, 3 * one_matrix, 7 * one_matrix):  # one block per step; a ragged last chunk
    got = run_blocks(rows, w_in, w_in, w_out, sizes, gather_bytes=budget)
    np.testing.assert_array_equal(got, want)


def _ep_loss(layer, params, x, balance):
  y, load = layer.apply({"params": params, "balance": balance}, x)
  return jnp.sum(y**2), (y, load)


@functools.cache
def _ep_layer(exchange, mesh_cfg):
  """The MoE layer and its loss's value and gradients, jitted: one function per mesh (None: one
  device), as jit keeps a trace per function and the mesh is read while tracing; compiled
  once for both skews (the bias is an argument, not a constant)."""
  layer = MoE(
    num_experts=8,
    top_k=2,
    expert_hidden=16,
    num_shared=1,
    capacity_slack=1.0,
    expert_exchange=exchange,
  )
  return layer, jax.jit(
    jax.value_and_grad(functools.partial(_ep_loss, layer), (0, 1), has_aux=True)
  )


@pytest.mark.parametrize("skew", [0.0, 50.0])
@pytest.mark.parametrize(
  ("mesh_cfg", "exchange"),
  [
    (MeshConfig(data=2, expert=4), "all_to_all"),
    (MeshConfig(data=2, expert=4), "replicated"),
    (MeshConfig(fsdp=4), "replicated"),  # no expert axis: every device runs every expert
  ],
)
def test_expert_parallel_equals_one_device_and_drops_nothing(skew, mesh_cfg, exchange):
  """Experts split over expert=4 (2 per device) with data=2, or every expert on every device
  of fsdp=4 with each device's tokens dispatched locally: the same outputs, loads and
  gradients as one device. With skew and expert=4, every token picks experts 0 and 1 (one
  device's), so that device receives all its N_loc * K assignments, twice its capacity at
  slack 1: the overflow path must still run every one of them. 'all_to_all' exchanges each
  device's slice of the tokens with the experts' devices (its overflow path is 'replicated')."""
  mesh = sharding.make_mesh(mesh_cfg)
  (layer, grad), (_, ep) = _ep_layer(exchange, None), _ep_layer(exchange, mesh_cfg)
  x = jax.random.normal(jax.random.key(0), (4, 6, 32))
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x))["params"]
  balance = {"expert_bias": jnp.zeros((8,)).at[:2].set(skew)}
  (_, (y, load)), g = grad(params, x, balance)
  with sharding.model_mesh(mesh, LOGICAL_RULES):
    (_, (y_ep, load_ep)), g_ep = ep(params, x, balance)
    text = ep.lower(params, x, balance).as_text()
  assert "shard_map" in text or "manual" in text  # the mesh path ran
  assert ("all_to_all" in text) == (exchange == "all_to_all" and mesh_cfg.expert > 1)
  np.testing.assert_allclose(y_ep, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(load_ep, load, rtol=1e-6)
  if skew:
    np.testing.assert_allclose(load[:2], [0.5, 0.5])  # every assignment on one device
  chex.assert_trees_all_close(g_ep, g, rtol=1e-4, atol=1e-5)
