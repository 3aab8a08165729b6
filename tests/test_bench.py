"""Every benchmark script runs, at tiny sizes, as `python -m bench.<script>` would: several in one
process (`run_scripts` in conftest: the imports are paid once, and each script sees only its own
absl flags, so they do not collide)."""

import json

# (module, arguments: the smallest sizes and one timed repeat, a line its output must contain)
SCRIPTS = [
  ("bench.hashing", ["--batch=4", "--seq=300", "--repeats=1"], "speedup:"),
  ("bench.train_step", ["--preset=tiny", "--repeats=1"], "of the matmul rate"),
  ("bench.step_profile", ["--preset=tiny", "--repeats=1"], "page faults per step"),
  ("bench.memory", ["--smoke"], "copy"),
  ("bench.generate", ["--preset=tiny", "--new_tokens=3", "--repeats=1"], "same text from both"),
]


def test_bench_scripts_run(run_scripts):
  results = run_scripts([(module, args) for module, args, _ in SCRIPTS])
  failed = [
    f"{module}: exit status {r.returncode}, {expected!r} not in its output\n{r.stderr[-3000:]}"
    for (module, _, expected), r in zip(SCRIPTS, results, strict=True)
    if r.returncode != 0 or expected not in r.stdout
  ]
  assert not failed, "\n\n".join(failed)


def test_v41_rows_runs_and_refuses_to_overwrite(run_scripts, tmp_path):
  smoke = ["--smoke", f"--workdir={tmp_path}"]
  rows = tmp_path / "rows.json"
  r, again, reuse = run_scripts(
    [
      ("bench.v41_rows", [*smoke, f"--json={rows}"]),
      ("bench.v41_rows", smoke),  # the checkpoint is there: measured again only with --reuse
      ("bench.v41_rows", [*smoke, "--reuse", f"--json={rows}"]),
    ]
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "vs memcpy" in r.stdout and "page cache drop:" in r.stdout
  report = json.loads(rows.read_text())
  sources = {"mmap cold", "mmap warm", "host RAM", "host RAM + decode", "tiered"}
  assert {(x["workload"], x["source"]) for x in report["results"]} == {
    (w, s) for w in ("decode", "prefill") for s in sources
  }
  assert again.returncode != 0 and "pass --reuse" in again.stderr
  assert reuse.returncode != 0 and "refusing to overwrite" in reuse.stderr
