"""Flax OPT decoder: pre-LN and post-LN (350m) variants, project_in/out, layers under scan, KV cache.

Dimension letters used in shapes and einsums:
  B batch, T query length, S key length (T without a cache, cache slots with one),
  V vocab, E word_embed_proj_dim, D hidden, N heads, H head_dim, F ffn_dim, L layers.

Parameters (`params` collection, plain arrays; layer weights stacked on a leading L axis):
  embed_tokens/embedding [V, E]          (also the tied LM head)
  embed_positions/embedding [P + 2, D]   (OPT's learned positions, offset 2)
  project_in/kernel [E, D], project_out/kernel [D, E]        only when E != D
  layers/self_attn_layer_norm/{scale,bias} [L, D]
  layers/self_attn/{qkv_kernel [L, D, 3, N, H], qkv_bias [L, 3, N, H],
                    out_kernel [L, N, H, D], out_bias [L, D]}         (3 = q, k, v)
  layers/final_layer_norm/{scale,bias} [L, D]
  layers/fc1/{kernel [L, D, F], bias [L, F]}, layers/fc2/{kernel [L, F, D], bias [L, D]}
  final_layer_norm/{scale,bias} [D]      only for pre-LN models without `_remove_final_layer_norm`

KV cache: a plain dict that prints and checkpoints like any pytree (see `init_cache`):
  key, value     [L, B, S, N, H]  compute dtype; slot s of row b holds the token written s-th
  valid          [B, S] bool      slot holds a real token (False: left padding or not yet written)
  next_position  [B] int32        real tokens seen so far = position id of the next real token
  index          [] int32         slots written so far (the same for every row)

Every parameter and large activation carries logical axis names (batch, length, embed, heads,
head_dim, mlp, vocab, layers, and act_* for activations, e.g. act_vocab for logits);
`opt_jax.sharding` maps them to a mesh.
Softmax and everything reported downstream is fp32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from opt_jax.config import OPTConfig

Array = jax.Array
Cache = dict[str, Array]

POSITION_OFFSET = 2  # OPT reserves embed_positions rows 0 and 1; row 1 is used by padding.
ATTENTION_IMPLS = ("xla", "blocked", "cudnn")
_MASK_VALUE = -1e30  # finite, so a row with no visible key (a pad query) gives no NaN.

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str | None, ...],
           dtype) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  # A no-op unless opt_jax.sharding has activated a mesh and its rules table.
  return nn.with_logical_constraint(x, axes)


class LayerNorm(nn.Module):
  """LayerNorm computed in fp32, returned in the compute dtype."""
  eps: float
  affine: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.affine:
      d = x.shape[-1]
      y = y * _param(self, "scale", nn.initializers.ones, (d,), ("embed",), self.param_dtype)
      y = y + _param(self, "bias", nn.initializers.zeros, (d,), ("embed",), self.param_dtype)
    return y.astype(self.dtype)


def attention_mask(key_valid: Array, query_slot: Array, segments: Array | None = None) -> Array:
  """[B, 1, T, S] bool: key slot s is visible from query slot t if s <= t and s holds a real token
  (and, with segments, s is in segment 0 or in t's segment).

  key_valid [B, S] bool; query_slot [T] int32 (slot of each query among the keys); segments
  [B, T] int32 or None (only without a cache, so S = T; see OPT.__call__).
  """
  s = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
  causal = s[None, :] <= query_slot[:, None]                       # [T, S]
  mask = causal[None, :, :] & key_valid[:, None, :]                 # [B, T, S]
  if segments is not None:
    mask = mask & _segment_visible(segments, segments)
  return mask[:, None]                                              # [B, 1, T, S]


def _segment_visible(query_segments: Array, key_segments: Array) -> Array:
  """[B, T, S] bool: key segment 0 (shared) or the query's own segment."""
  k = key_segments[:, None, :]
  return (k == 0) | (k == query_segments[:, :, None])


def _softmax_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """q [B, T, N, H] (already scaled), k/v [B, S, N, H], mask [B, 1, T, S] -> [B, T, N, H]."""
  scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("BNTS,BSNH->BTNH", probs, v, preferred_element_type=jnp.float32
                    ).astype(v.dtype)


def _blocked_causal_attention(q: Array, k: Array, v: Array, key_valid: Array, block: int,
                              segments: Array | None = None) -> Array:
  """Causal attention without a cache, flash-style, for CPU where XLA has no fused kernel.

  Queries and keys in blocks of `block` positions. Each query block (unrolled) runs an online
  softmax (running max, sum and fp32 accumulator) over the key blocks below the diagonal in a
  fori_loop, then over its diagonal block with the causal mask. Blocks above the diagonal are
  skipped (about half the work) and the loop keeps one [B, N, block, block] fp32 score block
  alive at a time instead of [B, N, T, T], so scores stay in cache and peak memory stays small.
  q [B, T, N, H] (already scaled), k/v [B, T, N, H], key_valid [B, T], segments [B, T] int32 or
  None (see OPT.__call__) -> [B, T, N, H].
  """
  b, t, n, h = q.shape
  nb = -(-t // block)
  if segments is None:
    segments = jnp.zeros((b, t), jnp.int32)
  if nb * block != t:  # pad to whole blocks with invalid keys; padded queries are dropped
    pad = lambda x: jnp.pad(x, [(0, 0), (0, nb * block - t)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, key_valid, segments = pad(q), pad(k), pad(v), pad(key_valid), pad(segments)
  q, k, v = (jnp.einsum("BTNH->BNTH", x) for x in (q, k, v))           # heads-major blocks
  kb = k.reshape(b, n, nb, block, h)
  vb = v.reshape(b, n, nb, block, h)
  valid = key_valid.reshape(b, nb, block)
  seg = segments.reshape(b, nb, block)
  causal = jnp.arange(block)[None, :] <= jnp.arange(block)[:, None]      # [block, block]

  def update(carry, qi, i, j, diagonal):
    run_max, run_sum, acc = carry
    kj = jax.lax.dynamic_index_in_dim(kb, j, axis=2, keepdims=False)     # [B, N, block, H]
    vj = jax.lax.dynamic_index_in_dim(vb, j, axis=2, keepdims=False)
    visible = jax.lax.dynamic_index_in_dim(valid, j, axis=1, keepdims=False)[:, None, :]
    visible = visible & _segment_visible(                                 # [B, block, block]
        seg[:, i], jax.lax.dynamic_index_in_dim(seg, j, axis=1, keepdims=False))
    visible = visible[:, None]                                            # [B, 1, block, block]
    if diagonal:
      visible = visible & causal
    scores = jnp.einsum("BNTH,BNSH->BNTS", qi, kj, preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores, _MASK_VALUE)
    new_max = jnp.maximum(run_max, scores.max(-1))
    probs = jnp.exp(scores - new_max[..., None])
    # exp(-inf) = 0 on the first block; a fully masked earlier block (left padding) had max -1e30
    # and its terms vanish here as soon as a real key arrives.
    rescale = jnp.exp(run_max - new_max)
    pv = jnp.einsum("BNTS,BNSH->BNTH", probs.astype(v.dtype), vj, preferred_element_type=jnp.float32)
    return new_max, run_sum * rescale + probs.sum(-1), acc * rescale[..., None] + pv

  outs = []
  for i in range(nb):
    qi = q[:, :, i * block:(i + 1) * block]                               # [B, N, block, H]
    carry = (jnp.full((b, n, block), -jnp.inf, jnp.float32), jnp.zeros((b, n, block), jnp.float32),
             jnp.zeros((b, n, block, h), jnp.float32))
    if i:
      carry = jax.lax.fori_loop(0, i, lambda j, c, qi=qi, i=i: update(c, qi, i, j, False), carry)
    _, run_sum, acc = update(carry, qi, i, i, True)
    outs.append(acc / run_sum[..., None])
  out = jnp.concatenate(outs, axis=2)                                      # [B, N, T, H]
  return jnp.einsum("BNTH->BTNH", out)[:, :t].astype(q.dtype)


class Attention(nn.Module):
  config: OPTConfig
  dtype: Any
  param_dtype: Any
  impl: str
  block: int

  @nn.compact
  def __call__(self, x: Array, kv: tuple[Array, Array] | None, key_valid: Array, query_slot: Array,
               index: Array | None, segments: Array | None = None
               ) -> tuple[Array, tuple[Array, Array] | None]:
    """x [B, T, D]; kv: this layer's cache (k, v) [B, S, N, H] or None; segments [B, T] int32 or
    None (no cache only, see OPT.__call__) -> ([B, T, D], new kv)."""
    c = self.config
    d, n, h = c.hidden_size, c.num_attention_heads, c.head_dim
    init = nn.initializers.normal(0.02)
    w_qkv = _param(self, "qkv_kernel", init, (d, 3, n, h), ("embed", None, "heads", "head_dim"),
                   self.param_dtype)
    # Every projection accumulates in fp32 and rounds once (see Dense).
    qkv = jnp.einsum("BTD,DKNH->KBTNH", x, w_qkv.astype(self.dtype),
                     preferred_element_type=jnp.float32)                      # [3, B, T, N, H]
    if c.enable_bias:
      b_qkv = _param(self, "qkv_bias", nn.initializers.zeros, (3, n, h), (None, "heads", "head_dim"),
                     self.param_dtype)
      qkv = qkv + b_qkv.astype(jnp.float32)[:, None, None]
    q = (qkv[0] * (h ** -0.5)).astype(self.dtype)
    k, v = qkv[1].astype(self.dtype), qkv[2].astype(self.dtype)
    q = _constrain(q, ("batch", "act_length", "act_heads", "head_dim"))
    if kv is not None:
      k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
      new_kv = (k, v)
    else:
      new_kv = None
    k = _constrain(k, ("batch", "act_length", "act_heads", "head_dim"))
    v = _constrain(v, ("batch", "act_length", "act_heads", "head_dim"))

    if self.impl == "blocked" and kv is None and x.shape[1] > self.block:
      out = _blocked_causal_attention(q, k, v, key_valid, self.block, segments)
    elif self.impl == "cudnn":
      mask = attention_mask(key_valid, query_slot, segments)
      out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                         scale=1.0, implementation="cudnn")
    else:
      out = _softmax_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                               attention_mask(key_valid, query_slot, segments))
    out = _constrain(out, ("batch", "act_length", "act_heads", "head_dim"))   # [B, T, N, H]

    w_out = _param(self, "out_kernel", init, (n, h, d), ("heads", "head_dim", "embed"),
                   self.param_dtype)
    y = jnp.einsum("BTNH,NHD->BTD", out.astype(self.dtype), w_out.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    if c.enable_bias:
      y = y + _param(self, "out_bias", nn.initializers.zeros, (d,), ("embed",),
                     self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype), new_kv


class Dense(nn.Module):
  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = _param(self, "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.axes,
               self.param_dtype)
    # fp32 accumulation requested explicitly: XLA's CPU backend rewrites a bf16 x bf16 -> bf16 dot
    # into converts + an fp32 x fp32 dot (fp32 speed), while bf16 x bf16 -> fp32 stays a bf16
    # dot (AMX / avx512_bf16 kernels where the CPU has them). On GPU/TPU the result is the same.
    y = jnp.einsum("...I,IO->...O", x, w.astype(self.dtype), preferred_element_type=jnp.float32)
    if self.use_bias:
      y = y + _param(self, "bias", nn.initializers.zeros, (self.features,), self.axes[1:],
                     self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype)


class DecoderLayer(nn.Module):
  config: OPTConfig
  dtype: Any
  param_dtype: Any
  impl: str
  block: int

  @nn.compact
  def __call__(self, x: Array, kv: tuple[Array, Array] | None, key_valid: Array,
               query_slot: Array, index: Array | None, segments: Array | None = None):
    """x [B, T, D] -> ([B, T, D], new kv). Pre-LN: x + f(LN(x)); post-LN (350m): LN(x + f(x))."""
    c = self.config
    norm = lambda name: LayerNorm(c.layer_norm_eps, c.layer_norm_elementwise_affine, self.dtype,
                                  self.param_dtype, name=name)
    dense = lambda feats, axes, name: Dense(feats, axes, c.enable_bias, self.dtype, self.param_dtype,
                                            name=name)
    attn_norm, mlp_norm = norm("self_attn_layer_norm"), norm("final_layer_norm")

    y = attn_norm(x) if c.do_layer_norm_before else x
    y, new_kv = Attention(c, self.dtype, self.param_dtype, self.impl, self.block, name="self_attn")(
        y, kv, key_valid, query_slot, index, segments)
    x = x + y
    if not c.do_layer_norm_before:
      x = attn_norm(x)

    y = mlp_norm(x) if c.do_layer_norm_before else x
    y = dense(c.ffn_dim, ("embed", "mlp"), "fc1")(y)                            # [B, T, F]
    y = _constrain(_ACTIVATIONS[c.activation_function](y), ("batch", "act_length", "act_mlp"))
    y = dense(c.hidden_size, ("mlp", "embed"), "fc2")(y)                        # [B, T, D]
    x = x + y
    if not c.do_layer_norm_before:
      x = mlp_norm(x)
    x = _constrain(x, ("batch", "act_length", "act_embed"))
    return x, new_kv


class OPT(nn.Module):
  """OPT decoder returning final hidden states [B, T, E]; the tied LM head is `logits()`.

  dtype: compute dtype (fp32 on CPU, bf16 on accelerators); param_dtype: storage dtype of params.
  attention: "xla" (plain masked softmax), "blocked" (causal blocks skipped; fastest on CPU for
  long sequences), "cudnn" (fused kernel of jax.nn.dot_product_attention; GPU only).
  """
  config: OPTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "xla"
  attention_block: int = 256

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               cache: Cache | None = None, positions: Array | None = None,
               segment_ids: Array | None = None) -> tuple[Array, Cache | None]:
    """input_ids [B, T] int; attention_mask [B, T] (1 real token, 0 padding; default all ones).

    Without a cache, returns (hidden [B, T, E], None). With a cache (see `init_cache`), the T new
    tokens are written at slots [index, index + T) and the updated cache is returned.

    Several sequences sharing a prefix in one row (no cache only): segment_ids [B, T] int32, 0 for
    the shared prefix and k > 0 for the k-th continuation; a token sees earlier tokens of segment
    0 and of its own segment only. positions [B, T] int32 then gives each token's position id
    (-1 for pads), e.g. continuing the prefix's count in every continuation. Without positions
    they are counted from the mask as HF does (0, 1, 2, ... over the real tokens).
    """
    c = self.config
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
    if cache is not None and (segment_ids is not None or positions is not None):
      raise ValueError("segment_ids and positions are for calls without a cache")
    b, t = input_ids.shape
    mask = (jnp.ones((b, t), jnp.int32) if attention_mask is None
            else attention_mask.astype(jnp.int32))

    # Position ids as HF computes them from the mask: real tokens count 0, 1, 2, ...; pads get -1.
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache["next_position"]
    if positions is None:
      positions = jnp.where(mask > 0, start[:, None] + jnp.cumsum(mask, axis=1) - 1, -1)
    if segment_ids is not None:
      segment_ids = segment_ids.astype(jnp.int32)

    tokens = Embed(c.vocab_size, c.word_embed_proj_dim, ("vocab", "embed"), self.param_dtype,
                   name="embed_tokens")(input_ids).astype(self.dtype)            # [B, T, E]
    # The lookup in a vocab-split table is a masked gather + sum over `model`; pin its output to
    # the residual layout so the partitioner does not pick the table's (fsdp) layout for it.
    tokens = _constrain(tokens, ("batch", "act_length", "act_embed"))
    if c.has_projections:
      tokens = Dense(c.hidden_size, ("embed", "embed_out"), False, self.dtype, self.param_dtype,
                     name="project_in")(tokens)                                     # [B, T, D]
    pos = Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, (None, "embed"),
                self.param_dtype, name="embed_positions")(positions + POSITION_OFFSET)
    x = _constrain(tokens + pos.astype(self.dtype), ("batch", "act_length", "act_embed"))

    if cache is None:
      key_valid, query_slot, index, kv = mask > 0, jnp.arange(t, dtype=jnp.int32), None, None
    else:
      index = cache["index"]
      key_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], mask > 0, index, axis=1)
      query_slot = index + jnp.arange(t, dtype=jnp.int32)
      kv = (cache["key"], cache["value"])

    layers = nn.scan(
        DecoderLayer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=c.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(c, self.dtype, self.param_dtype, self.attention, self.attention_block, name="layers")
    x, new_kv = layers(x, kv, key_valid, query_slot, index, segment_ids)

    if c.final_layer_norm:
      x = LayerNorm(c.layer_norm_eps, c.layer_norm_elementwise_affine, self.dtype, self.param_dtype,
                    name="final_layer_norm")(x)
    if c.has_projections:
      x = Dense(c.word_embed_proj_dim, ("embed_out", "embed"), False, self.dtype, self.param_dtype,
                name="project_out")(x)                                              # [B, T, E]

    new_cache = None
    if cache is not None:
      new_cache = {"key": new_kv[0], "value": new_kv[1], "valid": key_valid,
                   "next_position": start + mask.sum(axis=1, dtype=jnp.int32), "index": index + t}
    return x, new_cache


class Embed(nn.Module):
  num: int
  features: int
  axes: tuple[str | None, str | None]
  param_dtype: Any

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table = _param(self, "embedding", nn.initializers.normal(0.02), (self.num, self.features),
                   self.axes, self.param_dtype)
    # Gather the features dim first if it is split (fsdp): a lookup can stay split by rows
    # (masked gather + sum), not by features when the batch is split over the same devices.
    table = _constrain(table, (self.axes[0], "act_embed"))
    return jnp.take(table, ids, axis=0)


# Functional helpers ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _jitted_init(config: OPTConfig, param_dtype) -> Any:
  # One compiled initialiser per (config, dtype): the seed is an argument, so new seeds are free.
  model = OPT(config, param_dtype=param_dtype)
  return jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]))


