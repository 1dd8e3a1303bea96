"""Exact per-token log-probabilities and lm-evaluation-harness style requests over them.

Two layers:
  * `token_logprobs` (and `target_logprobs` under it): one jitted forward pass over a padded
    [B, T] batch, then a chunked logsumexp over the vocabulary: the LM head is applied one vocab
    chunk at a time inside a `lax.fori_loop` with a running max / sum / argmax in fp32, so the
    largest temporary is [B, T, vocab_chunk], never [B, T, V].
  * `Scorer`: requests -> rows -> bucketed batches -> the jitted functions -> per-request results.
    Rows are sorted by length and padded to power-of-two lengths; a batch holds batch_size rows,
    and a last (or only) batch with fewer real rows runs in the next power-of-two bucket of its
    rows (times the data-parallel split) instead of batch_size, so no more than that many padding
    rows are computed; a long run compiles a handful of programs; parameters are arguments, so `set_params` with another
    checkpoint of the same size compiles nothing.

Requests (lm-evaluation-harness, `lm_eval/api/model.py` and `lm_eval/utils.py`), with the text
convention of the tokenizer (`conventions=`: "native", the family's, or "lm_eval", HFLM's
defaults; opt_jax/tokenizer.py):
  * loglikelihood(context, continuation): trailing spaces of the context move to the front of the
    continuation; context + continuation is encoded as one string and the continuation is the
    tokens after the context's own tokens. Each encoding starts with the convention's prefix
    (native: OPT's `</s>`, Llama's `<s>`, nothing for Pythia / OLMo; lm_eval: nothing); a context
    that encodes to nothing becomes the tokenizer's start_id (lm_eval: bos, else eos, as HFLM's
    empty-context rule). The input is the last max_length tokens of (context +
    continuation)[:-1]; the result is the sum of the continuation's log-probs (nats) and whether
    every continuation token is the argmax.
  * loglikelihood_rolling: windows of `get_rolling_token_windows` with max_seq_len =
    context_length and context_len = context_length - stride + 1 over the document's ids
    (`Tokenizer.encode_documents`: native: the encoded text; lm_eval: start_id + the text, as
    HFLM): every token after the first is scored exactly once, the first window conditions on
    that first token alone, and each later window predicts `stride` new tokens conditioned on
    the context_length - stride tokens before. lm_eval's own call is stride = context_length =
    max_length.
  * Several continuations of one context (multiple choice): with share_prefix=True they are
    packed into one row, the context once and then each continuation (after the context's last
    token), with segment ids so that a continuation sees the context and itself only, and
    position ids that continue the context's count in every continuation (`pack_options`). Same
    numbers as scoring each request alone, the same program as plain rows, no KV cache to copy.

Programs: `score_program(spec)` is the one jitted scoring step (module level, `ScoreSpec`
static), used by Scorer, tools/plan_mesh.py (through `lower_score`) and the benchmarks alike;
`ScoreSpec.shapes` gives exactly the arguments it runs on for a [batch, length] bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from tqdm.auto import tqdm

from opt_jax import model as M
from opt_jax import programs, sharding
from opt_jax.config import DecoderConfig

Array = jax.Array
DEFAULT_VOCAB_CHUNK = 8192


# Log-probs of targets -------------------------------------------------------------------------

def vocab_chunks(vocab_size: int, vocab_chunk: int, shards: int = 1) -> tuple[int, int]:
  """(n_chunks, rows per chunk C) with n_chunks * C >= vocab_size and C close to vocab_chunk.

  Prefers an exact split (no padded rows): a divisor n of vocab_size with C = vocab_size / n
  within 2x of vocab_chunk and divisible by `shards` (the vocab-parallel split of the head, so
  each chunk stays split evenly over the devices that hold the vocabulary).
  """
  target = max(1, min(vocab_chunk, vocab_size))
  exact = [n for n in range(1, vocab_size + 1)
           if vocab_size % n == 0 and (vocab_size // n) % shards == 0
           and target / 2 <= vocab_size // n <= 2 * target]
  if exact:
    n = min(exact, key=lambda n: abs(math.log(vocab_size / n / target)))
    return n, vocab_size // n
  n = -(-vocab_size // target)
  c = -(-vocab_size // n)
  c = -(-c // shards) * shards
  return n, c


def head_logprobs(head: Array, hidden: Array, targets: Array,
                  vocab_chunk: int = DEFAULT_VOCAB_CHUNK, vocab_shards: int | None = None
                  ) -> tuple[Array, Array]:
  """log p(targets) under softmax(hidden @ head.T), without materialising [B, T, V].

  head [V, E] (the LM head, any dtype; every row takes part in the softmax, as in HF, padded
  vocabulary rows included); hidden [B, T, E] (compute dtype); targets [B, T] int.
  Returns (logprobs [B, T] fp32 nats, is_greedy [B, T] bool: target is the argmax, first index
  winning ties like torch/numpy argmax).

  vocab_shards > 1 (a vocab-parallel head, split contiguously over that many devices): chunk i
  holds the strided rows {r * n_chunks + i}, i.e. the head reshaped to [C, n_chunks, E] with C
  split the same way, so each chunk's logits stay split and only the [B, T] running statistics
  cross devices. Otherwise chunks are contiguous row ranges. None: the split RULES give the
  vocabulary on the mesh active while tracing (sharding.activate), 1 without one.
  """
  if vocab_shards is None:
    vocab_shards = sharding.num_shards(sharding.context_mesh(), "vocab")
  v, e = head.shape
  n_chunks, c = vocab_chunks(v, vocab_chunk, vocab_shards)
  if n_chunks * c != v:
    head = jnp.pad(head, ((0, n_chunks * c - v), (0, 0)))
  targets = targets.astype(jnp.int32)
  shape = targets.shape
  if vocab_shards > 1:
    # Strided chunks: chunk i holds rows {r * n_chunks + i}, split over devices like the head.
    strided = head.reshape(c, n_chunks, e)                                   # [C, n, E]
    chunk_rows = lambda i: jax.lax.dynamic_index_in_dim(strided, i, axis=1, keepdims=False)
    chunk_ids = lambda i: jnp.arange(c, dtype=jnp.int32) * n_chunks + i
    t_chunk, t_row = targets % n_chunks, targets // n_chunks                 # [B, T]
  else:
    # Contiguous chunks (rows [i * C, (i + 1) * C)): about 10% faster on one CPU device.
    chunk_rows = lambda i: jax.lax.dynamic_slice_in_dim(head, i * c, c, axis=0)
    chunk_ids = lambda i: jnp.arange(c, dtype=jnp.int32) + i * c
    t_chunk, t_row = targets // c, targets % c

  def body(i, carry):
    run_max, run_sum, target_logit, best, best_id = carry
    w = chunk_rows(i)                                                          # [C, E]
    logits = jnp.einsum("BTE,CE->BTC", hidden, w.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)                    # [B, T, C] fp32
    logits = nn.with_logical_constraint(logits, ("batch", "act_length", "act_vocab"))
    ids = chunk_ids(i)                                                         # [C] vocab ids
    if n_chunks * c != v:
      logits = jnp.where(ids < v, logits, -jnp.inf)
    chunk_max = logits.max(-1)
    new_max = jnp.maximum(run_max, chunk_max)
    run_sum = (run_sum * jnp.exp(run_max - new_max)
               + jnp.exp(logits - new_max[..., None]).sum(-1))
    here = jnp.take_along_axis(logits, t_row[..., None], axis=-1)[..., 0]
    target_logit = jnp.where(t_chunk == i, here, target_logit)
    chunk_id = ids[jnp.argmax(logits, axis=-1)]
    better = (chunk_max > best) | ((chunk_max == best) & (chunk_id < best_id))
    return (new_max, run_sum, target_logit, jnp.where(better, chunk_max, best),
            jnp.where(better, chunk_id, best_id))

  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32),
          jnp.zeros(shape, jnp.int32))
  run_max, run_sum, target_logit, _, best_id = jax.lax.fori_loop(0, n_chunks, body, init)
  return target_logit - (run_max + jnp.log(run_sum)), best_id == targets


def target_logprobs(params: Any, input_ids: Array, attention_mask: Array, targets: Array, *,
                    config: DecoderConfig, dtype=jnp.float32, attention: str = "xla",
                    attention_block: int = 256, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                    vocab_shards: int | None = None, positions: Array | None = None,
                    segment_ids: Array | None = None) -> tuple[Array, Array]:
  """log p(targets[:, t] | input_ids[:, :t + 1]) for every t: the harness's (input, target) form.

  input_ids, attention_mask (1 real, 0 pad), targets: [B, T]. Returns (logprobs [B, T] fp32 nats,
  is_greedy [B, T] bool); entries at padded inputs are meaningless (callers select what they need).
  positions, segment_ids [B, T] int32 (optional): several continuations of a shared prefix in one
  row, see model.Decoder.__call__; "the tokens before t" are then those visible from t.
  """
  hidden, _ = M.Decoder(config, dtype=dtype, attention=attention, attention_block=attention_block
                        ).apply({"params": params}, input_ids, attention_mask,
                                positions=positions, segment_ids=segment_ids)  # [B, T, E]
  return head_logprobs(M.lm_head(params), hidden, targets, vocab_chunk, vocab_shards)


def token_logprobs(params: Any, input_ids: Array, attention_mask: Array, *,
                   config: DecoderConfig, dtype=jnp.float32, attention: str = "xla",
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                   attention_block: int = 256) -> tuple[Array, Array]:
  """Per-token log p(ids[:, t] | ids[:, <t]) of a right- or left-padded batch.

  input_ids [B, T] int; attention_mask [B, T] (1 real token, 0 padding). Jit with
  static_argnames=("config", "dtype", "attention", "vocab_chunk", "attention_block").
  Returns (logprobs [B, T] fp32 nats, is_greedy [B, T] bool); both are 0/False at t = 0, at pads
  and at a row's first real token (nothing to condition on).
  """
  mask = attention_mask.astype(bool)
  targets = jnp.roll(input_ids, -1, axis=1)                                  # targets[t] = ids[t+1]
  lp, greedy = target_logprobs(params, input_ids, attention_mask, targets, config=config,
                               dtype=dtype, attention=attention, attention_block=attention_block,
                               vocab_chunk=vocab_chunk)
  scored = jnp.pad(mask[:, 1:] & mask[:, :-1], ((0, 0), (1, 0)))              # [B, T]
  lp = jnp.pad(lp[:, :-1], ((0, 0), (1, 0)))
  greedy = jnp.pad(greedy[:, :-1], ((0, 0), (1, 0)))
  return jnp.where(scored, lp, 0.0), greedy & scored


def resolve_attention(attention: str, config: DecoderConfig, dtype) -> str:
  """"auto" -> "blocked" on CPU, "cudnn" on GPU for bf16/fp16 with a supported head size, else
  "xla"; any other value is returned as given (validated by the model)."""
  if attention != "auto":
    return attention
  backend = jax.default_backend()
  if backend == "cpu":
    return "blocked"
  if (backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      and config.head_dim % 8 == 0 and config.head_dim <= 128):
    return "cudnn"
  return "xla"


# The scoring program ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScoreSpec:
  """Everything static about the scoring program (hashable: the jit static argument).

  dtype: compute dtype name; attention: a resolved implementation ("xla", "blocked", "cudnn");
  mesh: jax.sharding.Mesh or None (one device): the program is traced under it, so the model's
  sharding rules and the head's vocab-parallel split come from it.
  """
  config: DecoderConfig
  dtype: str
  attention: str
  attention_block: int = 256
  vocab_chunk: int = DEFAULT_VOCAB_CHUNK
  mesh: Any = None

  def shapes(self, batch: int, length: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract (ids, mask, targets, positions, segments) of a [batch, length] bucket, each
    int32 [batch, length] laid out over the mesh's batch axes: what `score_program` runs on."""
    rows = sharding.batch_sharding(self.mesh)
    return tuple(jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
                 for _ in range(5))


