"""DeepSeek-style MoE + MLA language models in JAX/Flax: pre-training and post-training."""

from setuptools import find_packages, setup

setup(
    name="deepjax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["model*", "train*", "posttrain*", "kernels*", "configs*"]),
    # The CPU kernels' sources: kernels/native_build.py compiles them on first use.
    package_data={"kernels": ["csrc/*.cc", "csrc/*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2", "flax>=0.12", "optax", "orbax-checkpoint", "chex", "grain", "sentencepiece",
        "absl-py", "ml_collections", "numpy", "ml_dtypes", "pyarrow", "tensorboardX", "math-verify",
        "tqdm", "matplotlib",
    ],
    extras_require={
        # nbclient executes notebooks/quickstart.ipynb in the tests, on an ipykernel.
        "test": ["pytest", "nbclient", "nbformat", "ipykernel"],
        # torch pinned: this version installs as a CPU build here; an unpinned torch pulls CUDA.
        # transformers < 5.25: 5.25 requires HF's `kernels` package and imports it at start-up,
        # and this repository's top-level `kernels/` (our Pallas kernels) shadows it when run from
        # the repository root (ImportError: cannot import name 'CUDAProperties' from 'kernels').
        "hf": ["torch==2.13.0", "transformers>=5.0,<5.25", "safetensors"],
        # Benchmark peers only (bench/posttrain_step.py), never needed by the tests.
        "peers": ["trl"],
    },
)
