"""Tests for engram_jax/layers/mhc.py: Sinkhorn projection, init values, M = 1 reduction."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from engram_jax.layers.ffn import FeedForward
from engram_jax.layers.mhc import (
  HyperConnection,
  expand_streams,
  merge_streams,
  sinkhorn_knopp,
)
from engram_jax.layers.norms import RMSNorm

B, T, M, D = 2, 3, 4, 8


def _setup(streams=M, dtype=None):
  hc = HyperConnection(streams=streams, sinkhorn_iters=20, dtype=dtype)
  h = jax.random.normal(jax.random.key(0), (B, T, streams, D))
  variables = nn.unbox(jax.jit(lambda k, h_: hc.init(k, h_, method=hc.pre))(jax.random.key(1), h))
  return hc, variables, h


class SinkhornTest(parameterized.TestCase):
  @parameterized.parameters(0.5, 1.0, 2.0)
  def test_rows_and_columns_sum_to_one(self, scale):
    logits = scale * jax.random.normal(jax.random.key(2), (16, M, M))
    p = jax.jit(sinkhorn_knopp, static_argnums=1)(logits, 20)
    self.assertTrue(bool(jnp.all(p >= 0.0)))
    np.testing.assert_allclose(jnp.sum(p, axis=-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(jnp.sum(p, axis=-2), 1.0, atol=1e-3)

  def test_doubly_stochastic_input_is_a_fixed_point(self):
    eye = jnp.eye(M)
    perm = jnp.roll(eye, 1, axis=0)
    target = 0.7 * (0.5 * eye + 0.5 * perm) + 0.3 * jnp.full((M, M), 1.0 / M)
    np.testing.assert_allclose(sinkhorn_knopp(jnp.log(target), 20), target, atol=1e-6)

  def test_matches_a_per_matrix_float64_reference_on_batched_input(self):
    logits = 1.5 * jax.random.normal(jax.random.key(4), (3, 5, M, M))  # [B, T, M, M]
    p = np.exp(np.asarray(logits, np.float64))
    for _ in range(20):  # one matrix at a time: rows, then columns
      p = p / p.sum(axis=-1, keepdims=True)
      p = p / p.sum(axis=-2, keepdims=True)
    np.testing.assert_allclose(sinkhorn_knopp(logits, 20), p, atol=2e-6)

  def test_one_round_differs_from_twenty(self):
    logits = 2.0 * jax.random.normal(jax.random.key(3), (M, M))
    rows_after_one = jnp.sum(sinkhorn_knopp(logits, 1), axis=-1)
    self.assertGreater(float(jnp.max(jnp.abs(rows_after_one - 1.0))), 1e-3)


class HyperConnectionTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes(self):
    hc, variables, h = _setup()
    pre = self.variant(lambda v, h_: hc.apply(v, h_, method=hc.pre))
    x, ctx = pre(variables, h)
    chex.assert_shape(
      [x, ctx.h, ctx.h_post, ctx.h_res], [(B, T, D), h.shape, (B, T, M), (B, T, M, M)]
    )
    post = self.variant(lambda v, c, y: hc.apply(v, c, y, method=hc.post))
    chex.assert_shape(post(variables, ctx, x), (B, T, M, D))

  def test_params_at_init(self):
    hc = HyperConnection(streams=M)
    h = jnp.zeros((B, T, M, D))
    boxed = hc.init(jax.random.key(0), h, method=hc.pre)
    specs = nn.get_partition_spec(boxed)["params"]
    self.assertEqual(tuple(specs["proj"]["kernel"]), ("streams_embed", "streams_coeffs"))
    self.assertEqual(tuple(specs["b_res"]), ("streams", "streams_in"))
    p = nn.unbox(boxed)["params"]
    chex.assert_shape(p["proj"]["kernel"], (M * D, 2 * M + M * M))
    for name in ("alpha_pre", "alpha_post", "alpha_res"):
      np.testing.assert_allclose(p[name], 0.01, rtol=1e-7)
    for name in ("b_pre", "b_post", "b_res"):
      np.testing.assert_array_equal(p[name], 0.0)

  def test_maps_at_init(self):
    hc, variables, h = _setup()
    h_pre, h_post, h_res = hc.apply(variables, h, method=hc.coefficients)
    # Gains of 0.01 keep the data-dependent part small at step 0.
    np.testing.assert_allclose(h_pre, 0.5, atol=0.01)
    np.testing.assert_allclose(h_post, 1.0, atol=0.02)
    np.testing.assert_allclose(h_res, 1.0 / M, atol=0.01)
    # With the gains at zero the maps are exactly the init values.
    zero_gain = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if "alpha" in jax.tree_util.keystr(path) else v,
      variables,
    )
    h_pre, h_post, h_res = hc.apply(zero_gain, h, method=hc.coefficients)
    np.testing.assert_allclose(h_pre, 0.5, atol=1e-7)
    np.testing.assert_allclose(h_post, 1.0, atol=1e-7)
    np.testing.assert_allclose(h_res, 1.0 / M, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pre_and_post_follow_the_formulas(self):
    hc, variables, h = _setup()
    y = jax.random.normal(jax.random.key(7), (B, T, D))
    # Non-trivial maps: larger gains and biases than at init.
    p = dict(variables["params"])
    p.update(alpha_pre=jnp.array(1.0), alpha_post=jnp.array(1.0), alpha_res=jnp.array(1.0))
    p["b_res"] = jax.random.normal(jax.random.key(8), (M, M))
    v = {"params": p}

    @self.variant
    def run(v_, h_, y_):
      x, ctx = hc.apply(v_, h_, method=hc.pre)
      return x, ctx, hc.apply(v_, ctx, y_, method=hc.post)

    x, ctx, h_new = run(v, h, y)
    h_pre, h_post, h_res = hc.apply(v, h, method=hc.coefficients)
    expected_x = np.einsum("btm,btmd->btd", h_pre, h)
    expected_h = np.einsum("btmn,btnd->btmd", h_res, h) + np.einsum("btm,btd->btmd", h_post, y)
    chex.assert_trees_all_close(x, expected_x, atol=1e-5)
    chex.assert_trees_all_close(h_new, expected_h, atol=1e-5)
    chex.assert_trees_all_close(ctx.h_res, h_res, atol=1e-6)
    # The mixing preserves the sum over streams; only the written output adds to it.
    added = jnp.sum(h_post, axis=-1)[..., None] * y
    chex.assert_trees_all_close(jnp.sum(h_new, 2), jnp.sum(h, 2) + added, atol=1e-3)

  def test_single_stream_is_exactly_a_pre_norm_residual_block(self):
    hc, variables, h = _setup(streams=1)
    self.assertEqual(variables, {})
    norm, ffn = RMSNorm(), FeedForward(hidden_dim=16)
    x0 = h[:, :, 0, :]
    nv = norm.init(jax.random.key(2), x0)
    fv = ffn.init(jax.random.key(3), x0)

    def sublayer(x):
      return ffn.apply(fv, norm.apply(nv, x))

    x, ctx = hc.apply(variables, h, method=hc.pre)
    got = hc.apply(variables, ctx, sublayer(x), method=hc.post)
    expected = h + sublayer(x0)[:, :, None, :]
    chex.assert_trees_all_equal(got, expected)

  def test_gradients_reach_every_parameter(self):
    hc, variables, h = _setup()
    ffn = FeedForward(hidden_dim=16)
    fv = ffn.init(jax.random.key(4), h[:, :, 0, :])

    def loss(params):
      x, ctx = hc.apply({"params": params}, h, method=hc.pre)
      return jnp.sum(hc.apply({"params": params}, ctx, ffn.apply(fv, x), method=hc.post) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      self.assertGreater(float(jnp.max(jnp.abs(g))), 0.0, msg=jax.tree_util.keystr(path))

  def test_bfloat16_sublayer_input(self):
    hc, variables, h = _setup(dtype=jnp.bfloat16)
    x, ctx = jax.jit(lambda v, h_: hc.apply(v, h_, method=hc.pre))(variables, h)
    self.assertEqual(x.dtype, jnp.bfloat16)
    self.assertEqual(ctx.h_res.dtype, jnp.float32)
    h_new = jax.jit(lambda v, c, y: hc.apply(v, c, y, method=hc.post))(variables, ctx, x)
    self.assertEqual(h_new.dtype, h.dtype)

  def test_expand_then_merge_is_identity(self):
    x = jax.random.normal(jax.random.key(5), (B, T, D))
    h = expand_streams(x, M)
    chex.assert_shape(h, (B, T, M, D))
    chex.assert_trees_all_equal(h[:, :, 2, :], x)
    chex.assert_trees_all_close(merge_streams(h), x, atol=1e-6)
    h = h.at[:, :, 0, :].add(4.0)
    chex.assert_trees_all_close(merge_streams(h), x + 1.0, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
