import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from opt_jax import model as M
from opt_jax import families
import oracle
from _oracle_fixtures import pair  # noqa: F401  (a pytest fixture)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_logits_match_hf(pair, side, impl):
  config, hf, params = pair
  ids, mask = oracle.padded_batch(config.vocab_size, [16, 9, 4], 16, side)
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  hidden, _ = M.Decoder(config, attention=impl, attention_block=4).apply(
      {"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  got = np.asarray(M.logits(params, hidden))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)


def test_incremental_cache_matches_full_forward(pair):
  config, hf, params = pair
  ids, mask = oracle.padded_batch(config.vocab_size, [12, 7], 12, "left")
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  model = M.Decoder(config)
  cache = M.init_cache(config, batch=2, max_length=16)
  outs = []
  for start, stop in [(0, 5), (5, 6), (6, 9), (9, 12)]:
    h, cache = model.apply({"params": params}, jnp.asarray(ids[:, start:stop]),
                           jnp.asarray(mask[:, start:stop]), cache)
    outs.append(h)
  got = np.asarray(M.logits(params, jnp.concatenate(outs, axis=1)))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)
  assert int(cache["index"]) == 12
  np.testing.assert_array_equal(np.asarray(cache["next_position"]), mask.sum(1))


def test_param_tree_matches_logical_axes_and_count(pair):
  config, hf, params = pair
  shapes = M.param_shapes(config)
  axes = M.logical_axes(config)
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  for path, shape in jax.tree_util.tree_leaves_with_path(shapes):
    leaf_axes = axes
    for k in path:
      leaf_axes = leaf_axes[k.key]
    assert len(leaf_axes) == len(shape.shape), path
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert n == config.num_params() == sum(p.numel() for p in hf.parameters())


def test_presets_have_published_sizes():
  # Parameter counts of the released OPT models (HF model cards / metaseq), tied head counted once.
  expected = {"125m": 125.2e6, "350m": 331.2e6, "1.3b": 1.316e9, "6.7b": 6.658e9, "175b": 174.6e9}
  for name, n in expected.items():
    c = families.preset("opt-" + name)
    assert abs(c.num_params() / n - 1) < 0.01, (name, c.num_params())
  c = families.preset("350m")
  assert c.embed_dim == 512 and c.block == "post_norm" and not c.final_norm
  assert families.preset("facebook/opt-30b") == families.preset("opt-30b")


def test_hf_config_round_trip(tmp_path):
  for config in list(oracle.TINY.values()) + list(families.presets().values()):
    path = tmp_path / "config.json"
    families.write_config(config, path)
    assert families.read_config(path) == config


def test_bad_config_is_named():
  with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
    families.get("opt").config(vocab_size=10, hidden_size=30, num_hidden_layers=1,
                               num_attention_heads=4, ffn_dim=8)


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, ...]]:
  """Element types of the operands of every dot in optimised HLO text (one entry per dot)."""
  import re
  out = []
  for comp in hlo.split("\n\n"):
    types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", comp))
    for operands in re.findall(r"= \w+\[[^\]]*\]\S* dot\(([^)]*)\)", comp):
      out.append(tuple(types.get(o.strip().split(" ")[-1], "?") for o in operands.split(",")))
  return out


def test_bf16_program_multiplies_bf16_operands_only():
  # XLA's CPU backend turns a bf16 x bf16 -> bf16 dot into converts + an fp32 dot: the model
  # asks for fp32 accumulation so that every matmul of a bf16 forward keeps bf16 operands
  # (the fast AMX / avx512_bf16 kernels on CPUs that have them).
  import functools

  from opt_jax import scoring
  # OPT (biases, learned positions, tied head) and Llama with GQA (grouped scores and p.v, gated
  # MLP, rotary, untied head): every einsum of the model is in one of the two.
  ids = jnp.zeros((2, 32), jnp.int32)
  for config in (oracle.TINY["pre_ln"], oracle.FAMILY_TINY["llama_gqa"]):
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.bfloat16), M.param_shapes(config))
    for attention in ("xla", "blocked"):
      fn = jax.jit(functools.partial(scoring.token_logprobs, config=config, dtype=jnp.bfloat16,
                                     attention=attention, attention_block=16))
      dots = _dot_operand_dtypes(fn.lower(params, ids, ids).compile().as_text())
      assert len(dots) >= 5, dots                    # q/k/v, scores, p.v, out, mlp, head
      assert all(t == ("bf16", "bf16") for t in dots), (config.family, attention, dots)
