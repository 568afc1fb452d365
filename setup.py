"""Packaging: `kernels/` ships as `llm2vec_fast.kernels` (a top-level `kernels` collides with the PyPI package)."""
from setuptools import setup

setup(
    name="llm2vec_fast",
    version="0.1.0",
    description="Fast, faithful LLM2Vec: bidirectional decoder LLMs as text encoders, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["llm2vec_fast", "llm2vec_fast.training", "llm2vec_fast.kernels"],
    package_dir={"llm2vec_fast": "llm2vec_fast", "llm2vec_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17,<6",
        "peft>=0.17",
        "numpy>=1.26",
        "tqdm",
        "safetensors",
        "gguf>=0.10",
        "accelerate>=1.0",
        "triton>=3.4; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "scipy", "scikit-learn", "matplotlib", "sentence-transformers>=6",
                 "mteb>=2"],
        "eval": ["scipy", "scikit-learn", "matplotlib"],
        "st": ["sentence-transformers>=6"],
        "mteb": ["mteb>=2"],
        "flash_attn": ["flash-attn"],
    },
    entry_points={"console_scripts": ["llm2vec-fast=llm2vec_fast.cli:main"]},
)
