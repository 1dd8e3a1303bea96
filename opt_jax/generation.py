"""KV-cached decoding under jit: greedy, temperature, top-k, top-p, and weighted mixtures of models.

One jitted program per (batch bucket, prompt bucket, max_new_tokens, models, dtype): the
prompt is prefilled into each model's KV cache (`opt_jax.model.init_cache`), then a
`lax.while_loop` feeds one token per step, so there is no host round trip per token. Parameters,
sampler (greedy or sample), temperature, top-k, top-p, eos, pad, the seed and the mixture
weights are all arguments of the program, so one compilation serves every checkpoint of a size
and every sampler setting.

Conventions
  * Prompts are lists of token ids (as the tokenizer's encode() gives them, e.g. starting with
    OPT's </s> or Llama's <s>). They are sorted by length,
    left-padded to a bucketed length and a bucketed batch size; positions come from the attention
    mask, so a left-padded row sees exactly the positions HF gives it.
  * Every row stops after it emits `eos_id` (default: the config's eos_token_id; the eos is part
    of its output); a finished row keeps emitting pad and its cache slots are masked. The loop
    ends when every row is done.
  * Prompt too long: a prompt of n tokens needs n + max_new_tokens <= max_position_embeddings.
    By default a longer prompt is an error naming it; `truncate_prompts=True` keeps its last
    max_position_embeddings - max_new_tokens tokens instead.
  * Sampling: scores s [B, V] fp32 (logits / temperature) go through top-k then top-p in the order
    and with the tie rules of HF's TopK/TopP warpers, then one token is drawn by inverse CDF with
    u = uniform(fold_in(fold_in(key(seed), prompt_index), step)). The draw for a prompt therefore
    depends on the seed and on its index in `prompts`, not on how prompts were batched.

Meshes (`mesh=`, from opt_jax.sharding.make_mesh): the decoding program is jitted with in/out
shardings: parameters laid out by the rules table (sharding.shard_params; params restored straight
into that layout are used as they are), prompt rows over the batch axes (data x fsdp; batch
buckets are rounded up to a multiple of that split), each KV cache with sharding.cache_shardings
(kv heads over `model`, or replicated when they do not split), tracing under sharding.activate.
Divisibility is checked before anything is
placed or compiled. Every process of a multi-process run must make the same call with the same
arguments; each gets the whole result. The tokens are those of the single-device run up to float
rounding (tensor-parallel sums add in another order), which decides a token only at a near tie.

Joint decoding (`joint_generate`): with per-model probabilities p_i = softmax(logits_i / T),
the next-token distribution is q = max(sum_i w_i p_i, 0) / Z: the weighted sum of probabilities
(not of logits), entries <= 0 dropped, renormalised (`mixture_log_probs`). This is the mixture
p' = l1 * p_small + l2 * p_large of Xia et al. (2023, section 4; `OPTSubtract` in the authors'
utils.py, which sets negatives to 0 and adds 1e-7 to every entry before the log: the same
argmax; for sampling its dropped tokens keep 1e-7 each before renormalising, V x 1e-7 in all
(0.5% of the mass for a 50k vocabulary at Z = 1), mostly outside a top-p 0.9 nucleus; here a
dropped token is never drawn). Greedy search takes argmax q; nucleus sampling applies top-k / top-p to q and draws
(`sampling_distribution` is what the draw sees). Weights may be negative (p_small - p_large, the
contrastive sets). If Z <= FALLBACK_MASS * sum_i |w_i| (the weights leave no positive mass at that
step: e.g. all weights zero, or w = (1, -1) on two models that agree), that row uses p_f (the
first model's distribution, or the one `fallback_model` names) for that step; such steps are
counted per prompt in the returned stats. Models must share a tokenizer (fingerprints compared up
front) and a vocabulary size. Weights, sampler and seed are arguments of the one compiled
program, so every configuration and method of a pair of models (the paper's five mixtures x
greedy / nucleus) runs one program per prompt bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opt_jax import model as M
from opt_jax import programs, sharding
from opt_jax.config import DecoderConfig

Array = jax.Array
FALLBACK_MASS = 1e-6


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Everything static about one decoding program (hashable: a jit static argument)."""
  configs: tuple[DecoderConfig, ...]
  max_new_tokens: int
  joint: bool
  dtype: str
  attention: str
  mesh: Any = None   # jax.sharding.Mesh or None (one device)


# Samplers ------------------------------------------------------------------------------------

