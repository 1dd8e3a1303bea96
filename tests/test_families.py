"""Every family against its HF PyTorch class: logits, log-probs, greedy decoding, KV cache,
conversion both ways; config.json in and out, presets, and the inputs opt_jax refuses.

One tiny random model per feature set (tests/oracle.py FAMILY_TINY): GPT-NeoX with parallel and
sequential residual (partial rotary, fused per-head qkv, untied embed_out, padded vocabulary),
Llama with GQA 8/2 and an untied head and with MQA and a tied head, OLMo-1 (non-parametric LN,
clip_qkv), OLMo-2 (sublayer-output norms, QK-norm). OPT's own tests are in test_model.py and
friends; the sharded runs of every family are in test_sharding.py (one subprocess).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
import transformers

from opt_jax import families
from opt_jax.checkpoints import checkpoint
from opt_jax import generation as G
from opt_jax import model as M
from opt_jax import scoring as S
from opt_jax.config import DecoderConfig
from opt_jax.convert import ConversionError, convert
from opt_jax.errors import InputError
import oracle
from _oracle_fixtures import twin

NAMES = sorted(oracle.FAMILY_TINY)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=NAMES)
def fam(request):
  return (request.param,) + twin(oracle.FAMILY_TINY[request.param])


def _batch(config, side, lengths=(16, 9, 4), total=16, seed=3):
  return oracle.padded_batch(oracle.TOKENS, list(lengths), total, side, seed=seed,
                             pad_id=config.pad_token_id, bos_id=config.bos_token_id)


@functools.lru_cache(maxsize=None)
def _logprobs_fn(config):
  # blocked attention with blocks of 8 < T = 16 (GQA keys repeated per group on that path);
  # vocab_chunk 40 does not divide V: padded chunks.
  return jax.jit(functools.partial(S.token_logprobs, config=config, attention="blocked",
                                   attention_block=8, vocab_chunk=40))


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_and_logprobs_match_hf(fam, side):
  name, config, hf, params = fam
  ids, mask = _batch(config, side)
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert ref.shape[-1] == config.vocab_size            # HF's softmax runs over every head row
  hidden, _ = M.Decoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  got = np.asarray(M.logits(params, hidden))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0, err_msg=name)
  if config.clip_qkv is not None and side == "right":   # the clipping really acts here
    unclipped, _ = M.Decoder(config.replace(clip_qkv=None)).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(M.logits(params, unclipped))[real] - ref[real]).max() > 1e-2

  lp, _ = map(np.asarray, _logprobs_fn(config)(params, jnp.asarray(ids), jnp.asarray(mask)))
  scored = (mask[:, 1:] & mask[:, :-1]).astype(bool)
  want = oracle.hf_logprobs(hf, ids, mask)
  assert np.abs(want[scored]).min() > 0
  np.testing.assert_allclose(lp[:, 1:][scored], want[scored], atol=1e-4, rtol=0, err_msg=name)


@functools.lru_cache(maxsize=None)
def _packed_fn(config, attention):
  return jax.jit(functools.partial(S.target_logprobs, config=config, attention=attention,
                                   attention_block=8, vocab_chunk=40))


@pytest.mark.parametrize("attention", ["xla", "blocked"])
def test_packed_options_match_hf_one_by_one(fam, attention):
  # Multiple choice in one row (scoring.pack_options): a 9-token context, then 3 options that
  # see the context and themselves only, positions (rotary or learned) continuing the context's.
  # Each option's log-probs equal HF's on context + option alone. Blocks of 8 over a 24-token
  # row: the blocked path crosses segments inside and across blocks.
  name, config, hf, params = fam
  rng = np.random.RandomState(11)
  ctx = [config.bos_token_id] + rng.randint(3, oracle.TOKENS, 8).tolist()
  conts = [rng.randint(3, oracle.TOKENS, n).tolist() for n in (4, 2, 5)]
  [(row, members)] = S.pack_options(ctx, conts, 64)
  assert members == [0, 1, 2] and len(row.inputs) == 8 + 11
  t = 24
  pad = lambda xs, fill: np.asarray([list(xs) + [fill] * (t - len(xs))], np.int32)
  n = len(row.inputs)
  lp, _ = _packed_fn(config, attention)(
      params, pad(row.inputs, config.pad_token_id), pad([1] * n, 0), pad(row.targets, 0),
      positions=pad(row.positions, -1), segment_ids=pad(row.segments, 0))
  got = np.asarray(lp)[0, n - row.n_scored:n]
  want = []
  for cont in conts:
    ids = np.asarray([ctx + cont])
    want.append(oracle.hf_logprobs(hf, ids, np.ones_like(ids))[0, -len(cont):])
  np.testing.assert_allclose(got, np.concatenate(want), atol=1e-4, rtol=0, err_msg=name)


# One model per family (the other variants differ from these only where the forward pass,
# checked above, differs).
@pytest.mark.parametrize("fam", ["neox_parallel", "llama_gqa", "olmo", "olmo2"], indirect=True)
def test_greedy_32_tokens_match_hf_generate(fam):
  name, config, hf, params = fam
  ids, mask = _batch(config, "left", lengths=(9, 4, 13), total=13, seed=5)
  prompts = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
  eos = config.eos_token_id
  with torch.no_grad():
    out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=32, min_new_tokens=0, pad_token_id=config.pad_token_id,
                      eos_token_id=eos)
  want = [row[:row.index(eos) + 1] if eos in row else row for row in out[:, 13:].tolist()]
  got = G.generate(config, params, prompts, max_new_tokens=32)   # eos from the config
  assert got == want, name
  assert sum(len(r) for r in got) > 32                             # not all stopped at once


@pytest.mark.parametrize("fam", ["llama_gqa"], indirect=True)
def test_kv_cache_in_pieces_matches_hf(fam):
  # GQA caches hold K heads: [L, B, S, K, H]. (Greedy decoding above runs the cache of every
  # family one token at a time; here several tokens per write, on the GQA model.)
  name, config, hf, params = fam
  ids, mask = _batch(config, "left", lengths=(12, 7), total=12, seed=7)
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  model = M.Decoder(config)
  cache = M.init_cache(config, batch=2, max_length=16)
  assert cache["key"].shape == (2, 2, 16, config.num_key_value_heads, config.head_dim)
  outs = []
  for start, stop in [(0, 5), (5, 6), (6, 9), (9, 12)]:
    h, cache = model.apply({"params": params}, jnp.asarray(ids[:, start:stop]),
                           jnp.asarray(mask[:, start:stop]), cache)
    outs.append(h)
  got = np.asarray(M.logits(params, jnp.concatenate(outs, axis=1)))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0, err_msg=name)


def test_param_count_equals_hf(fam):
  name, config, hf, params = fam
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  assert n == config.num_params() == sum(p.numel() for p in hf.parameters()), name


def test_hf_to_opt_jax_to_hf_is_bit_exact(fam, tmp_path):
  name, config, hf, _ = fam
  src = tmp_path / "hf"
  hf.save_pretrained(src)
  out = convert(src, tmp_path / "jax")
  assert checkpoint.load_config(out) == config
  back = convert(out, tmp_path / "back", output_format="hf", max_shard_bytes=40_000)
  with safetensors.safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
    original = {k: f.get_tensor(k) for k in f.keys()}
  index = json.load(open(os.path.join(back, "model.safetensors.index.json")))["weight_map"]
  assert set(index) == set(original), name           # same names (embed_out for GPT-NeoX)
  for key, shard in index.items():
    with safetensors.safe_open(os.path.join(back, shard), "pt") as f:
      assert torch.equal(f.get_tensor(key), original[key]), (name, key)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
  assert type(reloaded) is type(hf)
  for key, value in hf.state_dict().items():
    assert torch.equal(reloaded.state_dict()[key], value), (name, key)
  ids, mask = _batch(config, "right")
  with torch.no_grad():   # and the config.json written reads back as the same model
    np.testing.assert_array_equal(
        reloaded(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy(),
        hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy())


def test_bare_base_model_layout_is_read(tmp_path):
  # GPTNeoXModel / LlamaModel checkpoints name tensors without the CausalLM prefix.
  config = oracle.FAMILY_TINY["llama_tied"]
  model = oracle.hf_model(config, seed=2)
  from opt_jax.convert import hf as hf_io
  want = oracle.params_from_hf_model(model, config)
  bare = {k.removeprefix("model."): v.detach().numpy() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
  got = hf_io.params_from_state_dict(bare, config)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(g, w, err_msg=str(path))


def test_hf_config_round_trip_and_hf_reads_the_same_features():
  for name, config in oracle.FAMILY_TINY.items():
    d = families.to_hf_dict(config)
    assert families.from_hf_dict(json.loads(json.dumps(d))) == config, name
    hc = oracle.hf_config(config)
    if config.family == "gpt_neox":
      assert hc.rope_parameters["partial_rotary_factor"] == config.rotary_fraction
      assert hc.use_parallel_residual == (config.block == "parallel")
    if config.positions == "rotary":
      assert hc.rope_parameters["rope_theta"] == config.rotary_base
    assert getattr(hc, "num_key_value_heads", config.num_attention_heads) == \
        config.num_key_value_heads
  # transformers >= 5 writes rope_parameters; both forms read alike.
  new = dict(families.to_hf_dict(oracle.FAMILY_TINY["neox_sequential"]))
  del new["rotary_pct"], new["rotary_emb_base"]
  new["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0,
                            "partial_rotary_factor": 0.5}
  assert families.from_hf_dict(new) == oracle.FAMILY_TINY["neox_sequential"]


# Presets -----------------------------------------------------------------------------------

def test_presets_have_published_parameter_counts():
  # Pythia paper (Biderman et al., 2023) Table 1 "total params"; HF model cards for the rest.
  published = {"pythia-70m": 70_426_624, "pythia-160m": 162_322_944, "pythia-410m": 405_334_016,
               "pythia-1b": 1_011_781_632, "pythia-1.4b": 1_414_647_808,
               "pythia-2.8b": 2_775_208_960, "pythia-6.9b": 6_857_302_016,
               "pythia-12b": 11_846_072_320, "llama-7b": 6_738_415_616,
               "tinyllama-1.1b": 1_100_048_384, "olmo-7b": 6_888_095_744}
  for name, n in published.items():
    assert families.preset(name).num_params() == n, name
  assert families.preset("EleutherAI/pythia-160m-deduped") == families.preset("pythia-160m")
  assert families.preset("olmo-2-13b").qk_norm and families.preset("tinyllama-1.1b") \
      .num_key_value_heads == 4
  with pytest.raises(InputError, match="unknown preset 'gpt-5'.*pythia-12b"):
    families.preset("gpt-5")


def test_planner_accepts_family_presets():
  for name, family in [("pythia-12b", "gpt_neox"), ("olmo-2-13b", "olmo2"),
                       ("llama-7b", "llama")]:
    assert families.preset(name).family == family
  # The tool itself (a subprocess: absl flags are process-global) on OLMo-2 13B, bf16.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "tools.plan_mesh", "--model=olmo-2-13b", "--mesh=data:1",
       "--batch=1", "--length=32", "--dtype=bfloat16", "--device_memory_gib=80"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  params = re.search(r"parameters [\d.]+ GiB \(([\d,]+) B\)", proc.stdout)
  assert int(params.group(1).replace(",", "")) == 2 * families.preset("olmo-2-13b").num_params()
  assert proc.stdout.strip().splitlines()[-1].endswith("fits=true")


# Bad input ---------------------------------------------------------------------------------

def _config_dir(tmp_path, d):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(d))
  return path


@pytest.mark.parametrize("model_type", ["bloom", "mistral", None])
def test_unsupported_model_type_is_named_with_the_supported_ones(tmp_path, model_type):
  d = {"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
  if model_type:
    d["model_type"] = model_type
  path = _config_dir(tmp_path, d)
  what = f"model_type '{model_type}'" if model_type else "has no model_type"
  with pytest.raises(InputError, match=f"{path}: {what} is not supported; opt_jax supports "
                                       "model_type opt, gpt_neox, llama, olmo, olmo2"):
    families.read_config(path)


@pytest.mark.parametrize("field, value, family", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "llama"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "llama"),
    ("sliding_window", 4096, "llama"),
    ("alibi", True, "gpt_neox"),
    ("eos_token_id", [1, 2, 3], "olmo2"),
])
def test_unsupported_field_fails_naming_it(tmp_path, field, value, family):
  d = dict(families.to_hf_dict(oracle.FAMILY_TINY["llama_gqa" if family == "llama" else
                               "neox_parallel" if family == "gpt_neox" else "olmo2"]))
  d[field] = value
  path = _config_dir(tmp_path, d)
  name = "rope_parameters.rope_type" if field == "rope_parameters" else field
  with pytest.raises(InputError, match=f"{path}: {name}"):
    families.read_config(path)
  # Conversion fails the same way, before anything is written.
  (tmp_path / "model.safetensors").write_bytes(b"")
  out = f"{tmp_path}-out"   # beside the checkpoint: no output goes into one
  with pytest.raises(ConversionError, match=name):
    convert(tmp_path, out)
  assert not os.path.exists(out)


def test_config_json_that_cannot_express_the_model_fails():
  llama_like = oracle.FAMILY_TINY["llama_gqa"].replace(family="opt")
  with pytest.raises(InputError, match="an OPT config.json cannot express positions='rotary'"):
    families.to_hf_dict(llama_like)
