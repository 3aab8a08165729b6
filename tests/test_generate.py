"""Tests for engram_jax/infer/generate.py: the same text from every memory backend."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.data import default_tokenizer_path
from engram_jax.infer import Generator
from engram_jax.model import EngramLM


@pytest.fixture(scope="module")
def trained(tiny_run):
  workdir, _, _ = tiny_run
  return workdir


def test_every_backend_generates_the_same(trained):
  workdir = trained
  outputs, logits = {}, {}
  for kind, options in (("device", {}), ("host", {}), ("tiered", {"cache_fraction": 0.1})):
    gen = Generator.from_checkpoint(workdir, "tiny", kind, **options)
    outputs[kind] = gen.generate("And God said", max_new_tokens=6)
    logits[kind] = gen.next_token_logits([5, 17, 230])
    assert gen.tables[1].stats()["fetches"] > 0
    if kind == "tiered":  # calibrated on the prompt stream: the prompt's rows are cached
      table, layout = gen.tables[1], gen.hashing.layouts[1]
      prompt = np.asarray([gen.tokenizer.encode("And God said").ids])
      rows = np.asarray(layout.row_ids(gen.hashing.hash_ids(prompt)[1]))
      assert set(rows.reshape(-1)) <= set(np.asarray(table.state.cached_ids).tolist())
      assert table.stats()["hits"] > 0
  assert outputs["device"] == outputs["host"] == outputs["tiered"]
  assert len(outputs["device"]) > 0
  np.testing.assert_allclose(logits["host"], logits["device"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits["tiered"], logits["device"], rtol=1e-5, atol=1e-5)


def test_cached_decoding_matches_the_full_forward(trained):
  workdir = trained
  gen = Generator.from_checkpoint(workdir, "tiny", "host")
  # The trained convolution is still near its zero start: make its decoding state matter.
  conv = gen.params["block_1"]["engram"]["conv_kernel"]
  gen.params["block_1"]["engram"]["conv_kernel"] = conv + 0.5
  prompt = "And God said, Let there be"
  want = gen.greedy_without_cache(prompt, 8)  # re-runs the whole sequence every step
  assert len(want) == 8
  assert gen.generate(prompt, max_new_tokens=8) == gen.tokenizer.decode(want)


def test_padding_does_not_change_the_logits(trained):
  workdir = trained
  gen = Generator.from_checkpoint(workdir, "tiny", "device")
  ids = np.asarray([[7, 99, 1000, 42]])
  padded = gen.next_token_logits(ids[0].tolist())  # read inside a 64-token bucket
  hash_ids = gen.hashing.hash_ids(ids)
  rows = {
    layer: jnp.asarray(gen.tables[layer].fetch(layout.row_ids(hash_ids[layer])))
    for layer, layout in gen.hashing.layouts.items()
  }
  # The whole unpadded sequence through the model (jitted: one compile, not one per operation).
  logits, _ = jax.jit(EngramLM(gen.model_cfg).apply)(
    {"params": gen.params, "balance": gen.balance}, jnp.asarray(ids, jnp.int32), rows
  )
  np.testing.assert_allclose(padded, np.asarray(logits[0, -1]), rtol=1e-5, atol=1e-5)


def test_errors(trained, tmp_path):
  workdir = trained
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Generator.from_checkpoint(tmp_path, "tiny")
  gen = Generator.from_checkpoint(workdir, "tiny", "device")
  with pytest.raises(ValueError, match="prompt"):
    gen.generate("", 3)


def test_serves_a_run_from_its_record(trained):
  workdir = trained
  recorded = Generator.from_checkpoint(workdir)  # the model and tokenizer from run.json
  explicit = Generator.from_checkpoint(workdir, "tiny", "device")
  assert recorded.model_cfg == explicit.model_cfg
  assert recorded.generate("And God said", 5) == explicit.generate("And God said", 5)


def test_serves_a_run_with_its_own_tokenizer(small_corpus, tmp_path):
  from engram_jax import presets
  from engram_jax.data import tokenizer_train
  from engram_jax.train import loop

  tokenizer = tmp_path / "tokenizer.json"
  tokenizer_train.train_tokenizer(small_corpus, 600, tokenizer, show_progress=False)
  exp = presets.tiny()
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=2, eval_every=2))
  run = tmp_path / "run"
  loop.train(exp, run, corpus_files=(small_corpus,), tokenizer_file=str(tokenizer), progress=False)
  gen = Generator.from_checkpoint(run)
  assert gen.tokenizer.get_vocab_size() == gen.model_cfg.vocab_size <= 600
  assert isinstance(gen.generate("And God said", 3), str)
  with pytest.raises(ValueError, match=r"has 8192 ids; the run .* vocabulary of \d+"):
    Generator.from_checkpoint(run, tokenizer_file=str(default_tokenizer_path()))
  tokenizer.rename(tmp_path / "elsewhere.json")
  with pytest.raises(FileNotFoundError, match=r"tokenizer .* is missing; pass it with --tokenizer"):
    Generator.from_checkpoint(run)
  assert Generator.from_checkpoint(run, tokenizer_file=str(tmp_path / "elsewhere.json"))


def test_generate_script_reports_one_line(trained, tmp_path, run_scripts):
  workdir = trained
  # Both as `python -m experiments.generate` runs them, in one process (conftest).
  ok, r = run_scripts(
    [
      ("experiments.generate", [f"--workdir={workdir}", "--max_new_tokens=3"]),
      ("experiments.generate", [f"--workdir={workdir}", f"--tokenizer={tmp_path / 'none.json'}"]),
    ]
  )
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("generate: ")


def test_serving_skips_a_corrupt_checkpoint_and_moves_nothing(finished_run):
  import json

  from engram_jax.run import load_run

  workdir, _, _ = finished_run
  # Step 6's record no longer matches a leaf serving reads: verification must catch it.
  record_file = workdir / "checkpoints" / "6" / "checksums" / "metadata"
  record = json.loads(record_file.read_text())
  leaf = next(k for k in sorted(record["state"]) if k.startswith("['params']"))
  record["state"][leaf]["checksum"] = "0" * 16
  record_file.write_text(json.dumps(record))
  assert load_run(workdir).step == 3  # falls back, read-only
  assert Generator.from_checkpoint(workdir).generate("And God said", 2) is not None
  assert (workdir / "checkpoints" / "6").is_dir()
  assert not (workdir / "checkpoints" / "corrupt").exists()


def test_serves_a_run_trained_with_scanned_blocks(small_corpus, tmp_path):
  from engram_jax import presets
  from engram_jax.train import loop

  exp = presets.tiny()
  model = dataclasses.replace(exp.model, num_layers=4, scan_layers=True)  # blocks 2-3 scanned
  exp = dataclasses.replace(
    exp, model=model, train=dataclasses.replace(exp.train, steps=2, eval_every=2)
  )
  loop.train(exp, tmp_path, corpus_files=(small_corpus,), progress=False)
  gen = Generator.from_checkpoint(tmp_path)
  # Unstacked for cached decoding: every block under its own name again.
  assert not gen.model_cfg.scan_layers
  assert {"block_2", "block_3"} <= set(gen.params) and "blocks_2_4" not in gen.params
  assert gen.generate("And God said", max_new_tokens=3) == gen.generate(
    "And God said", max_new_tokens=3
  )