def _order_keys(scores: Array) -> Array:
  """scores [B, V] fp32 (no NaN) -> int32 keys [B, V] in the same order (-0.0 and 0.0 equal)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(scores == 0, 0.0, scores), jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)   # negative floats: flip the magnitude bits


def _threshold_key(keys: Array, weights: Array, limit: Array) -> Array:
  """keys [B, V] int32, weights [B, V] >= 0 -> [B] the smallest key x among each row's keys with
  sum(weights where keys > x) < limit (limit > 0, so the row's largest key qualifies).

  The sum only falls as x grows, so x is found by halving [min key, max key]: 32 masked sums
  over [B, V] instead of a sort of the vocabulary (which on CPU costs ~20x as much).
  """
  def halve(_, bounds):
    lo, hi = bounds                                   # the answer lies in [lo, hi]
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)       # floor((lo + hi) / 2) without overflow
    fits = jnp.sum(jnp.where(keys > mid[:, None], weights, 0), axis=-1) < limit
    return jnp.where(fits, lo, mid + 1), jnp.where(fits, mid, hi)

  return jax.lax.fori_loop(0, 32, halve, (keys.min(axis=-1), keys.max(axis=-1)))[1]


def filter_top_k_top_p(scores: Array, top_k: Array, top_p: Array) -> Array:
  """scores [B, V] fp32 (logits or log-probs, -inf allowed) -> same with filtered tokens at -inf.

  top_k [] int (0: off) keeps tokens whose score is >= the k-th largest (ties kept, like HF);
  then top_p [] float (1: off) keeps the smallest set of highest-scoring tokens whose probability
  (softmax of the top-k survivors) reaches top_p: a token is kept iff the mass strictly above it
  is < top_p, so the best token is always kept. Each filter is skipped when off.

  No sort: the k-th largest score is the smallest score with fewer than k scores above it, and
  the top-p cut is the smallest score with less than top_p of the mass above it; both are found
  by bisection over the scores' bit patterns (`_threshold_key`).
  """
  def apply_top_k(s):
    keys = _order_keys(s)
    kth = _threshold_key(keys, jnp.ones_like(keys), jnp.minimum(top_k, s.shape[-1]))
    return jnp.where(keys >= kth[:, None], s, -jnp.inf)

  def apply_top_p(s):
    keys = _order_keys(s)
    pth = _threshold_key(keys, jax.nn.softmax(s, axis=-1), top_p)
    return jnp.where(keys >= pth[:, None], s, -jnp.inf)

  scores = jax.lax.cond(top_k > 0, apply_top_k, lambda s: s, scores)
  return jax.lax.cond(top_p < 1.0, apply_top_p, lambda s: s, scores)


def sample_inverse_cdf(scores: Array, u: Array) -> Array:
  """scores [B, V] fp32 (-inf = excluded), u [B] in [0, 1) -> tokens [B] int32.

  Token = first index whose cumulative probability exceeds u (never an excluded token).
  """
  w = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))               # [B, V] unnormalised
  c = jnp.cumsum(w, axis=-1)
  idx = jnp.sum(c <= u[:, None] * c[:, -1:], axis=-1).astype(jnp.int32)
  v = scores.shape[-1]
  last = v - 1 - jnp.argmax((w > 0)[:, ::-1], axis=-1).astype(jnp.int32)      # rounding guard
  return jnp.minimum(idx, last)


def step_uniforms(seed: Array, rows: Array, step: Array) -> Array:
  """u [B] fp32: uniform(fold_in(fold_in(key(seed), rows[b]), step)), the randomness of a draw."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(rows)
  return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)


def mixture_log_probs(logits: Sequence[Array], weights: Array, temperature: Array,
                      fallback_model: Array | int = 0) -> tuple[Array, Array]:
  """Joint next-token distribution. logits: per model [B, V] fp32; weights [M] fp32.

  Returns (log q [B, V] fp32 with -inf where q = 0, fallback [B] bool) with
  q = max(sum_i w_i softmax(logits_i / T), 0) / Z, or softmax(logits_f / T) of the fallback model
  f (default the first) where Z is not positive (see the module docstring).
  """
  probs = [jax.nn.softmax(l / temperature, axis=-1) for l in logits]
  mix = sum(weights[i] * p for i, p in enumerate(probs))
  pos = jnp.maximum(mix, 0.0)
  z = jnp.sum(pos, axis=-1)                                                   # [B]
  fallback = z <= FALLBACK_MASS * jnp.sum(jnp.abs(weights))
  backup = sum(jnp.where(fallback_model == i, p, 0.0) for i, p in enumerate(probs))
  q = jnp.where(fallback[:, None], backup, pos / jnp.where(fallback, 1.0, z)[:, None])
  return jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1.0)), -jnp.inf), fallback


