"""A run's folder: its identity (`run.json`), the rules that keep it from being overwritten, and
a metrics log that survives kills.

WORKDIR/
  run.json        what the run is: preset, resolved config, tokenizer and corpus files with their
                  sizes and sha256, seed, batch and sequence sizes, steps, package version and
                  git commit; each resume appends to its "resumes" list
  metrics.jsonl   one JSON record per logged step and per evaluation
  checkpoints/    orbax steps; corrupt/ and diverged/ hold steps moved aside (never deleted)
  results.json, loss_curve.png, error.log

Rules:
- a workdir that holds a run is never reused without `resume`; `overwrite` moves the old run
  aside to `WORKDIR.old-<time>` (nothing is deleted);
- `resume` compares the recorded identity with the new one field by field and refuses any
  difference that changes the model or the data. Only the length of training (`steps`, never
  below the newest checkpoint), the learning rates (`optim.lr`, `optim.engram_lr_mult`, e.g.
  to continue past a divergence), the bookkeeping intervals and where the tables live may
  change; each change of the first three is announced in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

from absl import logging

from engram_jax.errors import RunError, RunExists, RunMismatch

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINTS = "checkpoints"
FORMAT = 1

# Fields that may differ on resume. The rest of the identity must match.
_ANNOUNCED = ("config.train.steps", "config.optim.lr", "config.optim.engram_lr_mult")
_FREE = (
  "config.train.eval_every",
  "config.train.log_every",
  "config.train.checkpoint_every",
  "config.train.spike_factor",
  "config.train.spike_window",
  "config.memory.kind",
  "config.memory.cache_fraction",
  "config.memory.storage",
  "config.memory.lookup_impl",
  "config.mesh.data",
  "config.mesh.fsdp",
  "config.mesh.tensor",
  "config.mesh.expert",
  "config.mesh.rules",
  "config.mesh.table_axes",
  "config.model.moe.dispatch",  # the same outputs to float rounding
  "config.model.moe.capacity_slack",  # dropless either way: the same outputs
  "config.model.moe.expert_exchange",
  "config.model.moe.block_gather_mib",  # memory only: the same outputs
  "config.model.remat",  # the same mathematics
  "steps",  # the top-level copy of config.train.steps
  "tokenizer.path",
  "version",
  "commit",
  "created",
  "resumes",
  "format",
)


# Fields added to the configs after runs were first recorded, with the value that gives the
# behaviour those runs had: a record without the field matches a config at that value.
_ADDED = {
  "config.model.engram.form": "demo",
  "config.model.engram.gate_eps": None,
  "config.model.engram.gating": "multi",
  "config.model.engram.short_conv": True,
  "config.model.engram.compress_tokens": True,
}
_MISSING = object()


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def file_digest(path: str | os.PathLike) -> dict:
  """{"path", "bytes", "sha256"} of a file."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  size = os.path.getsize(path)
  return {"path": str(Path(path).resolve()), "bytes": size, "sha256": h.hexdigest()}


def package_version() -> str | None:
  try:
    return importlib.metadata.version("engram-jax")
  except importlib.metadata.PackageNotFoundError:
    return None


