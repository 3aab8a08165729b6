"""Tests for engram_jax/layers/attention.py."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from engram_jax.layers.attention import CausalSelfAttention, KVCache, apply_rope, rope_angles

B, T, D = 2, 6, 16
Q, G, DA = 4, 2, 8


def _setup(num_heads=Q, num_kv_heads=G, dtype=jnp.float32, t=T):
  module = CausalSelfAttention(
    num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=DA, dtype=dtype
  )
  x = jax.random.normal(jax.random.key(0), (B, t, D))
  variables = jax.jit(module.init)(jax.random.key(1), x)
  return module, variables, x


class AttentionTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_logical_axes(self):
    module, variables, x = _setup()
    y = self.variant(module.apply)(variables, x)
    chex.assert_shape(y, (B, T, D))
    specs = nn.get_partition_spec(variables)["params"]
    self.assertEqual(tuple(specs["w_q"]), ("embed", "heads", "head_dim"))
    self.assertEqual(tuple(specs["w_k"]), ("embed", "kv_heads", "head_dim"))
    self.assertEqual(tuple(specs["w_v"]), ("embed", "kv_heads", "head_dim"))
    self.assertEqual(tuple(specs["w_o"]), ("heads", "head_dim", "embed"))
    p = nn.unbox(variables)["params"]
    chex.assert_shape([p["w_q"], p["w_k"], p["w_o"]], [(D, Q, DA), (D, G, DA), (Q, DA, D)])

  def test_causal_via_gradients(self):
    module, variables, x = _setup()
    # d out[0, t] / d in[0, s] for all t, s: [T, D, T, D] -> [T, T] magnitudes.
    jac = jax.jit(jax.jacrev(lambda x0: module.apply(variables, x0[None])[0]))(x[0])
    influence = np.asarray(jnp.sum(jnp.abs(jac), axis=(1, 3)))
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    np.testing.assert_array_equal(influence[future], 0.0)
    self.assertTrue(np.all(influence[~future] > 0.0))

  def test_matches_jax_dot_product_attention(self):
    module, variables, x = _setup()
    p = nn.unbox(variables)["params"]
    q = jnp.einsum("btd,dqa->btqa", x, p["w_q"])
    k = jnp.einsum("btd,dga->btga", x, p["w_k"])
    v = jnp.einsum("btd,dga->btga", x, p["w_v"])
    positions = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
    cos, sin = rope_angles(positions, DA, 10000.0)
    out = jax.nn.dot_product_attention(
      apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True
    )
    expected = jnp.einsum("btqa,qad->btd", out, p["w_o"])
    chex.assert_trees_all_close(module.apply(variables, x), expected, atol=1e-5, rtol=1e-5)

  def test_rope_scores_depend_only_on_relative_position(self):
    q = jax.random.normal(jax.random.key(2), (1, 1, 1, DA))
    k = jax.random.normal(jax.random.key(3), (1, 1, 1, DA))

    def score(m, n):
      cq, sq = rope_angles(jnp.array([[m]]), DA, 10000.0)
      ck, sk = rope_angles(jnp.array([[n]]), DA, 10000.0)
      return jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk))

    base = score(5, 2)
    np.testing.assert_allclose(score(105, 102), base, rtol=1e-4)
    np.testing.assert_allclose(score(3, 0), base, rtol=1e-4)
    self.assertGreater(abs(float(score(5, 4) - base)), 1e-3)

  def test_shifted_positions_give_same_output(self):
    module, variables, x = _setup()
    positions = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
    apply = jax.jit(module.apply)
    y = apply(variables, x, positions)
    chex.assert_trees_all_close(apply(variables, x, positions + 37), y, atol=1e-4)
    # Positions are used: spreading them apart changes the output.
    spread = apply(variables, x, positions * 3)
    self.assertGreater(float(jnp.max(jnp.abs(spread - y))), 1e-3)

  def test_gqa_equals_mha_with_repeated_kv_heads(self):
    gqa, variables, x = _setup()
    p = nn.unbox(variables)["params"]
    repeated = dict(p)
    repeated["w_k"] = jnp.repeat(p["w_k"], Q // G, axis=1)
    repeated["w_v"] = jnp.repeat(p["w_v"], Q // G, axis=1)
    mha = CausalSelfAttention(num_heads=Q, num_kv_heads=Q, head_dim=DA)
    got = jax.jit(gqa.apply)({"params": p}, x)
    chex.assert_trees_all_close(got, jax.jit(mha.apply)({"params": repeated}, x), atol=1e-5)

  def test_bfloat16_compute_path(self):
    module, variables, x = _setup(dtype=jnp.bfloat16)
    y16 = jax.jit(module.apply)(variables, x)
    f32_module = CausalSelfAttention(num_heads=Q, num_kv_heads=G, head_dim=DA)
    y32 = jax.jit(f32_module.apply)(variables, x)
    self.assertEqual(y16.dtype, jnp.bfloat16)
    chex.assert_trees_all_close(y16.astype(jnp.float32), y32, atol=5e-2, rtol=5e-2)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("gqa", G), ("mqa", 1))
  def test_incremental_decoding_equals_full_forward(self, kv_heads):
    module, variables, x = _setup(num_kv_heads=kv_heads)
    full = jax.jit(module.apply)(variables, x)
    step = self.variant(lambda x_, pos, cache: module.apply(variables, x_, pos, cache))
    cache = KVCache.zeros(B, T + 2, kv_heads, DA, jnp.float32)
    prefill = 3
    positions = jnp.broadcast_to(jnp.arange(prefill)[None, :], (B, prefill))
    y, cache = step(x[:, :prefill], positions, cache)
    outs = [y]
    for t in range(prefill, T):
      y, cache = step(x[:, t : t + 1], jnp.full((B, 1), t), cache)
      outs.append(y)
    chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)

  def test_rejects_bad_head_counts(self):
    with self.assertRaisesRegex(ValueError, "multiple of num_kv_heads"):
      _setup(num_heads=4, num_kv_heads=3)


if __name__ == "__main__":
  absltest.main()
