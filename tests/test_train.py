"""Training: the loss against HF's, learning, determinism, one data order for every size,
checkpoints that restore and score bit-exactly, the suite manifest and resuming a family."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import oracle
from experiments import training
from experiments.tasks import corpus
from opt_jax import suite
from opt_jax.checkpoints import checkpoint, layout
from opt_jax import model as model_lib
from opt_jax import train as train_lib
from opt_jax import families
from opt_jax.convert import hf as hf_lib

VOCAB = 320  # room for the test tokenizer (300 ids); the data uses ids 4..67
SMALL = families.get("opt").config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, ffn_dim=64, max_position_embeddings=32)
WIDER = SMALL.replace(hidden_size=48, intermediate_size=96)
# One optimiser setting (same steps) everywhere, so every test reuses the compiled programs.
TC = train_lib.TrainConfig(steps=50, batch_size=8, seq_len=32, num_checkpoints=5, eval_batches=2)
LR = 1e-2


def _markov_stream(n: int, seed: int) -> np.ndarray:
  """Tokens 4..67 from a fixed sparse random Markov chain (entropy well below log 64)."""
  rng = np.random.default_rng(0)
  k = 64
  probs = rng.dirichlet(np.full(k, 0.05), size=k)            # [k, k] peaked rows
  out = np.empty(n, np.int32)
  state = 0
  draws = np.random.default_rng(seed).random(n)
  cdf = np.cumsum(probs, axis=1)
  for i in range(n):
    state = min(int(np.searchsorted(cdf[state], draws[i])), k - 1)
    out[i] = state + 4
  return out


@pytest.fixture(scope="module")
def data():
  return _markov_stream(20000, seed=1), _markov_stream(2000, seed=2)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  texts = ["To be, or not to be, that is the question.\n", "Tomorrow, and tomorrow.\n"] * 30
  return corpus.train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory, tokenizer_file):
  train_ids, val_ids = data
  ckpt = str(tmp_path_factory.mktemp("ckpt"))
  result = train_lib.train(SMALL, train_ids, TC, peak_lr=LR, val_ids=val_ids, checkpoint_dir=ckpt,
                           tokenizer_files=[tokenizer_file], progress=False)
  return result, ckpt


def test_loss_matches_hf_cross_entropy():
  hf = oracle.hf_model(SMALL, seed=3)
  params = oracle.params_from_hf_model(hf, SMALL)
  batch = np.random.default_rng(0).integers(0, VOCAB, (3, 17)).astype(np.int32)
  with torch.no_grad():
    want = hf(torch.tensor(batch, dtype=torch.long), labels=torch.tensor(batch, dtype=torch.long))
  got = train_lib.loss_fn(params, jnp.asarray(batch), SMALL)
  np.testing.assert_allclose(float(got), float(want.loss), rtol=2e-5)


def test_other_families_train_too(data):
  # A Llama-architecture model (RMSNorm, SwiGLU, rotary, GQA 4/2, untied head): the loss is HF's
  # cross-entropy, and fifty steps learn the Markov chain as the OPT model does.
  config = families.get("llama").config(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32, bos_token_id=0,
      eos_token_id=2)
  hf = oracle.hf_model(config, seed=3)
  batch = np.random.default_rng(0).integers(0, VOCAB, (3, 17)).astype(np.int32)
  with torch.no_grad():
    want = hf(torch.tensor(batch, dtype=torch.long), labels=torch.tensor(batch, dtype=torch.long))
  got = train_lib.loss_fn(oracle.params_from_hf_model(hf, config), jnp.asarray(batch), config)
  np.testing.assert_allclose(float(got), float(want.loss), rtol=2e-5)
  mask = train_lib._decay_mask(model_lib.param_shapes(config))
  assert mask["lm_head"]["embedding"] and mask["layers"]["mlp"]["gate_kernel"]
  assert not mask["layers"]["attn_norm"]["scale"]
  result = train_lib.train(config, data[0], TC, peak_lr=LR, val_ids=data[1], progress=False)
  first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
  assert last < first - 1.5, result.history


def test_gpt_neox_loss_and_gradients_match_hf():
  # Pythia's architecture (partial rotary, parallel residual, untied embed_out, 8 padded vocab
  # rows): the loss is HF's cross-entropy and every parameter's gradient is torch's.
  config = families.get("gpt_neox").config(
      vocab_size=VOCAB + 8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=32, rotary_pct=0.25, bos_token_id=0,
      eos_token_id=0)
  hf = oracle.hf_model(config, seed=5)
  batch = np.random.default_rng(1).integers(0, VOCAB, (2, 17)).astype(np.int32)
  labels = torch.tensor(batch, dtype=torch.long)
  want = hf(labels, labels=labels).loss
  want.backward()
  params = oracle.params_from_hf_model(hf, config)
  loss, grads = jax.value_and_grad(train_lib.loss_fn)(params, jnp.asarray(batch), config)
  np.testing.assert_allclose(float(loss), float(want.detach()), rtol=2e-5)
  hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
  ours = hf_lib.state_dict_from_params(jax.tree_util.tree_map(np.asarray, grads), config)
  # The head is embed_out in released checkpoints; transformers >= 5 names it lm_head.
  rename = lambda n: "lm_head.weight" if n not in hf_grads and n == "embed_out.weight" else n
  assert sorted(map(rename, ours)) == sorted(hf_grads)
  for name, g in ours.items():
    np.testing.assert_allclose(g, hf_grads[rename(name)], atol=1e-5, rtol=1e-3, err_msg=name)
  assert train_lib._decay_mask(model_lib.param_shapes(config))["lm_head"]["embedding"]


def test_fifty_steps_lower_validation_loss(trained):
  result, _ = trained
  history = result.history
  assert [h["step"] for h in history] == [0] + TC.checkpoint_steps()
  first, last = history[0]["val_loss"], history[-1]["val_loss"]
  assert first > np.log(VOCAB) - 0.1  # random init: about uniform over the vocabulary
  assert last < first - 1.5, history
  assert history[-1]["train_loss"] < history[1]["train_loss"]


def test_same_seed_gives_bit_identical_params(trained, data):
  result, _ = trained
  again = train_lib.train(SMALL, data[0], TC, peak_lr=LR, val_ids=data[1], progress=False)
  for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  assert again.data_digest == result.data_digest
  assert [h["val_loss"] for h in again.history] == [h["val_loss"] for h in result.history]
  # Another seed: another data order and another initialisation.
  order = lambda seed: train_lib.DataOrder(len(data[0]), TC.seq_len, TC.batch_size, seed)
  assert not np.array_equal(order(0).starts(0), order(1).starts(0))
  assert not np.array_equal(model_lib.init_params(SMALL, 0)["embed"]["embedding"],
                            model_lib.init_params(SMALL, 1)["embed"]["embedding"])


def test_data_order_is_the_same_for_every_size(family, trained):
  # The family trained two widths on the same stream: the digests of the batches they were fed
  # (hashed from the very arrays passed to the train step) are equal, and equal to a lone run's.
  out, _, _ = family
  log = json.load(open(os.path.join(out, "training.json")))
  assert [m["data_digest"] for m in log["models"]] == [trained[0].data_digest] * 2
  # Each epoch visits every window once; windows overlap by one token so every token is a target.
  order = train_lib.DataOrder(num_tokens=1 + 10 * 4, seq_len=4, batch_size=5, seed=0)
  starts = np.concatenate([order.starts(s) for s in range(4)])
  assert sorted(starts[:10]) == sorted(starts[10:]) == list(range(0, 40, 4))
  ids = np.arange(41)
  np.testing.assert_array_equal(order.batch(ids, 0)[:, 0], order.starts(0))
  np.testing.assert_array_equal(order.batch(ids, 0)[:, -1], order.starts(0) + 4)


def test_checkpoints_restore_and_score_bit_exactly(trained, tokenizer_file):
  result, ckpt = trained
  assert sorted(result.checkpoints) == TC.checkpoint_steps()
  final = checkpoint.restore(result.checkpoints[TC.steps])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(final),
                          jax.tree.leaves(result.params)):
    assert a.dtype == b.dtype and a.shape == b.shape, path
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=str(path))
  ids = jnp.asarray(np.random.default_rng(0).integers(4, 68, (2, 32)), jnp.int32)

  @jax.jit
  def logprobs(params):
    hidden, _ = model_lib.Decoder(SMALL).apply({"params": params}, ids)
    return jax.nn.log_softmax(model_lib.logits(params, hidden), -1)

  np.testing.assert_array_equal(np.asarray(logprobs(final)), np.asarray(logprobs(result.params)))
  # An intermediate checkpoint holds the params of its step: it reproduces the validation loss
  # recorded during training exactly.
  step = TC.checkpoint_steps()[2]
  restored = checkpoint.restore(result.checkpoints[step])
  val = train_lib.validation_batches(_markov_stream(2000, seed=2), TC.seq_len, TC.batch_size,
                                     TC.eval_batches)
  recorded = [h["val_loss"] for h in result.history if h["step"] == step][0]
  assert train_lib.evaluate(restored, SMALL, val) == recorded
  assert checkpoint.load_config(result.checkpoints[step]) == SMALL
  meta = checkpoint.load_metadata(result.checkpoints[step])
  assert meta["step"] == step and meta["tokens"] == step * TC.tokens_per_step
  assert open(os.path.join(result.checkpoints[step], "tokenizer.json")).read() == \
      open(tokenizer_file).read()


@pytest.fixture(scope="module")
def family(data, tmp_path_factory, tokenizer_file):
  out = str(tmp_path_factory.mktemp("family"))
  members = [train_lib.FamilyMember("tiny-a", SMALL, LR),
             train_lib.FamilyMember("tiny-b", WIDER, LR)]
  path = train_lib.train_family(out, members, data[0], TC, val_ids=data[1],
                                tokenizer_file=tokenizer_file, suite_name="test", progress=False)
  return out, members, path


def test_manifest_is_a_valid_suite(family):
  out, members, path = family
  assert path == os.path.join(out, "suite.json")
  manifest = json.load(open(path))
  assert manifest["name"] == "test"
  assert [m["name"] for m in manifest["models"]] == ["tiny-a", "tiny-b"]
  for m, member in zip(manifest["models"], members):
    assert set(m) == {"name", "params", "tokens_per_step", "checkpoints"}
    assert m["tokens_per_step"] == TC.batch_size * TC.seq_len == 256
    assert sorted(int(s) for s in m["checkpoints"]) == TC.checkpoint_steps()
    assert m["checkpoints"][str(TC.steps)] == f"ckpt/{member.name}/step{TC.steps}"
    params = checkpoint.restore(os.path.join(out, m["checkpoints"]["1"]))
    assert m["params"] == sum(x.size for x in jax.tree.leaves(params))
  loaded = suite.load_suite(path)
  model = loaded.models[1]
  assert model.tokens(TC.steps) == TC.steps * 256
  assert all(os.path.isabs(p) and checkpoint.is_checkpoint(p) for p in model.checkpoints.values())


def test_second_run_reuses_finished_sizes(family, data, tokenizer_file, monkeypatch):
  out, members, path = family
  before = open(path).read()
  calls = []
  real_train = train_lib.train
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: calls.append(k["desc"]) or
                      real_train(*a, **k))
  again = lambda: train_lib.train_family(out, members, data[0], TC, val_ids=data[1],
                                         tokenizer_file=tokenizer_file, suite_name="test",
                                         progress=False)
  assert again() == path and calls == []
  assert open(path).read() == before
  # A size whose checkpoints are incomplete is trained again; the other is kept.
  step_dir = os.path.join(out, "ckpt", "tiny-b", f"step{TC.steps}")
  os.remove(os.path.join(step_dir, layout.METADATA_FILE))
  again()
  assert len(calls) == 1 and "tiny-b" in calls[0]
  assert checkpoint.is_checkpoint(step_dir)
  assert json.load(open(path)) == json.loads(before)


def test_log_spaced_steps_and_schedule():
  steps = train_lib.log_spaced_steps(400, 15)
  assert steps[0] == 4 and steps[-1] == 400 and len(steps) == 15
  ratios = np.diff(np.log(steps))
  assert np.all(ratios > 0) and ratios.max() < 2 * ratios.min() + 0.1
  assert train_lib.log_spaced_steps(10, 30) == list(range(1, 11))
  tc = train_lib.TrainConfig(steps=100, warmup_steps=10, final_lr_ratio=0.1)
  lr = train_lib.lr_schedule(1.0, tc)
  np.testing.assert_allclose([float(lr(c)) for c in (0, 4, 9, 99)], [0.1, 0.5, 1.0, 0.1],
                             rtol=1e-6)
  assert 0.1 < float(lr(50)) < 1.0


def test_weight_decay_skips_biases_and_layer_norms():
  mask = train_lib._decay_mask(model_lib.param_shapes(SMALL))
  assert mask["embed"]["embedding"] and mask["layers"]["mlp"]["up_kernel"]
  assert mask["layers"]["attn"]["q_kernel"] and mask["layers"]["attn"]["o_kernel"]
  assert not mask["layers"]["mlp"]["up_bias"] and not mask["layers"]["mlp_norm"]["scale"]
  assert not mask["final_norm"]["scale"]


def test_demo_family_sizes():
  members, tc = training.demo_family(2048)
  params = [m.config.num_params() for m in members]
  assert len(members) >= 3 and params == sorted(params)
  assert 0.08e6 < params[0] < 0.12e6 and 0.2e6 < params[1] < 0.3e6 and 0.9e6 < params[2] < 1.2e6
  assert all(m.config.max_position_embeddings == tc.seq_len for m in members)
  fast, ftc = training.demo_family(512, fast=True, sizes=["fast-s", "fast-l"])
  assert [m.name for m in fast] == ["fast-s", "fast-l"]
  with pytest.raises(ValueError, match="unknown size"):
    training.demo_family(512, sizes=["nope"])


def test_train_demo_family_wires_tokenizer_vocab_and_fast_sizes(data, tokenizer_file, tmp_path):
  path = training.train_demo_family(str(tmp_path), data[0], data[1], tokenizer_file, fast=True,
                                    sizes=["fast-s"], steps=20, seq_len=32, progress=False)
  loaded = suite.load_suite(path)
  assert loaded.name == "demo-fast" and [m.name for m in loaded.models] == ["fast-s"]
  config = checkpoint.load_config(loaded.models[0].path(20))
  assert config.vocab_size == 320  # the test tokenizer's 300 ids, rounded up to a multiple of 64
  assert config.max_position_embeddings == 32 and loaded.models[0].tokens_per_step == 8 * 32