def init_params(config: OPTConfig, seed: int = 0, param_dtype=jnp.float32) -> dict[str, Any]:
  """Random parameters (normal(0.02) weights, zero biases, unit LN scales), plain arrays."""
  return _jitted_init(config, jnp.dtype(param_dtype))(jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=None)
def _abstract_params(config: OPTConfig, param_dtype) -> Any:
  # One abstract trace of init per (config, dtype), shared by logical_axes and param_shapes
  # (sharding asks for both several times per model). Callers get fresh trees built from it.
  model = OPT(config, param_dtype=param_dtype)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]


def logical_axes(config: OPTConfig) -> Any:
  """Pytree matching the params, each leaf a tuple of logical axis names (no arrays allocated)."""
  return jax.tree.map(lambda p: tuple(p.names), _abstract_params(config, jnp.dtype(jnp.float32)),
                      is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))


def param_shapes(config: OPTConfig, param_dtype=jnp.float32) -> Any:
  """Pytree of jax.ShapeDtypeStruct matching the params."""
  return nn.unbox(_abstract_params(config, jnp.dtype(param_dtype)))


def lm_head(params: dict[str, Any]) -> Array:
  """The tied LM head [V, E] (OPT ties it to the token embedding)."""
  return params["embed_tokens"]["embedding"]


def logits(params: dict[str, Any], hidden: Array) -> Array:
  """hidden [B, T, E] -> logits [B, T, V] fp32. Materialises all of V: use scoring for log-probs."""
  w = lm_head(params)
  out = jnp.einsum("BTE,VE->BTV", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
  return _constrain(out, ("batch", "act_length", "act_vocab"))   # vocab-parallel: V stays split


def init_cache(config: OPTConfig, batch: int, max_length: int, dtype=jnp.float32) -> Cache:
  """An empty KV cache of `max_length` slots (see the module docstring for its layout)."""
  shape = (config.num_hidden_layers, batch, max_length, config.num_attention_heads, config.head_dim)
  return {
      "key": jnp.zeros(shape, dtype),
      "value": jnp.zeros(shape, dtype),
      "valid": jnp.zeros((batch, max_length), bool),
      "next_position": jnp.zeros((batch,), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }
