"""The explanation methods: one ``MethodSpec`` per method, the only method switch of the package.

A method is a name, its options (defaults, allowed values), what it can do (capabilities the entry
checks before any work) and one function, ``explain(vit, images, targets, options, path, full)``, in the
module of its family (``engine``: TokenTM / GAE / rollout; ``tails``: LeGrad / attention Grad-CAM;
``raw``: raw attention). ``path`` is the attention path strategy (``tokentm_fast.paths``).

Adding a method: a ``MethodSpec`` here and its function in one module (an existing family's, or a
new one); the literal oracle (``tokentm_fast.reference``) gets its literal formula too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ..kernels._utils import GRADIENT_MODES
from . import engine, raw, relevance, tails


@dataclass(frozen=True)
class MethodSpec:
    """One explanation method.

    Attributes:
        name: the ``method=`` name.
        explain: ``(vit, images, targets, options, path, full) -> [(B, N−P) map per target]`` (``(B, N, N)``
            with ``full``), ``targets`` a sequence of K ≥ 1 targets (``tokentm_fast.multi_target``).
        defaults: every option with its default (the options the method takes).
        choices: options restricted to a set of values.
        flags: options that must be bools.
        checks: options checked by a function of their value (raises naming the problem).
        layer_choice: takes ``end_layer`` / ``layers`` besides ``start_layer`` (docs/methods.md "Layer choice").
        full_matrix: ``full=True`` gives the whole ``(B, N, N)`` contribution matrix.
        needs_gradients: runs a backward pass (a target that is a score of the output).
        target_free: the map does not depend on the target (the method computes it once for K targets).
        flash_refuses: option values the flash path cannot serve → the reason (the entry's message).
        materialized_only: why the flash path cannot serve the method at all (None: it can).
        torch_flash: ``attention="auto"`` on the PyTorch backend takes the flash twin at every size on CPU tensors, not only
            beyond ``api.TORCH_FLASH_BYTES`` (as fast or faster there already at N = 197, docs §8).
        pixel_map: the method's map is at the pixels ``(B, H, W)``; the patch grid is its sum over each
            patch (``tokentm_fast.maps.patch_sums``), ``upsample=True`` returns the pixels themselves.
        float32_tolerance: the per-image relative error its float32 maps meet against the float64
            reference (docs/methods.md §7; the LRP rules' cancelling divisions: §6.3, "Precision").
        signed: the map can be negative (evidence against the target); the pictures draw it with a diverging
            colour map centred at 0 (``tokentm_fast.visualize``). False: the method's map is ≥ 0 by its
            definition (a clamp, or sums and products of non-negative terms).
    """

    name: str
    explain: Callable
    defaults: Mapping[str, Any] = field(default_factory=dict)
    choices: Mapping[str, Tuple] = field(default_factory=dict)
    flags: Tuple[str, ...] = ()
    checks: Mapping[str, Callable[[Any], None]] = field(default_factory=dict)
    layer_choice: bool = False
    full_matrix: bool = False
    needs_gradients: bool = True
    target_free: bool = False
    flash_refuses: Mapping[Tuple[str, Any], str] = field(default_factory=dict)
    materialized_only: Optional[str] = None
    torch_flash: bool = False
    pixel_map: bool = False
    float32_tolerance: float = 1e-5
    signed: bool = False

    def flash_refusal(self, options: Mapping[str, Any]) -> Optional[str]:
        """Why the flash path cannot serve these (resolved) options, or None."""
        if self.materialized_only is not None:
            return self.materialized_only
        return next((why for (name, value), why in self.flash_refuses.items() if options.get(name) == value), None)


#: the relevance pass's rule sets (docs/methods.md §6.3)
RULES = ("ours", "classic")

#: the float32 bound of the relevance pass (docs/methods.md §6.3, "Precision"): the bf16 class of §7
_RELEVANCE_TOLERANCE = 2e-2

REGISTRY: Dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec(
        "tokentm", engine.tokentm,
        defaults={"head_fusion": "gae", "use_length": True, "use_necc": True, "init": "length", "start_layer": 0},
        choices={"head_fusion": GRADIENT_MODES, "init": ("length", "identity")},
        flags=("use_length", "use_necc"), layer_choice=True, full_matrix=True,
        flash_refuses={("head_fusion", "decoupled"):
                       "head_fusion='decoupled' needs mean_h A and mean_h max(G, 0) per entry, which the flash "
                       "path does not form"},
    ),
    # GAE has no layer option (tests keep its start_layer refused)
    MethodSpec("gae", engine.gae, full_matrix=True),
    MethodSpec("rollout", engine.rollout, defaults={"start_layer": 0}, layer_choice=True, full_matrix=True,
               needs_gradients=False, target_free=True),
    MethodSpec("raw_attention", raw.raw_attention, needs_gradients=False, target_free=True),
    MethodSpec("attn_gradcam", tails.attn_gradcam),
    MethodSpec("legrad", tails.legrad,
               defaults={"start_layer": -2, "layer_pooling": "mean", "neutral_prompt": None,
                         "correction_threshold": 0.8},
               choices={"layer_pooling": ("mean", "head")}, layer_choice=True,
               checks={"neutral_prompt": tails.check_neutral_prompt,
                       "correction_threshold": tails.check_threshold}),
    MethodSpec("conservative_lrp", relevance.conservative_lrp, signed=True),
    MethodSpec("attcat", relevance.attcat, signed=True),
    MethodSpec("lrp", relevance.lrp, defaults={"rules": "ours"}, choices={"rules": RULES},
               pixel_map=True, float32_tolerance=_RELEVANCE_TOLERANCE,
               signed=True, torch_flash=True),
    MethodSpec("partial_lrp", relevance.partial_lrp, defaults={"rules": "ours"}, choices={"rules": RULES},
               float32_tolerance=_RELEVANCE_TOLERANCE, torch_flash=True),
    MethodSpec("transformer_attribution", relevance.transformer_attribution, defaults={"start_layer": 0},
               float32_tolerance=_RELEVANCE_TOLERANCE),
)}

METHODS: Tuple[str, ...] = tuple(REGISTRY)


def check_method(method: str) -> str:
    if not isinstance(method, str) or method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return method


def get_method(method: str) -> MethodSpec:
    """The registry entry of ``method`` (``ValueError`` naming the known methods otherwise)."""
    return REGISTRY[check_method(method)]
