"""What a user hands to opt_jax: text files and dtype names, read and checked in one place.

The one corpus rule, used by every binary (`--corpus`, `--input`, `--validation_text`, ...):

  * a `.jsonl` file is JSON lines: each non-blank line is an object with a string "text" field,
    or a bare JSON string; each line is one document;
  * any other file (`.txt`, `.md`, no extension, ...) is one plain-text document;
  * a document that is empty or only whitespace has no token worth scoring: it is skipped (and
    counted in `Corpus.skipped`); a file left with no document is an error that says it is empty;
  * files are UTF-8; a byte that is not names the file and line;
  * Windows conventions are read as what they mean, the same for every file: a leading UTF-8
    byte-order mark (BOM, EF BB BF) is dropped, and CRLF line endings are read as LF, so the
    same text scores the same whichever editor saved it (a BOM would otherwise be three byte
    tokens, each \r a token). Of a .jsonl file this is its lines; a "text" value is taken as its
    JSON says (an escaped \r\n in it is content). What was changed is in `Corpus.notes`, which
    the closing summary says once (`normalisation_note`), and logged as a warning once per file.

Errors are opt_jax.errors classes (the binaries print them in one line, exit status 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from opt_jax.errors import InputError, MissingFileError

JSONL = ".jsonl"
DTYPES = ("float32", "bfloat16", "float16")
BOM = "\ufeff"
BOM_DROPPED = "a leading UTF-8 byte-order mark dropped"
CRLF_READ_AS_LF = "CRLF line endings read as LF"

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, tuple[str, ...]]] = set()


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: its text and where it came from ("path" or "path:LINE" for a .jsonl line)."""
  text: str
  source: str


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The documents of one file, in order. name: the file name without its extension (what tables
  call the corpus); skipped: empty or whitespace-only documents left out; notes: what was
  normalised (BOM_DROPPED, CRLF_READ_AS_LF; module docstring)."""
  path: str
  name: str
  documents: tuple[Document, ...]
  skipped: int = 0
  notes: tuple[str, ...] = ()

  @property
  def texts(self) -> tuple[str, ...]:
    return tuple(d.text for d in self.documents)


def read_text(path: str | os.PathLike, what: str = "input file") -> str:
  """The whole file decoded as UTF-8; errors name the file (and line of a bad byte)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise InputError(f"{what} {path} is a folder; expected a file")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise MissingFileError(f"{what} not found: {path}") from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise InputError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                     f"save the file as UTF-8") from None


def read_corpus(path: str | os.PathLike, what: str = "corpus") -> Corpus:
  """The documents of one file by the rule of the module docstring."""
  path = os.path.abspath(os.fspath(path))
  content = read_text(path, what)
  notes = []
  if content.startswith(BOM):
    content = content[len(BOM):]
    notes.append(BOM_DROPPED)
  if "\r\n" in content:
    notes.append(CRLF_READ_AS_LF)
    if not path.endswith(JSONL):   # .jsonl: splitlines() below drops them with the line breaks
      content = content.replace("\r\n", "\n")
  if notes and (path, tuple(notes)) not in _WARNED:   # once per file, however often it is read
    _WARNED.add((path, tuple(notes)))
    log.warning("%s: %s", path, "; ".join(notes))
  documents: list[Document] = []
  skipped = 0
  if path.endswith(JSONL):
    for i, text in jsonl_texts(path, content):
      if text.strip():
        documents.append(Document(text, f"{path}:{i}"))
      else:
        skipped += 1
  elif content.strip():
    documents.append(Document(content, path))
  if not documents:
    detail = (f"it has {skipped} document(s), all empty or whitespace" if skipped else
              "the file is empty" if not content else "it holds only whitespace")
    raise InputError(f"{what} {path} is empty: {detail}; expected "
                     + ("JSON lines with a \"text\" field" if path.endswith(JSONL)
                        else "text (any file other than .jsonl is one plain-text document)"))
  name = os.path.splitext(os.path.basename(path))[0]
  return Corpus(path, name, tuple(documents), skipped, tuple(notes))


def jsonl_texts(path: str, content: str, fields: Sequence[str] = ("text",)
                ) -> Iterator[tuple[int, str]]:
  """(line number, text) of each non-blank line of a JSON-lines file's `content`: a bare JSON
  string, or an object's string under the first of `fields` it has. Errors name the file and
  line (not valid JSON; no such string)."""
  for i, line in enumerate(content.splitlines(), 1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(item, dict):
      item = next((item[f] for f in fields if f in item), None)
    if not isinstance(item, str):
      names = " or ".join(f'"{f}"' for f in fields)
      raise InputError(f"{path}:{i}: expected a JSON string or an object with a string {names} "
                       f"field, got {line.strip()[:80]!r}")
    yield i, item


def normalisation_note(corpora: Sequence[Corpus]) -> str | None:
  """One line for a closing summary saying which files were normalised and how; None if none."""
  parts = []
  for note in (BOM_DROPPED, CRLF_READ_AS_LF):
    names = [os.path.basename(c.path) for c in corpora if note in c.notes]
    if names:
      parts.append(f"{note} ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")
  return "input normalised: " + "; ".join(parts) if parts else None


def read_corpora(paths: Sequence[str | os.PathLike], what: str = "corpus",
                 reserved: Sequence[str] = ()) -> list[Corpus]:
  """read_corpus of each path, names made unique (a.txt and dir2/a.txt -> a, a_2; a name in
  `reserved` gets a suffix too). At least one path is needed."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  if not paths:
    raise InputError(f"no {what} given: pass at least one file (.jsonl: JSON lines with a "
                     f"\"text\" field; any other file: one plain-text document)")
  out, used = [], set(reserved)
  for p in paths:
    c = read_corpus(p, what)
    name, k = c.name, 1
    while name in used:
      k += 1
      name = f"{c.name}_{k}"
    used.add(name)
    out.append(dataclasses.replace(c, name=name))
  return out


def documents(corpora: Sequence[Corpus]) -> list[Document]:
  """Every document of every corpus, in order."""
  return [d for c in corpora for d in c.documents]


def digest_texts(texts: Sequence[str]) -> str:
  """sha256 (hex) over the texts, their order and boundaries included."""
  h = hashlib.sha256()
  for t in texts:
    h.update(hashlib.sha256(t.encode()).digest())
  return h.hexdigest()


def parse_dtype(dtype: Any) -> np.dtype | None:
  """One of DTYPES ('float32' | 'bfloat16' | 'float16'), or a numpy/jax dtype -> the numpy dtype
  (bfloat16 from ml_dtypes, the object jnp.dtype gives) of parameters and compute (log-probs are
  fp32 whatever it is); None stays None (keep the stored dtype). InputError for any other name."""
  if dtype is None:
    return None
  if isinstance(dtype, str) and dtype not in DTYPES:
    raise InputError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
  return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)
