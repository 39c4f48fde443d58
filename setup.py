"""Install script for tokentm_fast.

The repository keeps Triton kernels in ``kernels/`` and the torch.library
bindings in ``bindings/``; both are installed *inside* the package as
``tokentm_fast.kernels`` and ``tokentm_fast.bindings`` so that no top-level
``kernels`` or ``bindings`` module is ever importable.
"""
from setuptools import find_packages, setup

setup(
    name="tokentm_fast",
    version="0.1.0",
    description="Fast, faithful explanations for Vision Transformers (TokenTM, LeGrad, GAE, rollout)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["tokentm_fast", "tokentm_fast.*"])
    + ["tokentm_fast.kernels", "tokentm_fast.bindings"],
    package_dir={
        "tokentm_fast": "tokentm_fast",
        "tokentm_fast.kernels": "kernels",
        "tokentm_fast.bindings": "bindings",
    },
    package_data={"tokentm_fast": ["assets/*.safetensors", "assets/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "timm>=1.0",
        "numpy>=1.24",
        "safetensors>=0.4",
        "h5py>=3.8",
        "matplotlib>=3.7",
        "pillow>=9.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["tokentm-fast=tokentm_fast.cli:main"]},
)
