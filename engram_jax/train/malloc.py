"""The C library's malloc, set to keep freed memory: XLA:CPU's steps without fresh pages.

XLA:CPU takes each execution's temporary buffer (342 MB for a `cpu_small` forward + backward)
and every large result from malloc. glibc serves blocks that large with a fresh mmap and unmaps
them when they are freed, so every call touches new pages: a page fault per 4 KiB, about 89,000
per `cpu_small` train step. `keep_freed_memory` sets glibc's malloc (`mallopt`) to one arena, no
mmap'd blocks and no trimming: freed blocks stay in the heap and later calls reuse their pages.
The numerics are unchanged (the same losses to the bit); the process keeps its peak memory until
it exits, and every thread shares one arena.
`experiments.train --keep_freed_memory` (what `make train` runs) and the step benchmarks use it.
"""

from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# The usage error of a `--keep_freed_memory` flag where `keep_freed_memory` returns False.
NOT_GLIBC = "--keep_freed_memory needs glibc's malloc (Linux with glibc)"


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory for reuse: one arena, no mmap'd blocks, no trim.

  Must run before JAX's first computation (the runtime's threads must start after it). Later
  calls reuse freed pages; most of them, as small blocks placed in a freed one can still make
  the heap grow now and then.

  Returns:
    Whether it was set (False where the C library is not glibc).
  """
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version"):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
