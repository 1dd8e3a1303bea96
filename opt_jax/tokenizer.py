"""OPT's tokenizer from local files only: byte-level BPE, `</s>` (id 2) prepended to every text.

A checkpoint directory holds either `tokenizer.json` (the `tokenizers` library's format) or the
GPT-2 pair `vocab.json` + `merges.txt` (what facebook/opt-* ship). Both load into the same
`tokenizers.Tokenizer`; no network access, no transformers import.

OPT conventions (as HF's GPT2Tokenizer with OPT's tokenizer_config.json applies them):
  * encode() prepends `</s>` (the bos id, 2 in OPT) itself; any post-processor stored in
    tokenizer.json is ignored so the id is never added twice;
  * `<s>`, `<pad>`, `</s>`, `<unk>` written in the text are matched as single special tokens;
  * no prefix space: "Hello" and " Hello" are different tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0, 1, 2, 3


class Tokenizer:
  """A byte-level BPE tokenizer with OPT's special-token conventions.

  Attributes: vocab_size (including added tokens), bos_id, eos_id, pad_id (int token ids).
  """

  def __init__(self, tok: tokenizers.Tokenizer, source: str):
    # Only the model, normaliser, pre-tokeniser and decoder matter: we add </s> ourselves.
    tok.post_processor = None
    tok.no_padding()
    tok.no_truncation()
    self._tok = tok
    self.source = source
    vocab = tok.get_vocab(with_added_tokens=True)
    missing = [s for s in ("</s>", "<pad>") if s not in vocab]
    if missing:
      raise ValueError(f"{source}: the tokenizer has no {missing} token(s); OPT needs </s> (bos/eos)"
                       " and <pad>")
    self.bos_id = self.eos_id = vocab["</s>"]
    self.pad_id = vocab["<pad>"]
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self._fingerprint: str | None = None

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text`, with `</s>` (bos_id) first when add_bos."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id] + ids if add_bos else ids

  def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
    """encode() of each text (the Rust tokenizer runs them in parallel)."""
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [([self.bos_id] if add_bos else []) + e.ids for e in encs]

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
    tokenizers built the same way). Computed once: the wrapped tokenizer never changes."""
    if self._fingerprint is not None:
      return self._fingerprint
    spec = json.loads(self._tok.to_str())
    for key in ("post_processor", "padding", "truncation"):  # ignored by encode()
      spec.pop(key, None)
    spec["opt_jax_bos"] = self.bos_id
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    self._fingerprint = hashlib.sha256(blob).hexdigest()
    return self._fingerprint

  def __repr__(self) -> str:
    return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id})"


def _from_vocab_merges(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
  """The same pipeline as HF's GPT2Tokenizer (byte-level BPE, no prefix space)."""
  tok = tokenizers.Tokenizer(models.BPE.from_file(vocab_path, merges_path, dropout=None,
                                                  continuing_subword_prefix="",
                                                  end_of_word_suffix="", fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # OPT's special tokens live in vocab.json; marking them special makes "</s>" in text one token
  # (as HF does) and lets decode() skip them.
  vocab = tok.get_vocab()
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                          for s in SPECIAL_TOKENS if s in vocab])
  return tok


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """The tokenizer stored in `directory`: tokenizer.json, else vocab.json + merges.txt.

  Raises FileNotFoundError naming the directory and the files needed; ValueError if a file
  cannot be parsed.
  """
  directory = os.fspath(directory)
  tj = os.path.join(directory, TOKENIZER_JSON)
  vj, mt = os.path.join(directory, VOCAB_JSON), os.path.join(directory, MERGES_TXT)
  if os.path.isfile(tj):
    try:
      tok = tokenizers.Tokenizer.from_file(tj)
    except Exception as e:  # the Rust error says what is wrong, not which file
      raise ValueError(f"{tj}: not a valid tokenizers JSON file ({e})") from e
    return Tokenizer(tok, tj)
  if os.path.isfile(vj) and os.path.isfile(mt):
    try:
      tok = _from_vocab_merges(vj, mt)
    except Exception as e:
      raise ValueError(f"{vj} + {mt}: not a valid GPT-2 style vocab/merges pair ({e})") from e
    return Tokenizer(tok, directory)
  present = [f for f in (VOCAB_JSON, MERGES_TXT) if os.path.isfile(os.path.join(directory, f))]
  raise FileNotFoundError(
      f"no tokenizer in {directory}: need {TOKENIZER_JSON}, or both {VOCAB_JSON} and {MERGES_TXT}"
      + (f" (found only {present[0]})" if present else ""))
