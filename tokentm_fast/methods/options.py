"""A method's options checked against its registry entry, defaults filled in (docs/methods.md §3–§6)."""
from __future__ import annotations

from typing import Any, Dict, List

from ..validation import check_index

#: the options every method with ``layer_choice`` takes besides ``start_layer`` (docs/methods.md
#: "Layer choice"): ``end_layer`` (exclusive) or an explicit ``layers`` list
LAYER_OPTIONS = ("end_layer", "layers")


def resolve_options(spec, options: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
    """Validate ``options`` for the method ``spec`` (a ``MethodSpec``) and fill in its defaults.

    Block indices follow one rule for every method (Python's, ``validation.check_index``): an int in
    ``[-L, L)``, a negative one counting from the end. ``start_layer`` (the first block used; for
    TokenTM and rollout also the number of bottom blocks skipped) is returned in ``[0, L)``;
    ``end_layer`` / ``layers`` become ``layers``, the sorted tuple of chosen blocks in ``[0, L)``.
    """
    method, defaults = spec.name, spec.defaults
    extra = LAYER_OPTIONS if spec.layer_choice else ()
    unknown = sorted(set(options) - set(defaults) - set(extra))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid}")
    resolved = {**defaults, **options}
    for name, value in resolved.items():
        if name in spec.choices and value not in spec.choices[name]:
            raise ValueError(f"option {name}={value!r} for {method!r}; expected one of {spec.choices[name]}")
        if name in spec.flags and not isinstance(value, bool):
            raise TypeError(f"option {name} must be a bool, got {value!r}")
        if name in spec.checks:
            spec.checks[name](value)
        if name == "start_layer":
            resolved[name] = check_index("option start_layer", value, num_layers, _blocks(num_layers))
    if "end_layer" in options or "layers" in options:
        resolved["layers"] = _resolve_layers(method, options, resolved["start_layer"], num_layers)
        resolved.pop("end_layer", None)
    return resolved


def _blocks(num_layers: int) -> str:
    return f"a model with {num_layers} blocks"


def _resolve_layers(method: str, options: Dict[str, Any], start: int, num_layers: int) -> tuple:
    """The sorted blocks a method aggregates over: ``layers`` as given (negative counting from the
    end), or ``start_layer <= l < end_layer``."""
    if "layers" in options:
        if "end_layer" in options or "start_layer" in options:
            raise ValueError(f"give either layers=[...] or start_layer/end_layer for {method!r}, not both")
        value = options["layers"]
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"option layers must be a list of block indices, got {value!r}")
        value = list(value)
        if not value:
            raise ValueError(f"option layers is empty: {method!r} needs at least one block")
        for l in value:
            if isinstance(l, bool) or not isinstance(l, int):
                raise TypeError(f"option layers must hold ints (block indices), got {l!r}")
        chosen = [check_index(f"option layers[{i}]", l, num_layers, _blocks(num_layers), "l")
                  for i, l in enumerate(value)]
        if len(set(chosen)) != len(chosen):
            dup = sorted({l for l in chosen if chosen.count(l) > 1})
            raise ValueError(f"option layers names block(s) {dup} more than once")
        return tuple(sorted(chosen))
    end = options["end_layer"]
    if isinstance(end, bool) or not isinstance(end, int):
        raise TypeError(f"option end_layer must be an int, got {end!r}")
    if not -num_layers < end <= num_layers:
        raise ValueError(f"option end_layer={end} out of range for a model with {num_layers} blocks "
                         f"(expected {-num_layers} < end_layer <= {num_layers}; exclusive, as in Python)")
    end = end % num_layers if end < 0 else end
    if end <= start:
        raise ValueError(f"end_layer={end} must be greater than start_layer={start}: no block would be used")
    return tuple(range(start, end))


def chosen_layers(options: Dict[str, Any], num_layers: int) -> List[int]:
    """The blocks a method aggregates over: ``options["layers"]`` or ``start_layer .. L-1``."""
    return list(options["layers"]) if "layers" in options else list(range(options["start_layer"], num_layers))
