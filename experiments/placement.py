"""Engram placement (paper §6.2): one Engram layer at each block in turn, and the same budget
split over two blocks.

python -m experiments.placement --workdir=runs/studies   # preset cpu_study
python -m experiments.placement --preset=tiny --placements=block1 --seeds=0 --steps=2

Resumable. Writes WORKDIR/placement.json and placement.png. Exit codes: 0, 1 error, 2 usage.
"""

from absl import app, flags

from engram_jax import studies
from experiments import cli, study_cli

_PLACEMENTS = flags.DEFINE_list("placements", None, "Placements to run (default: all).")


def _runs(exp, seeds, steps):
  runs = studies.placement(exp, seeds, steps)
  wanted = _PLACEMENTS.value
  if wanted:
    known = {r.coords["placement"] for r in runs}
    if unknown := sorted(set(wanted) - known):
      raise app.UsageError(f"--placements: expected names from {sorted(known)}, got {unknown}")
    runs = [r for r in runs if r.coords["placement"] in wanted]
  return runs


main = study_cli.main_for(
  "placement", _runs, [0, 1], lambda run: f"--placements={run.coords['placement']}"
)

if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("placement"))
