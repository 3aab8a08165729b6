"""Tests of the studies (engram_jax/studies) and their scripts (experiments/<study>.py)."""

import dataclasses
import json

import numpy as np
import pytest

from engram_jax import params as params_lib
from engram_jax import presets, studies

# The studies that really train run `tiny` for its own steps, evaluated and saved once at the
# end: the learning-rate schedule (compiled into the train step) depends on the steps, so at the
# preset's steps a point that is `tiny` itself (memory_scaling x1, placement block1) or its
# baseline (allocation rho 1) loads the train step that the shared `tiny_run` (conftest), the
# notebooks and the other tiny runs of the suite compiled, from the persistent compilation cache.
STEPS = presets.tiny().train.steps
# The ablation point that trains: larger initial table rows, the model's own train and eval steps
# (the init std enters only the tables' initialisation), so only its init compiles anew.
ABLATION = "init_std_1"


@pytest.fixture(scope="module")
def exp():
  return presets.tiny()


@pytest.fixture(scope="module")
def trained_exp(exp):
  """`tiny`, evaluated and checkpointed only at its last step."""
  train = dataclasses.replace(exp.train, eval_every=STEPS, checkpoint_every=STEPS)
  return dataclasses.replace(exp, train=train)


def test_allocation_runs_are_iso_parameter(exp):
  runs = studies.allocation(exp, [1.0, 0.5], [0, 1], steps=3)
  assert [r.name for r in runs] == ["rho1_seed0", "rho1_seed1", "rho0.5_seed0", "rho0.5_seed1"]
  moe, engram = runs[0].exp.model, runs[2].exp.model
  assert moe.engram is None and engram.engram is not None
  assert runs[0].coords["table_params"] == 0 and runs[2].coords["table_params"] > 0
  assert runs[2].coords["routed_experts"] == engram.moe.num_experts
  assert engram.moe.num_experts < moe.moe.num_experts
  total = lambda m: params_lib.count_params(m).total
  assert total(engram) <= total(moe)
  assert {r.exp.train.seed for r in runs} == {0, 1} and all(r.exp.train.steps == 3 for r in runs)


def test_memory_scaling_scales_only_the_tables(exp):
  runs = studies.memory_scaling(exp, [0.25, 1.0, 4.0], [0])
  sizes = [r.coords["table_params"] for r in runs]
  assert sizes == sorted(sizes) and sizes[-1] > 10 * sizes[0]
  for r in runs:  # everything but the table bases is the preset's
    e = dataclasses.replace(r.exp.model.engram, table_bases=exp.model.engram.table_bases)
    assert dataclasses.replace(r.exp.model, engram=e) == exp.model


