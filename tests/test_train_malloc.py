"""`train.malloc`: glibc's malloc kept from mapping fresh pages (each case in a subprocess, as
`mallopt` changes the whole process)."""

import subprocess
import sys
import textwrap

# A 64 MiB block allocated, written and freed 5 times after a first time: the minor page faults
# of those 5.
_FAULTS = textwrap.dedent(
  """
  import ctypes, resource, sys
  from engram_jax.train import malloc
  if sys.argv[1] == "keep":
    assert malloc.keep_freed_memory()
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  size = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)

  def cycle():  # what XLA:CPU does with a step's temp buffer: malloc, write, free
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)

  cycle()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    cycle()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  """
)


def test_keep_freed_memory_stops_the_page_faults_of_fresh_buffers():
  def faults(mode):
    r = subprocess.run(
      [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(r.stdout.split()[-1])

  # By default each 64 MiB block is mapped afresh: 16,384 faults of 4 KiB pages a cycle.
  assert faults("default") > 5 * 16_000
  assert faults("keep") < 1_000