def git_commit() -> str | None:
  """The source tree's commit (with "+dirty" when it has uncommitted changes), if it is a git
  checkout."""
  root = Path(__file__).resolve().parents[2]
  if not (root / ".git").exists():
    return None
  try:
    run = lambda *a: subprocess.run(
      ["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    commit = run("rev-parse", "HEAD")
    dirty = run("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "")


def identity(exp, data_cfg) -> dict:
  """The record of `run.json` for an experiment (its model config resolved, e.g. the
  vocabulary set to the tokenizer's) on the data of `data_cfg`."""
  t = exp.train
  return {
    "format": FORMAT,
    "preset": exp.name,
    "config": _jsonable(dataclasses.asdict(exp)),
    "tokenizer": file_digest(data_cfg.tokenizer_path()),
    "corpus": [file_digest(p) for p in data_cfg.corpus_paths()],
    "seed": t.seed,
    "batch_size": t.batch_size,
    "seq_len": t.seq_len,
    "steps": t.steps,
    "version": package_version(),
    "commit": git_commit(),
    "created": datetime.datetime.now().isoformat(timespec="seconds"),
  }


def _flatten(record: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in record.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out |= _flatten(value, name + ".")
    elif key == "corpus":  # the files' contents, not where they are
      out[name] = [(f["bytes"], f["sha256"]) for f in value]
    else:
      out[name] = value
  return out


_ORDER = ("preset", "config.model", "tokenizer", "corpus", "config.train", "seed", "config.optim")


def _priority(field: str) -> tuple[int, str]:
  """Differences are named in this order: the model and data before the rest."""
  rank = next((i for i, p in enumerate(_ORDER) if field.startswith(p)), len(_ORDER))
  return rank, field


def compare(old: dict, new: dict) -> tuple[list[tuple[str, object, object]], list[str]]:
  """(refused differences as (field, old, new), announcements) between two identities."""
  a, b = _flatten(old), _flatten(new)
  refused, notes = [], []
  value = lambda x, field: x.get(field, _ADDED.get(field, _MISSING))
  shown = lambda x, field: "(absent)" if value(x, field) is _MISSING else value(x, field)
  for field in sorted(set(a) | set(b), key=_priority):
    if field in _FREE or value(a, field) == value(b, field):
      continue
    if field in _ANNOUNCED:
      notes.append(f"{field} changes from {a.get(field)} to {b.get(field)}")
    else:
      refused.append((field, shown(a, field), shown(b, field)))
  return refused, notes


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """Finished checkpoint steps in `workdir/checkpoints` (orbax names them by number once
  complete), oldest first."""
  d = Path(workdir) / CHECKPOINTS
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def run_contents(workdir: str | os.PathLike) -> list[str]:
  """What in `workdir` makes it hold a run (empty: no run)."""
  d = Path(workdir)
  found = [name for name in (RUN_FILE, METRICS_FILE, RESULTS_FILE) if (d / name).exists()]
  ckpt = d / CHECKPOINTS
  if ckpt.is_dir() and any(ckpt.iterdir()):
    steps = checkpoint_steps(d)
    found.append(f"checkpoints up to step {steps[-1]}" if steps else "checkpoints/")
  return found


def move_aside(workdir: str | os.PathLike) -> Path:
  """Renames `workdir` to `workdir.old-<time>` (never deletes) and returns the new name."""
  d = Path(workdir)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  target = d.with_name(f"{d.name}.old-{stamp}")
  n = 1
  while target.exists():
    n += 1
    target = d.with_name(f"{d.name}.old-{stamp}-{n}")
  os.rename(d, target)
  return target


def refuse_existing(workdir: str | os.PathLike, contents: list[str]) -> RunExists:
  return RunExists(
    f"{workdir} holds a run ({', '.join(contents)}); nothing was changed. To continue it pass "
    "--resume; to start a new run choose another --workdir, or pass --overwrite to move the "
    f"old run aside to {Path(workdir).name}.old-<time>"
  )


def read_run(workdir: str | os.PathLike) -> dict | None:
  """The recorded identity, or None if the run has no run.json (a run of an older version)."""
  path = Path(workdir) / RUN_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunError(
      f"{path} is not readable JSON ({e}); restore it from a backup or move the run aside "
      "with --overwrite"
    ) from e


def check_resume(workdir: str | os.PathLike, new: dict) -> list[str]:
  """Refuses a resume that would change the run (RunMismatch, nothing changed); returns the
  lines to announce."""
  steps = checkpoint_steps(workdir)
  if steps and new["steps"] < steps[-1]:
    raise RunMismatch(
      f"--steps={new['steps']} is below the newest checkpoint (step {steps[-1]}) of {workdir}; "
      f"nothing was changed. Pass --steps={steps[-1]} or more to continue the run"
    )
  old = read_run(workdir)
  if old is None:
    logging.warning("%s has no %s (an older run): its settings are not checked", workdir, RUN_FILE)
    return []
  refused, notes = compare(old, new)
  if refused:
    field, was, now = refused[0]
    more = f" (and {len(refused) - 1} more differences)" if len(refused) > 1 else ""
    raise RunMismatch(
      f"--resume: {workdir} was trained with {field} = {was!r}, this command gives {now!r}"
      f"{more}; nothing was changed. Resume with the run's settings (see {RUN_FILE}) or start "
      "a new run in another --workdir"
    )
  if "config.train.steps" in {n.split(" ")[0] for n in notes}:
    notes.append(f"the learning-rate schedule is now that of {new['steps']} steps")
  return notes


def write_run(workdir: str | os.PathLike, record: dict, resumed_from: int | None = None) -> None:
  """Writes run.json atomically; on a resume the recorded identity is kept and the new
  settings (steps, rates, commit) are appended to its "resumes" list."""
  path = Path(workdir) / RUN_FILE
  if resumed_from is not None:
    old = read_run(workdir)
    if old is not None:
      entry = {
        "from_step": resumed_from,
        "time": record["created"],
        "steps": record["steps"],
        "optim": record["config"]["optim"],
        "memory": record["config"]["memory"],
        "mesh": record["config"]["mesh"],
        "commit": record["commit"],
      }
      record = old | {
        "steps": record["steps"],
        "config": old["config"]
        | {k: record["config"][k] for k in ("train", "optim", "memory", "mesh")},
        "resumes": [*old.get("resumes", []), entry],
      }
  atomic_write(path, json.dumps(record, indent=2) + "\n")


def atomic_write(path: Path, text: str) -> None:
  """Writes a file so that a reader sees the old or the new content, never half (write a
  temporary file, fsync, rename)."""
  tmp = path.with_name(path.name + ".tmp")
  with _naming(path):
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _naming(path: Path):
  """Adds the file's name to an OSError that lacks it (a failed write() names no file)."""
  try:
    yield
  except OSError as e:
    if e.filename is None and e.errno is not None:
      raise OSError(e.errno, e.strerror, str(path)) from e
    raise


class MetricsLog:
  """`metrics.jsonl`: appended and flushed record by record, fsync'd at every checkpoint, cut
  back to the restored step on resume (dropping a line torn by a kill)."""

  def __init__(self, path: str | os.PathLike, enabled: bool = True):
    self.path = Path(path)
    self.enabled = enabled  # multi-host: process 0 alone writes

  def append(self, record: dict) -> None:
    if not self.enabled:
      return
    with _naming(self.path), open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()

  def sync(self) -> None:
    """fsync: the records written so far survive a crash of the machine."""
    if not self.enabled or not self.path.exists():
      return
    with _naming(self.path):
      fd = os.open(self.path, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)

  def cut_back(self, step: int) -> None:
    """Keeps the records of steps <= `step` (those before the checkpoint a run resumes from),
    each once; unreadable lines (a torn last line) are dropped with a warning."""
    if not self.enabled or not self.path.exists():
      return
    lines = self.path.read_text(errors="replace").splitlines()
    keep, seen = [], set()
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        s = int(record["step"])
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        where = "its last line" if i == len(lines) - 1 else f"line {i + 1}"
        logging.warning("%s: dropped %s, not a whole record: %.60r", self.path, where, line)
        continue
      key = (s, "val_loss" in record)  # a step has one training and one evaluation record
      if s <= step and key not in seen:
        seen.add(key)
        keep.append(line)
    atomic_write(self.path, "".join(line + "\n" for line in keep))
