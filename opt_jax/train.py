"""Training with optax on the engine's own Flax decoder (any family), and suites of sizes.

The demo needs real training trajectories: a few model sizes trained on the same token stream in
the same order (as in the paper, every size sees the same batches), with checkpoints at
log-spaced steps and a suite manifest (`opt_jax.suite` format) over them.

Pieces:
  DataOrder       the batches: step -> window starts in the token stream; depends only on
                  (stream length, seq_len, batch_size, seed), never on the model.
  loss_fn         mean next-token cross-entropy in nats (fp32 logsumexp, no fp32 log-softmax
                  tensor kept).
  optimizer       AdamW (decay on matrices and embeddings only), linear warmup + cosine decay,
                  global-norm clipping.
  train           one model: jitted step with params/opt state donated, checkpoints written by
                  `opt_jax.checkpoints.orbax_format.save` in a background thread, validation
                  loss at each checkpoint, tqdm bar with loss and ETA. Deterministic in (config,
                  data, seed).
  train_family    several sizes into OUT/ckpt/<name>/step<k>, OUT/suite.json, OUT/training.json;
                  sizes already complete with the same spec are skipped.

The demo's own sizes and settings (`demo_family`) are in experiments/training.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from opt_jax import families, files
from opt_jax.checkpoints import checkpoint, orbax_format
from opt_jax import model as model_lib
from opt_jax.config import DecoderConfig

# For tiny models (fast mode, tests) compiling costs more than running: this XLA flag halves
# compile time and slows large models' steps about 2x. It must be in XLA_FLAGS before JAX starts.
FAST_COMPILE_XLA_FLAG = "--xla_backend_optimization_level=0"
SUITE_FILE = "suite.json"
TRAINING_FILE = "training.json"
_DONE_FILE = "training.json"  # per model, written last: its presence marks the model complete


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and data settings shared by every size of a family.

  Batches are [batch_size, seq_len + 1] windows of the token stream (inputs are the first seq_len
  tokens, targets the last seq_len), so tokens_per_step = batch_size * seq_len.
  warmup_steps None: 5% of steps (at least 1). final_lr_ratio: cosine decay ends at this fraction
  of the peak. eval_batches: validation batches scored at each checkpoint (0: none).
  """
  steps: int = 400
  batch_size: int = 8
  seq_len: int = 128
  seed: int = 0
  warmup_steps: int | None = None
  final_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  num_checkpoints: int = 15
  first_checkpoint: int | None = None
  eval_batches: int = 4

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len

  @property
  def warmup(self) -> int:
    return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

  def checkpoint_steps(self) -> list[int]:
    return log_spaced_steps(self.steps, self.num_checkpoints, self.first_checkpoint)


@dataclasses.dataclass(frozen=True)
class FamilyMember:
  """One size of a family: a name for the suite, its config and its peak learning rate."""
  name: str
  config: DecoderConfig
  peak_lr: float


def log_spaced_steps(last: int, num: int, first: int | None = None) -> list[int]:
  """About `num` distinct integer steps from `first` (default ~last/100) to `last`, log-spaced,
  always including `last`."""
  if last < 1 or num < 1:
    raise ValueError(f"need last >= 1 and num >= 1, got last={last}, num={num}")
  first = max(1, min(last, first if first is not None else round(last / 100)))
  if num == 1 or first == last:
    return [last]
  steps = np.unique(np.round(np.geomspace(first, last, num)).astype(int))
  return sorted(set(int(s) for s in steps) | {last})


# Data -------------------------------------------------------------------------------------------

