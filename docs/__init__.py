"""The project's documentation, installed with the package as ``tokentm_fast.docs``.

The docstrings cite ``docs/methods.md`` (the math of every method, the tolerances) and
``docs/evaluation.md`` (metrics, the synthetic benchmark). In a source checkout they are in the
repository's ``docs/`` folder; an installed wheel carries the same files here::

    from tokentm_fast.docs import path
    print(path("methods.md"))          # e.g. .../site-packages/tokentm_fast/docs/methods.md
"""
from __future__ import annotations

from pathlib import Path

FILES = ("methods.md", "evaluation.md")


def path(name: str = "methods.md") -> Path:
    """The installed path of one of ``FILES``."""
    if name not in FILES:
        raise ValueError(f"unknown documentation file {name!r}; expected one of {FILES}")
    return Path(__file__).resolve().parent / name
