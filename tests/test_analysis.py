"""The analysis library (engram_jax/analysis) and experiments/analyze.py, on the `tiny` preset."""

import collections
import dataclasses
import html
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import presets
from engram_jax.analysis import (
  AnalysisModel,
  NgramCounts,
  cka_matrix,
  frequent_mask,
  gate_map,
  linear_cka,
  logit_lens,
  readout,
  sensitivity,
  soft_alignment,
  table_diagnostics,
  table_usage,
  token_losses,
  write_gate_html,
  write_gate_png,
)
from engram_jax.data import default_tokenizer_path
from engram_jax.hashing import EngramHashing
from engram_jax.layers.engram import Engram
from engram_jax.model import EngramLM
from engram_jax.run import load_run
from engram_jax.tokenization import load_tokenizer

TEXT = "And God said, Let there be light: and there was light. And God saw the light."


@pytest.fixture(scope="module")
def loaded(tiny_run):
  return load_run(tiny_run[0])


@pytest.fixture(scope="module")
def model(loaded):
  return AnalysisModel.from_run(loaded)


@pytest.fixture(scope="module")
def tokens(loaded):
  ids = loaded.tokenizer.encode(TEXT, add_special_tokens=False).ids
  return np.asarray([ids, ids[::-1]], np.int64)  # [2, T]


# --- CKA ---


