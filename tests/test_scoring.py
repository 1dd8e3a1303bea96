import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from opt_jax import families, programs
from opt_jax import scoring as S
import _suite_util as U
import oracle
from _oracle_fixtures import pair, twin  # noqa: F401  (pair: a pytest fixture)

MAX_LEN = 64  # TINY's max_position_embeddings


@pytest.fixture(scope="module")
def pre_ln():
  return twin(oracle.TINY["pre_ln"], seed=1)


def _hf_next_logprobs(hf, ids):
  """[T, V] float64 log p(. | ids[:t+1]) of one unpadded row."""
  with torch.no_grad():
    logits = hf(torch.tensor([ids])).logits[0].double()
  return torch.log_softmax(logits, -1).numpy()


def _hf_request(hf, ctx, cont, max_length=MAX_LEN):
  """The harness's _loglikelihood_tokens for one request, computed with HF."""
  whole = (ctx + cont)[-(max_length + 1):]
  lp = _hf_next_logprobs(hf, whole[:-1])[-len(cont):]
  return float(lp[np.arange(len(cont)), cont].sum()), bool((lp.argmax(-1) == cont).all())


def _hf_greedy(hf, ctx, n):
  ids = list(ctx)
  for _ in range(n):
    ids.append(int(_hf_next_logprobs(hf, ids)[-1].argmax()))
  return ids[len(ctx):]


def _requests(config, hf, seed=0):
  """Several contexts with 1-4 continuations each (some greedy), lengths 1..60."""
  rng = np.random.RandomState(seed)
  rand = lambda n: [int(t) for t in rng.randint(3, config.vocab_size, n)]
  reqs = []
  for n_ctx in (1, 3, 9, 20, 45):
    ctx = [2] + rand(n_ctx - 1)
    conts = [rand(rng.randint(1, 7)) for _ in range(rng.randint(1, 4))]
    conts.append(_hf_greedy(hf, ctx, 3))
    reqs += [(ctx, c) for c in conts]
  reqs.append(([2] + rand(70), rand(5)))       # longer than max_length: oldest context dropped
  return reqs


# token_logprobs --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _token_logprobs_fn(config):
  # vocab_chunk=32 does not divide V=101: padded chunks and several loop steps are exercised;
  # attention_block=10 does not divide T=24: padded attention blocks too.
  return jax.jit(functools.partial(S.token_logprobs, config=config, vocab_chunk=32,
                                   attention="blocked", attention_block=10))


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_logprobs_match_hf(pair, side):
  config, hf, params = pair
  ids, mask = oracle.padded_batch(config.vocab_size, [24, 13, 5, 2], 24, side, seed=3)
  if config == oracle.TINY["pre_ln"]:
    # A greedy row, so that is_greedy is exercised on True as well as False.
    ids[0] = [2] + _hf_greedy(hf, [2], 23)
  lp, greedy = map(np.asarray, _token_logprobs_fn(config)(params, jnp.asarray(ids),
                                                          jnp.asarray(mask)))
  assert lp.dtype == np.float32 and lp.shape == ids.shape
  scored = (mask[:, 1:] & mask[:, :-1]).astype(bool)
  ref = oracle.hf_logprobs(hf, ids, mask)
  np.testing.assert_allclose(lp[:, 1:][scored], ref[scored], atol=1e-4, rtol=0)
  assert (lp[:, 0] == 0).all() and (lp[:, 1:][~scored] == 0).all()
  with torch.no_grad():
    logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  argmax = logits.argmax(-1)
  # Two implementations may break a near-tie of the top two logits differently on another CPU:
  # positions whose top-two gap is under 1e-4 are not compared.
  top2 = np.sort(logits, -1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0] > 1e-4)[:, :-1]
  want = scored & (argmax[:, :-1] == ids[:, 1:])
  np.testing.assert_array_equal(greedy[:, 1:][clear], want[clear])
  if config == oracle.TINY["pre_ln"]:
    assert greedy[0, 1:].all()


def _avals(jaxpr):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield v.aval
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _avals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _avals(sub)


def test_no_batch_length_vocab_array_is_built(pre_ln):
  config, _, params = pre_ln
  b, t, v = 3, 16, config.vocab_size
  fn = functools.partial(S.token_logprobs, config=config, vocab_chunk=32)
  jaxpr = jax.make_jaxpr(fn)(params, jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), jnp.int32))
  shapes = [tuple(a.shape) for a in _avals(jaxpr.jaxpr) if hasattr(a, "shape")]
  assert (b, t, 26) in shapes                       # the [B, T, chunk] logits of one chunk
  assert not [s for s in shapes if len(s) >= 2 and s[-1] >= v and b * t in (s[0], s[0] * s[1])]


