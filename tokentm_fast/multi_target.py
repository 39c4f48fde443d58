"""Several targets per image in one call: ``explain(model, images, target=T)`` with ``T`` a ``(B, K)``
integer tensor or a list of K score functions returns ``(B, K, ...)`` maps, map ``[:, k]`` being
target k's (``tokentm_fast.targets.check_targets``).

How the K explanations share the work, per path:

- rollout and raw attention do not use the target: computed once, the map repeated K times;
- ``backend="torch"`` and ``"triton"`` with materialized attention: one forward pass; TokenTM and
  GAE then run K backward passes through the kept graph (``retain_graph``), each carrying its own
  row update; LeGrad and attention Grad-CAM re-run the (prefix-row) block tails once and
  back-propagate them K times (``tokentm_fast.paths``). The graph and the per-layer attention
  stay alive until the K-th backward, so the peak memory is that of one call plus K small maps;
- the flash path (``attention="flash"``): LeGrad and attention Grad-CAM share the forward as on
  the materialized path (the same block-tail backward); TokenTM and GAE run one call per target
  (K forward passes), since their row update lives inside the flash attention's custom backward,
  which frees each layer's saved tiles as it goes and takes one backward per forward;
- ``backend="reference"``: one call per target (K forward passes): it is the literal oracle,
  not restructured for speed.

Every path gives, for each k, the map of a separate call with target k (the same arithmetic).
"""
from __future__ import annotations

from typing import Callable

import torch

from .targets import TargetList


def explain_targets(spec, path: str, targets: TargetList, explain: Callable[[object], torch.Tensor]) -> torch.Tensor:
    """The K explanations stacked image-major, ``(B·K, ...)`` (image b's targets are rows
    ``b·K .. b·K+K−1``), so the caller's per-image post-processing applies unchanged.

    ``spec``: the method's ``MethodSpec`` (``target_free``, ``flash_shares_forward``); ``path``:
    ``"reference"``, ``"flash"`` or ``"materialized"``; ``explain(target)``: one explanation for a
    single target, or the list of the K explanations from one forward for the ``TargetList``.
    """
    k = len(targets)
    if spec.target_free:
        e = explain(targets[0])
        outs = [e] * k
    elif path == "materialized" or (path == "flash" and spec.flash_shares_forward):
        outs = explain(targets)
    else:
        outs = [explain(t) for t in targets]
    return torch.stack(outs, dim=1).flatten(0, 1)
