"""tools/plan_mesh.py plans the programs that run: for each mode, the planned program is the one
the Scorer or generate / joint_generate compiled (same jitted function, spec and shapes: lowering
it again traces nothing new), and its memory numbers come from that program."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from opt_jax import generation as G
from opt_jax import programs, scoring, sharding
from tools import plan_mesh
import oracle

CONFIG = oracle.TINY["pre_ln"]


@pytest.fixture(scope="module")
def setup():
  hf = oracle.hf_model(CONFIG, seed=1)
  return sharding.make_mesh("data:1", devices=jax.devices()[:1]), oracle.params_from_hf_model(
      hf, CONFIG)


def _plan(**kw):
  kw = {"batch": 2, "dtype": "float32", "attention": "xla", "device_memory_gib": 1.0, **kw}
  return plan_mesh.plan(CONFIG, "data:1", num_devices=1, **kw)


def test_score_and_multiple_choice_plans_are_the_scorer_programs(setup):
  mesh, params = setup
  scorer = scoring.Scorer(CONFIG, params, batch_size=2, mesh=mesh, attention="xla")
  rng = np.random.RandomState(0)
  tokens = lambda n: rng.randint(3, 100, n).tolist()
  # Two contexts, 3 options of 5 tokens each: two packed rows of 11 + 15 = 26 tokens -> one
  # full batch in bucket 32 (a batch of fewer rows would run in a smaller batch bucket).
  ctxs = [[2] + tokens(11), [2] + tokens(11)]
  scorer.loglikelihood_tokens([(ctx, tokens(5)) for ctx in ctxs for _ in range(3)])
  # Two plain rows of 40 tokens -> bucket 64.
  scorer.rolling_tokens([[2] + tokens(40), [2] + tokens(40)])
  assert sorted(programs.traced_shapes("score", scorer.spec)) == [(2, 32), (2, 64)]
  before = programs.compilations("score")

  mc = _plan(mode="multiple_choice", length=12, options=3, continuation=5)
  assert (mc.batch, mc.length) == (2, 32) and "packed row of 26 tokens" in mc.program
  score = _plan(mode="score", length=40)
  assert (score.batch, score.length) == (2, 64)
  # Lowering the planned programs found them in the jit cache: the Scorer's own programs.
  assert programs.compilations("score") == before
  assert 0 < mc.total_bytes < score.total_bytes
  assert mc.parameter_bytes == score.parameter_bytes == 4 * CONFIG.num_params()
  assert score.fits and not _plan(mode="score", length=40, device_memory_gib=1e-6).fits
  # 4 options of 20 do not fit a 64-token row: the Scorer splits them 2 + 2 (19 + 40 = 59).
  split = _plan(mode="multiple_choice", length=20, options=4, continuation=20)
  assert split.length == 64 and "packed row of 59 tokens" in split.program


def test_decode_plan_is_the_joint_decoding_program(setup):
  mesh, params = setup
  other = oracle.params_from_hf_model(oracle.hf_model(CONFIG, seed=2), CONFIG)
  prompts = [[2, 5, 7, 9, 11], [2, 8, 3]]
  G.joint_generate([(CONFIG, params), (CONFIG, other)], [1.0, -0.5], prompts, max_new_tokens=4,
                   batch_size=2, mesh=mesh, eos_id=None)
  spec = G.DecodeSpec((CONFIG, CONFIG), 4, True, "float32", "xla", mesh)
  assert programs.traced_shapes("decode", spec) == [(2, 8)]
  before = programs.compilations("decode")
  joint = _plan(mode="decode", length=5, new_tokens=4, joint_config=CONFIG)
  assert (joint.batch, joint.length) == (2, 8) and "joint" in joint.program
  assert programs.compilations("decode") == before
  assert joint.parameter_bytes == 2 * 4 * CONFIG.num_params()
  alone = _plan(mode="decode", length=5, new_tokens=4)
  assert alone.parameter_bytes == 4 * CONFIG.num_params() and alone.total_bytes < joint.total_bytes


def test_planner_refuses_what_cannot_run():
  with pytest.raises(plan_mesh.InputError, match="one option does not fit"):
    _plan(mode="multiple_choice", length=50, options=2, continuation=20)
  with pytest.raises(plan_mesh.InputError, match="max_position_embeddings - --new_tokens"):
    _plan(mode="decode", length=62, new_tokens=4)
