r"""Per-token log-probabilities of text under a checkpoint (opt_jax or HF), in sliding windows.

  python -m tools.score_text --checkpoint=/ckpts/opt-125m-jax --input=wiki.txt \
      --output=/tmp/wiki_scores.jsonl --context_length=2048 --stride=1024

--input: a .jsonl file (JSON lines with a "text" field: one document per line) or any other file
(one plain-text document), UTF-8. The output JSONL has, per document, the token ids, token
strings and natural-log log-probs of every token after the first (the family's prefix, e.g.
OPT's </s>, under --conventions=native; see opt_jax.scoring.score_text_file); the totals are in
the closing summary. The output location, the input and the windows are checked before the
checkpoint is restored.
"""

from __future__ import annotations

import dataclasses
import os

from opt_jax import cli, inputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  checkpoint: str = cli.option(help="opt_jax or HF (safetensors) checkpoint directory, with "
                               "tokenizer files.")
  input: str = cli.option(help=".jsonl (JSON lines with a \"text\" field) or any other text file "
                          "(one document).")
  output: str = cli.option(help="Output .jsonl (written atomically).")
  context_length: int | None = cli.option(None, "Tokens per window (default: the model's "
                                          "max_position_embeddings).", ge=2)
  stride: int | None = cli.option(None, "New tokens scored per window after the first (default: "
                                  "context_length, i.e. disjoint windows).", ge=1)
  batch_size: int = cli.option(8, "Windows per forward pass.", ge=1)
  dtype: str = cli.option("float32", "Compute and parameter dtype (log-probs are fp32 "
                          "regardless).", choices=inputs.DTYPES)
  attention: str = cli.option("auto", "Attention implementation (auto: blocked on CPU, cudnn on "
                              "GPU).", choices=("auto", "xla", "blocked", "cudnn"))
  conventions: str = cli.option("native", "Text conventions: native (the family's own prefix, "
                                "e.g. OPT's </s>, Llama's <s>, none for Pythia/OLMo) or lm_eval "
                                "(lm-evaluation-harness HFLM's defaults).",
                                choices=("native", "lm_eval"))


def run(s: Settings) -> cli.Summary:
  from opt_jax import scoring  # pylint: disable=import-outside-toplevel
  r = scoring.score_text_file(s.checkpoint, s.input, s.output, context_length=s.context_length,
                              stride=s.stride, batch_size=s.batch_size, dtype=s.dtype,
                              attention=s.attention, conventions=s.conventions)
  return cli.Summary(
      "score_text", evaluated=[f"{r['documents']} document(s) of {s.input}, {r['num_tokens']:,} "
                               f"tokens, with {s.checkpoint}"],
      results=[f"total NLL {r['nll']:.4f} nats, {r['nll'] / max(r['num_tokens'], 1):.4f} nats per "
               f"token, perplexity {r['perplexity']:.4f}"],
      skipped=[f"{r['skipped']} empty document(s)"] if r["skipped"] else [],
      out_dir=None, files=[os.path.abspath(s.output)])


if __name__ == "__main__":
  cli.main(Settings, run)