def test_vocab_chunks_prefer_exact_splits():
  assert S.vocab_chunks(50272, 8192) == (8, 6284)
  assert S.vocab_chunks(50272, 8192, shards=8) == (4, 12568)
  n, c = S.vocab_chunks(101, 32)
  assert n * c >= 101 and c <= 64


@pytest.mark.parametrize("vocab, chunk, shards", [(101, 32, 1), (101, 32, 4), (96, 16, 4),
                                                  (96, 200, 1)])
def test_head_logprobs_equal_log_softmax(vocab, chunk, shards):
  rng = np.random.RandomState(0)
  head = rng.randn(vocab, 8).astype(np.float32)
  hidden = rng.randn(2, 5, 8).astype(np.float32)
  logits = hidden.astype(np.float64) @ head.T.astype(np.float64)
  targets = rng.randint(0, vocab, (2, 5))
  targets[0, :2] = logits[0, :2].argmax(-1)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse
  lp, greedy = S.head_logprobs(jnp.asarray(head), jnp.asarray(hidden), jnp.asarray(targets),
                               vocab_chunk=chunk, vocab_shards=shards)
  np.testing.assert_allclose(np.asarray(lp), want, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(-1) == targets)


# Requests --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scorers(pre_ln):
  config, _, params = pre_ln
  kw = dict(max_length=MAX_LEN, batch_size=4, min_bucket=16, vocab_chunk=48, attention_block=16)
  return (S.Scorer(config, params, share_prefix=False, **kw),
          S.Scorer(config, params, share_prefix=True, **kw))


def test_loglikelihood_matches_hf_sums_and_greedy(pre_ln, scorers):
  config, hf, _ = pre_ln
  reqs = _requests(config, hf)
  want = [_hf_request(hf, c, x) for c, x in reqs]
  assert sum(g for _, g in want) >= 5              # the greedy continuations are there
  for scorer in scorers:
    got = scorer.loglikelihood_tokens(reqs)
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], atol=1e-4, rtol=0)
    assert [g for _, g in got] == [g for _, g in want]


@pytest.mark.parametrize("name", ["pre_ln", "post_ln_350m"])
def test_shared_prefix_equals_independent_scoring(name, scorers):
  config = oracle.TINY[name]
  if name == "pre_ln":
    indep_scorer, shared_scorer = scorers
    hf = oracle.hf_model(config, seed=1)
    reqs = _requests(config, hf, seed=1)
  else:  # The cache path through project_in/out and post-LN, on one bucket to compile little.
    hf = oracle.hf_model(config, seed=2)
    params = oracle.params_from_hf_model(hf, config)
    kw = dict(max_length=MAX_LEN, batch_size=2, min_bucket=16)
    indep_scorer = S.Scorer(config, params, share_prefix=False, **kw)
    shared_scorer = S.Scorer(config, params, share_prefix=True, **kw)   # rows per pass: auto
    reqs = [r for r in _requests(config, hf, seed=1) if len(r[0]) < 16]
  rows_before = indep_scorer.rows_run, shared_scorer.rows_run
  indep = indep_scorer.loglikelihood_tokens(reqs)
  shared = shared_scorer.loglikelihood_tokens(reqs)
  np.testing.assert_allclose([s for s, _ in shared], [s for s, _ in indep], atol=1e-4, rtol=0)
  assert [g for _, g in shared] == [g for _, g in indep]
  # The packed rows really ran: one row per context (all fit), one per request without sharing.
  assert indep_scorer.rows_run - rows_before[0] == len(reqs)
  assert shared_scorer.rows_run - rows_before[1] == len({tuple(c) for c, _ in reqs})


def test_packed_rows_split_when_options_overflow_the_window(pre_ln):
  # 4 options of 20 tokens after a 20-token context do not fit one 64-token row (19 + 4 x 20):
  # the packer starts a new row (with the context again) after 2 options (19 + 2 x 20 = 59);
  # every option still equals HF's number.
  config, hf, params = pre_ln
  rng = np.random.RandomState(3)
  ctx = [2] + [int(t) for t in rng.randint(3, config.vocab_size, 19)]
  conts = [[int(t) for t in rng.randint(3, config.vocab_size, 20)] for _ in range(4)]
  rows = S.pack_options(ctx, conts, MAX_LEN)
  assert [m for _, m in rows] == [[0, 1], [2, 3]]
  assert [len(r.inputs) for r, _ in rows] == [59, 59]
  assert rows[0][0].positions == list(range(59 - 20)) + list(range(19, 39))
  assert rows[0][0].segments == [0] * 19 + [1] * 20 + [2] * 20
  scorer = S.Scorer(config, params, share_prefix=True, max_length=MAX_LEN, batch_size=2,
                    min_bucket=64, attention_block=16)
  got = scorer.loglikelihood_tokens([(ctx, c) for c in conts])
  want = [_hf_request(hf, ctx, c) for c in conts]
  np.testing.assert_allclose([g for g, _ in got], [w for w, _ in want], atol=1e-4, rtol=0)
  assert scorer.rows_run == 2