def _score_step(spec: ScoreSpec, params: Any, ids: Array, mask: Array, targets: Array,
                positions: Array, segments: Array) -> tuple[Array, Array]:
  """The scoring step: ids, mask, targets, positions, segments [B, T] int32 (plain rows:
  positions 0, 1, ... and segments 0) -> (logprobs [B, T] fp32 nats, is_greedy [B, T] bool)."""
  programs.traced("score", spec, ids.shape)
  return target_logprobs(params, ids, mask, targets, config=spec.config,
                         dtype=jnp.dtype(spec.dtype), attention=spec.attention,
                         attention_block=spec.attention_block, vocab_chunk=spec.vocab_chunk,
                         positions=positions, segment_ids=segments)


_score_jit = jax.jit(_score_step, static_argnums=0)


def score_program(spec: ScoreSpec) -> Callable:
  """(params, ids, mask, targets, positions, segments) -> _score_step's result, jitted; called
  and lowered under sharding.activate(spec.mesh) (one compiled program per spec and shape)."""
  return functools.partial(_score_jit, spec)


def lower_score(spec: ScoreSpec, params: Any, batch: int, length: int) -> Any:
  """The lowered scoring program of a [batch, length] bucket: params may be abstract
  (jax.ShapeDtypeStruct with shardings); see tools/plan_mesh.py."""
  with sharding.activate(spec.mesh):
    return _score_jit.lower(spec, params, *spec.shapes(batch, length))