def _cka_by_gram_matrices(x, y):
  """CKA as HSIC of centred Gram matrices: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
  return np.trace(k @ l_) / np.sqrt(np.trace(k @ k) * np.trace(l_ @ l_))


def test_cka_is_one_under_rotation_and_scaling():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8))
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
  assert linear_cka(x, -3.5 * x) == pytest.approx(1.0, abs=1e-12)
  assert linear_cka(x, x + 7.0) == pytest.approx(1.0, abs=1e-12)  # columns are centred


def test_cka_matches_the_closed_form():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(50, 6)), rng.normal(size=(50, 11))
  y[:, :3] += 2 * x[:, :3]
  assert linear_cka(x, y) == pytest.approx(_cka_by_gram_matrices(x, y), rel=1e-10)
  assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
  reps_a = [x, y, x @ rng.normal(size=(6, 4))]
  reps_b = [y, x]
  m = cka_matrix(reps_a, reps_b)
  assert m.shape == (3, 2)
  for i, a in enumerate(reps_a):
    for j, b in enumerate(reps_b):
      assert m[i, j] == pytest.approx(_cka_by_gram_matrices(a, b), rel=1e-10)
  assert m[0, 1] == pytest.approx(1.0) and m[1, 0] == pytest.approx(1.0)


def test_cka_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match="same N"):
    linear_cka(np.ones((4, 2)), np.ones((5, 2)))
  with pytest.raises(ValueError, match="non-constant"):
    linear_cka(np.ones((4, 2)), np.arange(8.0).reshape(4, 2))


def test_soft_alignment_weights_the_most_similar_rows():
  cka = np.array([[1.0, 0.2], [0.5, 0.2], [0.0, 0.6]])  # [La = 3, Lb = 2]
  # Column 0: rows 0 (1.0) and 1 (0.5) -> 0.5 / 1.5; column 1: rows 2 (0.6) and 0 (0.2, first).
  np.testing.assert_allclose(soft_alignment(cka, top_k=2), [0.5 / 1.5, (2 * 0.6) / 0.8])


# --- LogitLens ---


def test_logit_lens_last_block_is_zero(model, tokens):
  kl = logit_lens(model, [tokens, tokens[:1]])
  assert kl.shape == (model.model_cfg.num_layers,)
  assert kl[-1] == pytest.approx(0.0, abs=1e-7)  # the model's own readout
  assert np.all(kl[:-1] > 0)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_logit_lens_matches_a_float64_readout(model, tokens):
  out = model.forward(tokens)
  log_p = _log_softmax(out.logits)
  for i, h in enumerate(out.block_outputs):
    log_q = _log_softmax(readout(model.model_cfg, model.params, jnp.asarray(h)))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)  # [B, T]
    np.testing.assert_allclose(out.lens_kl[i], kl, atol=2e-5, rtol=1e-4)
    assert np.all(out.lens_kl[i] >= -1e-6)


def _untrained(model_cfg, seed=0):
  tokenizer = load_tokenizer(default_tokenizer_path())
  model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.get_vocab_size())
  hashing = EngramHashing.from_tokenizer(model_cfg.engram, tokenizer, model_cfg.engram_init_std)
  rows = {i: jnp.zeros((1, 1, lay.num_heads, lay.dim)) for i, lay in hashing.layouts.items()}
  init = jax.jit(
    lambda k: nn.unbox(EngramLM(model_cfg).init(k, jnp.zeros((1, 1), jnp.int32), rows))
  )
  variables = init(jax.random.key(seed))
  tables = {
    i: np.asarray(lay.init(jax.random.key(seed + i + 1))) for i, lay in hashing.layouts.items()
  }
  return model_cfg, variables, hashing, tables, tokenizer


def test_logit_lens_of_a_scanned_model():
  cfg = dataclasses.replace(presets.tiny().model, num_layers=4, scan_layers=True)
  cfg, variables, hashing, tables, tokenizer = _untrained(cfg)
  assert "blocks_2_4" in variables["params"]  # blocks 2-3 are scanned
  m = AnalysisModel(cfg, variables["params"], variables.get("balance", {}), hashing, tables)
  assert not m.model_cfg.scan_layers and "block_3" in m.params
  ids = np.asarray([tokenizer.encode(TEXT).ids], np.int64)
  out = m.forward(ids)
  rows = {i: jnp.asarray(r) for i, r in m.rows(ids).items()}
  scanned_logits, _ = jax.jit(EngramLM(cfg).apply)(variables, jnp.asarray(ids, jnp.int32), rows)
  np.testing.assert_allclose(out.logits, scanned_logits, atol=1e-5)  # the same function
  kl = logit_lens(m, [ids])
  assert kl.shape == (4,) and kl[-1] == pytest.approx(0.0, abs=1e-7)
  assert np.all(kl[:-1] >= 0)


# --- Engram removed ---


def _gates_closed(next_fun, args, kwargs, context):
  """Calls every Engram layer with all positions dead: its gate forced to 0."""
  if isinstance(context.module, Engram) and context.method_name == "__call__":
    kwargs = {**kwargs, "dead": jnp.ones(args[0].shape[:2], bool)}  # hidden [B, T, M, D]
  return next_fun(*args, **kwargs)


def test_zeroing_engram_equals_gates_forced_to_zero(model, tokens):
  variables = {"params": model.params, "balance": model.balance}
  rows = {i: jnp.asarray(r) for i, r in model.rows(tokens).items()}
  x = jnp.asarray(tokens, jnp.int32)
  lm = EngramLM(model.model_cfg)

  @jax.jit  # the interceptor acts while tracing; one compile instead of one per operation
  def gates_closed(variables, x, rows):
    with nn.intercept_methods(_gates_closed):
      return lm.apply(variables, x, rows, mutable=["intermediates"])

  (closed, _), state = gates_closed(variables, x, rows)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(state))
  zeroed = model.forward(tokens, zero_engram=True)
  np.testing.assert_allclose(zeroed.logits, closed, atol=1e-5)
  full = model.forward(tokens)
  assert np.abs(full.logits - zeroed.logits).max() > 1e-3
  # Zero rows are not the same: the projection's bias still reaches the streams.
  zero_rows = {i: jnp.zeros_like(r) for i, r in rows.items()}
  zero_rows_logits, _ = jax.jit(lm.apply)(variables, x, zero_rows)
  assert np.abs(zero_rows_logits - zeroed.logits).max() > 1e-6
  # The gates are still computed (and recorded) while the branch is removed.
  np.testing.assert_allclose(zeroed.gates[1], full.gates[1])


def test_ngram_counts_and_frequent_mask_against_a_counter():
  rng = np.random.default_rng(0)
  stream = rng.integers(0, 4, size=400)
  counts = NgramCounts.from_tokens(stream, 3, vocab_size=4)
  brute = collections.Counter(tuple(stream[i : i + 3]) for i in range(len(stream) - 2))
  grams = np.asarray([[a, b, c] for a in range(4) for b in range(4) for c in range(4)])
  np.testing.assert_array_equal(counts.count(grams), [brute[tuple(g)] for g in grams])
  w = rng.integers(0, 4, size=(3, 9))
  tokens, targets = w[:, :-1], w[:, 1:]
  mask = frequent_mask(tokens, targets, counts, min_count=8)
  for b in range(3):
    for t in range(8):
      expect = t >= 1 and brute[(tokens[b, t - 1], tokens[b, t], targets[b, t])] >= 8
      assert mask[b, t] == expect
  with pytest.raises(ValueError, match="order"):
    NgramCounts.from_tokens(stream, 5, vocab_size=2**16)


def test_token_losses_are_cross_entropies():
  logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
  np.testing.assert_allclose(token_losses(logits, np.array([[0, 2]])), [[np.log(2), -np.log(0.8)]])


def test_sensitivity_splits_every_token_into_one_category(model, loaded, tokens):
  windows = np.concatenate([tokens, tokens], axis=1)  # [B, T + 1], T = 2 T0 - 1: text twice
  n = windows[:, :-1].size
  counts = NgramCounts.from_tokens(windows.reshape(-1), 3, loaded.model_cfg.vocab_size)
  result = sensitivity(model, [windows], counts, min_count=2)
  cats = result["categories"]
  assert cats["all"]["tokens"] == n
  assert cats["frequent_ngram"]["tokens"] + cats["other"]["tokens"] == n
  assert cats["frequent_ngram"]["tokens"] > 0 and cats["other"]["tokens"] > 0
  full = token_losses(model.forward(windows[:, :-1]).logits, windows[:, 1:]).mean()
  assert cats["all"]["loss"] == pytest.approx(full)
  total = sum(cats[c]["loss_increase"] * cats[c]["tokens"] for c in ("frequent_ngram", "other"))
  assert total / n == pytest.approx(cats["all"]["loss_increase"])


# --- Gate maps ---


def test_gate_map_files_escape_the_tokens(model, loaded, tmp_path):
  text = 'a <b>bold</b> & "quoted" line\nAnd God said'
  g = gate_map(model, loaded.tokenizer, text)
  assert set(g.gates) == {1} and g.gates[1].shape == (len(g.token_ids), 2)
  assert np.all((g.gates[1] > 0) & (g.gates[1] < 1))
  write_gate_png(g, tmp_path / "gates.png")
  write_gate_html(g, tmp_path / "gates.html", title="<gates>")
  assert (tmp_path / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  page = (tmp_path / "gates.html").read_text()
  assert "<b>" not in page and "&lt;gates&gt;" in page
  for token in g.token_texts:
    assert f">{html.escape(token)}</span>" in page
  assert any("&lt;" in html.escape(t) or "&amp;" in html.escape(t) for t in g.token_texts)
  assert json.loads(json.dumps(g.to_json()))["tokens"] == list(g.token_texts)


# --- Table diagnostics ---


def test_table_diagnostics_count_rows_like_brute_force(loaded):
  hashing = loaded.hashing
  ids = loaded.tokenizer.encode(TEXT + " " + TEXT.lower(), add_special_tokens=False).ids
  windows = np.asarray([ids[:12], ids[12:24], ids[:12]], np.int64)  # a repeated window
  usage = table_usage(hashing, windows)
  layout = hashing.layouts[1]
  assert [u.head for u in usage] == list(range(layout.num_heads))
  hash_ids = hashing.hash_ids(windows)[1]  # [N, T, H]
  compressed = hashing.compressor(windows)
  pad = hashing.hasher.pad_id
  for u in usage:
    reads = collections.Counter(int(r) for r in hash_ids[..., u.head].reshape(-1))
    row_grams = collections.defaultdict(set)
    for s in range(windows.shape[0]):
      for t in range(windows.shape[1]):
        gram = tuple(
          int(compressed[s, t - k]) if t - k >= 0 else pad for k in range(u.order - 1, -1, -1)
        )
        row_grams[int(hash_ids[s, t, u.head])].add(gram)
    assert u.rows_touched == len(reads)
    assert {int(r): int(c) for r, c in enumerate(u.reads) if c} == dict(reads)
    per_row = u.ngrams_per_row()
    assert {r: int(per_row[r]) for r in row_grams} == {r: len(g) for r, g in row_grams.items()}
    # Every recorded n-gram hashes, on its own, to its row.
    again = hashing.hasher.hash_all(u.ngrams)[1][:, -1, u.head]  # [K, n, H] -> [K]
    np.testing.assert_array_equal(again, u.ngram_rows)
  diag = table_diagnostics(usage, loaded.tables, loaded.tokenizer, top_rows=3)
  heads = diag["1"]["heads"]
  assert diag["1"]["rows_touched"] == sum(u.rows_touched for u in usage)
  for h, u in zip(heads, usage, strict=True):
    assert h["distinct_ngrams"] == u.ngram_rows.size
    assert h["ngrams_per_touched_row"] == pytest.approx(u.ngram_rows.size / u.rows_touched)
    top = h["top_rows"][0]
    assert top["reads"] == u.reads.max() and top["row"] == u.offset + top["head_row"]
    assert sum(g["reads"] for g in top["ngrams"]) <= top["reads"]
    assert len(top["ngrams"][0]["tokens"]) == u.order
    q = h["row_norms"]["touched"]
    assert q == sorted(q) and len(q) == len(h["row_norms"]["quantiles"])


# --- The script ---


def test_analyze_script_writes_everything_and_never_overwrites(tiny_run, tmp_path, run_scripts):
  workdir, _, _ = tiny_run
  out = tmp_path / "analysis"
  flags = [f"--workdir={workdir}", f"--baseline={workdir}", f"--out={out}", "--min_count=2"]
  # Twice, as `python -m experiments.analyze` runs: in one process (conftest).
  r, again = run_scripts([("experiments.analyze", flags), ("experiments.analyze", flags)])
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((out / "analysis.json").read_text())
  for name in summary["files"]:
    assert (out / name).stat().st_size > 0, name
  assert {p.suffix for p in out.iterdir()} == {".json", ".png", ".html"}
  lens = json.loads((out / "logit_lens.json").read_text())
  assert lens["run"][-1] == pytest.approx(0.0, abs=1e-7) and lens["run"] == lens["baseline"]
  cka = np.asarray(json.loads((out / "cka.json").read_text())["cka"])
  np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-9)  # the run against itself
  sens = json.loads((out / "sensitivity.json").read_text())["categories"]
  assert sens["all"]["tokens"] == summary["validation_tokens"]
  tables = json.loads((out / "tables.json").read_text())
  assert tables["layers"]["1"]["rows_touched"] > 0
  # The second run refused, and wrote, moved or removed nothing: every file the first one
  # listed is still there (checked above), none newer than the end of the first run.
  assert again.returncode == 2 and "Traceback" not in again.stderr
  assert "already exists" in again.stderr and "another --out" in again.stderr
  assert all(p.stat().st_mtime_ns <= r.ended_ns for p in [out, *out.iterdir()])
  assert not list(tmp_path.glob(".analysis.partial-*"))
