"""One Flax decoder for every family, built from the neutral `DecoderConfig`; layers under scan.

The forward pass, top to bottom: token embedding (+ project_in) (+ learned positions) -> L
blocks of attention and MLP, their norms placed by `config.block` -> final norm (+ project_out)
-> hidden states; the LM head (tied embedding or its own table) is applied by `logits` or, one
vocabulary chunk at a time, by opt_jax.scoring.

Dimension letters used in shapes and einsums:
  B batch, T query length, S key length (T without a cache, cache slots with one),
  V vocab, E embed_dim, D hidden, N query heads, K key/value heads (N = K x G), G query heads per
  key/value head, H head_dim, F intermediate_size, L layers, P max_position_embeddings.

Parameters (`params` collection, plain arrays; layer weights stacked on a leading L axis; a
parameter exists only when the config has its feature):
  embed/embedding [V, E]                  token embedding (and the LM head when tied)
  pos_embed/embedding [offset + P, D]     learned positions only
  project_in/kernel [E, D], project_out/kernel [D, E]        only when E != D
  layers/attn_norm/{scale, bias} [L, D]   the norm of the attention sublayer (bias: layernorm)
  layers/attn/{q_kernel [L, D, N, H], k_kernel, v_kernel [L, D, K, H], o_kernel [L, N, H, D],
               q_bias [L, N, H], k_bias, v_bias [L, K, H], o_bias [L, D],
               q_norm/scale [L, N, H], k_norm/scale [L, K, H]}       (biases, qk_norm: optional)
  layers/mlp_norm/{scale, bias} [L, D]
  layers/mlp/{up_kernel [L, D, F], gate_kernel [L, D, F] (gated MLP), down_kernel [L, F, D],
              up_bias, gate_bias [L, F], down_bias [L, D]}
  final_norm/{scale, bias} [D]
  lm_head/embedding [V, E]                untied head only

KV cache: a plain dict that prints and checkpoints like any pytree (see `init_cache`):
  key, value     [L, B, S, K, H]  compute dtype, keys after rotary; slot s of row b holds the
                                  token written s-th
  valid          [B, S] bool      slot holds a real token (False: left padding or not yet written)
  next_position  [B] int32        real tokens seen so far = position id of the next real token
  index          [] int32         slots written so far (the same for every row)

Every parameter and large activation carries logical axis names (batch, length, embed, heads,
kv_heads, head_dim, mlp, vocab, layers, and act_* for activations, e.g. act_vocab for logits);
`opt_jax.sharding` maps them to a mesh. Norms, softmax and everything reported downstream are
fp32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from opt_jax.config import DecoderConfig

Array = jax.Array
Cache = dict[str, Array]

ATTENTION_IMPLS = ("xla", "blocked", "cudnn")
_MASK_VALUE = -1e30  # finite, so a row with no visible key (a pad query) gives no NaN.

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str | None, ...],
           dtype) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  # A no-op unless opt_jax.sharding has activated a mesh and its rules table.
  return nn.with_logical_constraint(x, axes)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the trailing len(axes) dims, in fp32, returned in the compute dtype.

  axes: logical names of the normalised dims (("embed",) for the residual stream; ("heads",
  "head_dim") for OLMo-2's norm over a whole query projection [B, T, N, H]).
  """
  kind: str
  affine: bool
  eps: float
  axes: tuple[str, ...]
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dims = tuple(range(x.ndim - len(self.axes), x.ndim))
    shape = x.shape[x.ndim - len(self.axes):]
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      mean = x32.mean(dims, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(dims, keepdims=True) + self.eps)
    else:
      y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(dims, keepdims=True) + self.eps)
    if self.affine:
      y = y * _param(self, "scale", nn.initializers.ones, shape, self.axes, self.param_dtype)
      if self.kind == "layernorm":
        y = y + _param(self, "bias", nn.initializers.zeros, shape, self.axes, self.param_dtype)
    return y.astype(self.dtype)


