"""The paper's ablation table: shared gate, no gate, no tokenizer compression, no short
convolution, 4-grams at the same table budget, table init std 1.0, against the full model.

python -m experiments.ablations --workdir=runs/studies   # preset cpu_study
python -m experiments.ablations --preset=tiny --variants=full,no_gate --seeds=0 --steps=2

Every variant is an option of `EngramConfig`/`ModelConfig` (`studies.ablation_variants`).
Resumable. Writes WORKDIR/ablations.json and ablations.png. Exit codes: 0, 1 error, 2 usage.
"""

from absl import app, flags

from engram_jax import studies
from experiments import cli, study_cli

_VARIANTS = flags.DEFINE_list("variants", None, "Variants to run (default: all).")

main = study_cli.main_for(
  "ablations",
  lambda exp, seeds, steps: studies.ablations(exp, seeds, steps, _VARIANTS.value),
  [0, 1],
  lambda run: f"--variants={run.coords['variant']}",
)

if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("ablations"))
