import json
import os

import pytest
import tokenizers
import transformers

import _suite_util as U
from opt_jax import families
from opt_jax import tokenizer as T

OPT = families.get("opt")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Language models learn across scales; perplexity predicts behaviour.",
    "In-context learning emerges with training, 123 456 7890!",
    "Héllo wörld — unicode, tabs\tand\nnewlines.",
] * 20

TEXTS = ["Hello world", " Hello world", "The lazy fox, 42 times.", "", "  two spaces",
         "unseen wörds ☃ and emoji 🙂", "a</s>b <pad> c"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  # A small byte-level BPE with OPT's special ids <s>=0, <pad>=1, </s>=2, <unk>=3.
  json_dir = tmp_path_factory.mktemp("tokjson")
  tok = tokenizers.Tokenizer.from_file(
      U.train_tokenizer(str(json_dir), OPT.special_tokens, vocab_size=400, texts=CORPUS))
  pair_dir = tmp_path_factory.mktemp("tokpair")
  tok.model.save(str(pair_dir))                     # vocab.json + merges.txt
  return json_dir, pair_dir


def _hf_opt_tokenizer(pair_dir):
  # OPT's released tokenizer_config: GPT2Tokenizer, </s> as bos/eos/unk, <pad>, bos added.
  return transformers.GPT2Tokenizer(vocab=str(pair_dir / "vocab.json"),
                                    merges=str(pair_dir / "merges.txt"), bos_token="</s>",
                                    eos_token="</s>", unk_token="</s>", pad_token="<pad>",
                                    add_bos_token=True)


def test_special_ids_follow_opt(dirs):
  for d in dirs:
    tok = T.load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 2, 1)
    assert tok.encode("Hello world")[0] == 2
    assert tok.encode("Hello world", add_bos=False) == tok.encode("Hello world")[1:]
    assert tok.encode("") == [2]


def test_vocab_merges_ids_equal_hf_gpt2_tokenizer(dirs):
  _, pair_dir = dirs
  tok = T.load_tokenizer(pair_dir)
  hf = _hf_opt_tokenizer(pair_dir)
  for text in TEXTS:
    want = hf(text)["input_ids"]
    assert tok.encode(text) == want, text
    assert tok.decode(want) == hf.decode(want, skip_special_tokens=True), text


def test_tokenizer_json_and_vocab_pair_agree(dirs):
  json_dir, pair_dir = dirs
  a, b = T.load_tokenizer(json_dir), T.load_tokenizer(pair_dir)
  assert a.vocab_size == b.vocab_size == 400
  for text in TEXTS:
    assert a.encode(text) == b.encode(text), text
  assert a.encode_batch(TEXTS) == [a.encode(t) for t in TEXTS]


def test_post_processor_in_tokenizer_json_does_not_double_bos(dirs, tmp_path):
  json_dir, _ = dirs
  tok = tokenizers.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="</s> $A", special_tokens=[("</s>", 2)])
  tok.save(str(tmp_path / "tokenizer.json"))
  assert T.load_tokenizer(tmp_path).encode("Hello") == T.load_tokenizer(json_dir).encode("Hello")


def test_decode_round_trip_and_token_strings(dirs):
  tok = T.load_tokenizer(dirs[0])
  for text in TEXTS[:6]:
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode("Hello world")
  pieces = tok.tokens(ids)
  assert pieces[0] == "</s>" and "".join(pieces[1:]) == "Hello world"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.tokens([10_000])


def test_fingerprint_tracks_mapping(dirs, tmp_path):
  json_dir, pair_dir = dirs
  a = T.load_tokenizer(json_dir)
  assert a.fingerprint() == T.load_tokenizer(json_dir).fingerprint()
  # Swap two merges: a different text -> ids map must get a different fingerprint.
  spec = json.loads((json_dir / "tokenizer.json").read_text())
  merges = spec["model"]["merges"]
  merges[0], merges[-1] = merges[-1], merges[0]
  (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
  assert T.load_tokenizer(tmp_path).fingerprint() != a.fingerprint()


def test_missing_files_error_names_directory_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*tokenizer\.json.*vocab\.json.*"
                     r"merges\.txt"):
    T.load_tokenizer(tmp_path)
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*found only vocab.json"):
    T.load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json: not a valid"):
    T.load_tokenizer(tmp_path)
