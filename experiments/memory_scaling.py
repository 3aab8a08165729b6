"""Memory scaling (paper Fig. 3 right): a fixed backbone with Engram tables of several sizes.

python -m experiments.memory_scaling --workdir=runs/studies   # preset cpu_study
python -m experiments.memory_scaling --preset=tiny --factors=0.25,1 --seeds=0 --steps=2

Each factor scales the preset's table bases (rows per head); the default spans 32x. Resumable.
Writes WORKDIR/memory_scaling.json and memory_scaling.png. Exit codes: 0, 1 error, 2 usage.
"""

from absl import app, flags

from engram_jax import studies
from experiments import cli, study_cli

_FACTORS = flags.DEFINE_list("factors", ["0.125", "0.25", "0.5", "1", "2", "4"], "Table scales.")

main = study_cli.main_for(
  "memory_scaling",
  lambda exp, seeds, steps: studies.memory_scaling(exp, study_cli.floats(_FACTORS), seeds, steps),
  [0, 1],
  lambda run: f"--factors={run.coords['factor']:g}",
)

if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("memory_scaling"))
