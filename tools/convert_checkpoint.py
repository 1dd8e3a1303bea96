r"""Converts checkpoints of every supported family (OPT, GPT-NeoX, Llama, OLMo, OLMo-2) between HF
and opt_jax formats, and OPT's metaseq checkpoints to either.

  # HF (safetensors / sharded / pytorch_model.bin) or metaseq (.pt, model parts) -> opt_jax
  python -m tools.convert_checkpoint --input=/ckpts/opt-125m --output=/ckpts/opt-125m-jax
  python -m tools.convert_checkpoint --input=/ckpts/175b/reshard-model_part-0.pt \
      --format=metaseq --output=/ckpts/opt-175b-jax --dtype=bfloat16
  # any input -> HF safetensors (cross-check in PyTorch with AutoModelForCausalLM.from_pretrained)
  python -m tools.convert_checkpoint --input=/ckpts/opt-125m-jax --to=hf --output=/tmp/opt-125m-hf

--format names the input (auto: detected from the files), --to the output. The output directory
is written under a temporary name and renamed when complete: a failed run leaves nothing behind.
Tokenizer files beside the input (tokenizer.json, vocab.json + merges.txt, ...; for metaseq
gpt2-vocab.json + gpt2-merges.txt + dict.txt) are stored with the output.
"""

import sys

from absl import app, flags, logging

from opt_jax import convert

_INPUT = flags.DEFINE_string("input", None, "Checkpoint to convert: a directory or a weights file.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (must not exist unless "
                              "--overwrite).", required=True)
_FORMAT = flags.DEFINE_enum("format", "auto", convert.INPUT_FORMATS,
                            "Input format: hf (config.json + safetensors/.bin), metaseq (.pt "
                            "consolidated or *model_part-N.pt), opt_jax, or auto (detect).")
_TO = flags.DEFINE_enum("to", "opt_jax", convert.OUTPUT_FORMATS,
                        "Output format: opt_jax (orbax params + config.json + tokenizer) or hf "
                        "(config.json + model.safetensors for OPTForCausalLM.from_pretrained).")
_DTYPE = flags.DEFINE_enum("dtype", None, convert.DTYPES,
                           "Cast parameters to this dtype (default: keep the stored dtype).")
_CONFIG = flags.DEFINE_string("config", None, "metaseq only: HF-style config.json to use instead "
                              "of inferring the config from tensor shapes and the stored args.")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "--to=hf only: largest safetensors shard.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every array at INFO
  try:
    out = convert.convert(_INPUT.value, _OUTPUT.value, input_format=_FORMAT.value,
                          output_format=_TO.value, dtype=_DTYPE.value, config_path=_CONFIG.value,
                          overwrite=_OVERWRITE.value, progress=True,
                          max_shard_bytes=int(_MAX_SHARD_GB.value * 1e9))
  except (convert.ConversionError, FileExistsError, FileNotFoundError) as e:
    # Bad input: the message names the file and tensor; a traceback would only bury it.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