def _norm(c: DecoderConfig, module: nn.Module, name: str, axes=("embed",)) -> Norm:
  return Norm(c.norm, c.norm_affine, c.norm_eps, axes, module.dtype, module.param_dtype, name=name)


def rotary(x: Array, positions: Array, dim: int, base: float) -> Array:
  """RoPE on the first `dim` dims of each head, rotate-half layout (dim j pairs with j + dim/2).

  x [B, T, N, H]; positions [B, T] int (pads: any value). The angles are computed in fp32 as HF
  does (inverse frequencies base^(-2j/dim) in fp32, cos/sin cast to the compute dtype).
  """
  inv_freq = np.float32(1.0) / np.power(np.float32(base),
                                        np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)   # [B, T, dim/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None]                # [B, T, 1, dim]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  rot, rest = x[..., :dim], x[..., dim:]
  half = dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  out = rot * cos + rotated * sin
  return out if dim == x.shape[-1] else jnp.concatenate([out, rest], axis=-1)


def attention_mask(key_valid: Array, query_slot: Array, segments: Array | None = None) -> Array:
  """[B, 1, T, S] bool: key slot s is visible from query slot t if s <= t and s holds a real token
  (and, with segments, s is in segment 0 or in t's segment).

  key_valid [B, S] bool; query_slot [T] int32 (slot of each query among the keys); segments
  [B, T] int32 or None (only without a cache, so S = T; see Decoder.__call__).
  """
  s = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
  causal = s[None, :] <= query_slot[:, None]                       # [T, S]
  mask = causal[None, :, :] & key_valid[:, None, :]                 # [B, T, S]
  if segments is not None:
    mask = mask & segment_visible(segments, segments)
  return mask[:, None]                                              # [B, 1, T, S]


def segment_visible(query_segments: Array, key_segments: Array) -> Array:
  """[B, T, S] bool: the key is in segment 0 (the shared prefix) or in the query's own segment.

  query_segments [B, T], key_segments [B, S] int32.
  """
  k = key_segments[:, None, :]
  return (k == 0) | (k == query_segments[:, :, None])


