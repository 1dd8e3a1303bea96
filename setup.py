"""opt_jax: a JAX evaluation engine for training trajectories of language models across scales."""

from setuptools import find_packages, setup

# Versions tested together; requirements.txt pins the whole environment (`make test` uses it).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "transformers==5.24.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "scipy==1.17.1",
    "pandas==3.1.1",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "psutil==7.2.2",
]

EXTRAS = {
    # PyTorch reads .bin / metaseq .pt checkpoints and is the oracle of the tests. The CPU build
    # 2.13.0 is what the package index of our CI machines serves; any 2.x reads the files.
    "torch": ["torch==2.13.0"],
    "test": ["torch==2.13.0", "pytest==9.2.0", "pytest-xdist==3.8.0", "statsmodels==0.15.0"],
    # benchmarks/icl_sweep_vs_lmeval.py only; never needed by `make test`. Every lm_eval 0.4.x
    # needs pytablewriter -> typepy -> python-dateutil<3, so this venv gets python-dateutil
    # 2.9.0.post0 instead of requirements.txt's 4.0.0: install it into a separate venv.
    "bench": ["torch==2.13.0", "lm_eval[hf]==0.4.13"],
}

setup(
    name="opt_jax",
    version="0.1.0",
    description="Sharded JAX evaluation of OPT checkpoints and the analyses of "
                "'Training Trajectories of Language Models Across Scales'",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["opt_jax", "opt_jax.*", "experiments", "experiments.*", "tools",
                                    "tools.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
