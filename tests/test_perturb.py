"""Text perturbations: exact noise rates, locality of shuffles, entity/number swaps, determinism."""

import collections
import re

import numpy as np
import pytest

import _suite_util as U
from experiments.tasks import perturb as P
from experiments.tasks import sequences as T
from opt_jax.tokenizer import load_tokenizer

IDS = [2] + list(range(10, 110))   # 100 distinct ids after the leading </s>
POOL = np.arange(4, 500)

TEXT = ("MACBETH. So foul and fair a day I have not seen.\n"
        "In 1606 the King of Scotland, Duncan, met Banquo near Forres with 3,000 men.\n"
        "The Thane of Cawdor had 12 ships and 2.5 tons of gold. Lady Macbeth said Duncan would "
        "sleep in Inverness. Then 1606 came.")


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_replacement_changes_exactly_rate_of_tokens(rate):
  out = P.replace_tokens(IDS, rate, POOL, P.rng_for(0, "replace", 7))
  changed = [i for i, (a, b) in enumerate(zip(IDS, out)) if a != b]
  assert len(out) == len(IDS) and out[0] == 2
  assert len(changed) == round(rate * 100)
  assert all(out[i] in set(POOL.tolist()) for i in changed)


def test_replacement_is_deterministic_by_seed():
  a = P.replace_tokens(IDS, 0.3, POOL, P.rng_for(1, "replace", 0))
  assert a == P.replace_tokens(IDS, 0.3, POOL, P.rng_for(1, "replace", 0))
  assert a != P.replace_tokens(IDS, 0.3, POOL, P.rng_for(2, "replace", 0))
  assert a != P.replace_tokens(IDS, 0.3, POOL, P.rng_for(1, "replace", 1))


@pytest.mark.parametrize("rate,window", [(0.2, 4), (0.5, 3), (1.0, 5)])
def test_shuffle_moves_tokens_only_within_windows(rate, window):
  out = P.shuffle_windows(IDS, rate, window, P.rng_for(3, "shuffle"))
  assert out[0] == 2 and sorted(out) == sorted(IDS)
  starts = list(range(1, len(IDS) - 1, window))
  changed = 0
  for s in starts:
    before, after = IDS[s:s + window], out[s:s + window]
    assert sorted(before) == sorted(after)   # nothing crosses a window boundary
    changed += before != after
  assert changed == round(rate * len(starts))
  assert out == P.shuffle_windows(IDS, rate, window, P.rng_for(3, "shuffle"))


def test_bad_noise_arguments_are_named():
  with pytest.raises(ValueError, match="rate must be in"):
    P.replace_tokens(IDS, 1.5, POOL, P.rng_for(0))
  with pytest.raises(ValueError, match="at least 2 distinct ids"):
    P.replace_tokens(IDS, 0.1, [5, 5], P.rng_for(0))
  with pytest.raises(ValueError, match="window needs at least 2"):
    P.shuffle_windows(IDS, 0.1, 1, P.rng_for(0))


def test_mentions_are_numbers_and_capitalised_spans_not_sentence_starts():
  got = [(m.kind, m.text) for m in P.find_mentions(TEXT)]
  assert got == [("number", "1606"), ("entity", "King"), ("entity", "Scotland"),
                 ("entity", "Duncan"), ("entity", "Banquo"), ("entity", "Forres"),
                 ("number", "3,000"), ("entity", "Thane"), ("entity", "Cawdor"), ("number", "12"),
                 ("number", "2.5"), ("entity", "Lady Macbeth"), ("entity", "Duncan"),
                 ("entity", "Inverness"), ("number", "1606")]
  for m in P.find_mentions(TEXT):
    assert TEXT[m.start:m.end] == m.text


def _slots(original, new):
  """The texts that fill the original's mention slots in `new` (the rest must be unchanged)."""
  mentions = P.find_mentions(original)
  pattern, last = "", 0
  for m in mentions:
    pattern += re.escape(original[last:m.start]) + "(.+?)"
    last = m.end
  match = re.fullmatch(pattern + re.escape(original[last:]), new, flags=re.S)
  assert match, "a swap changed text outside the mentions"
  return mentions, list(match.groups())


def test_swaps_exchange_same_kind_mentions_and_nothing_else():
  for seed in range(5):
    res = P.swap_facts(TEXT, P.rng_for(seed, "facts", 0), swaps_per_kind=2)
    kinds = collections.Counter(k for k, _, _ in res.swaps)
    assert kinds == {"entity": 2, "number": 2}
    assert all(a != b for _, a, b in res.swaps)
    mentions, filled = _slots(TEXT, res.text)
    assert sum(m.text != f for m, f in zip(mentions, filled)) == 2 * len(res.swaps)
    for kind in ("entity", "number"):   # same multiset of mentions per kind, in another order
      before = [m.text for m in mentions if m.kind == kind]
      after = [f for m, f in zip(mentions, filled) if m.kind == kind]
      assert sorted(before) == sorted(after) and before != after
    assert res == P.swap_facts(TEXT, P.rng_for(seed, "facts", 0), swaps_per_kind=2)


def test_swap_needs_two_distinct_forms():
  res = P.swap_facts("We met Duncan, and Duncan met us in 1606.", P.rng_for(0))
  assert res.swaps == () and res.text == "We met Duncan, and Duncan met us in 1606."
  res = P.swap_facts("We met Duncan in 1606, not in 1610.", P.rng_for(0), kinds=("number",))
  assert res.text == "We met Duncan in 1610, not in 1606."
  assert re.search("Duncan", res.text)


def test_corrupted_sets_replace_exactly_round_rate_tokens_never_a_special_id(tmp_path):
  """The experiment's corrupted sets (the paper's rates on 100-token passages): each passage has
  exactly round(rate x 100) positions changed, no special or start id drawn, rate 1 changes all."""
  U.train_tokenizer(str(tmp_path))
  tok = load_tokenizer(str(tmp_path))
  docs = [TEXT * 4, "Banquo and Fleance walk at night; 2 torches light the road. " * 8]
  rates = (0.2, 0.4, 0.6, 0.8, 1.0)
  sets, stats = T.perturbed_sets(tok, docs, seed=5, num_passages=6, passage_tokens=100,
                                 noise_rates=rates)
  by_name = {s.name: s for s in sets}
  assert list(by_name) == ["clean", "replace_0.2", "replace_0.4", "replace_0.6", "replace_0.8",
                           "replace_1"]
  assert stats["passages"] == 6 and stats["passages_with_swaps"] == 0   # extras off
  special = tok.special_ids | {tok.start_id}
  clean = by_name["clean"].ids
  assert all(len(x) == 100 and not special & set(x) for x in clean)
  for rate in rates:
    s = by_name[f"replace_{rate:g}"]
    assert s.context_ids == [[tok.start_id]] * 6
    for before, after in zip(clean, s.ids):
      assert len(after) == 100
      assert sum(a != b for a, b in zip(before, after)) == round(rate * 100)
      assert not special & set(after)
      assert all(0 <= t < tok.vocab_size for t in after)
