"""The explanation methods (docs/methods.md §3–§6): the registry (``registry.REGISTRY``, one
``MethodSpec`` per method) and the method families (``engine``, ``tails``, ``raw``)."""
from __future__ import annotations

from typing import Any, Dict

from . import options as _options
from .options import chosen_layers
from .registry import METHODS, REGISTRY, MethodSpec, check_method, get_method

#: the methods whose ``full=True`` gives the whole contribution matrix
FULL_MATRIX_METHODS = tuple(name for name, spec in REGISTRY.items() if spec.full_matrix)
#: every method's options with their defaults
DEFAULT_OPTIONS: Dict[str, Dict[str, Any]] = {name: dict(spec.defaults) for name, spec in REGISTRY.items()}


def resolve_options(method: str, options: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
    """``options`` of ``method`` checked, defaults filled in (``options.resolve_options``)."""
    return _options.resolve_options(get_method(method), options, num_layers)


__all__ = ["METHODS", "REGISTRY", "MethodSpec", "check_method", "get_method", "resolve_options", "chosen_layers",
           "FULL_MATRIX_METHODS", "DEFAULT_OPTIONS"]
