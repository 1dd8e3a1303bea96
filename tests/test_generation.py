"""Decoding: greedy parity with HF generate, samplers against HF's warpers and the math, joint
decoding against a full-forward (no cache) reference written here, and decoding on device meshes
against the single-device run.

The mesh runs happen in subprocesses (tests/_generation_mesh_child.py; the device count is fixed
when JAX starts): one with 8 simulated CPU devices, and two processes of 2 devices joined by
jax.distributed. They start in the background when this module's first test runs, so they use the
second core while the in-process tests run; the mesh tests at the end collect their results.
"""

import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation import logits_process as hf_lp

from opt_jax import generation as G
from opt_jax import model as M
from opt_jax import programs
import oracle
from _oracle_fixtures import pair, twin  # noqa: F401  (pair: a pytest fixture)
import _suite_util as U

HERE = os.path.dirname(os.path.abspath(__file__))
MESH_CHILD = os.path.join(HERE, "_generation_mesh_child.py")
import _generation_mesh_child as mesh_child  # noqa: E402  (meshes, cases and sizes it runs)

PROMPT_LENGTHS = [9, 4, 13]   # 3 prompts: batch bucket 4 with one filler row, prompt bucket 16
N = 32                        # most tests share the program of (4, 16, N) per config


def _prompts(config, lengths=PROMPT_LENGTHS, seed=3):
  ids, mask = oracle.padded_batch(config.vocab_size, lengths, max(lengths), "left", seed=seed)
  return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)], ids, mask


def _hf_greedy(hf, ids, mask, n, eos):
  with torch.no_grad():
    out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=n, min_new_tokens=0, pad_token_id=1, eos_token_id=eos,
                      bos_token_id=2)
  rows = []
  for row in out[:, ids.shape[1]:].tolist():
    rows.append(row[:row.index(eos) + 1] if eos in row else row)
  return rows


@pytest.fixture(scope="module")
def pre_ln():
  return twin(oracle.TINY["pre_ln"], seed=2)


def test_greedy_32_tokens_match_hf_generate_left_padded(pair):
  config, hf, params = pair
  prompts, ids, mask = _prompts(config)
  want = _hf_greedy(hf, ids, mask, 32, eos=2)
  got = G.generate(config, params, prompts, max_new_tokens=32)
  assert got == want
  assert max(len(r) for r in got) == 32   # at least one row runs the full length


def test_greedy_stops_at_eos_like_hf(pre_ln):
  config, hf, params = pre_ln
  prompts, ids, mask = _prompts(config)
  free = G.generate(config, params, prompts, max_new_tokens=N, eos_id=None)
  assert all(len(r) == N for r in free)
  eos = free[0][5]   # a token row 0 emits at step 5: rows end at different steps
  want = _hf_greedy(hf, ids, mask, N, eos=eos)
  got = G.generate(config, params, prompts, max_new_tokens=N, eos_id=eos)
  assert got == want
  assert len(got[0]) <= 6 and got[0][-1] == eos
  for row, full in zip(got, free):   # each row is the free-running path cut after its first eos
    assert row == (full[:full.index(eos) + 1] if eos in full else full)


_filter = jax.jit(G.filter_top_k_top_p)   # k and p are traced: one compilation for every case


def test_filter_matches_hf_top_k_top_p_warpers():
  rng = np.random.RandomState(0)
  scores = rng.randn(6, 50).astype(np.float32) * 2
  scores[0, :5] = scores[0, 5]   # ties at the k-th value are kept by both
  for k, p in [(0, 0.9), (5, 1.0), (7, 0.5), (1, 1.0), (0, 1e-4), (20, 0.99)]:
    ref = torch.tensor(scores)
    if k:
      ref = hf_lp.TopKLogitsWarper(k)(None, ref)
    if p < 1:
      ref = hf_lp.TopPLogitsWarper(p)(None, ref)
    got = np.asarray(_filter(jnp.asarray(scores), jnp.int32(k), jnp.float32(p)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref.numpy()), err_msg=f"{k} {p}")
    np.testing.assert_array_equal(got[np.isfinite(got)], scores[np.isfinite(got)])


def test_top_k_1_and_tiny_top_p_equal_greedy(pre_ln):
  config, _, params = pre_ln
  prompts, _, _ = _prompts(config)
  greedy = G.generate(config, params, prompts, max_new_tokens=N)
  for kw in (dict(top_k=1, temperature=1.3), dict(top_p=1e-6, temperature=0.8)):
    assert G.generate(config, params, prompts, max_new_tokens=N, sampler="sample", seed=5,
                      **kw) == greedy, kw


