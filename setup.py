"""megatron_alcot: Megatron-style LLaMA pretraining with token-level adaptive latent chain-of-thought.

Install (torch pinned in the same command as everything that depends on it):

    pip install "torch==2.13.0" -e ".[test,hf,deepspeed]"
"""
from setuptools import find_packages, setup

setup(
    name="megatron_alcot",
    version="0.1.0",
    description="Megatron-style LLaMA pretraining with token-level adaptive latent chain-of-thought",
    packages=find_packages(include=["megatron_alcot", "megatron_alcot.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.15",
        "zstandard>=0.22",
        "psutil>=5.9",
    ],
    extras_require={
        "test": ["pytest>=8", "scipy>=1.10", "matplotlib>=3.7", "tensorboard>=2.14", "megatron-core==0.16.1",
                 "megatron-core==0.16.1"],  # reference reader for the .bin/.idx oracle tests
        "hf": ["transformers>=4.45", "safetensors>=0.4", "protobuf>=4"],
        "eval": ["lm-eval>=0.4.5", "accelerate>=0.30"],
        "deepspeed": ["deepspeed>=0.14"],
        "mpi": ["mpi4py>=3.1"],
        "plot": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
    },
    scripts=[],
)
