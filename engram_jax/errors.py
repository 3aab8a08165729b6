"""Errors a user can act on, and their one-line form (the scripts in experiments/ print it).

Every script exits with one of `EXIT_CODES`. A `RunError` carries its own exit code and a
message that already says what went wrong and how to go on; an `OSError` anywhere in an
exception's chain (disk full, read-only filesystem, permission denied, ...) is reported as the
path and the OS error; a `ValueError` or `FileNotFoundError` (bad data, a bad tokenizer) as its
message (`one_line`). The traceback goes to a log file (`write_log`: `WORKDIR/error.log` for
training), never to the terminal.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". A training run
# stopped by SIGTERM/SIGINT exits with it after saving a checkpoint: rerun with --resume.
EXIT_INTERRUPTED = 75
EXIT_CODES = {
  EXIT_OK: "done",
  EXIT_ERROR: "error (I/O, data, corrupt checkpoints, divergence); nothing good was lost",
  EXIT_USAGE: "usage: bad flags, or a command that does not fit the workdir (nothing changed)",
  EXIT_INTERRUPTED: "interrupted by a signal after saving a checkpoint: rerun with --resume",
}


class RunError(Exception):
  """An error whose message is the whole story (shown as one line, no traceback)."""

  exit_code = EXIT_ERROR


class UsageRefused(RunError):
  """The command does not fit the workdir or the flags contradict each other; nothing was
  changed."""

  exit_code = EXIT_USAGE


class RunExists(UsageRefused):
  """The workdir holds a run and neither --resume nor --overwrite was given."""


class RunMismatch(UsageRefused):
  """--resume with settings that change the model or the data of the recorded run."""


class CheckpointMismatch(UsageRefused):
  """A checkpoint holds another model (tree structure, shape or dtype) than the one asked for."""


class NoGoodCheckpoint(RunError):
  """Every checkpoint of a run failed verification or could not be read."""


class TrainingDiverged(RunError):
  """The loss became NaN/inf, or jumped far above its running median."""


class Interrupted(RunError):
  """Training stopped on a signal after saving a checkpoint."""

  exit_code = EXIT_INTERRUPTED


def _chain(exc: BaseException):
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


# Fragments of OS error texts that libraries (tensorstore, orbax) re-raise as other types.
_OS_MESSAGES = {
  errno.ENOSPC: "No space left on device",
  errno.EROFS: "Read-only file system",
  errno.EACCES: "Permission denied",
  errno.EFBIG: "File too large",
  errno.EDQUOT: "Disk quota exceeded",
}


def os_error_of(exc: BaseException) -> OSError | None:
  """The OSError behind `exc` (itself, a cause or context, or one named in a wrapped
  message), or None."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno is not None:
      return e
  for e in _chain(exc):
    text = str(e)
    for code, fragment in _OS_MESSAGES.items():
      if fragment.lower() in text.lower():
        paths = re.findall(r'"(/[^"]+)"', text)  # tensorstore quotes the files it names
        return OSError(code, os.strerror(code), paths[0] if paths else None)
  return None


def one_line(exc: BaseException) -> tuple[int, str]:
  """(exit code, one-line message) of an exception."""
  if isinstance(exc, RunError):
    return exc.exit_code, first_line(str(exc))
  os_error = os_error_of(exc)
  if os_error is not None:
    where = os_error.filename
    where = f"cannot write {where}: " if where else ""
    return EXIT_ERROR, f"{where}[Errno {os_error.errno}] {os_error.strerror}"
  return EXIT_ERROR, first_line(f"{type(exc).__name__}: {exc}")


def first_line(text: str) -> str:
  """The first non-empty line of a message."""
  lines = [x for x in text.strip().splitlines() if x.strip()]
  return lines[0] if lines else text


def write_log(exc: BaseException, directory: str | os.PathLike | None, name: str) -> Path:
  """Appends the traceback of `exc` to `directory/error.log` (or, if that cannot be written, to
  a file in the temporary folder) and returns the file's path."""
  text = (
    f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {' '.join(sys.argv)}\n"
    + "".join(traceback.format_exception(exc))
    + "".join(getattr(e, "details", "") for e in _chain(exc))
  )
  candidates = []
  if directory is not None:
    candidates.append(Path(directory) / "error.log")
  candidates.append(Path(tempfile.gettempdir()) / f"{name}-error-{os.getpid()}.log")
  for path in candidates:
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      with open(path, "a") as f:
        f.write(text)
      return path
    except OSError:
      continue
  return candidates[-1]