def test_placement_moves_the_layer_and_splits_the_budget(exp):
  runs = {r.coords["placement"]: r.exp.model.engram for r in studies.placement(exp, [0])}
  assert set(runs) == {"block0", "block1"}  # tiny has two blocks: no split of two others
  assert runs["block0"].layer_ids == (0,) and runs["block1"].layer_ids == (1,)
  deeper = dataclasses.replace(exp, model=dataclasses.replace(exp.model, num_layers=3))
  split = {r.coords["placement"]: r.exp.model.engram for r in studies.placement(deeper, [0])}
  assert split["blocks1+2"].layer_ids == (1, 2)
  assert split["blocks1+2"].table_bases == tuple(b // 2 for b in exp.model.engram.table_bases)


def test_each_ablation_changes_what_it_names(exp):
  table = studies.ablation_variants(exp)
  e = exp.model.engram
  changed = {
    v: {k for k, x in vars(r.exp.model.engram).items() if x != getattr(e, k)}
    for v, r in ((r.coords["variant"], r) for r in studies.ablations(exp, [0]))
  }
  assert changed["full"] == set() and changed["shared_gate"] == {"gating"}
  assert changed["no_gate"] == {"gating"} and changed["no_short_conv"] == {"short_conv"}
  assert changed["no_compression"] == {"compress_tokens"}
  assert changed["4grams"] == {"max_ngram_size", "table_bases"}
  assert table["init_std_1"] == {"engram_init_std": 1.0}
  with pytest.raises(ValueError, match="variants: expected names"):
    studies.ablations(exp, [0], variants=["no_engram"])


def test_run_study_skips_finished_runs_and_resumes_the_rest(exp, tmp_path, monkeypatch):
  calls = []

  def fake_train(run_exp, workdir, *, resume, **kw):
    calls.append((workdir.name, resume))
    workdir.mkdir(parents=True, exist_ok=True)
    loss = 5.0 + run_exp.train.seed / 10
    (workdir / "run.json").write_text(json.dumps({"commit": f"c{run_exp.train.seed}"}))
    (workdir / "results.json").write_text(json.dumps({"val_loss": loss, "steps": 2}))
    return {"val_loss": loss, "steps": 2}

  monkeypatch.setattr(studies.loop, "train", fake_train)
  runs = studies.ablations(exp, [0, 1], variants=["full", "no_gate"])
  (tmp_path / "ablations" / "full_seed1").mkdir(parents=True)  # interrupted: no results yet
  summary = studies.run_study("ablations", runs, tmp_path, lambda r: f"cmd {r.name}")
  assert calls == [
    ("full_seed0", False),
    ("full_seed1", True),
    ("no_gate_seed0", False),
    ("no_gate_seed1", False),
  ]
  assert [r["val_loss"] for r in summary["runs"]] == [5.0, 5.1, 5.0, 5.1]
  assert summary["runs"][1]["command"] == "cmd full_seed1" and summary["cpu"]
  assert [r["trained_at"] for r in summary["runs"]] == ["c0", "c1", "c0", "c1"]
  assert json.loads((tmp_path / "ablations.json").read_text()) == summary
  assert (tmp_path / "ablations.png").stat().st_size > 1000
  rows = studies.table(summary).splitlines()
  assert rows[0] == "| variant | seed 0 | seed 1 | mean | range | vs first (s.e.) |"
  assert rows[3] == "| no_gate | 5.0000 | 5.1000 | 5.0500 | 0.1000 | +0.0000 (0.0000) |"
  calls.clear()
  studies.run_study("ablations", runs, tmp_path, lambda r: "")
  assert calls == []  # every run finished: nothing trains again


def test_a_study_script_trains_and_its_command_reruns_a_point(run_scripts, small_corpus, tmp_path):
  # Both scripts as `python -m` runs them, in one process (`run_scripts`, conftest). The point:
  # the ablation that changes only the tables' initial rows, at the preset's steps (see ABLATION).
  # The small corpus: the embedded one takes seconds to tokenize.
  args = ["--preset=tiny", f"--variants={ABLATION}", "--seeds=0", f"--steps={STEPS}"]
  args += [f"--corpus={small_corpus}", f"--workdir={tmp_path}"]
  r, bad = run_scripts(
    [
      ("experiments.ablations", ["--noprogress", *args]),
      ("experiments.allocation", ["--rhos=abc", f"--workdir={tmp_path}"]),
    ]
  )
  assert r.returncode == 0, r.stderr[-2000:]
  (run,) = json.loads((tmp_path / "ablations.json").read_text())["runs"]
  assert run["variant"] == ABLATION and run["steps"] == STEPS and run["val_loss"] > 0
  assert (
    run["command"].startswith("python -m experiments.ablations")
    and f"--variants={ABLATION}" in run["command"]
  )
  assert (tmp_path / "ablations.png").exists() and f"| {ABLATION} |" in r.stdout
  assert bad.returncode != 0 and "--rhos: expected numbers" in bad.stderr


def test_log_linear_fit_recovers_the_slope_and_its_standard_error():
  sizes = [1e3, 2e3, 4e3, 8e3, 32e3] * 2
  exact = [5.0 - 0.03 * np.log(s) for s in sizes]
  fit = studies.log_linear_fit(sizes, exact)
  assert fit["slope"] == pytest.approx(-0.03) and fit["slope_stderr"] < 1e-9
  assert fit["slope_per_doubling"] == pytest.approx(-0.03 * np.log(2)) and fit["points"] == 10
  noisy = np.asarray(exact) + np.random.default_rng(0).normal(0, 0.01, len(sizes))
  fit = studies.log_linear_fit(sizes, noisy)
  coef, cov = np.polyfit(np.log(sizes), noisy, 1, cov="unscaled")
  slope, residual = coef[0], noisy - np.polyval(coef, np.log(sizes))
  stderr = np.sqrt(cov[0, 0] * (residual @ residual) / (len(sizes) - 2))
  assert fit["slope"] == pytest.approx(slope) and fit["slope_stderr"] == pytest.approx(stderr)
  with pytest.raises(ValueError, match=">= 3 points over >= 2 sizes"):
    studies.log_linear_fit([1e3, 1e3, 1e3], [1.0, 2.0, 3.0])


def test_log_linear_fit_gives_each_seed_its_intercept():
  sizes = [1e3, 2e3, 4e3, 8e3] * 2
  seeds = [0] * 4 + [1] * 4
  losses = [5.0 - 0.03 * np.log(s) + 0.1 * seed for s, seed in zip(sizes, seeds, strict=True)]
  pooled = studies.log_linear_fit(sizes, losses)
  paired = studies.log_linear_fit(sizes, losses, seeds)
  assert paired["slope"] == pytest.approx(-0.03) and paired["slope_stderr"] < 1e-9
  assert paired["seeds"] == 2 and pooled["seeds"] == 1
  assert pooled["slope_stderr"] > 1e-3  # the seed offset lands in the pooled fit's residuals


def test_table_differences_are_paired_by_seed():
  runs = [
    {"rho": rho, "seed": seed, "val_loss": loss}
    for rho, losses in ((1.0, (5.0, 5.2, 5.4)), (0.5, (4.9, 5.2, 5.2)))
    for seed, loss in enumerate(losses)
  ]
  rows = studies.table({"runs": runs}).splitlines()
  assert rows[2] == "| 1.0 | 5.0000 | 5.2000 | 5.4000 | 5.2000 | 0.4000 | +0.0000 |"
  # differences -0.1, 0, -0.2: mean -0.1, standard error 0.1 / sqrt(3)
  assert rows[3] == "| 0.5 | 4.9000 | 5.2000 | 5.2000 | 5.1000 | 0.3000 | -0.1000 (0.0577) |"


def test_memory_scaling_summary_has_the_fit(exp, tmp_path, monkeypatch):
  def fake_train(run_exp, workdir, **kw):
    workdir.mkdir(parents=True, exist_ok=True)
    loss = 6.0 - 0.1 * np.log(sum(run_exp.model.engram.table_bases)) + run_exp.train.seed / 100
    (workdir / "results.json").write_text(json.dumps({"val_loss": loss, "steps": 2}))
    return {"val_loss": loss, "steps": 2}

  monkeypatch.setattr(studies.loop, "train", fake_train)
  runs = studies.memory_scaling(exp, [0.25, 1.0, 4.0], [0, 1])
  summary = studies.run_study("memory_scaling", runs, tmp_path, lambda r: "")
  assert summary["fit"]["points"] == 6 and -0.11 < summary["fit"]["slope"] < -0.09
  assert (tmp_path / "memory_scaling.png").stat().st_size > 1000


def test_the_study_preset_is_cpu_small_shortened():
  study, small = presets.get("cpu_study"), presets.get("cpu_small")
  assert study.model == small.model and study.train.steps < small.train.steps
  assert study.train.eval_every == study.train.steps  # one evaluation, at the end
  assert study.train.steps % study.train.checkpoint_every == 0


@pytest.mark.parametrize(
  ("study", "make"),
  [
    ("allocation", lambda exp: studies.allocation(exp, [1.0, 0.5], [0], steps=STEPS)),
    ("memory_scaling", lambda exp: studies.memory_scaling(exp, [0.5, 1.0, 2.0], [0], steps=STEPS)),
    ("placement", lambda exp: studies.placement(exp, [0], steps=STEPS)),
    ("ablations", lambda exp: studies.ablations(exp, [0], steps=STEPS, variants=[ABLATION])),
  ],
)
def test_each_study_trains_at_tiny_size(study, make, trained_exp, small_corpus, tmp_path):
  runs = make(trained_exp)
  summary = studies.run_study(
    study, runs, tmp_path, lambda r: r.name, corpus_files=(small_corpus,), progress=False
  )
  assert [r["name"] for r in summary["runs"]] == [r.name for r in runs]
  assert all(np.isfinite(r["val_loss"]) and r["steps"] == STEPS for r in summary["runs"])
  assert json.loads((tmp_path / f"{study}.json").read_text()) == summary
  assert (tmp_path / f"{study}.png").stat().st_size > 1000
  assert ("fit" in summary) == (study == "memory_scaling")