class DataOrder:
  """Which windows of a token stream make each batch.

  The stream is cut into windows of seq_len + 1 tokens that overlap by one token (window k covers
  [k * seq_len, (k + 1) * seq_len]), so each token is a target exactly once per epoch. Each epoch
  visits the windows in a permutation drawn from (seed, epoch); batch `step` (0-based) takes the
  next batch_size windows. Nothing here depends on the model: every size sees the same batches.
  """

  def __init__(self, num_tokens: int, seq_len: int, batch_size: int, seed: int):
    self.num_windows = (num_tokens - 1) // seq_len
    if self.num_windows < batch_size:
      raise ValueError(f"a stream of {num_tokens} tokens has {self.num_windows} windows of "
                       f"{seq_len + 1} tokens, fewer than batch_size={batch_size}")
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      rng = np.random.default_rng([self.seed, epoch])
      self._perms[epoch] = rng.permutation(self.num_windows)
    return self._perms[epoch]

  def starts(self, step: int) -> np.ndarray:
    """[batch_size] int64 start offsets of the windows of batch `step`."""
    first = step * self.batch_size
    idx = [self._perm(i // self.num_windows)[i % self.num_windows]
           for i in range(first, first + self.batch_size)]
    return np.asarray(idx, np.int64) * self.seq_len

  def batch(self, ids: np.ndarray, step: int) -> np.ndarray:
    """[batch_size, seq_len + 1] int32 windows of `ids` for batch `step`."""
    return window_batch(ids, self.starts(step), self.seq_len)


def window_batch(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
  """[len(starts), seq_len + 1] int32: ids[s : s + seq_len + 1] for each start s."""
  return np.asarray(ids[starts[:, None] + np.arange(seq_len + 1)], np.int32)


def validation_batches(ids: np.ndarray, seq_len: int, batch_size: int,
                       num_batches: int) -> list[np.ndarray]:
  """The first num_batches * batch_size windows of the validation stream, in order (fewer when
  the stream is short), as [batch_size, seq_len + 1] batches."""
  windows = min((len(ids) - 1) // seq_len, num_batches * batch_size)
  n = windows // batch_size
  starts = np.arange(n * batch_size, dtype=np.int64) * seq_len
  return [window_batch(ids, starts[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(n)]


def fingerprint(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


# Loss, optimizer, step --------------------------------------------------------------------------

def loss_fn(params: Any, batch: jax.Array, config: DecoderConfig) -> jax.Array:
  """Mean next-token cross-entropy in nats per token.

  batch [B, T + 1] int32: the model reads batch[:, :T] and predicts batch[:, 1:]. Logits [B, T, V]
  are fp32; the loss is logsumexp - target logit, so no log-softmax tensor is kept.
  """
  hidden, _ = model_lib.Decoder(config).apply({"params": params}, batch[:, :-1])  # [B, T, E]
  logits = model_lib.logits(params, hidden)                                       # [B, T, V] fp32
  target = jnp.take_along_axis(logits, batch[:, 1:, None], axis=-1)[..., 0]      # [B, T]
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)


def lr_schedule(peak_lr: float, tc: TrainConfig) -> optax.Schedule:
  """Linear warmup to peak_lr over tc.warmup updates (the first update already uses
  peak_lr / warmup), then cosine decay to peak_lr * final_lr_ratio at tc.steps."""
  warmup, steps, floor = tc.warmup, tc.steps, peak_lr * tc.final_lr_ratio

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = peak_lr * jnp.minimum(1.0, (count + 1.0) / warmup)
    frac = jnp.clip((count + 1.0 - warmup) / max(1, steps - warmup), 0.0, 1.0)
    cos = floor + 0.5 * (peak_lr - floor) * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(count + 1.0 <= warmup, warm, cos)

  return schedule


def _decay_mask(params: Any) -> Any:
  # Decay matrices and embeddings; not biases or norm parameters (their stacked [L, D] leaves
  # are 2-D, so the test is on the name, not ndim).
  decayed = lambda name: name.endswith("kernel") or name == "embedding"
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decayed(str(getattr(path[-1], "key", ""))), params)


def optimizer(peak_lr: float, tc: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(lr_schedule(peak_lr, tc), b1=tc.b1, b2=tc.b2, eps=1e-8,
                  weight_decay=tc.weight_decay, mask=_decay_mask))


def _optimizer_key(tc: TrainConfig) -> tuple:
  # Only what changes the optimiser's math: the seed or eval settings must not force a recompile.
  return (tc.steps, tc.warmup, tc.final_lr_ratio, tc.weight_decay, tc.b1, tc.b2, tc.grad_clip)


@functools.lru_cache(maxsize=16)
def _compiled(config: DecoderConfig, peak_lr: float, opt_key: tuple):
  """(init_opt, train_step) jitted for one config and optimiser; cached, so repeated trainings
  with the same shapes reuse the compiled programs. Params and opt state are donated."""
  steps, warmup, final_lr_ratio, weight_decay, b1, b2, grad_clip = opt_key
  tx = optimizer(peak_lr, TrainConfig(steps=steps, warmup_steps=warmup,
                                      final_lr_ratio=final_lr_ratio, weight_decay=weight_decay,
                                      b1=b1, b2=b2, grad_clip=grad_clip))

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, config)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(tx.init), jax.jit(train_step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _eval_loss(config: DecoderConfig):
  return jax.jit(functools.partial(loss_fn, config=config))


def evaluate(params: Any, config: DecoderConfig, batches: Sequence[np.ndarray]) -> float | None:
  """Mean loss (nats per token) of `params` over equally shaped batches [B, T + 1]; None if no
  batches."""
  if not batches:
    return None
  eval_loss = _eval_loss(config)
  return float(np.mean([float(eval_loss(params, b)) for b in batches]))


# One model --------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
  """params: final params (host numpy); checkpoints: step -> directory; history: one record per
  evaluated step {step, tokens, train_loss (mean of the steps since the previous record),
  val_loss, seconds}; data_digest: sha256 over every batch fed, in order; seconds: wall time."""
  params: Any
  checkpoints: dict[int, str]
  history: list[dict[str, Any]]
  data_digest: str
  seconds: float


def train(config: DecoderConfig, train_ids: np.ndarray, tc: TrainConfig, *, peak_lr: float,
          val_ids: np.ndarray | None = None, checkpoint_dir: str | None = None,
          tokenizer_files: Sequence[str] = (), progress: bool = True,
          desc: str = "train") -> TrainResult:
  """Trains a randomly initialised model of any family (`model.init_params(config, tc.seed)`)
  for tc.steps.

  train_ids / val_ids: [N] int token streams (see DataOrder). With checkpoint_dir, params after
  each step of tc.checkpoint_steps() are saved to CHECKPOINT_DIR/step<k> (existing ones are
  replaced) with tokenizer_files copied in; saving runs in a background thread. Validation loss
  (nats/token over tc.eval_batches fixed batches) is recorded at step 0 and at every checkpoint.
  """
  if int(np.max(train_ids, initial=0)) >= config.vocab_size:
    raise ValueError(f"token id {int(np.max(train_ids))} in the training stream is outside the "
                     f"model vocabulary ({config.vocab_size})")
  if tc.seq_len > config.max_position_embeddings:
    raise ValueError(f"seq_len={tc.seq_len} exceeds max_position_embeddings="
                     f"{config.max_position_embeddings}")
  t_start = time.perf_counter()
  order = DataOrder(len(train_ids), tc.seq_len, tc.batch_size, tc.seed)
  val = ([] if val_ids is None or tc.eval_batches == 0 else
         validation_batches(val_ids, tc.seq_len, tc.batch_size, tc.eval_batches))
  init_opt, train_step = _compiled(config, peak_lr, _optimizer_key(tc))
  val_loss = lambda p: evaluate(p, config, val)

  params = model_lib.init_params(config, tc.seed)
  opt_state = init_opt(params)
  record_steps = set(tc.checkpoint_steps())
  ckpt_steps = record_steps if checkpoint_dir else set()
  history = [{"step": 0, "tokens": 0, "train_loss": None, "val_loss": val_loss(params),
              "seconds": time.perf_counter() - t_start}]
  checkpoints: dict[int, str] = {}
  pending: list[concurrent.futures.Future] = []
  digest = hashlib.sha256()
  losses: list[jax.Array] = []

  bar = tqdm(total=tc.steps, desc=desc, unit="step", dynamic_ncols=True, disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as saver:
    for step in range(1, tc.steps + 1):
      batch = order.batch(train_ids, step - 1)
      digest.update(batch.tobytes())
      params, opt_state, loss = train_step(params, opt_state, batch)
      losses.append(loss)
      if step in record_steps:
        train_loss = float(np.mean(jax.device_get(losses)))
        losses = []
        history.append({"step": step, "tokens": step * tc.tokens_per_step,
                        "train_loss": train_loss, "val_loss": val_loss(params),
                        "seconds": time.perf_counter() - t_start})
        if step in ckpt_steps:
          for f in pending:
            if f.done():
              f.result()  # a failed save stops training now, not at the end
          host = jax.tree.map(lambda a: np.array(a, copy=True), params)  # params get donated
          path = os.path.join(checkpoint_dir, f"step{step}")
          extra = {"step": step, "tokens": step * tc.tokens_per_step,
                   "train_loss": train_loss, "val_loss": history[-1]["val_loss"]}
          pending.append(saver.submit(orbax_format.save, path, host, config,
                                      tokenizer_files=tokenizer_files, extra=extra,
                                      overwrite=True))
          checkpoints[step] = path
        bar.set_postfix(loss=f"{train_loss:.3f}", val=_fmt(history[-1]["val_loss"]))
      elif step % 10 == 0 and progress:
        bar.set_postfix(loss=f"{float(loss):.3f}", val=_fmt(history[-1]["val_loss"]))
      bar.update(1)
    for f in pending:
      f.result()  # re-raises a failed save
  bar.close()
  return TrainResult(jax.tree.map(np.asarray, params), checkpoints, history, digest.hexdigest(),
                     time.perf_counter() - t_start)


def _fmt(x: float | None) -> str:
  return "-" if x is None else f"{x:.3f}"


# Families and suites ----------------------------------------------------------------------------

def _member_spec(member: FamilyMember, tc: TrainConfig, data_digest: str,
                 tokenizer_digest: str) -> dict[str, Any]:
  return {"config": families.to_hf_dict(member.config), "peak_lr": member.peak_lr,
          "train_config": dataclasses.asdict(tc), "data": data_digest,
          "tokenizer": tokenizer_digest}


def _completed(model_dir: str, spec: dict[str, Any]) -> dict[str, Any] | None:
  """The saved training record of a model if it finished with exactly this spec."""
  path = os.path.join(model_dir, _DONE_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  if record.get("spec") != json.loads(json.dumps(spec)):
    return None
  steps = record.get("checkpoints", {})
  if not steps or not all(checkpoint.is_checkpoint(os.path.join(model_dir, p))
                          for p in steps.values()):
    return None
  return record


def train_family(out_dir: str, members: Sequence[FamilyMember], train_ids: np.ndarray,
                 tc: TrainConfig, *, val_ids: np.ndarray | None = None,
                 tokenizer_file: str | None = None, suite_name: str = "demo",
                 progress: bool = True) -> str:
  """Trains every member on the same batches; returns the path of OUT_DIR/suite.json.

  Layout: OUT_DIR/ckpt/<name>/step<k>/ (opt_jax checkpoints, tokenizer.json included),
  OUT_DIR/ckpt/<name>/training.json (spec + loss history; written last), OUT_DIR/training.json
  (all members' histories) and OUT_DIR/suite.json {"name", "models": [{"name", "params",
  "tokens_per_step", "checkpoints": {"<step>": "ckpt/<name>/step<k>"}}]} with paths relative to
  OUT_DIR. Both JSON files are rewritten atomically after each member. A member whose record
  matches this exact spec (config, learning rate, TrainConfig, data and tokenizer digests) and
  whose checkpoints are all complete is not retrained.
  """
  out_dir = os.path.abspath(out_dir)
  names = [m.name for m in members]
  if len(set(names)) != len(names) or not members:
    raise ValueError(f"member names must be unique and non-empty, got {names}")
  os.makedirs(out_dir, exist_ok=True)
  data_digest = fingerprint(train_ids, val_ids if val_ids is not None else np.zeros(0))
  tok_digest = ""
  tokenizer_files = []
  if tokenizer_file:
    with open(tokenizer_file, "rb") as f:
      tok_digest = hashlib.sha256(f.read()).hexdigest()
    tokenizer_files = [tokenizer_file]

  records = []
  for i, member in enumerate(members):
    model_dir = os.path.join(out_dir, "ckpt", member.name)
    spec = _member_spec(member, tc, data_digest, tok_digest)
    record = _completed(model_dir, spec)
    if record is None:
      if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)  # stale steps of another spec must not stay listed on disk
      result = train(member.config, train_ids, tc, peak_lr=member.peak_lr, val_ids=val_ids,
                     checkpoint_dir=model_dir, tokenizer_files=tokenizer_files,
                     progress=progress, desc=f"[{i + 1}/{len(members)}] {member.name}")
      record = {"name": member.name, "params": member.config.num_params(),
                "tokens_per_step": tc.tokens_per_step, "spec": spec,
                "checkpoints": {str(s): os.path.relpath(p, model_dir)
                                for s, p in sorted(result.checkpoints.items())},
                "history": result.history, "seconds": result.seconds,
                "data_digest": result.data_digest}
      files.write_json(os.path.join(model_dir, _DONE_FILE), record, indent=1)
    elif progress:
      print(f"[{i + 1}/{len(members)}] {member.name}: already trained ({model_dir})")
    records.append(record)
    _write_suite(out_dir, suite_name, records)
  return os.path.join(out_dir, SUITE_FILE)


def _write_suite(out_dir: str, suite_name: str, records: list[dict[str, Any]]) -> None:
  models = [{"name": r["name"], "params": r["params"], "tokens_per_step": r["tokens_per_step"],
             "checkpoints": {s: os.path.join("ckpt", r["name"], p)
                             for s, p in r["checkpoints"].items()}}
            for r in records]
  files.write_json(os.path.join(out_dir, SUITE_FILE), {"name": suite_name, "models": models},
                   indent=1)
  files.write_json(os.path.join(out_dir, TRAINING_FILE),
                   {"name": suite_name,
                    "models": [{k: r[k] for k in ("name", "params", "tokens_per_step", "history",
                                                   "seconds", "data_digest")} for r in records]},
                   indent=1)
