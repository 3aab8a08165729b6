"""What every script in experiments/ shares: one-line error reports and flag parsing.

A failure prints one line on stderr, `<prog>: <message>`, plus where its traceback went; a bad
flag prints its message and "see --help" (exit 2), not absl's help text.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import flags

from engram_jax import errors


def report(prog: str, exc: BaseException, log_dir: str | os.PathLike | None) -> int:
  """Prints `exc` as one line on stderr (plus where its traceback went) and returns the exit
  code."""
  code, message = errors.one_line(exc)
  suffix = ""
  if not isinstance(exc, errors.RunError) or exc.__cause__ is not None:
    suffix = f" (traceback in {errors.write_log(exc, log_dir, prog)})"
  print(f"{prog}: {message}{suffix}", file=sys.stderr, flush=True)
  return code


def usage_exit(prog: str, message: str) -> None:
  """Prints a usage error as one line and exits with `EXIT_USAGE`."""
  print(f"{prog}: {errors.first_line(message)}; see --help", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_USAGE)


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `absl.app.run` that reports a bad flag in one line (exit 2) instead
  of absl's help text."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      usage_exit(prog, str(e))
      raise  # not reached

  return parse