def _softmax_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """q [B, T, N, H] (already scaled), k/v [B, S, K, H], mask [B, 1, T, S] -> [B, T, N, H].

  Query head n uses key/value head n // G (G = N / K), as HF's repeat_kv does, without repeating.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)                                          # [B, T, K, G, H]
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, :, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(v.dtype)


def _blocked_causal_attention(q: Array, k: Array, v: Array, key_valid: Array, block: int,
                              segments: Array | None = None) -> Array:
  """Causal attention without a cache, flash-style, for CPU where XLA has no fused kernel.

  Queries and keys in blocks of `block` positions. Each query block (unrolled) runs an online
  softmax (running max, sum and fp32 accumulator) over the key blocks below the diagonal in a
  fori_loop, then over its diagonal block with the causal mask. Blocks above the diagonal are
  skipped (about half the work) and the loop keeps one [B, N, block, block] fp32 score block
  alive at a time instead of [B, N, T, T], so scores stay in cache and peak memory stays small.
  q [B, T, N, H] (already scaled), k/v [B, T, K, H], key_valid [B, T], segments [B, T] int32 or
  None (see Decoder.__call__) -> [B, T, N, H].
  """
  b, t, n, h = q.shape
  if k.shape[2] != n:  # GQA: each group's key/value head serves its G query heads
    k, v = (jnp.repeat(x, n // x.shape[2], axis=2) for x in (k, v))
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
    visible = visible & segment_visible(                                  # [B, block, block]
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
  """Self-attention: projections (+ clip, + QK-norm, + rotary), a cache write, the softmax."""
  config: DecoderConfig
  dtype: Any
  param_dtype: Any
  impl: str
  block: int

  def _project(self, x: Array, name: str, heads: int, axis: str) -> Array:
    """x [B, T, D] -> [B, T, heads, H] (+ bias), the kernel's heads dim named `axis`."""
    c = self.config
    w = _param(self, f"{name}_kernel", nn.initializers.normal(0.02),
               (c.hidden_size, heads, c.head_dim), ("embed", axis, "head_dim"), self.param_dtype)
    # Every projection accumulates in fp32 and rounds once: XLA's CPU backend rewrites a
    # bf16 x bf16 -> bf16 dot into converts + an fp32 x fp32 dot (fp32 speed), while
    # bf16 x bf16 -> fp32 stays a bf16 dot (AMX / avx512_bf16 kernels where the CPU has them).
    # On GPU/TPU it is the same program.
    y = jnp.einsum("BTD,DNH->BTNH", x, w.astype(self.dtype), preferred_element_type=jnp.float32)
    if c.attention_bias:
      y = y + _param(self, f"{name}_bias", nn.initializers.zeros, (heads, c.head_dim),
                     (axis, "head_dim"), self.param_dtype).astype(jnp.float32)
    if c.clip_qkv is not None:
      y = jnp.clip(y, -c.clip_qkv, c.clip_qkv)
    return y.astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array, positions: Array, kv: tuple[Array, Array] | None,
               key_valid: Array, query_slot: Array, index: Array | None,
               segments: Array | None) -> tuple[Array, tuple[Array, Array] | None]:
    """x [B, T, D]; positions [B, T]; kv: this layer's cache (k, v) [B, S, K, H] or None;
    segments [B, T] int32 or None (no cache only, see Decoder.__call__) -> ([B, T, D], new kv)."""
    c = self.config
    n, kh, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = self._project(x, "q", n, "heads")                                   # [B, T, N, H]
    # k and v are not constrained: their layout follows the kv kernels, which the rules split
    # over `model` or replicate (when K does not divide it; opt_jax.sharding).
    k = self._project(x, "k", kh, "kv_heads")                               # [B, T, K, H]
    v = self._project(x, "v", kh, "kv_heads")
    if c.qk_norm:
      q = _norm(c, self, "q_norm", ("heads", "head_dim"))(q)
      k = _norm(c, self, "k_norm", ("kv_heads", "head_dim"))(k)
    if c.positions == "rotary":
      q = rotary(q, positions, c.rotary_dim, c.rotary_base)
      k = rotary(k, positions, c.rotary_dim, c.rotary_base)
    q = _constrain(q * jnp.asarray(h ** -0.5, self.dtype),
                   ("batch", "act_length", "act_heads", "head_dim"))
    if kv is not None:
      k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
      new_kv = (k, v)
    else:
      new_kv = None

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

    w_out = _param(self, "o_kernel", nn.initializers.normal(0.02), (n, h, c.hidden_size),
                   ("heads", "head_dim", "embed"), self.param_dtype)
    y = jnp.einsum("BTNH,NHD->BTD", out, w_out.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    if c.attention_bias:
      y = y + _param(self, "o_bias", nn.initializers.zeros, (c.hidden_size,), ("embed",),
                     self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype), new_kv


class Mlp(nn.Module):
  """down(act(x W_up)) or, gated, down(act(x W_gate) * (x W_up)); x [B, T, D] -> [B, T, D]."""
  config: DecoderConfig
  dtype: Any
  param_dtype: Any

  def _dense(self, x: Array, name: str, features: int, axes: tuple[str, str]) -> Array:
    w = _param(self, f"{name}_kernel", nn.initializers.normal(0.02), (x.shape[-1], features),
               axes, self.param_dtype)
    y = jnp.einsum("BTI,IO->BTO", x, w.astype(self.dtype), preferred_element_type=jnp.float32)
    if self.config.mlp_bias:   # fp32 accumulation as in Attention._project
      y = y + _param(self, f"{name}_bias", nn.initializers.zeros, (features,), axes[1:],
                     self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    act = _ACTIVATIONS[c.activation]
    up = self._dense(x, "up", c.intermediate_size, ("embed", "mlp"))            # [B, T, F]
    y = act(self._dense(x, "gate", c.intermediate_size, ("embed", "mlp"))) * up if c.gated_mlp \
        else act(up)
    y = _constrain(y, ("batch", "act_length", "act_mlp"))
    return self._dense(y, "down", c.hidden_size, ("mlp", "embed"))              # [B, T, D]


class Block(nn.Module):
  """One layer: attention then MLP, the two norms placed as `config.block` says (config.py)."""
  config: DecoderConfig
  dtype: Any
  param_dtype: Any
  impl: str
  block: int

  @nn.compact
  def __call__(self, x: Array, positions: Array, kv: tuple[Array, Array] | None,
               key_valid: Array, query_slot: Array, index: Array | None,
               segments: Array | None):
    """x [B, T, D] -> ([B, T, D], new kv)."""
    c = self.config
    attn_norm, mlp_norm = _norm(c, self, "attn_norm"), _norm(c, self, "mlp_norm")
    attn = lambda y: Attention(c, self.dtype, self.param_dtype, self.impl, self.block, name="attn")(
        y, positions, kv, key_valid, query_slot, index, segments)
    mlp = Mlp(c, self.dtype, self.param_dtype, name="mlp")
    if c.block == "pre_norm":
      y, new_kv = attn(attn_norm(x))
      x = x + y
      x = x + mlp(mlp_norm(x))
    elif c.block == "post_norm":
      y, new_kv = attn(x)
      x = attn_norm(x + y)
      x = mlp_norm(x + mlp(x))
    elif c.block == "parallel":
      y, new_kv = attn(attn_norm(x))
      x = mlp(mlp_norm(x)) + y + x                     # HF GPT-NeoX's order of the sum
    else:  # output_norm
      y, new_kv = attn(x)
      x = x + attn_norm(y)
      x = x + mlp_norm(mlp(x))
    return _constrain(x, ("batch", "act_length", "act_embed")), new_kv


class Decoder(nn.Module):
  """The decoder, returning final hidden states [B, T, E]; the LM head is `logits()`.

  dtype: compute dtype (fp32 on CPU, bf16 on accelerators); param_dtype: storage dtype of params.
  attention: "xla" (plain masked softmax), "blocked" (causal blocks skipped; fastest on CPU for
  long sequences), "cudnn" (fused kernel of jax.nn.dot_product_attention; GPU only).
  """
  config: DecoderConfig
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
    (learned and rotary positions alike; pads: -1), e.g. continuing the prefix's count in every
    continuation. Without positions they are counted from the mask as HF does (0, 1, 2, ... over
    the real tokens).
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
    positions = positions.astype(jnp.int32)
    if segment_ids is not None:
      segment_ids = segment_ids.astype(jnp.int32)

    x = Embed(c.vocab_size, c.embed_dim, ("vocab", "embed"), self.param_dtype,
              name="embed")(input_ids).astype(self.dtype)                      # [B, T, E]
    # The lookup in a vocab-split table is a masked gather + sum over `model`; pin its output to
    # the residual layout so the partitioner does not pick the table's (fsdp) layout for it.
    x = _constrain(x, ("batch", "act_length", "act_embed"))
    if c.has_projections:
      x = _project(self, x, c.hidden_size, ("embed", "embed_out"), "project_in")  # [B, T, D]
    if c.positions == "learned":
      pos = Embed(c.max_position_embeddings + c.position_offset, c.hidden_size, (None, "embed"),
                  self.param_dtype, name="pos_embed")(positions + c.position_offset)
      x = x + pos.astype(self.dtype)
    x = _constrain(x, ("batch", "act_length", "act_embed"))

    if cache is None:
      key_valid, query_slot, index, kv = mask > 0, jnp.arange(t, dtype=jnp.int32), None, None
    else:
      index = cache["index"]
      key_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], mask > 0, index, axis=1)
      query_slot = index + jnp.arange(t, dtype=jnp.int32)
      kv = (cache["key"], cache["value"])

    layers = nn.scan(
        Block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=c.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(c, self.dtype, self.param_dtype, self.attention, self.attention_block, name="layers")
    x, new_kv = layers(x, positions, kv, key_valid, query_slot, index, segment_ids)

    if c.final_norm:
      x = _norm(c, self, "final_norm")(x)
    if c.has_projections:
      x = _project(self, x, c.embed_dim, ("embed_out", "embed"), "project_out")  # [B, T, E]
    if not c.tie_embeddings:
      # The untied head is created here so that it is part of the params; logits() applies it.
      LmHead(c.vocab_size, c.embed_dim, self.param_dtype, name="lm_head")()

    new_cache = None
    if cache is not None:
      new_cache = {"key": new_kv[0], "value": new_kv[1], "valid": key_valid,
                   "next_position": start + mask.sum(axis=1, dtype=jnp.int32), "index": index + t}
    return x, new_cache


def _project(module: nn.Module, x: Array, features: int, axes: tuple[str, str], name: str
             ) -> Array:
  return Projection(features, axes, module.dtype, module.param_dtype, name=name)(x)


class Projection(nn.Module):
  """project_in / project_out (OPT-350m): x [B, T, I] -> [B, T, features], no bias."""
  features: int
  axes: tuple[str, str]
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = _param(self, "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
               self.axes, self.param_dtype)
    return jnp.einsum("BTI,IO->BTO", x, w.astype(self.dtype),
                      preferred_element_type=jnp.float32).astype(self.dtype)


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


class LmHead(nn.Module):
  """The untied LM head's table [V, E] (vocab-parallel like the embedding); `logits` uses it."""
  num: int
  features: int
  param_dtype: Any

  @nn.compact
  def __call__(self) -> Array:
    return _param(self, "embedding", nn.initializers.normal(0.02), (self.num, self.features),
                  ("vocab", "embed"), self.param_dtype)


# Functional helpers ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _jitted_init(config: DecoderConfig, param_dtype) -> Any:
  # One compiled initialiser per (config, dtype): the seed is an argument, so new seeds are free.
  model = Decoder(config, param_dtype=param_dtype)
  return jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]))


