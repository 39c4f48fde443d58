"""What every consumer of explanation maps does to them: bilinear upsampling to the image size,
per-image min–max normalisation (the API's ``upsample`` / ``normalize``, the metrics, the figures) and
the test for a constant map, which ranks nothing (``constant_rows``, ``ConstantMapWarning``)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def upsample_maps(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling ``(B, gh, gw) -> (B, H, W)`` (``align_corners=False``), float32 or wider."""
    if maps.dim() != 3:
        raise ValueError(f"maps must be (B, gh, gw), got shape {tuple(maps.shape)}")
    x = maps.detach()
    if not x.is_floating_point() or x.element_size() < 4:
        x = x.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x.clone()
    return F.interpolate(x[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def patch_sums(maps: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Pixel maps ``(B, H, W)`` pooled to the patch grid ``(B, gh, gw)`` by summing each patch's pixels
    (relevance is additive); H, W divisible by gh, gw."""
    b, h, w = maps.shape
    gh, gw = grid
    return maps.reshape(b, gh, h // gh, gw, w // gw).sum(dim=(2, 4))


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Per image ``(e − min) / (max − min)`` of ``(B, ...)`` over all but the batch dimension, in
    ``[0, 1]``; a constant image becomes zeros."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    rng = hi - lo
    ok = rng > 0
    out = torch.where(ok, (flat - lo) / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(flat))
    return out.reshape(x.shape)


class ConstantMapWarning(UserWarning):
    """An explanation map is constant (e.g. all zeros): it ranks nothing, and ``normalize=True`` makes it
    all zeros. ``explain`` / ``Explainer`` say it once per call site, naming the images, the method and
    the likely cause."""


def constant_rows(maps: torch.Tensor) -> torch.Tensor:
    """``(R,)`` bool: whether map ``r`` of ``maps (R, ...)`` is constant, i.e. has no two different finite
    values (all equal, no finite value, or empty). On the maps' device: no host synchronisation."""
    flat = maps.detach().reshape(maps.shape[0], -1)
    if flat.shape[1] == 0:
        return torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    if not flat.is_floating_point():
        flat = flat.double()
    finite = torch.isfinite(flat)
    hi = torch.where(finite, flat, -torch.inf).amax(dim=1)
    lo = torch.where(finite, flat, torch.inf).amin(dim=1)
    return ~(hi > lo)