def sampling_distribution(logits: Sequence[Array], weights: Array, temperature: Array,
                          top_k: Array, top_p: Array, fallback_model: Array | int = 0) -> Array:
  """log of the distribution a joint nucleus / top-k draw samples from: [B, V] fp32, -inf where
  excluded. logits: per model [B, V] fp32; the mixture of `mixture_log_probs`, then
  `filter_top_k_top_p` (top_k 0 and top_p 1: off), renormalised."""
  scores, _ = mixture_log_probs(logits, weights, temperature, fallback_model)
  return jax.nn.log_softmax(filter_top_k_top_p(scores, top_k, top_p), axis=-1)


# The decoding program -------------------------------------------------------------------------

def _decode(spec: DecodeSpec, params: tuple, ids: Array, mask: Array, rows: Array, done: Array,
            weights: Array, fallback_model: Array, greedy: Array, eos_id: Array, pad_id: Array,
            seed: Array, temperature: Array, top_k: Array, top_p: Array):
  """The whole decoding of one batch (jitted by `_decoder`, spec static).

  ids/mask [B, T] left-padded prompts; rows [B] prompt indices; done [B] (filler rows).

  weights [M] f32; fallback_model [] int32; greedy [] bool; eos_id (-1: none), pad_id, seed,
  top_k [] int32; temperature, top_p [] f32. All are traced: changing them does not recompile.

  Returns tokens [B, N] int32 (pad after a row's end), lengths [B] int32 (tokens emitted, eos
  included), fallback [B] int32 (joint steps that fell back to model 1).
  """
  programs.traced("decode", spec, ids.shape)
  b, t = ids.shape
  n = spec.max_new_tokens
  dtype = jnp.dtype(spec.dtype)
  models = [M.Decoder(c, dtype=dtype, attention=spec.attention) for c in spec.configs]

  def forward(tok_ids, tok_mask, caches):
    """tok_ids/tok_mask [B, t'] -> (per-model logits of the last column [B, V] fp32, caches)."""
    out_logits, out_caches = [], []
    for mod, p, cache in zip(models, params, caches):
      hidden, cache = mod.apply({"params": p}, tok_ids, tok_mask, cache)     # [B, t', E]
      out_logits.append(M.logits(p, hidden[:, -1:])[:, 0])                    # [B, V]
      out_caches.append(cache)
    return out_logits, tuple(out_caches)

  def choose(logits, step, done):
    """-> (token [B] int32, pad where done; fell back [B] bool, False where done)."""
    if spec.joint:
      scores, fell = mixture_log_probs(logits, weights, temperature, fallback_model)
    else:
      scores, fell = logits[0] / temperature, jnp.zeros((b,), bool)
    best = scores if spec.joint else logits[0]
    tok = jax.lax.cond(
        greedy, lambda s: jnp.argmax(best, axis=-1).astype(jnp.int32),
        lambda s: sample_inverse_cdf(filter_top_k_top_p(s, top_k, top_p),
                                     step_uniforms(seed, rows, step)), scores)
    return jnp.where(done, pad_id, tok), fell & ~done

  caches = tuple(M.init_cache(c, b, t + n, dtype) for c in spec.configs)
  if spec.mesh is not None:   # heads over `model`, rows over `data`, as the rules lay them out
    caches = tuple(jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(spec.mesh, c))
                   for cache, c in zip(caches, spec.configs))
  logits, caches = forward(ids, mask, caches)
  tok, fell = choose(logits, jnp.int32(0), done)
  tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
  lengths = (~done).astype(jnp.int32)
  fallback = fell.astype(jnp.int32)
  done = done | (tok == eos_id)

  def cond(state):
    step, _, done, *_ = state
    return (step < n) & ~jnp.all(done)

  def body(state):
    step, tok, done, tokens, lengths, fallback, caches = state
    # A finished row feeds a masked pad: its slot is invalid and its position does not advance.
    logits, caches = forward(tok[:, None], (~done)[:, None].astype(jnp.int32), caches)
    tok, fell = choose(logits, step, done)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    fallback = fallback + fell.astype(jnp.int32)
    done = done | (tok == eos_id)
    return step + 1, tok, done, tokens, lengths, fallback, caches

  state = (jnp.int32(1), tok, done, tokens, lengths, fallback, caches)
  _, _, _, tokens, lengths, fallback, _ = jax.lax.while_loop(cond, body, state)
  return tokens, lengths, fallback


