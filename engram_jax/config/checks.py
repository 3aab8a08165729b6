"""The one validation helper every config section uses."""

from __future__ import annotations


def check(cond: bool, field: str, expected: str, got) -> None:
  """Raises ValueError "<field>: expected <expected>, got <got>" unless `cond`."""
  if not cond:
    raise ValueError(f"{field}: expected {expected}, got {got!r}")