def test_compilations_bounded_and_set_params_reuses_programs(pre_ln, scorers):
  config, hf, params = pre_ln
  scorer = scorers[0]                              # share_prefix=False: only `score` programs
  rng = np.random.RandomState(5)
  rand = lambda lo, hi: [int(t) for t in rng.randint(3, 100, rng.randint(lo, hi))]
  reqs = [([2] + rand(0, 50), rand(1, 10)) for _ in range(60)]
  scorer.loglikelihood_tokens(reqs)                # 60 rows: 15 full batches of 4
  assert scorer.buckets == [16, 32, 64]
  # One program per length bucket for full batches, whatever the lengths (earlier tests of this
  # scorer may have run short batches as well: [1 or 2 rows, length]).
  shapes = set(programs.traced_shapes("score", scorer.spec))
  assert {n for b, n in shapes if b == 4} == {16, 32, 64}
  # 9 rows: two batches of 4 and a last one of 1 row, run as [1, length], not [4, length].
  rows_before, tokens_before = scorer.rows_run, scorer.tokens_run
  scorer.loglikelihood_tokens(reqs[:9])
  assert scorer.rows_run - rows_before == 9
  shapes = set(programs.traced_shapes("score", scorer.spec))
  assert shapes <= {(b, n) for b in (1, 2, 4) for n in (16, 32, 64)}
  assert scorer.tokens_run - tokens_before <= 9 * 64
  compiled = scorer.num_compilations
  assert compiled == len(shapes) <= 9
  other = oracle.hf_model(config, seed=7)
  try:
    scorer.set_params(oracle.params_from_hf_model(other, config))
    got = scorer.loglikelihood_tokens(reqs[:9])
  finally:
    scorer.set_params(params)
  assert scorer.num_compilations == compiled       # another checkpoint: no new program
  np.testing.assert_allclose([s for s, _ in got], [_hf_request(other, c, x)[0] for c, x in reqs[:9]],
                             atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="differ in structure, shape or dtype"):
    scorer.set_params(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))


def test_request_errors_name_the_request(scorers):
  scorer = scorers[0]
  with pytest.raises(ValueError, match="request 1: empty context"):
    scorer.loglikelihood_tokens([([2], [5]), ([], [5])])
  with pytest.raises(ValueError, match="request 0: continuation has 0 tokens"):
    scorer.loglikelihood_tokens([([2], [])])
  with pytest.raises(ValueError, match="request 0: token id 101 is outside"):
    scorer.loglikelihood_tokens([([2], [101])])
  with pytest.raises(ValueError, match="no tokenizer"):
    scorer.loglikelihood([("a", "b")])


# Rolling windows -------------------------------------------------------------------------------