def init_params(config: DecoderConfig, seed: int = 0, param_dtype=jnp.float32) -> dict[str, Any]:
  """Random parameters (normal(0.02) weights, zero biases, unit norm scales), plain arrays."""
  return _jitted_init(config, jnp.dtype(param_dtype))(jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=None)
def _abstract_params(config: DecoderConfig, param_dtype) -> Any:
  # One abstract trace of init per (config, dtype), shared by logical_axes and param_shapes
  # (sharding asks for both several times per model). Callers get fresh trees built from it.
  model = Decoder(config, param_dtype=param_dtype)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]


def logical_axes(config: DecoderConfig) -> Any:
  """Pytree matching the params, each leaf a tuple of logical axis names (no arrays allocated)."""
  return jax.tree.map(lambda p: tuple(p.names), _abstract_params(config, jnp.dtype(jnp.float32)),
                      is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))


def param_shapes(config: DecoderConfig, param_dtype=jnp.float32) -> Any:
  """Pytree of jax.ShapeDtypeStruct matching the params."""
  return nn.unbox(_abstract_params(config, jnp.dtype(param_dtype)))


def lm_head(params: dict[str, Any]) -> Array:
  """The LM head [V, E]: its own table when untied, else the token embedding."""
  return (params["lm_head"] if "lm_head" in params else params["embed"])["embedding"]


def logits(params: dict[str, Any], hidden: Array) -> Array:
  """hidden [B, T, E] -> logits [B, T, V] fp32. Materialises all of V: use scoring for log-probs."""
  w = lm_head(params)
  out = jnp.einsum("BTE,VE->BTV", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
  return _constrain(out, ("batch", "act_length", "act_vocab"))   # vocab-parallel: V stays split


def init_cache(config: DecoderConfig, batch: int, max_length: int, dtype=jnp.float32) -> Cache:
  """An empty KV cache of `max_length` slots (see the module docstring for its layout)."""
  shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads,
           config.head_dim)
  return {
      "key": jnp.zeros(shape, dtype),
      "value": jnp.zeros(shape, dtype),
      "valid": jnp.zeros((batch, max_length), bool),
      "next_position": jnp.zeros((batch,), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }
