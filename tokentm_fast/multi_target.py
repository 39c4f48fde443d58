"""Several targets per image in one call: ``explain(model, images, target=T)`` with ``T`` a ``(B, K)``
integer tensor or a list of K score functions returns ``(B, K, ...)`` maps, map ``[:, k]`` being
target k's (``tokentm_fast.targets.check_targets``).

Inside the package there is one kind of target: ``tokentm_fast.api`` makes a single target a
one-element ``TargetList``, every method (``tokentm_fast.methods``) and every attention path
(``tokentm_fast.paths``) takes the list and returns one map per target, and the API unwraps a single
target's map again. How the K explanations share the work is the method's and the path's business:

- rollout and raw attention do not use the target: computed once, the map repeated K times;
- the materialized path: one forward pass; TokenTM and GAE then run K backward passes through the
  kept graph (``retain_graph``), each carrying its own row update; LeGrad and attention Grad-CAM
  re-run the (prefix-row) block tails once and back-propagate them K times; the relevance methods
  back-propagate K times. The graph and the per-layer attention stay alive until the K-th backward,
  so the peak memory is that of one call plus K small maps;
- the flash path (``attention="flash"``): LeGrad, attention Grad-CAM, conservative LRP and ATTCAT share
  the forward as on the materialized path; TokenTM and GAE run one forward per target
  (``paths.Flash.gradient_rows``), since their row update lives inside the flash attention's custom
  backward, which frees each layer's saved tiles as it goes and takes one backward per forward;
- ``backend="reference"``: one call per target (K forward passes): it is the literal oracle,
  not restructured for speed.

Every path gives, for each k, the map of a separate call with target k (the same arithmetic).
"""
from __future__ import annotations

from typing import Sequence

import torch


def image_major(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The K maps ``(B, ...)`` of one call stacked image-major, ``(B·K, ...)`` (image b's targets are rows
    ``b·K .. b·K+K−1``), so the caller's per-image post-processing applies unchanged."""
    return torch.stack(list(maps), dim=1).flatten(0, 1)