def _hf_rolling_per_token(hf, tokens, context_length, stride):
  """Token j's log-prob given exactly the tokens its window shows it, one HF call per token.

  Token j (1 <= j < len) is predicted by the first window when j <= context_length; otherwise by
  window w = ceil((j - context_length) / stride), which ends at e = min(context_length + w *
  stride, n) and shows the context_length tokens before e (harness window semantics).
  """
  n = len(tokens) - 1
  out = []
  for j in range(1, n + 1):
    if j <= context_length:
      start = 0
    else:
      w = -(-(j - context_length) // stride)
      e = min(context_length + w * stride, n)
      start = e - context_length
    out.append(_hf_next_logprobs(hf, tokens[start:j])[-1][tokens[j]])
  return np.asarray(out)


@pytest.mark.parametrize("stride", [16, 6])
def test_rolling_3_5_windows_matches_hf_each_token_once(pre_ln, scorers, stride):
  config, hf, _ = pre_ln
  rng = np.random.RandomState(11)
  doc = [2] + [int(t) for t in rng.randint(3, config.vocab_size, 56)]   # 3.5 windows of 16
  short = [2] + [int(t) for t in rng.randint(3, config.vocab_size, 5)]
  scorer = scorers[0]
  got = scorer.rolling_tokens([doc, short, [2]], context_length=16, stride=stride)
  assert [len(g) for g in got] == [56, 5, 0]         # every token after </s> exactly once
  np.testing.assert_allclose(got[0], _hf_rolling_per_token(hf, doc, 16, stride), atol=1e-4, rtol=0)
  np.testing.assert_allclose(got[1], _hf_rolling_per_token(hf, short, 16, stride), atol=1e-4,
                             rtol=0)


def test_rolling_windows_cover_each_token_once():
  tokens = list(range(100, 158))
  for stride in (1, 5, 16):
    wins = S.rolling_windows(tokens, 16, stride)
    scored = [t for inp, tgt, k in wins for t in tgt[-k:]]
    assert scored == tokens[1:]
    for inp, tgt, k in wins:
      assert len(inp) == len(tgt) <= 16 and inp[1:] == tgt[:-1]
      assert tokens.index(tgt[0]) == tokens.index(inp[0]) + 1
  with pytest.raises(ValueError, match="stride=17"):
    S.rolling_windows(tokens, 16, 17)


# tools/score_text ------------------------------------------------------------------------------

def test_score_text_end_to_end_matches_hf(tmp_path):
  from opt_jax import families
  from opt_jax.checkpoints import orbax_format
  from opt_jax.tokenizer import load_tokenizer
  from tools import score_text

  config = families.get("opt").config(vocab_size=400, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, ffn_dim=64, max_position_embeddings=32)
  hf = oracle.hf_model(config, seed=3)
  U.train_tokenizer(str(tmp_path), vocab_size=400)   # OPT's special ids <s>=0 ... <unk>=3
  ckpt = tmp_path / "ckpt"
  orbax_format.save(ckpt, oracle.params_from_hf_model(hf, config), config,
                    tokenizer_files=[tmp_path / "tokenizer.json"])
  texts = ["Zebras vex 17 jumping wizards; 9 quirky gnomes fly back, 0 to 42 km.",
           "Perplexity predicts behaviour."]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  out = tmp_path / "out.jsonl"
  summary = score_text.run(score_text.Settings(
      checkpoint=str(ckpt), input=str(tmp_path / "in.jsonl"), output=str(out), context_length=16,
      stride=6, batch_size=2))
  printed = summary.render()

  tok = load_tokenizer(ckpt)
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["doc"] for r in records] == [0, 1]
  assert len(tok.encode(texts[0])) > 30                   # several windows of 16
  total_nll, total_n = 0.0, 0
  for text, r in zip(texts, records):
    ids = tok.encode(text)
    assert r["token_ids"] == ids[1:] and r["num_tokens"] == len(ids) - 1
    assert "".join(r["tokens"]) == text
    want = _hf_rolling_per_token(hf, ids, 16, 6)
    np.testing.assert_allclose(r["logprobs"], want, atol=1e-4, rtol=0)
    total_nll -= want.sum()
    total_n += len(want)
  assert f"2 document(s) of {tmp_path / 'in.jsonl'}, {total_n:,} tokens" in printed
  # The printed perplexity is read back as a number: its last digit may differ across CPUs.
  printed_ppl = float(re.search(r"perplexity ([0-9.]+)", printed).group(1))
  assert printed_ppl == pytest.approx(np.exp(total_nll / total_n), rel=1e-5)
  assert [r["source"] for r in records] == [f"{tmp_path / 'in.jsonl'}:{i}" for i in (1, 2)]
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp left


def test_score_text_checks_output_and_windows_before_restoring(tmp_path, monkeypatch):
  from opt_jax import families
  from opt_jax.checkpoints import checkpoint
  from opt_jax.errors import InputError
  from tools import score_text

  config = families.get("opt").config(vocab_size=320, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, ffn_dim=32,
                                      max_position_embeddings=32)
  (tmp_path / "ckpt").mkdir()
  families.write_config(config, tmp_path / "ckpt" / "config.json")
  (tmp_path / "in.txt").write_text("some text")
  monkeypatch.setattr(checkpoint, "restore", lambda *a, **k: pytest.fail("restored"))
  score = lambda **kw: score_text.score_text_file(str(tmp_path / "ckpt"), kw.pop("input", str(
      tmp_path / "in.txt")), kw.pop("output", str(tmp_path / "o.jsonl")), **kw)
  with pytest.raises(InputError, match=r"--output=.* is a folder; expected the path of a file"):
    score(output=str(tmp_path))
  with pytest.raises(InputError, match=r"--context_length=64: expected 2 to 32"):
    score(context_length=64)
  with pytest.raises(InputError, match=r"--stride=9: expected 1 to the context length \(8\)"):
    score(context_length=8, stride=9)
  with pytest.raises(InputError, match=r"in.txt is a file, so no folder can be created there"):
    score(output=str(tmp_path / "in.txt" / "o.jsonl"))
  (tmp_path / "ro").mkdir()
  # A read-only folder (simulated: these tests may run as root, who can write anywhere).
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not str(p).endswith(
      "ro"))
  with pytest.raises(InputError, match=r"cannot write into .*ro \(permission denied\)"):
    score(output=str(tmp_path / "ro" / "sub" / "o.jsonl"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(InputError, match=r"--input .*empty.txt is empty"):
    score(input=str(tmp_path / "empty.txt"))