def test_sampling_is_deterministic_by_seed(pre_ln):
  config, _, params = pre_ln
  prompts, _, _ = _prompts(config)
  kw = dict(max_new_tokens=N, sampler="sample", temperature=1.5, eos_id=None)
  a = G.generate(config, params, prompts, seed=11, **kw)
  assert a == G.generate(config, params, prompts, seed=11, **kw)
  assert a != G.generate(config, params, prompts, seed=12, **kw)


@pytest.mark.parametrize("temperature,top_k", [(0.7, 0), (1.0, 5)])
def test_sampled_token_distribution_matches_softmax(pre_ln, temperature, top_k):
  config, hf, params = pre_ln
  prompt = [2, 17, 40, 9]
  n = 4000
  got = G.generate(config, params, [prompt] * n, max_new_tokens=1, sampler="sample",
                   temperature=temperature, top_k=top_k, seed=1, eos_id=None, batch_size=n)
  counts = np.bincount([r[0] for r in got], minlength=config.vocab_size)
  with torch.no_grad():   # the oracle: HF's logits, softmax in float64
    logits = hf(torch.tensor([prompt])).logits[0, -1].double().numpy() / temperature
  if top_k:
    logits = np.where(logits >= np.sort(logits)[-top_k], logits, -np.inf)
  p = np.exp(logits - logits.max())
  p /= p.sum()
  assert counts[p == 0].sum() == 0
  expected = p * n
  big = expected >= 5   # merge small bins so the chi-square approximation holds
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  stat, pval = scipy.stats.chisquare(obs, exp)
  assert pval > 1e-3, (stat, pval)
  assert big.sum() >= (top_k or 6)   # enough categories to mean something


def test_one_compilation_per_bucket_and_draws_independent_of_batching(pre_ln):
  config, _, params = pre_ln
  prompts, _, _ = _prompts(config, lengths=[9, 10, 13, 12])   # all in prompt bucket 16
  kw = dict(max_new_tokens=N, sampler="sample", temperature=1.5, eos_id=None, seed=4)
  whole = G.generate(config, params, prompts, **kw)   # batch bucket 4, prompt bucket 16
  before = programs.compilations("decode")
  # Same buckets, other params, sampler settings, seed and eos: no compilation.
  other = jax.tree.map(lambda x: x * 1.01, params)
  G.generate(config, other, [[2] * 10, [2, 7], [2]], max_new_tokens=N, top_k=3, top_p=0.5,
             temperature=2.0, seed=9, sampler="sample")
  assert programs.compilations("decode") == before
  # Batches of 2 (a new batch bucket: one compilation) draw the same tokens for each prompt.
  assert G.generate(config, params, prompts, batch_size=2, **kw) == whole
  assert programs.compilations("decode") == before + 1
  G.generate(config, params, [[2] * 10, [2] * 9], max_new_tokens=N)
  assert programs.compilations("decode") == before + 1


def test_bad_prompts_are_named(pre_ln):
  config, _, params = pre_ln
  with pytest.raises(ValueError, match="prompt 1 has 40 tokens.*at most 32"):
    G.generate(config, params, [[2, 3], [2] * 40], max_new_tokens=N)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    G.generate(config, params, [[]], max_new_tokens=N)
  with pytest.raises(ValueError, match=r"token id\(s\) \[500\]"):
    G.generate(config, params, [[2, 500]], max_new_tokens=N)
  # truncate_prompts keeps the last tokens that fit (checked on the validated prompts; decoding
  # them is the same program as any other prompt).
  long = [2] + list(range(3, 42))
  assert G._check_prompts([long, [2, 5]], config.vocab_size, 64 - N, True) == [long[-32:], [2, 5]]


# Joint decoding ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_models():
  """Two different random models over one vocabulary (pre-LN and the 350m layout)."""
  out = []
  for name, seed in (("pre_ln", 4), ("post_ln_350m", 5)):
    config = oracle.TINY[name]
    out.append((config, oracle.params_from_hf_model(oracle.hf_model(config, seed=seed), config)))
  return out


NJ = 12


def _joint_prompts(two_models):
  return _prompts(two_models[0][0], lengths=[6, 3], seed=7)[0]


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(config, params, ids, length):
  """Full forward (no cache) of ids [1, L] right-padded after `length` real tokens -> [V] logits."""
  mask = (jnp.arange(ids.shape[1]) < length).astype(jnp.int32)[None]
  hidden, _ = M.Decoder(config).apply({"params": params}, ids, mask)
  return M.logits(params, jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1))[0, 0]


