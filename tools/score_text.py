r"""Per-token log-probabilities of text under a checkpoint (opt_jax or HF), in sliding windows.

  python -m tools.score_text --checkpoint=/ckpts/opt-125m-jax --input=wiki.txt \
      --output=/tmp/wiki_scores.jsonl --context_length=2048 --stride=1024

--input: a .jsonl file (JSON lines with a "text" field: one document per line) or any other file
(one plain-text document), UTF-8. The output JSONL has, per document, the token ids, token
strings and natural-log log-probs of every token after the first (the family's prefix, e.g.
OPT's </s>, under --conventions=native; see opt_jax.scoring.score_text_file); the totals are in
the closing summary. The output location, the input and the windows are checked before the
checkpoint is restored. The output is never the input, never inside the checkpoint folder (or any
other checkpoint's), and an existing file is replaced only with --overwrite and only when it is an
earlier output of score_text. A leading UTF-8 BOM of the input is dropped and CRLF read as LF
(opt_jax.inputs); the closing summary says so.
"""

from __future__ import annotations

import dataclasses
import json
import os

from typing import Any

from opt_jax import cli, files, inputs
from opt_jax.checkpoints import layout
from opt_jax.errors import OutputExistsError

# What opt_jax.scoring.score_text_file's messages call its arguments: this tool's flags.
FLAGS = {"input_path": "--input", "output_path": "--output", "context_length": "--context_length",
         "stride": "--stride", "batch_size": "--batch_size"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  checkpoint: str = cli.option(help="opt_jax or HF (safetensors) checkpoint directory, with "
                               "tokenizer files.")
  input: str = cli.option(help=".jsonl (JSON lines with a \"text\" field) or any other text file "
                          "(one document).")
  output: str = cli.option(help="Output .jsonl (written atomically; a new file, or with "
                           "--overwrite an earlier output of score_text).", key=False)
  overwrite: bool = cli.option(False, "Replace --output if it is an earlier output of score_text "
                               "(any other existing file is refused).", key=False)
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


def is_output(path: str) -> bool:
  """True when `path` reads as a score_text output: its first line a JSON object with the
  fields score_text writes."""
  try:
    with open(path, "rb") as f:
      first = json.loads(f.readline(64 << 20))
  except (OSError, ValueError):
    return False
  return isinstance(first, dict) and {"doc", "token_ids", "logprobs"} <= set(first)


def check_output(s: Settings) -> str:
  """--output checked before any work (module docstring); its absolute path."""
  out = files.check_new_output(s.output, what="--output", owner="tools.score_text",
                               inputs={"--input": s.input, "--checkpoint": s.checkpoint},
                               overwrite=s.overwrite, ours=is_output)
  inside = layout.enclosing_checkpoint(out)
  if inside:
    raise OutputExistsError(f"refusing to write: --output={out} lies inside the checkpoint "
                            f"folder {inside}; write the output elsewhere")
  return out


def score_text_file(checkpoint_dir: str, input_path: str, output_path: str,
                    **options: Any) -> dict[str, Any]:
  """opt_jax.scoring.score_text_file (same arguments and result) with this tool's flags named in
  its messages."""
  from opt_jax import scoring  # pylint: disable=import-outside-toplevel  (--help stays fast)
  return scoring.score_text_file(checkpoint_dir, input_path, output_path, names=FLAGS, **options)


def run(s: Settings) -> cli.Summary:
  check_output(s)
  note = inputs.normalisation_note([inputs.read_corpus(s.input, FLAGS["input_path"])])
  r = score_text_file(s.checkpoint, s.input, s.output, context_length=s.context_length,
                      stride=s.stride, batch_size=s.batch_size, dtype=s.dtype,
                      attention=s.attention, conventions=s.conventions)
  return cli.Summary(
      "score_text", evaluated=[f"{r['documents']} document(s) of {s.input}, {r['num_tokens']:,} "
                               f"tokens, with {s.checkpoint}", *([note] if note else [])],
      results=[f"total NLL {r['nll']:.4f} nats, {r['nll'] / max(r['num_tokens'], 1):.4f} nats per "
               f"token, perplexity {r['perplexity']:.4f}"],
      skipped=[f"{r['skipped']} empty document(s)"] if r["skipped"] else [],
      out_dir=None, files=[os.path.abspath(s.output)])


if __name__ == "__main__":
  cli.main(Settings, run)
