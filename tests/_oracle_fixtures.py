"""Fixtures shared by the parity tests: a tiny model of every oracle.TINY config with its HF
PyTorch twin (random init, seed 1). Import the fixture into a test module by name:

  from _oracle_fixtures import pair  # noqa: F401  (a pytest fixture)

`twin(config, seed)` builds one such (config, HF model, params) triple for other fixtures.
"""

from __future__ import annotations

import pytest

import oracle


def twin(config, seed: int = 1):
  """(config, HF model of `config` with random init `seed`, opt_jax params of the same weights)."""
  hf = oracle.hf_model(config, seed=seed)
  return config, hf, oracle.params_from_hf_model(hf, config)


@pytest.fixture(scope="module", params=sorted(oracle.TINY))
def pair(request):
  """(config, HF model, opt_jax params of the same weights), for each config of oracle.TINY."""
  return twin(oracle.TINY[request.param])
