"""opt_jax/inputs.py: the one corpus reader every binary uses, and the dtype parser."""

import json

import pytest

from opt_jax import inputs
from opt_jax.errors import InputError, MissingFileError


def test_any_file_but_jsonl_is_one_plain_text_document(tmp_path):
  text = "line one\n{\"text\": \"not json here\"}\nline three\n"
  for name in ("a.txt", "notes.md", "README", "data.csv"):
    (tmp_path / name).write_text(text)
    corpus = inputs.read_corpus(tmp_path / name)
    assert corpus.texts == (text,) and corpus.skipped == 0
    assert corpus.documents[0].source == str(tmp_path / name)
  assert inputs.read_corpus(tmp_path / "notes.md").name == "notes"


def test_jsonl_lines_are_documents_and_empty_ones_are_skipped(tmp_path):
  path = tmp_path / "web.jsonl"
  path.write_text("\n".join([json.dumps({"text": "first", "id": 1}), "", json.dumps("bare"),
                             json.dumps({"text": "  \n"}), json.dumps({"text": "last"})]) + "\n")
  corpus = inputs.read_corpus(path)
  assert corpus.texts == ("first", "bare", "last") and corpus.skipped == 1
  assert [d.source for d in corpus.documents] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_malformed_lines_name_the_file_and_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
  with pytest.raises(InputError, match=r"bad.jsonl:2: expected a JSON string or an object"):
    inputs.read_corpus(bad)
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"text": "a"}\n\n{"text": \n')
  with pytest.raises(InputError, match=r"broken.jsonl:3: not valid JSON"):
    inputs.read_corpus(broken)


def test_non_utf8_names_file_line_and_byte(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("first line\nsecond line\ncaf\xe9 au lait\n".encode("latin-1"))
  with pytest.raises(InputError, match=r"latin1.txt:3: not UTF-8 \(byte 0xe9 at column 4\)"):
    inputs.read_corpus(path)
  (tmp_path / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
  with pytest.raises(InputError, match=r"x.jsonl:2: not UTF-8 \(byte 0xff"):
    inputs.read_corpus(tmp_path / "x.jsonl")


def test_empty_inputs_say_they_are_empty(tmp_path):
  (tmp_path / "zero.txt").write_text("")
  with pytest.raises(InputError, match=r"zero.txt is empty: the file is empty"):
    inputs.read_corpus(tmp_path / "zero.txt")
  (tmp_path / "blank.txt").write_text("  \n\n")
  with pytest.raises(InputError, match=r"blank.txt is empty: it holds only whitespace"):
    inputs.read_corpus(tmp_path / "blank.txt")
  (tmp_path / "e.jsonl").write_text('{"text": ""}\n"  "\n')
  with pytest.raises(InputError, match=r"e.jsonl is empty: it has 2 document\(s\), all empty"):
    inputs.read_corpus(tmp_path / "e.jsonl")
  with pytest.raises(InputError, match="no corpus given"):
    inputs.read_corpora([])


def test_missing_file_or_folder_is_named(tmp_path):
  with pytest.raises(MissingFileError, match=r"corpus not found: .*absent.txt"):
    inputs.read_corpus(tmp_path / "absent.txt")
  with pytest.raises(InputError, match=r"is a folder; expected a file"):
    inputs.read_corpus(tmp_path)


def test_corpus_names_are_made_unique(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "all.txt").write_text("x")
  (tmp_path / "all.txt").write_text("y")
  got = inputs.read_corpora([tmp_path / "d" / "all.txt", tmp_path / "all.txt"], reserved=("all",))
  assert [c.name for c in got] == ["all_2", "all_3"]


def test_parse_dtype():
  import jax.numpy as jnp
  assert inputs.parse_dtype("bfloat16") == jnp.bfloat16
  with pytest.raises(InputError, match="dtype 'fp8': expected one of float32, bfloat16, float16"):
    inputs.parse_dtype("fp8")