# Request -> rows ------------------------------------------------------------------------------

@dataclasses.dataclass
class _Row:
  """One model input: log p(targets[-n_scored:]) given inputs, both [len] token ids.

  positions, segments: [len] position ids and segment ids of a packed row (several continuations
  of one context, see `pack_options`); None: 0, 1, 2, ... and all 0 (one plain sequence).
  """
  inputs: list[int]
  targets: list[int]
  n_scored: int
  positions: list[int] | None = None
  segments: list[int] | None = None


def pack_options(context: Sequence[int], continuations: Sequence[Sequence[int]],
                 max_length: int) -> list[tuple[_Row, list[int]]]:
  """Rows scoring every continuation of one context, the context computed once per row.

  Row layout: context[:-1] (segment 0, positions 0 .. n - 2), then for each continuation k in
  the row [context[-1]] + continuation[:-1] (segment k, positions n - 1, n, ...) with targets
  `continuation`. Continuations go into a row in order while it stays <= max_length tokens, then
  a new row starts (with the context again). Returns (row, indices of its continuations); each
  row's scored tokens are its continuations' tokens, concatenated in that order.
  Needs len(context) - 1 + len(c) <= max_length for every continuation c.
  """
  n = len(context)
  out: list[tuple[_Row, list[int]]] = []
  row = None
  for k, cont in enumerate(continuations):
    if row is None or len(row.inputs) + len(cont) > max_length:
      row = _Row(list(context[:-1]), list(context[1:]), 0, list(range(n - 1)), [0] * (n - 1))
      out.append((row, []))
    members = out[-1][1]
    members.append(k)
    row.inputs += [context[-1]] + list(cont[:-1])
    row.targets += list(cont)
    row.positions += range(n - 1, n - 1 + len(cont))
    row.segments += [len(members)] * len(cont)
    row.n_scored += len(cont)
  return out