def _reference_joint(models, weights, prompts, n, *, top_p=None, temperature=1.0, seed=0,
                     eos=2):
  """Every model's full forward over prompt + tokens so far at every step (no cache); float64."""
  w = np.asarray(weights, np.float64)
  outs, fallbacks = [], []
  for row, prompt in enumerate(prompts):
    seq, new, fb = list(prompt), [], 0
    for step in range(n):
      probs = []
      buf = np.ones((1, 32), np.int32)
      buf[0, :len(seq)] = seq
      for config, params in models:
        z = np.asarray(_last_logits(config, params, buf, len(seq))).astype(np.float64) / temperature
        e = np.exp(z - z.max())
        probs.append(e / e.sum())
      q = np.maximum(sum(wi * p for wi, p in zip(w, probs)), 0)
      if q.sum() <= 1e-6 * np.abs(w).sum():
        q, fb = probs[0], fb + 1
      q = q / q.sum()
      if top_p is None:
        tok = int(np.argmax(q))
      else:   # nucleus: keep the best tokens until the mass above a token reaches top_p
        order = np.argsort(-q, kind="stable")
        above = np.cumsum(q[order]) - q[order]
        kept = np.zeros_like(q)
        kept[order[above < top_p]] = q[order[above < top_p]]
        u = float(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(
            jax.random.key(seed), row), step), (), jnp.float32))
        tok = int(np.searchsorted(np.cumsum(kept) / kept.sum(), u, side="right"))
      seq.append(tok)
      new.append(tok)
      if tok == eos:
        break
    outs.append(new)
    fallbacks.append(fb)
  return outs, fallbacks


@pytest.mark.parametrize("weights,sampling", [((1.5, -0.5), None), ((1.0, -1.0), None),
                                              ((1.0, -1.0), 0.9), ((0.3, 0.7), 0.8)])
def test_joint_matches_full_forward_reference(two_models, weights, sampling):
  prompts = _joint_prompts(two_models)
  n = NJ
  kw = dict(sampler="greedy") if sampling is None else dict(sampler="sample", top_p=sampling,
                                                            temperature=1.2, seed=3)
  got, stats = G.joint_generate(two_models, weights, prompts, max_new_tokens=n, **kw)
  want, fb = _reference_joint(two_models, weights, prompts, n, top_p=sampling,
                              temperature=kw.get("temperature", 1.0), seed=kw.get("seed", 0))
  assert got == want
  assert stats["fallback_steps_per_prompt"] == fb
  assert stats["generated_tokens"] == sum(map(len, want))


def test_joint_falls_back_to_first_model_and_counts(two_models):
  (config, params), _ = two_models
  prompts = _joint_prompts(two_models)
  alone = G.generate(config, params, prompts, max_new_tokens=NJ)
  for models, weights in (([(config, params)] * 2, (1.0, -1.0)),   # the models agree: no mass
                          (two_models, (0.0, 0.0))):
    got, stats = G.joint_generate(models, weights, prompts, max_new_tokens=NJ)
    assert got == alone
    assert stats["fallback_steps_per_prompt"] == [len(r) for r in alone]
    assert stats["fallback_steps"] == sum(map(len, alone))
  want, stats = G.joint_generate(two_models, (1.0, -1.0), prompts, max_new_tokens=NJ)
  assert stats["fallback_steps"] == 0
  # p_0 - p_1 with the models swapped, weights (-1, 1) and model 1 as the fallback: same tokens.
  swapped = [two_models[1], two_models[0]]
  assert G.joint_generate(swapped, (-1.0, 1.0), prompts, max_new_tokens=NJ,
                          fallback_model=1)[0] == want
  got, stats = G.joint_generate(swapped, (0.0, 0.0), prompts, max_new_tokens=NJ, fallback_model=1)
  assert got == alone and stats["fallback_steps"] == sum(map(len, alone))


class _Tok:
  def __init__(self, fp):
    self.fp = fp

  def fingerprint(self):
    return self.fp


def test_joint_rejects_different_tokenizers_and_vocab(two_models):
  prompts = _joint_prompts(two_models)
  with pytest.raises(ValueError, match=r"\['large'\] tokenize text differently from small"):
    G.joint_generate(two_models, (1, -1), prompts, max_new_tokens=NJ,
                     tokenizers=[_Tok("a"), _Tok("b")], names=["small", "large"])
  other = two_models[1][0].replace(vocab_size=102)
  with pytest.raises(ValueError, match="equal vocabulary sizes"):
    G.joint_generate([two_models[0], (other, two_models[1][1])], (1, -1), prompts,
                     max_new_tokens=NJ)
  G.joint_generate(two_models, (1, -1), prompts, max_new_tokens=NJ,
                   tokenizers=[_Tok("a"), _Tok("a")])


