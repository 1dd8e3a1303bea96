"""Tokenizers from local files only, with a family's text convention or lm-evaluation-harness's.

A directory holds either `tokenizer.json` (the `tokenizers` library's format, what Pythia, Llama
and OLMo ship) or the GPT-2 pair `vocab.json` + `merges.txt` (what facebook/opt-* ship). Both
load into the same `tokenizers.Tokenizer`; no network access, no transformers import. Any
post-processor stored in tokenizer.json is ignored: opt_jax adds the convention's prefix itself,
so an id is never added twice. The family's special tokens written in a text are matched as
single tokens.

Special ids come from the model's config.json (the checkpoint directory's, or `config=`): bos,
eos and pad. A bare tokenizer directory without config.json follows the conventions of
`families.BARE_TOKENIZER_FAMILY` (OPT's `</s>` and `<pad>` looked up in its vocabulary), as the
demo's and the tests' tokenizers do.

Conventions (`conventions=`, see opt_jax.families):
  native   encode() prepends the family's prefix: OPT `</s>`, Llama `<s>`, nothing for Pythia
           and OLMo. start_id (what an empty context becomes) is the prefix, or eos without one.
  lm_eval  lm-evaluation-harness HFLM's defaults in lm_eval 0.4.9 (add_bos_token=False; newer
           releases take the tokenizer's own default unless add_bos_token=False is passed):
           encode() prepends nothing; start_id is bos, or eos when the model has no bos (HFLM's
           prefix_token_id), used for an empty context and as the first token of every rolling
           document.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from opt_jax import families
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, MissingFileError

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
CONFIG_JSON = "config.json"


class Tokenizer:
  """A tokenizer with a text convention.

  Attributes: vocab_size (including added tokens), bos_id / eos_id / pad_id (int token ids;
  bos_id may be None), prefix (ids encode() puts before every text), start_id (the one token an
  empty context is, and under lm_eval the token before each rolling document), conventions.
  """

  def __init__(self, tok: tokenizers.Tokenizer, source: str, *, bos_id: int | None, eos_id: int,
               pad_id: int, prepend_bos: bool, conventions: str = "native"):
    if conventions not in families.CONVENTIONS:
      raise InputError(f"conventions={conventions!r}: expected one of {families.CONVENTIONS}")
    # Only the model, normaliser, pre-tokeniser and decoder matter: the prefix is ours.
    tok.post_processor = None
    tok.no_padding()
    tok.no_truncation()
    self._tok = tok
    self.source = source
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self._prepend_bos = prepend_bos
    self.conventions = conventions
    if conventions == "native":
      self.prefix: tuple[int, ...] = (bos_id,) if prepend_bos else ()
      self.start_id = self.prefix[-1] if self.prefix else eos_id
    else:
      self.prefix = ()
      self.start_id = bos_id if bos_id is not None else eos_id
    bad = {k: v for k, v in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id))
           if v is not None and not 0 <= v < self.vocab_size}
    if bad:
      raise InputError(f"{source}: special token id(s) {bad} are outside the tokenizer's "
                       f"vocabulary of {self.vocab_size}")
    self._fingerprint: str | None = None

  def with_conventions(self, conventions: str) -> "Tokenizer":
    """The same tokenizer under another convention (shares the underlying tokenizer)."""
    if conventions == self.conventions:
      return self
    return Tokenizer(self._tok, self.source, bos_id=self.bos_id, eos_id=self.eos_id,
                     pad_id=self.pad_id, prepend_bos=self._prepend_bos, conventions=conventions)

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (OPT's <s> <pad> </s> <unk>, Pythia's
    <|endoftext|> <|padding|>, ...) and of bos, eos and pad."""
    ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    return frozenset(ids | {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None})

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text`, after the convention's prefix when add_bos (e.g. OPT's </s>)."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return list(self.prefix) + ids if add_bos else ids

  def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
    """encode() of each text (the Rust tokenizer runs them in parallel)."""
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [(list(self.prefix) if add_bos else []) + e.ids for e in encs]

  def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text for sliding-window scoring, whose first id is context only (never
    scored): native: encode(text) (with no prefix, the text's first token is not scored);
    lm_eval: [start_id] + encode(text), as HFLM.loglikelihood_rolling."""
    lead = [self.start_id] if self.conventions == "lm_eval" else []
    return [lead + ids for ids in self.encode_batch(texts)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def tokens(self, ids: Sequence[int]) -> list[str]:
    """Display strings, one per id: each token decoded on its own (" world", "</s>"); bytes that
    are not valid UTF-8 alone (half of an emoji) appear as U+FFFD."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.source} "
                       f"(size {self.vocab_size})")
    return self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)

  def fingerprint(self) -> str:
    """sha256 over everything that decides the text -> ids map (equal iff identical mapping for
    tokenizers built the same way), the convention's prefix and start token included. Computed
    once: the wrapped tokenizer never changes."""
    if self._fingerprint is not None:
      return self._fingerprint
    spec = json.loads(self._tok.to_str())
    for key in ("post_processor", "padding", "truncation"):  # ignored by encode()
      spec.pop(key, None)
    spec["opt_jax_prefix"] = list(self.prefix)
    spec["opt_jax_start"] = self.start_id
    spec["opt_jax_conventions"] = self.conventions   # encode_documents differs by convention
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    self._fingerprint = hashlib.sha256(blob).hexdigest()
    return self._fingerprint

  def __repr__(self) -> str:
    return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, prefix={self.prefix}, "
            f"conventions={self.conventions!r})")


def _from_vocab_merges(vocab_path: str, merges_path: str, specials: Sequence[str]
                       ) -> tokenizers.Tokenizer:
  """The same pipeline as HF's GPT2Tokenizer (byte-level BPE, no prefix space)."""
  tok = tokenizers.Tokenizer(models.BPE.from_file(vocab_path, merges_path, dropout=None,
                                                  continuing_subword_prefix="",
                                                  end_of_word_suffix="", fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # The special tokens live in vocab.json; marking them special makes "</s>" in text one token
  # (as HF does) and lets decode() skip them.
  vocab = tok.get_vocab()
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                          for s in specials if s in vocab])
  return tok


def load_tokenizer(directory: str | os.PathLike, *, config: DecoderConfig | None = None,
                   conventions: str = "native") -> Tokenizer:
  """The tokenizer stored in `directory`: tokenizer.json, else vocab.json + merges.txt.

  config: the model's config (special ids and family); default: `directory`/config.json when
  present, else the bare-tokenizer conventions (module docstring). conventions: "native" or
  "lm_eval". Raises MissingFileError naming the directory and the files needed; InputError if a
  file cannot be parsed or a special token is missing.
  """
  directory = os.fspath(directory)
  if conventions not in families.CONVENTIONS:
    raise InputError(f"conventions={conventions!r}: expected one of {families.CONVENTIONS}")
  if config is None and os.path.isfile(os.path.join(directory, CONFIG_JSON)):
    config = families.read_config(os.path.join(directory, CONFIG_JSON))
  family = families.get(config.family if config is not None else families.BARE_TOKENIZER_FAMILY)
  tj = os.path.join(directory, TOKENIZER_JSON)
  vj, mt = os.path.join(directory, VOCAB_JSON), os.path.join(directory, MERGES_TXT)
  if os.path.isfile(tj):
    try:
      tok = tokenizers.Tokenizer.from_file(tj)
    except Exception as e:  # the Rust error says what is wrong, not which file
      raise InputError(f"{tj}: not a valid tokenizers JSON file ({e})") from e
    source = tj
  elif os.path.isfile(vj) and os.path.isfile(mt):
    try:
      tok = _from_vocab_merges(vj, mt, family.special_tokens)
    except Exception as e:
      raise InputError(f"{vj} + {mt}: not a valid GPT-2 style vocab/merges pair ({e})") from e
    source = directory
  else:
    present = [f for f in (VOCAB_JSON, MERGES_TXT) if os.path.isfile(os.path.join(directory, f))]
    raise MissingFileError(
        f"no tokenizer in {directory}: need {TOKENIZER_JSON}, or both {VOCAB_JSON} and "
        f"{MERGES_TXT}" + (f" (found only {present[0]})" if present else ""))

  if config is not None:
    bos, eos, pad = config.bos_token_id, config.eos_token_id, config.pad_token_id
    if eos is None:
      raise InputError(f"{directory}: config.json has no eos_token_id; opt_jax needs one")
  else:
    vocab = tok.get_vocab(with_added_tokens=True)
    wanted = {t for t in (family.bos_token, family.eos_token, family.pad_token) if t}
    missing = sorted(t for t in wanted if t not in vocab)
    if missing:
      raise InputError(f"{source}: the tokenizer has no {missing} token(s); a tokenizer without "
                       f"config.json beside it follows {family.architecture}'s conventions and "
                       f"needs {sorted(wanted)} (or pass config=)")
    bos = vocab[family.bos_token] if family.bos_token else None
    eos = vocab[family.eos_token]
    pad = vocab[family.pad_token] if family.pad_token else None
  if family.prepend_bos and bos is None:
    raise InputError(f"{directory}: the {family.name} convention prepends bos, but the model "
                     "has no bos_token_id")
  return Tokenizer(tok, source, bos_id=bos, eos_id=eos, pad_id=eos if pad is None else pad,
                   prepend_bos=family.prepend_bos, conventions=conventions)
