"""The checkpoint layer: every format opt_jax reads, chosen once by kind.

  checkpoint       the entry point: `restore`, `load_config`, `param_metadata`, `stored_dtype`,
                   `load_metadata`, `checkpoint_problem` (the one cheap "can opt_jax read this
                   directory" test) and `identity`; picks the format of a directory once
                   (`layout.checkpoint_kind`) and hands the call to it
  layout           file names of both formats, `checkpoint_kind`, `enclosing_checkpoint` (pure
                   Python: no JAX)
  orbax_format     opt_jax's own checkpoints: orbax params + config.json + opt_jax.json; `save`
  hf_format        HF safetensors folders (e.g. HF-cache snapshots) restored in place onto the mesh
  hf_tensors       named tensors of HF weight files matched to the family's table
                   (`match_tensors`, `check_tied_head`), shared with conversion
  safetensors_io   the one safetensors reader (headers, byte ranges, slices)

Conversion (opt_jax.convert) builds on this layer; nothing here imports it. This file imports
nothing, so the pure-Python modules (layout, safetensors_io) stay light for the HF-cache scan
(opt_jax.hf_cache, opt_jax.integrity), which never imports JAX.
"""
