"""Tests for engram_jax/layers/ffn.py."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from absl.testing import absltest

from engram_jax.layers.ffn import FeedForward

B, T, D, F = 2, 5, 16, 24


def _setup(dtype=jnp.float32):
  module = FeedForward(hidden_dim=F, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  variables = jax.jit(module.init)(jax.random.key(1), x)
  return module, variables, x


class FeedForwardTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_swiglu_formula(self):
    module, variables, x = _setup()
    y = self.variant(module.apply)(variables, x)
    p = nn.unbox(variables)["params"]
    expected = (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]
    chex.assert_shape(y, (B, T, D))
    chex.assert_trees_all_close(y, expected, atol=1e-5, rtol=1e-5)

  def test_param_shapes_and_logical_axes(self):
    _, variables, _ = _setup()
    specs = nn.get_partition_spec(variables)["params"]
    self.assertEqual(tuple(specs["w_gate"]), ("embed", "mlp"))
    self.assertEqual(tuple(specs["w_up"]), ("embed", "mlp"))
    self.assertEqual(tuple(specs["w_down"]), ("mlp", "embed"))
    p = nn.unbox(variables)["params"]
    chex.assert_shape([p["w_gate"], p["w_up"], p["w_down"]], [(D, F), (D, F), (F, D)])
    chex.assert_trees_all_equal_dtypes(p, jax.tree.map(lambda _: jnp.zeros((), jnp.float32), p))

  def test_bfloat16_compute_path(self):
    module, variables, x = _setup(jnp.bfloat16)
    y16 = jax.jit(module.apply)(variables, x)
    y32 = jax.jit(FeedForward(hidden_dim=F).apply)(variables, x)
    self.assertEqual(y16.dtype, jnp.bfloat16)
    chex.assert_trees_all_close(y16.astype(jnp.float32), y32, atol=5e-2, rtol=5e-2)

  def test_every_weight_gets_a_gradient(self):
    module, variables, x = _setup()
    params = nn.unbox(variables)["params"]
    grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x) ** 2))(params)
    for name, g in grads.items():
      self.assertGreater(float(jnp.max(jnp.abs(g))), 0.0, msg=name)


if __name__ == "__main__":
  absltest.main()