# The paper's five mixtures (Xia et al. 2023, section 4) against HF PyTorch ---------------------

PAPER_WEIGHTS = [(1.0, -1.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (-1.0, 1.0)]
PAIRS = {"opt": ("pre_ln", "odd_heads"), "gpt_neox": ("neox_parallel", "neox_sequential")}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def hf_pair(request):
  """(small, large) random HF PyTorch models of one family and one vocabulary, with their
  converted params: [(config, hf model, params), ...]."""
  out = []
  return [twin(oracle.TINY.get(name) or oracle.FAMILY_TINY[name], seed)
          for name, seed in zip(PAIRS[request.param], (11, 12))]


def _hf_next_probs(hf, seq):
  """softmax of the HF model's last logits over the whole sequence (no cache), float64 [V]."""
  with torch.no_grad():
    logits = hf(torch.tensor([seq])).logits[0, -1].double().numpy()
  e = np.exp(logits - logits.max())
  return e / e.sum()


def _paper_mixture(p_small, p_large, weights):
  """The paper's rule written again: l1 p_s + l2 p_l, entries <= 0 dropped, renormalised."""
  q = weights[0] * p_small + weights[1] * p_large
  q = np.where(q > 0, q, 0.0)
  return q / q.sum()


def test_five_configurations_greedy_match_an_hf_loop_with_one_program(hf_pair):
  (sc, s_hf, sp), (lc, l_hf, lp) = hf_pair
  prompts = _prompts(sc, lengths=[5, 3], seed=8)[0]
  prompts = [[t % oracle.TOKENS for t in p] for p in prompts]
  n = 8
  compiled = None
  for weights in PAPER_WEIGHTS:
    got, stats = G.joint_generate([(sc, sp), (lc, lp)], weights, prompts, max_new_tokens=n,
                                  eos_id=None, fallback_model=0 if weights[0] > 0 else 1)
    # Nucleus decoding of the same pair runs the same program.
    G.joint_generate([(sc, sp), (lc, lp)], weights, prompts, max_new_tokens=n, eos_id=None,
                     sampler="sample", top_p=0.9, seed=5)
    if compiled is None:
      compiled = programs.compilations("decode")
    assert programs.compilations("decode") == compiled
    assert stats["fallback_steps"] == 0
    for prompt, new in zip(prompts, got):
      seq, want = list(prompt), []
      for _ in range(n):
        q = _paper_mixture(_hf_next_probs(s_hf, seq), _hf_next_probs(l_hf, seq), weights)
        tok = int(np.argmax(q))
        seq.append(tok)
        want.append(tok)
      assert new == want, weights


def test_nucleus_draws_from_the_paper_mixture_top_p_filtered(hf_pair):
  """At a fixed step, the distribution a nucleus draw samples from (logits of the opt_jax models)
  equals the mixture of the HF models' softmaxes, renormalised and top-p filtered in numpy."""
  (sc, s_hf, sp), (lc, l_hf, lp) = hf_pair
  seq = [2, 17, 5, 60, 33, 8, 71]
  ids = np.ones((1, 32), np.int32)
  ids[0, :len(seq)] = seq
  logits = [_last_logits(config, params, ids, len(seq))[None]
            for config, params in ((sc, sp), (lc, lp))]
  p_small, p_large = _hf_next_probs(s_hf, seq), _hf_next_probs(l_hf, seq)
  draw = jax.jit(G.sampling_distribution)   # one program for every weight and top_p
  for weights in PAPER_WEIGHTS:
    for top_p in (0.9, 0.5):
      got = np.exp(np.asarray(draw(logits, jnp.asarray(weights, jnp.float32), jnp.float32(1.0),
                                   jnp.int32(0), jnp.float32(top_p))))[0]
      q = _paper_mixture(p_small, p_large, weights)
      order = np.argsort(-q, kind="stable")
      above = np.cumsum(q[order]) - q[order]       # mass strictly above each token
      keep = np.zeros(q.shape, bool)
      keep[order[above < top_p]] = True
      want = np.where(keep, q, 0.0) / q[keep].sum()
      np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str((weights, top_p)))
      assert 1 < keep.sum() < q.size


