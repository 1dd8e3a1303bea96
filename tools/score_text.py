r"""Per-token log-probabilities of text under an opt_jax checkpoint, in sliding windows.

  python -m tools.score_text --checkpoint=/ckpts/opt-125m-jax --input=wiki.txt \
      --output=/tmp/wiki_scores.jsonl --context_length=2048 --stride=1024

--input: a .txt file (one document) or a .jsonl file with a "text" field per line. The output
JSONL has, per document, the token ids, token strings and natural-log log-probs of every token
after the first (the family's prefix, e.g. OPT's </s>; see opt_jax.scoring.score_text_file); totals
are printed at the end.
"""

import sys

from absl import app, flags

from opt_jax import scoring

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "opt_jax checkpoint directory (with "
                                  "tokenizer files).", required=True)
_INPUT = flags.DEFINE_string("input", None, ".txt or .jsonl (\"text\" field) file.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output .jsonl (written atomically).", required=True)
_CONTEXT = flags.DEFINE_integer("context_length", None, "Tokens per window (default: the model's "
                                "max_position_embeddings).")
_STRIDE = flags.DEFINE_integer("stride", None, "New tokens scored per window after the first "
                               "(default: context_length, i.e. disjoint windows).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Compute and parameter dtype (log-probs are fp32 regardless).")
_ATTENTION = flags.DEFINE_enum("attention", "auto", ["auto", "xla", "blocked", "cudnn"],
                               "Attention implementation (auto: blocked on CPU, cudnn on GPU).")


def main(argv):
  del argv
  try:
    s = scoring.score_text_file(_CHECKPOINT.value, _INPUT.value, _OUTPUT.value,
                                context_length=_CONTEXT.value, stride=_STRIDE.value,
                                batch_size=_BATCH.value, dtype=_DTYPE.value,
                                attention=_ATTENTION.value)
  except (FileNotFoundError, ValueError) as e:
    # Bad input: the message names the file (and line); a traceback would only bury it.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"documents {s['documents']}  tokens {s['num_tokens']}  total NLL {s['nll']:.4f} nats  "
        f"perplexity {s['perplexity']:.4f}")
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