def rolling_windows(tokens: Sequence[int], context_length: int, stride: int
                    ) -> list[tuple[list[int], list[int], int]]:
  """Windows (inputs, targets, n_scored) scoring each of tokens[1:] exactly once.

  tokens[0] is context only (e.g. OPT's </s>) and is never scored. Window k predicts up to
  `stride` new tokens (the first window: up to context_length) from at most context_length
  inputs; this is the
  harness's get_rolling_token_windows + make_disjoint_window with max_seq_len = context_length
  and context_len = context_length - stride + 1.
  """
  if not 1 <= stride <= context_length:
    raise ValueError(f"stride={stride} must be between 1 and context_length={context_length}")
  tokens = list(tokens)
  n = len(tokens) - 1                       # tokens to score
  windows = []
  done = 0
  while done < n:
    k = min(n - done, context_length if done == 0 else stride)
    end = done + k + 1                      # tokens[:end] are inputs + last target
    start = max(0, end - 1 - context_length)
    windows.append((tokens[start:end - 1], tokens[start + 1:end], k))
    done += k
  return windows


class Scorer:
  """lm-evaluation-harness style requests on one model size; see the module docstring.

  config, params: the model (params may be host or device arrays of any float dtype).
  tokenizer: an `opt_jax.tokenizer.Tokenizer`, needed by the string APIs only.
  conventions: "native" or "lm_eval": the text convention of the string APIs (the tokenizer is
    switched to it); None keeps the tokenizer's own.
  batch_size: rows per program at most; a batch of fewer rows runs in the smallest bucket
    data_shards * 2^k (or batch_size) that holds them, padded with dummy rows.
  max_length: longest model input (default config.max_position_embeddings).
  dtype: compute dtype; log-probs are fp32 whatever it is.
  attention: "auto" (blocked on CPU, cudnn on GPU for bf16), "xla", "blocked", "cudnn".
  mesh: optional opt_jax.sharding mesh: params sharded by its rules, batches over data x fsdp.
  share_prefix: score the continuations of one context in one packed row (module docstring).
  min_bucket: shortest padded length; buckets are min_bucket * 2^k and max_length
    (opt_jax.programs.bucket).
  Every batch runs `score_program(self.spec)`; Scorers with equal specs share its programs.
  """

  def __init__(self, config: DecoderConfig, params: Any, *, tokenizer=None,
               conventions: str | None = None, batch_size: int = 8,
               max_length: int | None = None, dtype=jnp.float32, attention: str = "auto",
               mesh=None, share_prefix: bool = True, min_bucket: int = 16,
               vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
               attention_block: int = 256, progress: bool = False):
    self.config = config
    if tokenizer is not None and conventions is not None:
      tokenizer = tokenizer.with_conventions(conventions)
    self.tokenizer = tokenizer
    self.batch_size = int(batch_size)
    self.max_length = int(max_length or config.max_position_embeddings)
    if not 2 <= self.max_length <= config.max_position_embeddings:
      raise ValueError(f"max_length={self.max_length} must be in [2, max_position_embeddings="
                       f"{config.max_position_embeddings}]")
    self.min_bucket = min(int(min_bucket), self.max_length)
    self.buckets = programs.buckets(self.min_bucket, self.max_length)
    self.dtype = dtype
    self.attention = resolve_attention(attention, config, dtype)
    self.share_prefix = share_prefix
    self.progress = progress
    self.mesh = mesh
    # Rows and padded tokens sent through the model so far (a packed row counts once), and the
    # [batch, length] program shapes they ran in.
    self.rows_run = self.tokens_run = 0
    self.shapes_run: set[tuple[int, int]] = set()
    if mesh is not None:
      sharding.check_divisible(config, mesh, batch_size=self.batch_size)
    # Batch buckets are multiples of the rows' split over devices (data x fsdp).
    self.min_batch = sharding.num_shards(mesh, "batch")
    self._batch_sharding = sharding.batch_sharding(mesh)
    self.spec = ScoreSpec(config, jnp.dtype(dtype).name, self.attention, int(attention_block),
                          int(vocab_chunk), mesh)
    self._score = score_program(self.spec)
    self.params = None
    self.set_params(params)

  # Parameters and bookkeeping -------------------------------------------------------------------

  @property
  def num_compilations(self) -> int:
    """Scoring programs traced (hence compiled) so far for this scorer's spec (shared with every
    Scorer of an equal spec; opt_jax.programs counts them)."""
    return programs.compilations("score", self.spec)

  def bucket_shape(self, length: int, rows: int | None = None) -> tuple[int, int]:
    """[batch, length] of the program that runs `rows` rows (default batch_size) of at most
    `length` tokens: batch is the bucket of rows (min_batch * 2^k, at most batch_size)."""
    rows = self.batch_size if rows is None else rows
    return (programs.bucket(rows, self.min_batch, self.batch_size),
            programs.bucket(length, self.min_bucket, self.max_length))

  def set_params(self, params: Any) -> None:
    """Switch to another checkpoint of the same config (and dtypes): no recompilation."""
    shapes = jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), params)
    if self.params is not None:
      old = jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), self.params)
      if jax.tree.structure(old) != jax.tree.structure(shapes) or old != shapes:
        raise ValueError("set_params: the new params differ in structure, shape or dtype from "
                         "the scorer's; build a new Scorer for another model size or dtype")
    if self.mesh is not None:
      params = sharding.shard_params(params, self.config, self.mesh)
    else:
      params = jax.device_put(params)
    self.params = params

  def _put(self, x: np.ndarray) -> Array:
    return sharding.put(x, self._batch_sharding if x.ndim == 2 else sharding.replicated(self.mesh))

  def _host(self, x: Array) -> np.ndarray:
    return sharding.to_host(x)

  def _call(self, fn: Callable, *args):
    with sharding.activate(self.mesh):
      return fn(self.params, *args)

  # Core batching --------------------------------------------------------------------------------

  def _pack(self, rows: Sequence[_Row], batch: int, length: int, pad_id: int):
    """Right-padded [batch, length] ids, mask, targets, positions (-1 at pads), segments (dummy
    rows all padding)."""
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    targets = np.full((batch, length), pad_id, np.int32)
    positions = np.full((batch, length), -1, np.int32)
    segments = np.zeros((batch, length), np.int32)
    for r, row in enumerate(rows):
      n = len(row.inputs)
      ids[r, :n], mask[r, :n], targets[r, :n] = row.inputs, 1, row.targets
      positions[r, :n] = np.arange(n) if row.positions is None else row.positions
      if row.segments is not None:
        segments[r, :n] = row.segments
    return ids, mask, targets, positions, segments

  def _run_rows(self, rows: Sequence[_Row], desc: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logprobs [n_scored] fp32, is_greedy [n_scored] bool) of each row, in order."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].inputs))
    batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
    out: list[Any] = [None] * len(rows)
    pad_id = self.config.filler_token_id

    def collect(batch, result):
      lp, greedy = self._host(result[0]), self._host(result[1])
      for r, i in enumerate(batch):
        n, k = len(rows[i].inputs), rows[i].n_scored
        out[i] = (lp[r, n - k:n], greedy[r, n - k:n])

    pending = None
    with tqdm(total=len(rows), desc=desc, disable=not self.progress, unit="row") as bar:
      for batch in batches:
        n_rows, length = self.bucket_shape(len(rows[batch[0]].inputs), len(batch))
        arrays = self._pack([rows[i] for i in batch], n_rows, length, pad_id)
        result = self._call(self._score, *map(self._put, arrays))
        self.rows_run += len(batch)
        self.tokens_run += n_rows * length
        self.shapes_run.add((n_rows, length))
        if pending is not None:              # Fetch the previous batch while this one runs.
          collect(*pending)
          bar.update(len(pending[0]))
        pending = (batch, result)
      if pending is not None:
        collect(*pending)
        bar.update(len(pending[0]))
    return out

  # Requests -------------------------------------------------------------------------------------

  def _check_tokens(self, ids: Sequence[int], what: str) -> None:
    v = self.config.vocab_size
    bad = [t for t in ids if not 0 <= int(t) < v]
    if bad:
      raise ValueError(f"{what}: token id {bad[0]} is outside the vocabulary [0, {v})")

  def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                           ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context) in nats, every continuation token greedy) per request.

    context: token ids, non-empty (at least the token to condition on: Tokenizer.encode's
    prefix, or its start_id); continuation: 1 to max_length token ids. Inputs longer than
    max_length lose their oldest context tokens.
    """
    reqs = []
    for i, (ctx, cont) in enumerate(requests):
      ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
      if not ctx:
        raise ValueError(f"request {i}: empty context; give at least one token to condition on "
                         "(the tokenizer's start_id, as Scorer.loglikelihood does)")
      if not 1 <= len(cont) <= self.max_length:
        raise ValueError(f"request {i}: continuation has {len(cont)} tokens; expected 1 to "
                         f"max_length={self.max_length}")
      self._check_tokens(ctx + cont, f"request {i}")
      reqs.append((ctx, cont))

    shared: dict[tuple[int, ...], list[int]] = {}
    if self.share_prefix:
      for i, (ctx, cont) in enumerate(reqs):
        shared.setdefault(tuple(ctx), []).append(i)
      # Only contexts with several continuations that fit without truncation share a prefix.
      shared = {c: ix for c, ix in shared.items()
                if len(ix) > 1 and len(c) - 1 + max(len(reqs[i][1]) for i in ix) <= self.max_length}
    in_shared = {i for ix in shared.values() for i in ix}

    rows, owners = [], []     # owners[r]: the requests whose continuations row r scores
    for i in range(len(reqs)):
      if i not in in_shared:
        ctx, cont = reqs[i]
        whole = (ctx + cont)[-(self.max_length + 1):]
        rows.append(_Row(whole[:-1], whole[1:], len(cont)))
        owners.append([i])
    for ctx, ix in shared.items():
      for row, members in pack_options(ctx, [reqs[i][1] for i in ix], self.max_length):
        rows.append(row)
        owners.append([ix[k] for k in members])
    results: list[Any] = [None] * len(reqs)
    for members, (lp, greedy) in zip(owners, self._run_rows(rows, "loglikelihood")):
      o = 0
      for i in members:
        n = len(reqs[i][1])
        results[i] = (float(lp[o:o + n].astype(np.float64).sum()), bool(greedy[o:o + n].all()))
        o += n
    return results

  def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context) in nats, is_greedy) per (context, continuation) string
    pair, with the harness's boundary rule and the tokenizer's convention (module docstring)."""
    tok = self._require_tokenizer()
    contexts, wholes = [], []
    for i, (context, continuation) in enumerate(requests):
      n_spaces = len(context) - len(context.rstrip())
      if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
      contexts.append(context)
      wholes.append(context + continuation)
    ctx_enc = tok.encode_batch(contexts)
    whole_enc = tok.encode_batch(wholes)
    pairs = []
    for i, (c, w) in enumerate(zip(ctx_enc, whole_enc)):
      cont = w[len(c):]
      if not cont:
        raise ValueError(f"request {i}: continuation {requests[i][1]!r} encodes to no tokens after "
                         f"the context {requests[i][0][-40:]!r}")
      pairs.append((c or [tok.start_id], cont))
    return self.loglikelihood_tokens(pairs)

  def rolling_tokens(self, token_lists: Sequence[Sequence[int]], context_length: int | None = None,
                     stride: int | None = None) -> list[np.ndarray]:
    """Log-probs (fp32 nats) of tokens[1:] of each list, each token scored once in sliding windows
    (see `rolling_windows`). context_length <= max_length (default max_length); stride defaults
    to context_length (disjoint windows, the harness's loglikelihood_rolling)."""
    context_length = int(context_length or self.max_length)
    if not 1 <= context_length <= self.max_length:
      raise ValueError(f"context_length={context_length} must be in [1, max_length="
                       f"{self.max_length}]")
    stride = int(stride or context_length)
    rows, owners = [], []
    for d, tokens in enumerate(token_lists):
      tokens = [int(t) for t in tokens]
      self._check_tokens(tokens, f"document {d}")
      for inputs, targets, k in rolling_windows(tokens, context_length, stride):
        rows.append(_Row(inputs, targets, k))
        owners.append(d)
    parts: list[list[np.ndarray]] = [[] for _ in token_lists]
    for d, (lp, _) in zip(owners, self._run_rows(rows, "loglikelihood_rolling")):
      parts[d].append(lp)
    return [np.concatenate(p).astype(np.float32) if p else np.zeros((0,), np.float32)
            for p in parts]

  def loglikelihood_rolling(self, texts: Sequence[str], context_length: int | None = None,
                            stride: int | None = None) -> list[np.ndarray]:
    """Per-token log-probs (fp32 nats) of each text's tokens after the first of
    `Tokenizer.encode_documents` (native: after the family's prefix; with no prefix the text's
    first token is not scored; lm_eval: every token of the text, the first given start_id)."""
    tok = self._require_tokenizer()
    return self.rolling_tokens(tok.encode_documents(list(texts)), context_length, stride)

  def _require_tokenizer(self):
    if self.tokenizer is None:
      raise ValueError("this Scorer has no tokenizer: pass tokenizer=opt_jax.tokenizer."
                       "load_tokenizer(DIR), or use the *_tokens methods")
    return self.tokenizer


