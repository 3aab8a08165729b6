"""The allocation U-curve (paper Fig. 3 left): iso-parameter Engram-MoE models at each rho.

python -m experiments.allocation --workdir=runs/studies   # preset cpu_study
python -m experiments.allocation --preset=tiny --rhos=1,0.5 --seeds=0 --steps=2   # seconds

rho is the share of the MoE's sparse budget left to routed experts (rho = 1: the pure MoE);
the rest becomes Engram tables (`params.iso_param_engram`). Resumable: a restarted study skips
finished runs. Writes WORKDIR/allocation.json and allocation.png. Exit codes: 0, 1 error, 2 usage.
"""

from absl import app, flags

from engram_jax import studies
from experiments import cli, study_cli

_RHOS = flags.DEFINE_list("rhos", ["1.0", "0.9", "0.8", "0.7", "0.6", "0.5", "0.4"], "Rhos.")

main = study_cli.main_for(
  "allocation",
  lambda exp, seeds, steps: studies.allocation(exp, study_cli.floats(_RHOS), seeds, steps),
  [0, 1, 2],
  lambda run: f"--rhos={run.coords['rho']:g}",
)

if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("allocation"))
