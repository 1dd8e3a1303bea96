"""Perturbed text for sequence-level trajectories: token noise and factually wrong variants.

Token noise works on token ids (the scoring suite's tokenizer); the first `keep_first` ids (the
leading </s>) are never touched, and the number of changed positions is exact, not a coin flip
per token:
  * `replace_tokens`: round(rate x n) positions, chosen without replacement, each get a token drawn
    uniformly from `pool` (default in the experiment: every non-special id of the tokenizer) and
    different from the original.
  * `shuffle_windows`: the ids after the kept prefix are cut into consecutive windows of `window`
    tokens; round(rate x number of windows) of them, chosen at random, are permuted (a random
    permutation other than the identity), so about `rate` of the tokens move, never farther than
    window - 1 positions. A window of identical ids cannot change.

Factually wrong variants (`swap_facts`) work on text, so any tokenizer can score them:
  * mentions are numbers (digits with inner , or . separators: "1,200", "3.5") and capitalised
    spans (maximal runs of capitalised words joined by single spaces, "Lady Macbeth", "New York");
  * a one-word capitalised span at the start of a sentence or of a line is not a mention (any
    sentence may start with a capital), and leading function words ("The", "And", "In", ...,
    `_LEADING`) are trimmed from a span;
  * a swap exchanges the text of two mentions of the same kind with different surface forms, each
    mention used at most once; up to `swaps_per_kind` swaps of each kind, chosen by the seed.
  Limits (plainly): no parser or entity tagger, so a capitalised common word mid-sentence (verse
  lines, titles, "God") counts as an entity; entities of different types (a person and a place)
  can be exchanged; years, counts and amounts are all just numbers; lower-case entities ("iPhone")
  and spelled-out numbers ("three") are missed; a swap can by chance produce a true statement.
  A document with fewer than two distinct surface forms of a kind gets no swap of that kind.

Every function takes a numpy Generator; `rng_for(seed, *keys)` derives one per (seed, set,
document), so a variant depends only on the seed and its own inputs (not on the order of others).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Sequence

import numpy as np

_WORD = r"[A-Z][A-Za-z'\u2019-]*"
_ENTITY = re.compile(rf"\b{_WORD}(?: {_WORD})*")
_NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)*(?![\w])")
_SENTENCE_START = re.compile(r"(?:^|[.!?;:]['\"\u2019\u201d)]*\s+|\n\s*)$")
# Words that start many capitalised spans without being names (trimmed from the front of a span).
_LEADING = frozenset(
    "A An And As At But By For From He Her His How I If In It Its My No Not O Of On Or Our She So "
    "That The Their Then There These They This Thou Thy To We What When Where Which Who Why With "
    "Ye Yet You Your".split())


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
  """A Generator determined by the seed and the keys (strings hashed with crc32)."""
  words = [int(seed) & 0xFFFFFFFF]
  for k in keys:
    words.append(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF)
  return np.random.default_rng(words)


def _check_rate(rate: float) -> None:
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"noise rate must be in [0, 1], got {rate}")


def replace_tokens(ids: Sequence[int], rate: float, pool: Sequence[int] | np.ndarray,
                   rng: np.random.Generator, *, keep_first: int = 1) -> list[int]:
  """ids with round(rate x (len - keep_first)) positions replaced by other ids drawn from pool."""
  _check_rate(rate)
  pool = np.unique(np.asarray(pool, np.int64))
  if pool.size < 2:
    raise ValueError(f"the replacement pool needs at least 2 distinct ids, got {pool.size}")
  out = [int(t) for t in ids]
  n = len(out) - keep_first
  k = int(round(rate * n)) if n > 0 else 0
  positions = keep_first + rng.choice(n, size=k, replace=False) if k else np.zeros(0, np.int64)
  for pos in positions.tolist():
    new = out[pos]
    while new == out[pos]:
      new = int(pool[rng.integers(pool.size)])
    out[pos] = new
  return out


def shuffle_windows(ids: Sequence[int], rate: float, window: int, rng: np.random.Generator, *,
                    keep_first: int = 1) -> list[int]:
  """ids with round(rate x windows) of their consecutive `window`-token windows permuted."""
  _check_rate(rate)
  if window < 2:
    raise ValueError(f"a shuffling window needs at least 2 tokens, got {window}")
  out = [int(t) for t in ids]
  starts = list(range(keep_first, len(out) - 1, window))   # a last window of 1 token cannot move
  k = int(round(rate * len(starts)))
  chosen = sorted(rng.choice(len(starts), size=k, replace=False).tolist()) if k else []
  for s in chosen:
    lo = starts[s]
    hi = min(lo + window, len(out))
    perm = np.arange(hi - lo)
    while np.array_equal(perm, np.arange(hi - lo)):
      perm = rng.permutation(hi - lo)
    out[lo:hi] = [out[lo + int(j)] for j in perm]
  return out


@dataclasses.dataclass(frozen=True)
class Mention:
  kind: str      # "entity" or "number"
  start: int     # character offsets in the text
  end: int
  text: str


def find_mentions(text: str) -> list[Mention]:
  """Numbers and capitalised spans of `text` (see the module docstring), in text order."""
  found = [Mention("number", m.start(), m.end(), m.group()) for m in _NUMBER.finditer(text)]
  for m in _ENTITY.finditer(text):
    words = m.group().split(" ")
    start = m.start()
    while words and words[0] in _LEADING:     # "The Thane of" -> "Thane"
      start += len(words[0]) + 1
      words = words[1:]
    if not words:
      continue
    span = " ".join(words)
    if len(words) == 1 and start == m.start() and _SENTENCE_START.search(text[:start]):
      continue
    if len(span) < 2:
      continue
    found.append(Mention("entity", start, start + len(span), span))
  return sorted(found, key=lambda x: x.start)


@dataclasses.dataclass(frozen=True)
class FactSwap:
  """A factually wrong variant: the new text and the swaps made (kind, original a, original b)."""
  text: str
  swaps: tuple[tuple[str, str, str], ...]


def swap_facts(text: str, rng: np.random.Generator, *, swaps_per_kind: int = 2,
               kinds: Sequence[str] = ("entity", "number")) -> FactSwap:
  """Exchanges pairs of same-kind mentions with different surface forms (module docstring)."""
  mentions = find_mentions(text)
  edits: dict[int, tuple[Mention, str]] = {}
  made = []
  for kind in kinds:
    pool = [m for m in mentions if m.kind == kind]
    order = rng.permutation(len(pool)).tolist()
    used: set[int] = set()
    count = 0
    for i in order:
      if count >= swaps_per_kind or i in used:
        continue
      partners = [j for j in order if j not in used and j != i and pool[j].text != pool[i].text]
      if not partners:
        continue
      j = partners[int(rng.integers(len(partners)))]
      used.update((i, j))
      edits[pool[i].start] = (pool[i], pool[j].text)
      edits[pool[j].start] = (pool[j], pool[i].text)
      made.append((kind, pool[i].text, pool[j].text))
      count += 1
  out = text
  for start in sorted(edits, reverse=True):
    m, new = edits[start]
    out = out[:m.start] + new + out[m.end:]
  return FactSwap(out, tuple(made))
