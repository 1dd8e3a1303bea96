"""Text conventions: each family's native one, and lm_eval, which must reproduce
lm-evaluation-harness HFLM's defaults (lm_eval 0.4.9, add_bos_token=False).

The lm_eval oracle below builds token sequences by HFLM's documented rules with an HF
tokenizer (transformers' PreTrainedTokenizerFast over the same tokenizer file) and scores them
with the HF PyTorch model:
  * loglikelihood: an empty context is [prefix_token_id] (the tokenizer's bos, else eos) and the
    continuation is encode(continuation); otherwise trailing spaces of the context move to the
    continuation, whole = encode(context + continuation), context = encode(context),
    continuation = whole[len(context):]; encode() adds no special tokens; the model sees the last
    max_length tokens of (context + continuation)[:-1].
  * loglikelihood_rolling: get_rolling_token_windows(encode(text), prefix_token_id, max_length,
    context_len=1) + make_disjoint_window: every token of the text scored once, in windows of
    max_length predictions, the first conditioned on the prefix token.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import _suite_util as U
from opt_jax import families
from opt_jax.checkpoints import orbax_format
from opt_jax import scoring as S
from opt_jax import tokenizer as T
import oracle

MAX_LEN = 32
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3,
         "Perplexity predicts behaviour better than size; 123 456 7890!",
         "Hello"]
CORPUS = ["The quick brown fox jumps over the lazy dog.",
          "Language models learn across scales; perplexity predicts behaviour.",
          "In-context learning emerges with training, 123 456 7890!"] * 20

# One model per convention kind: OPT (native prepends </s>, its bos), Pythia (bos = eos =
# <|endoftext|>, nothing prepended; the model's 320 rows exceed the tokenizer's 300 ids), Llama
# (native prepends <s>; lm_eval's prefix token is <s> too).
_SHAPE = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=MAX_LEN)
CASES = {
    "opt": (families.get("opt").config(**_SHAPE, ffn_dim=64), ("<s>", "<pad>", "</s>", "<unk>")),
    "gpt_neox": (families.get("gpt_neox").config(**_SHAPE, intermediate_size=64, bos_token_id=0,
                                                 eos_token_id=0),
                 ("<|endoftext|>", "<|padding|>")),
    "llama": (families.get("llama").config(**_SHAPE, intermediate_size=64,
                                           num_key_value_heads=2),
              ("<unk>", "<s>", "</s>")),
}


def _tokenizer_dir(tmp_path, specials):
  U.train_tokenizer(str(tmp_path), specials, vocab_size=300, texts=CORPUS)
  return tmp_path


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  config, specials = CASES[request.param]
  d = _tokenizer_dir(tmp_path_factory.mktemp(request.param), specials)
  hf = oracle.hf_model(config, seed=4)
  params = oracle.params_from_hf_model(hf, config)
  family = families.get(config.family)
  # The released tokenizers' special tokens (tokenizer_config.json), as HFLM sees them.
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"),
                                                bos_token=family.bos_token,
                                                eos_token=family.eos_token)
  # One compiled program ([4, MAX_LEN]) serves both request kinds; the Scorer switches the
  # native tokenizer it is given to the lm_eval convention.
  scorer = S.Scorer(config, params, tokenizer=T.load_tokenizer(d, config=config),
                    conventions="lm_eval", batch_size=4, min_bucket=MAX_LEN, share_prefix=False)
  return request.param, config, d, hf, params, hf_tok, scorer


def _lm_eval_pair(hf_tok, context, continuation):
  prefix = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.eos_token_id
  enc = lambda s: hf_tok.encode(s, add_special_tokens=False)
  if context == "":
    return [prefix], enc(continuation)
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole, ctx = enc(context + continuation), enc(context)
  return ctx, whole[len(ctx):]




def _hf_sum(hf, ctx, cont):
  whole = (ctx + cont)[-(MAX_LEN + 1):]
  with torch.no_grad():
    logits = hf(torch.tensor([whole[:-1]])).logits[0].double()
  lp = torch.log_softmax(logits, -1).numpy()[-len(cont):]
  return float(lp[np.arange(len(cont)), cont].sum())


REQUESTS = [("", "Hello"), ("The quick brown", " fox"), ("The quick brown ", "fox jumps"),
            ("Language models learn across scales; perplexity predicts behaviour. " * 4,
             " In-context"), ("123", " 456 7890!")]


def test_lm_eval_loglikelihood_matches_hflm_rules_scored_by_hf(case):
  name, config, d, hf, params, hf_tok, scorer = case
  got = scorer.loglikelihood(REQUESTS)
  want = [_hf_sum(hf, *_lm_eval_pair(hf_tok, c, x)) for c, x in REQUESTS]
  assert len(_lm_eval_pair(hf_tok, *REQUESTS[3])[0]) > MAX_LEN     # truncated on the left
  np.testing.assert_allclose([s for s, _ in got], want, atol=1e-4, rtol=0, err_msg=name)


def test_lm_eval_rolling_matches_hflm_windows_scored_by_hf(case):
  name, config, d, hf, params, hf_tok, scorer = case
  assert scorer.tokenizer.conventions == "lm_eval"
  got = scorer.loglikelihood_rolling(TEXTS)
  prefix = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.eos_token_id
  for text, lp in zip(TEXTS, got):
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert len(lp) == len(ids)                                         # every token, once
    np.testing.assert_allclose(lp, oracle.hf_rolling(hf, [prefix] + ids, MAX_LEN), atol=1e-4,
                               rtol=0,
                               err_msg=name)
  assert len(hf_tok.encode(TEXTS[0], add_special_tokens=False)) > 2 * MAX_LEN   # 3+ windows


def test_native_conventions_of_each_family(case):
  name, config, d, _, _, hf_tok, _ = case
  native, lm = T.load_tokenizer(d, config=config), T.load_tokenizer(d, config=config,
                                                                    conventions="lm_eval")
  plain = hf_tok.encode("Hello world", add_special_tokens=False)
  want_prefix = {"opt": [2], "gpt_neox": [], "llama": [1]}[name]
  assert native.encode("Hello world") == want_prefix + plain
  assert lm.encode("Hello world") == plain
  assert lm.start_id == {"opt": 2, "gpt_neox": 0, "llama": 1}[name]
  assert native.start_id == {"opt": 2, "gpt_neox": 0, "llama": 1}[name]
  # Rolling documents: native keeps the prefix (with none, the first token is context only);
  # lm_eval puts the prefix token before the text.
  assert native.encode_documents(["Hello world"]) == [want_prefix + plain]
  assert lm.encode_documents(["Hello world"]) == [[lm.start_id] + plain]
  assert native.fingerprint() != lm.fingerprint()


@pytest.mark.parametrize("case", ["gpt_neox"], indirect=True)   # one end-to-end run is enough
def test_score_text_file_with_lm_eval_convention(case, tmp_path):
  name, config, d, hf, params, hf_tok, _ = case
  ckpt = tmp_path / "ckpt"
  orbax_format.save(ckpt, params, config, tokenizer_files=[d / "tokenizer.json"])
  (tmp_path / "in.txt").write_text(TEXTS[1])
  out = tmp_path / "out.jsonl"
  totals = S.score_text_file(str(ckpt), str(tmp_path / "in.txt"), str(out), batch_size=2,
                             conventions="lm_eval", progress=False)
  record = json.loads(out.read_text())
  ids = hf_tok.encode(TEXTS[1], add_special_tokens=False)
  assert record["token_ids"] == ids and totals["num_tokens"] == len(ids)
  np.testing.assert_allclose(record["logprobs"], oracle.hf_rolling(hf, [0] + ids, MAX_LEN),
                             atol=1e-4)


def test_bad_convention_is_named(tmp_path):
  d = _tokenizer_dir(tmp_path, ("<s>", "<pad>", "</s>", "<unk>"))
  with pytest.raises(ValueError, match="conventions='harness'.*native.*lm_eval"):
    T.load_tokenizer(d, conventions="harness")
