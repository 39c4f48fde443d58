"""What the tests assert of a map before comparing it, and float32 error bounds derived from the condition
of what is computed; for tests only.

:func:`assert_informative`: every image's map is finite, not all zero and not constant, so that an equality
of two maps is not the vacuous equality of two flat ones.

:func:`float32_bound`: a float32 run rounds the result of every operation to a relative error of at most u = 2⁻²⁴. To first order,
each rounding moves the final map as much as a relative perturbation of size u of the operation's inputs
would, and the rest of the computation amplifies it by the map's condition number κ. The LRP relevance pass
(docs/methods.md §6.3) divides by sums that cancel, so κ depends on the model and the image, and a fixed
bound is either loose or wrong; here κ is measured instead, per image, on the independent float64 oracle:

    κ = max over draws of rel_err(map(W ⊙ (1 + u·r), x ⊙ (1 + u·r')), map(W, x)) / u  (relative L2, per image),

r, r' uniform in [−1, 1] for every weight and pixel (the perturbation a float32 rounding of them would make).
Each attention layer puts about ``ROUNDINGS_PER_LAYER`` roundings on a relevance's path (8 operations of
the forward: norm, qkv, q·kᵀ, softmax, A·V, proj, residual add, MLP; as many rules back), so the float32
map is within ``ROUNDINGS_PER_LAYER · layers · max(κ, 1) · u`` of the float64 one (κ at least 1: the float32
output is itself rounded). On the models of tests/test_lrp.py this bound is 2.5 to 45 times the float32
error of the torch and Triton backends and 8 to 200 times below what a stabiliser of 1e-5 instead of 1e-9
costs (test_lrp.py checks the latter; the 2e-2 used before was 270 to 19 000 times the error and let it pass).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from spec_oracle import rel_err
from torch import nn


def assert_informative(e: torch.Tensor, spread: float = 1e-3) -> None:
    """Every image's map of ``e (B, ...)`` is finite and varies: max − min > ``spread`` · max |e|."""
    e = e.detach().flatten(1)
    assert torch.isfinite(e).all(), "a map is not finite"
    top = e.abs().amax(1)
    assert (top > 0).all(), f"a map is all zeros (images {torch.nonzero(top == 0).flatten().tolist()})"
    flat = (e.amax(1) - e.amin(1)) <= spread * top
    assert not flat.any(), f"a map is constant to {spread:g} of its largest value (images {torch.nonzero(flat).flatten().tolist()})"


#: float32's unit roundoff
UNIT_ROUNDOFF = 2.0 ** -24
#: roundings on a relevance's path per attention layer (block or attention pool): ~8 forward, ~8 rules back
ROUNDINGS_PER_LAYER = 16


def perturbed(model: nn.Module, images: torch.Tensor, seed: int, size: float = UNIT_ROUNDOFF):
    """A float64 copy of ``model`` and of ``images (B, C, H, W)``, every parameter and pixel multiplied by
    ``1 + size·r`` with r uniform in [−1, 1] (a generator seeded ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model).double()

    def jitter(t: torch.Tensor) -> torch.Tensor:
        return t * (1 + size * (2 * torch.rand(t.shape, generator=g, dtype=torch.float64) - 1))

    with torch.no_grad():
        for p in m.parameters():
            p.copy_(jitter(p))
    return m, jitter(images.double())


def condition(evaluate: Callable[[nn.Module, torch.Tensor], torch.Tensor], model: nn.Module,
              images: torch.Tensor, draws: int = 3) -> torch.Tensor:
    """κ per image, (B,): the largest relative change of ``evaluate``'s float64 map (a ``(B, ...)`` tensor)
    under :func:`perturbed` copies of the weights and pixels, over ``draws`` draws, divided by u."""
    base = evaluate(copy.deepcopy(model).double(), images.double())
    changes = [rel_err(evaluate(*perturbed(model, images, seed)), base) for seed in range(draws)]
    return torch.stack(changes).amax(0) / UNIT_ROUNDOFF


def float32_bound(evaluate: Callable[[nn.Module, torch.Tensor], torch.Tensor], model: nn.Module,
                  images: torch.Tensor, layers: int, draws: int = 3) -> torch.Tensor:
    """Per-image bound, (B,), on the relative L2 error of a float32 run of the map ``evaluate`` computes in
    float64: ``ROUNDINGS_PER_LAYER · layers · max(κ, 1) · u`` (module docstring); ``layers`` counts the
    attention layers (blocks, plus one for an attention pool)."""
    kappa = condition(evaluate, model, images, draws).clamp_min(1.0)
    return ROUNDINGS_PER_LAYER * layers * kappa * UNIT_ROUNDOFF
