"""A tiny binary for tests/test_cli.py: what every binary's terminal does (opt_jax.cli.main).

  python tests/_cli_child.py --mode=cache [--compilation_cache=DIR]   jit one function; print the
                                                                      persistent cache's hits
  python tests/_cli_child.py --mode=logs [--verbosity=0]              library logs inside a bar
  python tests/_cli_child.py --mode=bug                               an unexpected exception
  python tests/_cli_child.py --mode=interrupt                         Ctrl-C
"""

from __future__ import annotations

import dataclasses
import logging

from opt_jax import cli


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  mode: str = cli.option(help="What to do.", choices=("cache", "logs", "bug",
                                                                   "interrupt"))


def run(s: Settings) -> cli.Summary:
  if s.mode == "bug":
    raise RuntimeError("a bug, not a user error")
  if s.mode == "interrupt":
    raise KeyboardInterrupt
  if s.mode == "logs":
    from absl import logging as absl_logging
    from tqdm import tqdm
    for i in tqdm(range(3), desc="bar", ncols=60):
      absl_logging.info("absl info %d", i)
      logging.getLogger("orbax.checkpoint").info("orbax info %d", i)
      if i == 1:
        absl_logging.warning("a warning the user must see")
    return cli.Summary("logs")
  import jax
  import jax.numpy as jnp
  from jax._src import monitoring
  events = []
  monitoring.register_event_listener(lambda name, **kw: events.append(name))
  jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()
  hits = events.count("/jax/compilation_cache/cache_hits")
  misses = events.count("/jax/compilation_cache/cache_misses")
  return cli.Summary("cache", results=[f"hits={hits} misses={misses}"])


if __name__ == "__main__":
  cli.main(Settings, run)
