r"""Converts checkpoints of every supported family (OPT, GPT-NeoX, Llama, OLMo, OLMo-2) between HF
and opt_jax formats, and OPT's metaseq checkpoints to either.

  # HF (safetensors / sharded / pytorch_model.bin) or metaseq (.pt, model parts) -> opt_jax
  python -m tools.convert_checkpoint --input=/ckpts/opt-125m --output=/ckpts/opt-125m-jax
  python -m tools.convert_checkpoint --input=/ckpts/175b/reshard-model_part-0.pt \
      --format=metaseq --output=/ckpts/opt-175b-jax --dtype=bfloat16
  # any input -> HF safetensors (cross-check in PyTorch with AutoModelForCausalLM.from_pretrained)
  python -m tools.convert_checkpoint --input=/ckpts/opt-125m-jax --to=hf --output=/tmp/opt-125m-hf

--format names the input (auto: detected from the files), --to the output. The output directory
is written under a temporary name and renamed when complete: a failed run leaves nothing behind
(a full disk is one error line saying how much space the output needs). The output is never the
input (also through a link), never inside or around it, never inside any checkpoint folder.
Tokenizer files beside the input (tokenizer.json, vocab.json + merges.txt, ...; for metaseq
gpt2-vocab.json + gpt2-merges.txt + dict.txt) are stored with the output.
"""

from __future__ import annotations

import dataclasses
import os

from opt_jax import cli, convert
from opt_jax.errors import MissingFileError, OutputExistsError, UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  input: str = cli.option(help="Checkpoint to convert: a directory or a weights file.")
  output: str = cli.option(help="Output directory (must not exist unless --overwrite).")
  format: str = cli.option("auto", "Input format: hf (config.json + safetensors/.bin), metaseq "
                           "(.pt consolidated or *model_part-N.pt), opt_jax, or auto (detect).",
                           choices=convert.INPUT_FORMATS)
  to: str = cli.option("opt_jax", "Output format: opt_jax (orbax params + config.json + "
                       "tokenizer) or hf (config.json + model.safetensors for "
                       "OPTForCausalLM.from_pretrained).", choices=convert.OUTPUT_FORMATS)
  dtype: str | None = cli.option(None, "Cast parameters to this dtype (default: keep the stored "
                                 "dtype).", choices=convert.DTYPES)
  config: str | None = cli.option(None, "metaseq only: HF-style config.json to use instead of "
                                  "inferring the config from tensor shapes and the stored args.")
  max_shard_gb: float = cli.option(5.0, "--to=hf only: largest safetensors shard.", gt=0)
  overwrite: bool = cli.option(False, "Replace --output if it is an earlier output of the same "
                               "kind (an opt_jax checkpoint, or with --to=hf an HF safetensors "
                               "folder) with nothing else in it; any other existing --output (a "
                               "folder holding the input, other files) is refused before the "
                               "input is read.")


def run(s: Settings) -> cli.Summary:
  try:
    out = convert.convert(s.input, s.output, input_format=s.format, output_format=s.to,
                          dtype=s.dtype, config_path=s.config, overwrite=s.overwrite,
                          progress=True, max_shard_bytes=int(s.max_shard_gb * 1e9))
  except UserError:   # ConversionError included: it names the file and tensor at fault
    raise
  except FileExistsError as e:
    raise OutputExistsError(str(e)) from None
  except FileNotFoundError as e:   # the message names the missing input
    raise MissingFileError(str(e)) from None
  cast = f", cast to {s.dtype}" if s.dtype else ""
  return cli.Summary("convert_checkpoint", evaluated=[f"{s.input} ({s.format}) -> {s.to}{cast}"],
                     files=[os.path.abspath(out)])


if __name__ == "__main__":
  cli.main(Settings, run)
