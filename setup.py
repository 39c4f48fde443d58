"""Shim for tools that call ``setup.py``: everything is declared in ``pyproject.toml``.

``pip install -e .`` (with the package index) and
``pip install --no-index --no-deps --no-build-isolation -e .`` (offline) both read
``pyproject.toml``; this file adds nothing to it.
"""
from setuptools import setup

setup()