_NUM_KNOBS = 9   # the scalar arguments of _decode after `done`


@functools.lru_cache(maxsize=None)
def _decoder(mesh, configs: tuple[DecoderConfig, ...]):
  """The jitted `_decode`: plain for one device; on a mesh with the layouts of its arguments and
  results pinned (params by the rules table, rows over the batch axes, knobs replicated)."""
  if mesh is None:
    return jax.jit(_decode, static_argnums=0)
  batch = sharding.batch_sharding(mesh)                            # [B, T]
  rows = sharding.named_sharding(mesh, ("batch",))                 # [B]
  params = tuple(sharding.param_shardings(c, mesh) for c in configs)
  return jax.jit(_decode, static_argnums=0,
                 in_shardings=(params, batch, batch, rows, rows)
                 + (sharding.replicated(mesh),) * _NUM_KNOBS,
                 out_shardings=(batch, rows, rows))


def decode_shape(spec: DecodeSpec, num_prompts: int, prompt_length: int) -> tuple[int, int]:
  """[batch, prompt length] of the program that decodes `num_prompts` prompts (at most the
  batch_size of the call) whose longest has `prompt_length` tokens: the batch rounded up to a
  power of two and to a multiple of the mesh's batch split, the length to a power of two >= 8,
  capped at max_position_embeddings - max_new_tokens."""
  split = sharding.num_shards(spec.mesh, "batch")
  max_prompt = min(c.max_position_embeddings for c in spec.configs) - spec.max_new_tokens
  b = -(-programs.bucket(num_prompts, 1) // split) * split
  return b, min(programs.bucket(prompt_length, 8), max_prompt)


def _knobs(weights, fallback_model: int, greedy: bool, eos_id: int | None, pad_id: int, seed: int,
           temperature: float, top_k: int, top_p: float) -> tuple[np.ndarray, ...]:
  """The traced scalar arguments of `_decode` after `done`, as host values."""
  return (np.asarray(weights, np.float32), np.int32(fallback_model), np.bool_(greedy),
          np.int32(-1 if eos_id is None else eos_id), np.int32(pad_id), np.int32(seed),
          np.float32(temperature), np.int32(0 if greedy else top_k),
          np.float32(1.0 if greedy else top_p))


def lower_decode(spec: DecodeSpec, params: tuple, batch: int, length: int) -> Any:
  """The lowered decoding program for a [batch, length] prompt bucket (see `decode_shape`);
  params: one pytree per model, may be abstract (jax.ShapeDtypeStruct); tools/plan_mesh.py."""
  mesh = spec.mesh
  rows2, rows1 = sharding.batch_sharding(mesh), sharding.named_sharding(mesh, ("batch",))
  arrays = (jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows2),
            jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows2),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows1),
            jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=rows1))
  knobs = tuple(jax.ShapeDtypeStruct(np.shape(k), k.dtype, sharding=sharding.replicated(mesh))
                for k in _knobs(np.ones(len(spec.configs)), 0, True, 0, 0, 0, 1.0, 0, 1.0))
  with sharding.activate(mesh):
    return _decoder(mesh, spec.configs).lower(spec, params, *arrays, *knobs)


# Host side: validation, batching -------------------------------------------------------------

def _check_prompts(prompts, vocab_size: int, max_len: int, truncate: bool) -> list[list[int]]:
  """Validated prompts (lists of int); max_len = the most prompt tokens that fit."""
  if max_len <= 0:
    raise ValueError("max_new_tokens must be smaller than max_position_embeddings "
                     "(no room left for a prompt)")
  out = []
  for i, p in enumerate(prompts):
    p = [int(x) for x in p]
    if not p:
      raise ValueError(f"prompt {i} is empty; give at least one token (the tokenizer's encode() "
                       "starts a text with the family's prefix)")
    bad = [x for x in p if not 0 <= x < vocab_size]
    if bad:
      raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside [0, {vocab_size})")
    if len(p) > max_len:
      if not truncate:
        raise ValueError(
            f"prompt {i} has {len(p)} tokens; with max_new_tokens it must have at most {max_len} "
            f"(max_position_embeddings - max_new_tokens). Shorten it or pass truncate_prompts=True "
            f"to keep its last {max_len} tokens.")
      p = p[-max_len:]
    out.append(p)
  return out