# Files ----------------------------------------------------------------------------------------

def score_text_file(checkpoint_dir: str, input_path: str, output_path: str, *,
                    context_length: int | None = None, stride: int | None = None,
                    batch_size: int = 8, dtype: str = "float32", attention: str = "auto",
                    conventions: str = "native", progress: bool = True,
                    names: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Scores every document of `input_path` (opt_jax.inputs: .jsonl is JSON lines with a "text"
  field, any other file one plain-text document) with the checkpoint.

  Writes `output_path` (JSONL, atomically: temporary name, then rename), one line per document:
    {"doc": i, "source": "path[:line]", "num_tokens": n, "nll": -sum(logprobs),
     "token_ids": [n ids], "tokens": [n strings], "logprobs": [n floats]}
  over the n tokens after the first of `Tokenizer.encode_documents` under `conventions`
  ("native": after the family's prefix, e.g. OPT's </s>; "lm_eval": every token of the text),
  log-probs in nats, each token scored once in sliding windows (`Scorer.rolling_tokens`).
  Returns {"nll", "num_tokens", "perplexity", "documents", "skipped"}: totals over all documents
  (perplexity = exp(nll / num_tokens)), empty documents skipped. The input, the output location
  and the windows are checked before any restore; a message names the argument at fault by its
  name here, or by what `names` calls it ({"context_length": "--context_length", ...}: a binary
  passes its flags).
  """
  import json  # pylint: disable=import-outside-toplevel

  from opt_jax import files, inputs  # pylint: disable=import-outside-toplevel
  from opt_jax.checkpoints import checkpoint  # pylint: disable=import-outside-toplevel
  from opt_jax.errors import InputError  # pylint: disable=import-outside-toplevel
  from opt_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  name = lambda argument: (names or {}).get(argument, argument)
  output_path = files.check_output(output_path, folder=False, what=name("output_path"))
  corpus = inputs.read_corpus(input_path, name("input_path"))
  compute = inputs.parse_dtype(dtype)
  config = checkpoint.load_config(checkpoint_dir)
  positions = config.max_position_embeddings
  if context_length is not None and not 2 <= context_length <= positions:
    raise InputError(f"{name('context_length')}={context_length}: expected 2 to {positions} (the "
                     f"model's max_position_embeddings)")
  if stride is not None and not 1 <= stride <= (context_length or positions):
    raise InputError(f"{name('stride')}={stride}: expected 1 to the context length "
                     f"({context_length or positions})")
  if batch_size < 1:
    raise InputError(f"{name('batch_size')}={batch_size}: expected an integer >= 1")
  tok = load_tokenizer(checkpoint_dir, config=config, conventions=conventions)
  token_lists = tok.encode_documents(list(corpus.texts))
  params = checkpoint.restore(checkpoint_dir, dtype=compute)
  scorer = Scorer(config, params, tokenizer=tok, batch_size=batch_size, dtype=compute,
                  attention=attention, progress=progress)
  logprobs = scorer.rolling_tokens(token_lists, context_length, stride)

  total_nll, total_tokens, lines = 0.0, 0, []
  for i, (doc, ids, lp) in enumerate(zip(corpus.documents, token_lists, logprobs)):
    nll = -float(lp.astype(np.float64).sum())
    total_nll += nll
    total_tokens += len(lp)
    lines.append(json.dumps({"doc": i, "source": doc.source, "num_tokens": len(lp), "nll": nll,
                             "token_ids": ids[1:], "tokens": tok.tokens(ids[1:]),
                             "logprobs": lp.tolist()}, ensure_ascii=False) + "\n")
  files.write_text(output_path, "".join(lines))
  ppl = math.exp(total_nll / total_tokens) if total_tokens else float("nan")
  return {"nll": total_nll, "num_tokens": total_tokens, "perplexity": ppl,
          "documents": len(corpus.documents), "skipped": corpus.skipped}
