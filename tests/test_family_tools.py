"""tools/convert_checkpoint.py and tools/score_text.py on an HF directory of every non-OPT family
(GPT-NeoX, Llama, OLMo, OLMo-2): the directory HF's save_pretrained writes, plus a tokenizer.json
with the family's special tokens; score_text's log-probs equal HF's under both conventions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import _suite_util as U
import oracle
from opt_jax import families
from tools import convert_checkpoint, score_text

WINDOW = 32
TEXT = " ".join(U.CORPUS[:4])            # ~3 windows of 32 tokens
_SHAPE = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64)
# (config, the tokenizer's special tokens from id 0): the released tokenizers' special tokens and
# ids in their order; vocabularies padded beyond the tokenizer's 300 ids.
CASES = {
    "gpt_neox": (families.get("gpt_neox").config(**_SHAPE, rotary_pct=0.25, bos_token_id=0,
                                                 eos_token_id=0),
                 U.PYTHIA_SPECIALS),
    "llama": (families.get("llama").config(**_SHAPE, num_key_value_heads=2, bos_token_id=1,
                                           eos_token_id=2),
              ("<unk>", "<s>", "</s>")),
    "olmo": (families.get("olmo").config(**_SHAPE, clip_qkv=0.5, bos_token_id=None,
                                         eos_token_id=0, pad_token_id=1),
             ("<|endoftext|>", "<|padding|>")),
    "olmo2": (families.get("olmo2").config(**_SHAPE, num_key_value_heads=2, bos_token_id=None,
                                           eos_token_id=0, pad_token_id=1),
              ("<|endoftext|>", "<|padding|>")),
}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  with U.persistent_compilation_cache(str(tmp_path_factory.mktemp("jax_cache"))):
    yield




@pytest.mark.parametrize("family", sorted(CASES))
def test_convert_then_score_text_equals_hf(family, tmp_path):
  config, specials = CASES[family]
  hf = oracle.hf_model(config, seed=7)
  hf_dir = tmp_path / "hf"
  hf.save_pretrained(hf_dir)
  tok_file = U.train_tokenizer(str(tmp_path / "tok"), specials, U.PYTHIA_TOKENIZER_SIZE)
  shutil.copy(tok_file, hf_dir / "tokenizer.json")
  jax_dir = tmp_path / "jax"
  convert_checkpoint.run(convert_checkpoint.Settings(input=str(hf_dir), output=str(jax_dir)))
  assert json.loads((jax_dir / "config.json").read_text())["model_type"] == family
  (tmp_path / "in.txt").write_text(TEXT)
  ids = transformers.PreTrainedTokenizerFast(tokenizer_file=tok_file).encode(
      TEXT, add_special_tokens=False)
  assert len(ids) > 2 * WINDOW
  # native: Llama's <s> first, nothing for the others (then the text's first token is context
  # only); lm_eval: HFLM's prefix token (bos, else eos) before the text, every token scored.
  bos, eos = config.bos_token_id, config.eos_token_id
  native = ([bos] if family == "llama" else []) + ids
  lm_eval = [bos if bos is not None else eos] + ids
  for conventions, tokens in (("native", native), ("lm_eval", lm_eval)):
    out = tmp_path / f"{conventions}.jsonl"
    summary = score_text.run(score_text.Settings(
        checkpoint=str(jax_dir), input=str(tmp_path / "in.txt"), output=str(out),
        context_length=WINDOW, batch_size=2, conventions=conventions))
    record = json.loads(out.read_text())
    assert record["token_ids"] == tokens[1:], conventions
    np.testing.assert_allclose(record["logprobs"], oracle.hf_rolling(hf, tokens, WINDOW), atol=1e-4,
                               rtol=0, err_msg=f"{family} {conventions}")
    assert f"{len(tokens) - 1:,} tokens" in summary.render()