def _run(configs: tuple[DecoderConfig, ...], params: tuple, prompts, weights: np.ndarray, *,
         max_new_tokens: int, sampler: str, temperature: float, top_k: int, top_p: float,
         eos_id: int | None | str, pad_id: int | None, seed: int, dtype, batch_size: int,
         truncate_prompts: bool, attention: str, joint: bool, fallback_model: int = 0,
         mesh=None):
  """Shared driver of generate / joint_generate -> (list of new-token lists, fallback counts)."""
  if sampler not in ("greedy", "sample"):
    raise ValueError(f"sampler={sampler!r}: expected 'greedy' or 'sample'")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
  max_pos = min(c.max_position_embeddings for c in configs)
  prompts = _check_prompts(prompts, configs[0].vocab_size, max_pos - max_new_tokens,
                           truncate_prompts)
  for c in configs:   # before anything is placed or compiled
    sharding.check_divisible(c, mesh)
  pad = configs[0].filler_token_id if pad_id is None else pad_id
  if isinstance(eos_id, str):
    if eos_id != "config":
      raise ValueError(f"eos_id={eos_id!r}: expected a token id, None or 'config'")
    eos_id = configs[0].eos_token_id
  spec = DecodeSpec(configs, max_new_tokens, joint, jnp.dtype(dtype).name, attention, mesh)
  greedy = sampler == "greedy"
  decode = _decoder(mesh, configs)

  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  results: list[list[int]] = [[] for _ in prompts]
  fallbacks = np.zeros(len(prompts), np.int64)
  knobs = _knobs(weights, fallback_model, greedy, eos_id, pad, seed, temperature, top_k, top_p)
  assert len(knobs) == _NUM_KNOBS
  # Every process runs this same loop on identical host values: `put` hands each process its own
  # devices' slices, `to_host` gives every process the whole result (without a mesh: a plain
  # device_put and numpy). Params already laid out by the rules (e.g. restored with
  # param_shardings) are used as they are.
  row_layouts = {2: sharding.batch_sharding(mesh), 1: sharding.named_sharding(mesh, ("batch",))}
  put_rows = lambda x: sharding.put(x, row_layouts[x.ndim])
  fetch = lambda xs: tuple(sharding.to_host(x) for x in xs)
  if mesh is None:
    params = jax.device_put(params)
  else:
    params = tuple(sharding.shard_params(p, c, mesh) for c, p in zip(configs, params))
  knobs = tuple(sharding.put(k, sharding.replicated(mesh)) for k in knobs)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    # Batch buckets are multiples of the batch split (data x fsdp), filled with filler rows.
    b, t = decode_shape(spec, len(chunk), max(len(prompts[i]) for i in chunk))
    ids = np.full((b, t), pad, np.int32)
    mask = np.zeros((b, t), np.int32)
    rows = np.zeros((b,), np.int32)
    done = np.ones((b,), bool)
    for r, i in enumerate(chunk):
      p = prompts[i]
      ids[r, t - len(p):], mask[r, t - len(p):], rows[r], done[r] = p, 1, i, False
    ids[len(chunk):, -1], mask[len(chunk):, -1] = pad, 1                        # filler rows
    with sharding.activate(mesh):   # traced under the mesh: the model's rules apply
      out = decode(spec, params, *(put_rows(x) for x in (ids, mask, rows, done)), *knobs)
    tokens, lengths, fell = fetch(out)
    for r, i in enumerate(chunk):
      results[i] = tokens[r, :lengths[r]].tolist()
      fallbacks[i] = fell[r]
  return results, fallbacks


def generate(config: DecoderConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampler: str = "greedy", temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None | str = "config",
             pad_id: int | None = None, seed: int = 0, dtype=jnp.float32, batch_size: int = 32,
             truncate_prompts: bool = False, attention: str = "xla", mesh=None
             ) -> list[list[int]]:
  """Decode up to max_new_tokens after each prompt; returns the new tokens only, eos included.

  sampler: "greedy" (argmax of the logits; temperature/top-k/top-p ignored) or "sample"
  (temperature, then top-k (0: off), then top-p (1: off), then a seeded draw). eos_id: "config"
  (the config's eos_token_id), a token id, or None (never stop early). pad_id defaults to
  config.filler_token_id (pad, else eos). See the module docstring for conventions.
  mesh: optional opt_jax.sharding mesh (module docstring, "Meshes"); the same tokens as without.
  """
  results, _ = _run((config,), (params,), prompts, np.ones(1), max_new_tokens=max_new_tokens,
                    sampler=sampler, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=eos_id, pad_id=pad_id, seed=seed, dtype=dtype, batch_size=batch_size,
                    truncate_prompts=truncate_prompts, attention=attention, joint=False,
                    mesh=mesh)
  return results


