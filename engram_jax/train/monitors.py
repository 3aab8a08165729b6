"""What watches a training run while it trains: signals, loss spikes, throughput."""

from __future__ import annotations

import collections
import contextlib
import signal
import time

import numpy as np


class SpikeDetector:
  """Flags a loss far above the median of the recent ones (after warm-up).

  Args:
    factor: a loss above `factor` x the running median is a spike; 0 disables.
    window: how many recent losses the median is over.
    after_step: no check up to this step (the warm-up, when the loss moves fast).
  """

  MIN_HISTORY = 10  # losses needed before the median is trusted

  def __init__(self, factor: float, window: int, after_step: int):
    self.factor, self.after_step = factor, after_step
    self.recent: collections.deque[float] = collections.deque(maxlen=window)

  def check(self, step: int, loss: float) -> str | None:
    """None, or why `loss` at `step` is a spike; the loss joins the history otherwise."""
    if (
      self.factor
      and step > self.after_step
      and len(self.recent) >= min(self.MIN_HISTORY, self.recent.maxlen)
    ):
      median = float(np.median(self.recent))
      if loss > self.factor * median:
        return (
          f"loss {loss:.4g} at step {step} is above {self.factor:g}x the median {median:.4g} "
          f"of the last {len(self.recent)} steps"
        )
    self.recent.append(loss)
    return None


class SignalGuard:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received: int | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      # Outside the main thread signals cannot be caught; training then runs unguarded.
      with contextlib.suppress(ValueError):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class Throughput:
  """Training tokens per second of wall time, from the end of the first (compiling) step seen to
  the last step seen finished; evaluation and checkpoint time is left out."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self._start: tuple[float, int] | None = None  # (time, step) when timing began
    self._last: tuple[float, int] | None = None
    self._paused = 0.0  # paused seconds since timing began
    self._paused_by_last = 0.0  # of which before the last step seen finished

  def finished(self, step: int) -> float:
    """Records that `step` has finished; returns the rate so far (0 before two steps)."""
    now = time.perf_counter()
    if self._start is None:
      self._start = (now, step)
    self._last = (now, step)
    self._paused_by_last = self._paused
    return self.rate() or 0.0

  @contextlib.contextmanager
  def paused(self):
    """Leaves the time inside out of the rate (only time after timing began counts)."""
    start = time.perf_counter()
    try:
      yield
    finally:
      if self._start is not None:
        self._paused += time.perf_counter() - start

  def rate(self) -> float | None:
    """Tokens per second, or None before two steps (or with no measurable time between)."""
    if self._start is None or self._last[1] == self._start[1]:
      return None
    seconds = self._last[0] - self._start[0] - self._paused_by_last
    if seconds <= 0:
      return None
    return (self._last[1] - self._start[1]) * self.tokens_per_step / seconds
