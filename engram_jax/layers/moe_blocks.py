"""The MoE's 'blocks' dispatch: routed experts as batched matmuls over blocks of one expert.

Each expert's rows (sorted by expert) are padded to whole blocks of `block_rows(...)` rows; the
blocks run as batched matmuls, each against its expert's weights, gathered per block. Padding
adds at most one block per expert, so the executed work stays within 1.25x of the routed work
(XLA:CPU lowers `ragged_dot` densely, E times the work). Gathers past a byte budget run as a
loop over chunks of blocks, so a paper-size layer holds only a chunk of gathered weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_rows(assignments: int, experts: int) -> int:
  """Bk: rows per block, a power of two in [8, 64] with the padding (at most one block per
  expert) at most a quarter of the assignments where the sizes allow."""
  bk = 64
  while bk > 8 and experts * bk > assignments // 4:
    bk //= 2
  return bk


def block_layout(group_sizes: jax.Array, rows: int, block: int) -> tuple[jax.Array, jax.Array]:
  """Where the expert-sorted rows go when each expert's group is padded to whole blocks.

  Shapes: E experts, Nk = `rows` sorted rows, Bk = `block`, NB = ceil(Nk / Bk) + E blocks (a
  static bound: padding adds at most one block per expert).

  Args:
    group_sizes: [E] int rows per expert, summing to Nk.
    rows: Nk.
    block: Bk.

  Returns:
    (dest [Nk] int32 padded position of each sorted row, block_expert [NB] int32 the expert of
    each block; blocks past the last expert's hold no row and name the last expert).
  """
  e = group_sizes.shape[0]
  blocks = (group_sizes + block - 1) // block  # [E]
  first_block = jnp.cumsum(blocks) - blocks  # [E]
  first_row = jnp.cumsum(group_sizes) - group_sizes  # [E]
  expert = jnp.repeat(jnp.arange(e, dtype=jnp.int32), group_sizes, total_repeat_length=rows)
  rank = jnp.arange(rows, dtype=jnp.int32) - first_row[expert]  # [Nk] rank within its group
  dest = (first_block[expert] * block + rank).astype(jnp.int32)  # [Nk]
  nb = -(-rows // block) + e
  # Block j belongs to the last expert whose first block is <= j (experts without rows own
  # none: their first block equals the next expert's).
  owner = jnp.searchsorted(first_block, jnp.arange(nb), side="right") - 1  # [NB]
  return dest, jnp.clip(owner, 0, e - 1).astype(jnp.int32)


def run_blocks(rows, w_gate, w_up, w_down, group_sizes, gather_bytes: int) -> jax.Array:
  """SwiGLU of each expert on its rows, as batched matmuls over blocks of one expert each.

  All blocks run as one batched matmul when gathering one matrix per block stays within
  `gather_bytes`; else as a loop over chunks of blocks that do (`lax.map`): the same products,
  with at most a chunk of gathered weights alive.

  Args:
    rows: [Nk, D] rows sorted by expert (Nk = N*K).
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    group_sizes: [E] rows per expert.
    gather_bytes: the most bytes of one matrix's gathered weights at once.

  Returns:
    [Nk, D] expert outputs in the sorted order.
  """
  nk, d = rows.shape
  e = group_sizes.shape[0]
  bk = block_rows(nk, e)
  dest, block_expert = block_layout(group_sizes, nk, bk)
  nb = block_expert.shape[0]
  # [Nk, D] -> [NB * Bk, D] (padding rows zero) -> [NB, Bk, D]
  blocks = jnp.zeros((nb * bk, d), rows.dtype).at[dest].set(rows).reshape(nb, bk, d)

  def swiglu(blocks, experts):
    """[J, Bk, D] blocks of experts [J] -> [J, Bk, D], each against its expert's weights."""
    # [J, Bk, D] x [J, D, F] -> [J, Bk, F]
    gate = jnp.einsum("jbd,jdf->jbf", blocks, w_gate[experts])
    up = jnp.einsum("jbd,jdf->jbf", blocks, w_up[experts])
    hidden = jax.nn.silu(gate) * up
    # [J, Bk, F] x [J, F, D] -> [J, Bk, D]
    return jnp.einsum("jbf,jfd->jbd", hidden, w_down[experts])

  chunk = max(1, gather_bytes // (w_gate[0].size * w_gate.dtype.itemsize))
  if chunk >= nb:
    out = swiglu(blocks, block_expert)
  else:  # padded to C chunks of `chunk` blocks (zero blocks of expert 0, dropped after)
    c = -(-nb // chunk)
    # [NB, Bk, D] -> [C * chunk, Bk, D] -> [C, chunk, Bk, D]; [NB] -> [C, chunk]
    padded = jnp.pad(blocks, ((0, c * chunk - nb), (0, 0), (0, 0))).reshape(c, chunk, bk, d)
    experts = jnp.pad(block_expert, (0, c * chunk - nb)).reshape(c, chunk)
    # Each chunk's weights are gathered again in the backward pass rather than kept.
    step = jax.checkpoint(lambda a: swiglu(*a))
    out = jax.lax.map(step, (padded, experts))  # [C, chunk, Bk, D]
    out = out.reshape(c * chunk, bk, d)[:nb]  # [C, chunk, Bk, D] -> [NB, Bk, D]
  return out.reshape(nb * bk, d)[dest]  # [NB * Bk, D] -> [Nk, D]