def check_joint_models(configs: Sequence[DecoderConfig], tokenizers: Sequence[Any] | None = None,
                       names: Sequence[str] | None = None) -> None:
  """Raise ValueError unless the models can be mixed: same tokenizer fingerprint, same vocab size.

  tokenizers: one object with a `fingerprint()` method per model (opt_jax.tokenizer.Tokenizer),
  or None to check only the vocabulary sizes. names label the models in the error.
  """
  names = list(names) if names is not None else [f"model {i}" for i in range(len(configs))]
  if tokenizers is not None:
    if len(tokenizers) != len(configs):
      raise ValueError(f"got {len(tokenizers)} tokenizers for {len(configs)} models")
    prints = [tok.fingerprint() for tok in tokenizers]
    differ = [n for n, f in zip(names, prints) if f != prints[0]]
    if differ:
      raise ValueError(
          f"joint decoding needs one tokenizer: {differ} tokenize text differently from "
          f"{names[0]} (tokenizer fingerprints differ); mix only models of one family")
  sizes = [c.vocab_size for c in configs]
  if len(set(sizes)) != 1:
    raise ValueError(f"joint decoding needs equal vocabulary sizes, got "
                     f"{dict(zip(names, sizes))}")


def joint_generate(models: Sequence[tuple[DecoderConfig, Any]], weights: Sequence[float],
                   prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   sampler: str = "greedy", temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, eos_id: int | None | str = "config",
                   pad_id: int | None = None,
                   seed: int = 0, dtype=jnp.float32, batch_size: int = 32,
                   truncate_prompts: bool = False, attention: str = "xla",
                   tokenizers: Sequence[Any] | None = None, names: Sequence[str] | None = None,
                   fallback_model: int = 0, mesh=None
                   ) -> tuple[list[list[int]], dict[str, Any]]:
  """Decode from q = max(sum_i w_i softmax(logits_i / T), 0) / Z (module docstring).

  models: (config, params) per model, each with its own KV cache in one jitted step.
  sampler "greedy" takes argmax q; "sample" applies top-k / top-p (nucleus) to q, then draws.
  tokenizers (optional, one per model) are checked to be identical before anything runs.
  fallback_model: index of the model whose distribution is used at a step without positive mass
  (default 0; p_small - p_large with the models ordered (large, small) and weights (-1, 1) runs
  the same compiled program as p_large - p_small, with fallback_model=1).
  mesh: optional opt_jax.sharding mesh, as in `generate`; every model is sharded on it.
  Returns (new tokens per prompt, stats) with stats = {"fallback_steps": total steps that used
  model 1's distribution, "fallback_steps_per_prompt": list[int], "generated_tokens": int,
  "weights": list[float]}.
  """
  if len(models) < 1 or len(models) != len(weights):
    raise ValueError(f"need one weight per model, got {len(models)} models, {len(weights)} weights")
  if not 0 <= fallback_model < len(models):
    raise ValueError(f"fallback_model={fallback_model} is not a model index (0..{len(models) - 1})")
  configs = tuple(c for c, _ in models)
  check_joint_models(configs, tokenizers, names)
  results, fallbacks = _run(
      configs, tuple(p for _, p in models), prompts, np.asarray(weights, np.float64),
      max_new_tokens=max_new_tokens, sampler=sampler, temperature=temperature, top_k=top_k,
      top_p=top_p, eos_id=eos_id, pad_id=pad_id, seed=seed, dtype=dtype, batch_size=batch_size,
      truncate_prompts=truncate_prompts, attention=attention, joint=True,
      fallback_model=fallback_model, mesh=mesh)
  stats = {"fallback_steps": int(fallbacks.sum()),
           "fallback_steps_per_prompt": fallbacks.tolist(),
           "generated_tokens": int(sum(len(r) for r in results)),
           "weights": [float(w) for w in weights]}
  return results, stats
