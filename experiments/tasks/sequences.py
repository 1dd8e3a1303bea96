"""The sets of sequences of the sequence-level analysis (Xia et al. 2023, section 4), and the
scoring requests made from them.

Generated sets (paper section 4, `OPTSubtract` of the authors' utils.py): from a small and a large
model's next-token distributions, configuration (l1, l2) decodes from
  p' = max(l1 * p_small + l2 * p_large, 0), renormalised (probabilities, not logits),
with greedy search and with nucleus sampling (top-p); `configuration_name` names them ("ps-pl",
"ps", "ps+pl", "pl", "pl-ps" for the paper's five) and a set is `<configuration>_<method>`,
e.g. `ps-pl_greedy`. Prompts are the first `prompt_tokens` tokens of the corpus documents in
order, one per document (`document_prompts`), or spans drawn at random positions
(`draw_spans`, for a corpus of few long documents), or a prompt file (`read_prompts`); every
prompt starts with the tokenizer's start token (OPT's </s>, Pythia's <|endoftext|>).

Perturbed sets: `num_passages` spans of `passage_tokens` tokens, clean and with round(rate x n) of
their tokens replaced by random non-special ids (`replace_<rate>`, experiments/tasks/perturb.py);
window shuffling (`shuffle_<rate>`) and swapped facts (`facts_original` / `facts_swapped`) are
extras, off unless their rates / counts are given.

Scoring requests (`scoring_inputs`): context + target ids per sequence, re-tokenised from text
for a tokenizer other than the set's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Sequence

import numpy as np

from experiments.tasks import perturb
from opt_jax import files, inputs
from opt_jax.errors import InputError

METHODS = ("greedy", "nucleus")
# The paper's five configurations (l1, l2) of l1 * p_small + l2 * p_large.
PAPER_CONFIGURATIONS = ("1:-1", "1:0", "1:1", "0:1", "-1:1")
INVERSE = "ps-pl"          # the configuration whose perplexity shows inverse scaling
LARGE = "pl"               # the large model alone


@dataclasses.dataclass
class SequenceSet:
  """Sequences to score. ids[i] are scored given context_ids[i] (which starts with the
  tokenizer's start token, e.g. OPT's </s>, Pythia's <|endoftext|>);
  contexts/texts are the same as text, for tokenizers other than `tokenizer` (a fingerprint)."""
  name: str
  kind: str                      # "generated" or "perturbed"
  tokenizer: str
  contexts: list[str]
  texts: list[str]
  context_ids: list[list[int]]
  ids: list[list[int]]
  extra: list[dict] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.ids)

  def digest(self) -> str:
    h = hashlib.sha256(json.dumps([self.name, self.kind, self.tokenizer, self.contexts,
                                   self.texts, self.context_ids, self.ids]).encode())
    return h.hexdigest()[:16]


# Files ----------------------------------------------------------------------------------------

def save_set(s: SequenceSet, directory: str) -> str:
  """Writes directory/<name>.jsonl, one sequence per line (atomic); returns the path."""
  lines = []
  for i in range(len(s)):
    row = {"index": i, "set": s.name, "kind": s.kind, "context": s.contexts[i],
           "text": s.texts[i], "context_ids": s.context_ids[i], "ids": s.ids[i],
           "tokenizer": s.tokenizer}
    row.update(s.extra[i] if s.extra else {})
    lines.append(json.dumps(row, ensure_ascii=False))
  path = os.path.join(directory, f"{s.name}.jsonl")
  files.write_text(path, "\n".join(lines) + "\n")
  return path


def load_set(path: str) -> SequenceSet:
  rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
  if not rows:
    raise InputError(f"{path}: empty sequence set; delete the sets folder to rebuild it")
  core = ("index", "set", "kind", "context", "text", "context_ids", "ids", "tokenizer")
  return SequenceSet(rows[0]["set"], rows[0]["kind"], rows[0]["tokenizer"],
                     [r["context"] for r in rows], [r["text"] for r in rows],
                     [r["context_ids"] for r in rows], [r["ids"] for r in rows],
                     [{k: v for k, v in r.items() if k not in core} for r in rows])


def read_prompts(path: str) -> list[str]:
  """Prompts from a .jsonl file ({"prompt"|"text": ...} or a JSON string per line) or any other
  file (one prompt per non-empty line), UTF-8. Errors name the file and line."""
  content = inputs.read_text(path, "prompt file")
  if not path.endswith(inputs.JSONL):
    prompts = [line for line in content.splitlines() if line.strip()]
  else:
    prompts = []
    for i, text in inputs.jsonl_texts(path, content, fields=("prompt", "text")):
      if not text.strip():
        raise InputError(f"{path}:{i}: expected a non-empty prompt, got {text[:80]!r}")
      prompts.append(text)
  if not prompts:
    raise InputError(f"{path}: no prompt (the file is empty or has no non-empty line)")
  return prompts


# Configurations -------------------------------------------------------------------------------

def parse_configurations(specs: Sequence[str]) -> list[tuple[float, float]]:
  """["1:-1", "0:1", ...] -> [(l1, l2), ...]; errors name the bad entry."""
  out = []
  for spec in specs:
    parts = str(spec).split(":")
    try:
      l1, l2 = (float(x) for x in parts)
    except ValueError:
      raise InputError(f"--configurations: {spec!r} is not l1:l2 (two numbers, the weights of "
                       "p_small and p_large, e.g. 1:-1)") from None
    if not (np.isfinite(l1) and np.isfinite(l2)) or (l1 <= 0 and l2 <= 0):
      raise InputError(f"--configurations: {spec!r} gives no positive weight; the mixture "
                       "l1 * p_small + l2 * p_large needs l1 > 0 or l2 > 0")
    out.append((l1, l2))
  names = [configuration_name(*c) for c in out]
  if len(set(names)) != len(names):
    raise InputError(f"--configurations: repeated configuration in {list(specs)}")
  if not out:
    raise InputError("--configurations: give at least one l1:l2 pair")
  return out


def configuration_name(l1: float, l2: float) -> str:
  """(1, -1) -> "ps-pl", (1, 0) -> "ps", (1, 1) -> "ps+pl", (0, 1) -> "pl", (-1, 1) -> "pl-ps",
  (2, -0.5) -> "2ps-0.5pl": positive terms first, zero terms left out."""
  terms = [(w, n) for w, n in ((l1, "ps"), (l2, "pl")) if w != 0]
  terms = [t for t in terms if t[0] > 0] + [t for t in terms if t[0] < 0]
  out = ""
  for w, n in terms:
    sign = "-" if w < 0 else ("+" if out else "")
    out += sign + ("" if abs(w) == 1 else f"{abs(w):g}") + n
  return out


def set_name(configuration: str, method: str) -> str:
  return f"{configuration}_{method}"


def check_methods(methods: Sequence[str]) -> None:
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    raise InputError(f"--methods: {bad or 'none given'}; expected some of {list(METHODS)}")


# Prompts and passages -------------------------------------------------------------------------

def document_prompts(docs: Sequence[Sequence[int]], num: int, length: int
                     ) -> tuple[list[list[int]], int]:
  """The first `length` token ids of the documents in order, one per document, for the first
  `num` documents that have that many tokens -> (prompts, documents too short, passed over)."""
  out, short = [], 0
  for d in docs:
    if len(out) == num:
      break
    if len(d) < length:
      short += 1
      continue
    out.append([int(t) for t in d[:length]])
  if not out:
    raise InputError(f"corpus (prompts): no document has {length} tokens; use fewer "
                     "--prompt_tokens")
  return out, short


def draw_spans(docs: Sequence[Sequence[int]], num: int, length: int, rng: np.random.Generator,
               what: str = "corpus") -> list[list[int]]:
  """`num` spans of `length` token ids, start positions uniform over every position of every
  document (token ids without the leading </s>) where a whole span fits."""
  fits = np.array([max(len(d) - length + 1, 0) for d in docs], np.int64)
  if fits.sum() == 0:
    raise InputError(f"{what}: no document has {length} tokens (longest: "
                     f"{max((len(d) for d in docs), default=0)}); use shorter spans")
  picks = rng.choice(int(fits.sum()), size=num, replace=num > fits.sum())
  bounds = np.cumsum(fits)
  out = []
  for p in sorted(picks.tolist()):
    d = int(np.searchsorted(bounds, p, side="right"))
    start = p - (int(bounds[d - 1]) if d else 0)
    out.append([int(t) for t in docs[d][start:start + length]])
  return out


def decode_text(tok, ids: Sequence[int]) -> str:
  # OPT's model vocabulary (50272) is larger than its tokenizer's (50265): unknown ids have no text.
  return tok.decode([i for i in ids if i < tok.vocab_size])


@dataclasses.dataclass(frozen=True)
class Prompts:
  texts: list[str]
  ids: list[list[int]]          # [start token, ...]
  source: str                   # "documents", "spans" or "file <path>"
  truncated: int = 0            # prompts cut to fit the context (start token + their last tokens)
  short_documents: int = 0      # documents passed over, shorter than the prompt


def make_prompts(tok, docs: Sequence[str], *, max_tokens: int, prompt_file: str | None = None,
                 source: str = "documents", num_prompts: int = 32, prompt_tokens: int = 5,
                 seed: int = 0) -> Prompts:
  """The prompts: a prompt file's lines, or the documents' first tokens (source "documents"), or
  spans drawn from the documents by the seed (source "spans"). Every prompt starts with the
  tokenizer's start token (the family's prefix, e.g. OPT's </s>, or its end-of-text token for
  families without one), so that its first text token is conditioned on something; a prompt of
  more than max_tokens keeps the start token and its last tokens (counted)."""
  short = 0
  if prompt_file:
    texts = read_prompts(prompt_file)
    ids = [[tok.start_id] + b for b in tok.encode_batch(texts, add_bos=False)]
    source = f"file {prompt_file}"
  else:
    encoded = tok.encode_batch(list(docs), add_bos=False)
    if source == "documents":
      body, short = document_prompts(encoded, num_prompts, prompt_tokens)
    elif source == "spans":
      body = draw_spans(encoded, num_prompts, prompt_tokens, perturb.rng_for(seed, "prompts"),
                        "corpus (prompts)")
    else:
      raise InputError(f"--prompt_source={source!r}: expected 'documents' or 'spans'")
    ids = [[tok.start_id] + b for b in body]
    texts = [decode_text(tok, b) for b in body]
  truncated = 0
  for i, p in enumerate(ids):
    if len(p) > max_tokens:   # keep the start token and the most recent tokens
      ids[i] = [p[0]] + p[len(p) - max_tokens + 1:]
      texts[i] = decode_text(tok, ids[i][1:])
      truncated += 1
  return Prompts(texts, ids, source, truncated, short)


# Building the sets ----------------------------------------------------------------------------

def decode_sets(pair: Sequence[tuple[Any, Any]], tok, prompts: Prompts,
                configurations: Sequence[tuple[float, float]], methods: Sequence[str], *,
                max_new_tokens: int, top_p: float = 0.9, temperature: float = 1.0, seed: int = 0,
                batch_size: int = 32, mesh=None, names: Sequence[str] = ("small", "large"),
                say=lambda _: None) -> tuple[list[SequenceSet], dict[str, Any]]:
  """One set per (configuration, method) from the joint decoder of pair = ((small config,
  params), (large config, params)): continuations of exactly max_new_tokens tokens (eos does not
  stop them, so every sequence perplexity averages the same number of tokens).

  Every set runs the same compiled program (weights, method and seed are its arguments). A step
  where the weights leave no positive mass (e.g. p_s - p_l where the models agree) takes the
  distribution of the model with the larger weight; such steps are counted per set.
  Returns (sets, stats) with stats["sets"][name] = {sequences, tokens, fallback_steps, seconds}
  and stats["decode_seconds"] (all sets, compilation included)."""
  # JAX loads only when something is decoded: the binary's --help and input checks stay fast.
  from opt_jax import generation  # pylint: disable=import-outside-toplevel
  check_methods(methods)
  stats: dict[str, Any] = {"sets": {}, "decode_seconds": 0.0}
  sets = []
  for k, (l1, l2) in enumerate(configurations):
    config = configuration_name(l1, l2)
    for method in methods:
      name = set_name(config, method)
      start = time.perf_counter()
      outs, st = generation.joint_generate(
          pair, (l1, l2), prompts.ids, max_new_tokens=max_new_tokens,
          sampler="greedy" if method == "greedy" else "sample", top_p=top_p,
          temperature=temperature, seed=seed + k, eos_id=None, batch_size=batch_size,
          fallback_model=0 if l1 > l2 else 1, mesh=mesh, names=list(names))
      seconds = time.perf_counter() - start
      stats["decode_seconds"] += seconds
      say(f"decoded {name} ({len(outs)} x {max_new_tokens} tokens, {seconds:.1f} s)")
      sets.append(SequenceSet(name, "generated", tok.fingerprint(), list(prompts.texts),
                              [decode_text(tok, o) for o in outs],
                              [list(p) for p in prompts.ids], [list(o) for o in outs],
                              [{"prompt_index": i, "weights": [l1, l2], "method": method}
                               for i in range(len(outs))]))
      stats["sets"][name] = {"sequences": len(outs), "tokens": sum(map(len, outs)),
                             "weights": [l1, l2], "method": method,
                             "fallback_steps": st["fallback_steps"], "seconds": round(seconds, 3)}
  return sets, stats


def sample_set(name: str, tok, texts: Sequence[str], ids: Sequence[Sequence[int]],
               outs: Sequence[Sequence[int]]) -> SequenceSet:
  """A set of plain samples of one model (an extra: sample_<model>)."""
  return SequenceSet(name, "generated", tok.fingerprint(), list(texts),
                     [decode_text(tok, o) for o in outs], [list(p) for p in ids],
                     [list(o) for o in outs], [{"prompt_index": i} for i in range(len(outs))])


def perturbed_sets(tok, docs: Sequence[str], *, seed: int = 0, num_passages: int = 32,
                   passage_tokens: int = 100, noise_rates: Sequence[float] = (),
                   shuffle_rates: Sequence[float] = (), shuffle_window: int = 4,
                   swaps_per_kind: int = 0) -> tuple[list[SequenceSet], dict[str, Any]]:
  """clean, replace_<rate> (round(rate x passage_tokens) tokens replaced by random non-special
  ids), and the extras shuffle_<rate>, facts_original / facts_swapped, from corpus spans."""
  body = draw_spans(tok.encode_batch(list(docs), add_bos=False), num_passages, passage_tokens,
                    perturb.rng_for(seed, "passages"), "corpus (passages)")
  fp = tok.fingerprint()
  bos = tok.start_id
  special = tok.special_ids | {bos}   # never drawn as replacement tokens
  pool = np.array([i for i in range(tok.vocab_size) if i not in special])

  def make(name, ids_list, texts=None, extra=None):
    texts = texts if texts is not None else [decode_text(tok, x) for x in ids_list]
    n = len(ids_list)
    return SequenceSet(name, "perturbed", fp, [""] * n, texts, [[bos] for _ in range(n)],
                       [list(x) for x in ids_list], extra or [])

  clean_texts = [decode_text(tok, b) for b in body]
  sets = [make("clean", body, clean_texts)]
  for rate in noise_rates:
    sets.append(make(f"replace_{rate:g}", [
        perturb.replace_tokens(b, rate, pool, perturb.rng_for(seed, "replace", i), keep_first=0)
        for i, b in enumerate(body)]))
  for rate in shuffle_rates:
    sets.append(make(f"shuffle_{rate:g}", [
        perturb.shuffle_windows(b, rate, shuffle_window, perturb.rng_for(seed, "shuffle", i),
                                keep_first=0) for i, b in enumerate(body)]))
  stats = {"passages": len(body), "passage_tokens": passage_tokens, "passages_with_swaps": 0}
  if swaps_per_kind > 0:
    swapped = [(i, perturb.swap_facts(t, perturb.rng_for(seed, "facts", i),
                                      swaps_per_kind=swaps_per_kind))
               for i, t in enumerate(clean_texts)]
    swapped = [(i, s) for i, s in swapped if s.swaps]
    stats["passages_with_swaps"] = len(swapped)
    if swapped:
      extra = [{"passage_index": i, "swaps": [list(x) for x in s.swaps]} for i, s in swapped]
      sets.append(make("facts_original", [body[i] for i, _ in swapped],
                       [clean_texts[i] for i, _ in swapped], extra))
      sets.append(make("facts_swapped", [tok.encode(s.text, add_bos=False) for _, s in swapped],
                       [s.text for _, s in swapped], extra))
  return sets, stats


# Scoring requests ------------------------------------------------------------------------------

def scoring_inputs(s: SequenceSet, tok) -> tuple[list[list[int]], list[int]]:
  """(full token lists context + target, number of target tokens) for `tok`; the ids as stored
  when `tok` is the set's tokenizer, else the texts re-tokenised (n = 0: nothing to score)."""
  if tok.fingerprint() == s.tokenizer:
    return [c + x for c, x in zip(s.context_ids, s.ids)], [len(x) for x in s.ids]
  ctx = [[tok.start_id] + c for c in tok.encode_batch(s.contexts, add_bos=False)]
  tgt = tok.encode_batch(s.texts, add_bos=False)
  return [c + x for c, x in zip(ctx, tgt)], [len(x) for x in tgt]