# Meshes (subprocesses) -----------------------------------------------------------------------

class _MeshRuns:
  """The 8-device child and the 2-process run, started together in the background (output to
  log files, so a chatty child never blocks on a full pipe)."""

  def __init__(self, directory):
    self.dir = str(directory)
    self.devices8 = self._start("devices8", os.path.join(self.dir, "devices8.json"))
    self._start_multihost()
    self._results = {}

  def _start(self, *args):
    log = open(os.path.join(self.dir, "_".join(a for a in args if "/" not in a) + ".log"), "w")
    with log:
      proc = subprocess.Popen([sys.executable, MESH_CHILD, *args], env=U.child_env(), stdout=log,
                              stderr=subprocess.STDOUT)
    proc.log_path = log.name
    return proc

  def _start_multihost(self):
    port = str(U.free_port())
    self.multihost = [self._start("multihost", os.path.join(self.dir, "multihost.json"),
                                  "--port", port, "--process_id", str(i)) for i in range(2)]

  @staticmethod
  def _wait(procs, deadline) -> tuple[bool, str]:
    ok, logs = True, []
    for p in procs:
      try:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        p.wait()
        ok = False
      ok = ok and p.returncode == 0
      with open(p.log_path) as f:
        logs.append(f.read()[-4000:])
    return ok, "\n".join(f"--- process {i} ---\n{l}" for i, l in enumerate(logs))

  def devices8_result(self) -> dict:
    if "devices8" not in self._results:
      ok, log = self._wait([self.devices8], time.monotonic() + 900)
      if not ok:
        pytest.fail(f"8-device child failed:\n{log}")
      with open(os.path.join(self.dir, "devices8.json")) as f:
        self._results["devices8"] = json.load(f)
    return self._results["devices8"]

  def multihost_result(self) -> list[dict]:
    if "multihost" not in self._results:
      ok, log = self._wait(self.multihost, time.monotonic() + 600)
      if not ok:   # a port taken between free_port and bind is the one flaky part: retry once
        print(log)
        self._start_multihost()
        ok, log = self._wait(self.multihost, time.monotonic() + 600)
      assert ok, log
      out = []
      for i in range(2):
        with open(os.path.join(self.dir, f"multihost.json.{i}")) as f:
          out.append(json.load(f))
      self._results["multihost"] = out
    return self._results["multihost"]

  def close(self):
    for p in [self.devices8, *self.multihost]:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope="module", autouse=True)
def mesh_runs(request, tmp_path_factory):
  """Starts the mesh children with the module's first test, if any mesh test is selected."""
  selected = any(item.module is request.module and "mesh" in item.name
                 for item in request.session.items)
  runs = _MeshRuns(tmp_path_factory.mktemp("mesh")) if selected else None
  yield runs
  if runs is not None:
    runs.close()


@pytest.mark.parametrize("spec", mesh_child.MESHES)
def test_mesh_greedy_and_nucleus_equal_single_device_with_one_program(mesh_runs, spec):
  result = mesh_runs.devices8_result()
  single, got = result["single"], result["meshes"][spec]
  n = len(mesh_child.LENGTHS)
  assert len(single["greedy"]) == n and all(len(r) == mesh_child.N for r in single["greedy"])
  assert single["nucleus"] != single["greedy"]   # sampling really draws
  assert got["greedy"] == single["greedy"]
  assert got["nucleus"] == single["nucleus"]
  assert got["compilations"] == 1                # greedy and nucleus share the sharded program


def test_mesh_joint_decoding_equals_single_device(mesh_runs):
  joint = mesh_runs.devices8_result()["joint"]
  single, sharded = joint["single"], joint[mesh_child.JOINT_MESH]
  assert len(single["tokens"]) == len(mesh_child.LENGTHS)
  assert sharded == single


def test_mesh_takes_params_already_laid_out_on_it(mesh_runs):
  result = mesh_runs.devices8_result()
  assert result["presharded"] == result["single"]["nucleus"]


def test_mesh_that_cannot_split_the_model_fails_before_compiling(mesh_runs):
  result = mesh_runs.devices8_result()
  msg = result["bad_mesh_error"]
  assert msg is not None and "num_attention_heads=4" in msg and "model mesh axis (8)" in msg
  assert result["bad_mesh_compilations"] == 0


def test_mesh_over_two_processes_decodes_like_one_device(mesh_runs):
  single = mesh_runs.devices8_result()["single"]
  for process in mesh_runs.multihost_result():   # every process gets the whole result
    assert {name: process[name] for name in mesh_child.CASES} == single
