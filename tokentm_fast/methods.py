"""The explanation methods, their options and defaults (docs/methods.md §3–§6)."""
from __future__ import annotations

from typing import Any, Dict

METHODS = ("tokentm", "gae", "rollout", "raw_attention", "attn_gradcam", "legrad")
FULL_MATRIX_METHODS = ("tokentm", "gae", "rollout")

DEFAULT_OPTIONS: Dict[str, Dict[str, Any]] = {
    "tokentm": {"head_fusion": "gae", "use_length": True, "use_necc": True, "init": "length", "start_layer": 0},
    "gae": {},
    "rollout": {"start_layer": 0},
    "raw_attention": {},
    "attn_gradcam": {},
    "legrad": {"start_layer": -2},
}

_CHOICES = {"head_fusion": ("gae", "decoupled"), "init": ("length", "identity")}


def check_method(method: str) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return method


def resolve_options(method: str, options: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
    """Validate ``options`` for ``method`` and fill in defaults.

    ``start_layer`` is returned as a non-negative block index: for TokenTM and
    rollout the number of bottom blocks skipped (0 ≤ k < L), for LeGrad the
    first block used (negative values count from the end, as in Python).
    """
    defaults = DEFAULT_OPTIONS[check_method(method)]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid}")
    resolved = {**defaults, **options}
    for name, value in resolved.items():
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(f"option {name}={value!r} for {method!r}; expected one of {_CHOICES[name]}")
        if name in ("use_length", "use_necc") and not isinstance(value, bool):
            raise TypeError(f"option {name} must be a bool, got {value!r}")
        if name == "start_layer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"option start_layer must be an int, got {value!r}")
            low = -num_layers if method == "legrad" else 0
            if not low <= value < num_layers:
                raise ValueError(
                    f"option start_layer={value} out of range for a model with {num_layers} blocks "
                    f"(expected {low} <= start_layer < {num_layers})"
                )
            resolved[name] = value % num_layers
    return resolved
