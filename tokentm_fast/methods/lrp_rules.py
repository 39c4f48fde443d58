"""The LRP rules of the relevance pass (docs/methods.md §6.3), on plain tensors.

Each rule maps the relevance ``r`` at an operation's output to the relevance at its inputs, given the
forward values. Dimension 0 is the image: every sum a rule takes (the residual rescaling) is per image.
The rules are those of Chefer et al.'s ``layers_ours.py`` (the spec's default); ``rules="classic"`` (their
older ``layers_lrp.py``) changes two of them, see ``linear`` and ``add``.

==================  ===========================================================================
operation           rule
==================  ===========================================================================
linear ``W x + b``  α=1, β=0: ``x⁺ ⊙ W⁺ᵀ s + x⁻ ⊙ W⁻ᵀ s``, ``s = r / (W⁺x⁺ + W⁻x⁻)`` (bias left out),
                    computed as ``(x ⊙ Wᵀs + |x| ⊙ |W|ᵀs) / 2``, ``2 (W⁺x⁺ + W⁻x⁻) = W x + |W||x|``
``a + b``           z-rule shares ``a ⊙ r/z``, ``b ⊙ r/z``, rescaled per image to ``|Σa| : |Σb|`` and ``Σr``
``a · b`` (matmul)  z-rule over both operands (each receives all of ``r``), halved
clone (x used 2×)   ``x ⊙ (r₁/x + r₂/x)``
row selection       ``x ⊙ r/x`` on the selected row
mean over rows      ``x_j ⊙ (r / mean x) / n``
patch embedding     zβ with each image's lowest / highest pixel value as the bounds
norms, activations  relevance unchanged
==================  ===========================================================================
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels._utils import STABILISER  # the authors' stabiliser, 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / (b + 1e-9)``, and 0 where ``b == 0`` (the authors' stabiliser, exactly: their
    ``b.clamp(min=ε) + b.clamp(max=ε)`` is ``b + ε``, and a sum landing on 0 gets ε)."""
    den, zero = _denominator(b)
    return (a / den).masked_fill_(zero, 0.0)


def _denominator(b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``safe_divide``'s denominator for ``b`` and the mask of ``b == 0``."""
    den = b + STABILISER
    return den.masked_fill_(den == 0, STABILISER), b == 0


def _per_image_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=tuple(range(1, t.dim())), keepdim=True)


#: where the shared denominator from the identity is rounding noise and is recomputed term by term (``linear``)
ZONE = 2.0 ** -6


class Scratch:
    """Temporaries of the linear rule reused from call to call (``linear``'s ``scratch``): a fresh multi-megabyte
    tensor costs the CPU its page faults on first touch, about as much as the elementwise pass that fills it
    (ViT-B/16, B = 4, 224 px: 4–12 ms per (788, 3072) temporary in a backward's heap, against 0.5 ms for the
    pass). Buffers of at most ``max_bytes`` are kept: 10 MiB holds ViT-B/16's widest temporary at 224 px and
    batch 4 (9.7 MB) and none at 1024 px (12.6 MB and up), where kept buffers would add to the peak memory;
    larger ones are allocated per call."""

    def __init__(self, max_bytes: int = 10 << 20) -> None:
        self.max_bytes, self.free = max_bytes, {}

    def take(self, shape, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device (hand it back with ``give``)."""
        numel = math.prod(shape)
        if numel * like.element_size() > self.max_bytes:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        kept = self.free.get((numel, like.dtype, like.device))
        flat = kept.pop() if kept else torch.empty(numel, dtype=like.dtype, device=like.device)
        return flat.view(shape)

    def give(self, *tensors: torch.Tensor) -> None:
        """Keep tensors from ``take`` (no longer read by the caller) for the next ``take`` of their size."""
        for t in tensors:
            if t.numel() * t.element_size() <= self.max_bytes:
                self.free.setdefault((t.numel(), t.dtype, t.device), []).append(t.reshape(-1))


def linear(x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, rules: str = "ours",
           xw: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
           scratch: Optional[Scratch] = None) -> torch.Tensor:
    """Relevance at the input ``x (..., in)`` of ``z = W x + b`` (``W (out, in)``) from ``r (..., out)``.

    ``"ours"``: positive and negative inputs share one denominator ``z⁺ = W⁺x⁺ + W⁻x⁻``, computed in three
    products (docs/methods.md §6.3) from ``2z⁺ = xWᵀ + |x||W|ᵀ``: with ``S = r ⊘ z⁺`` the relevance is
    ``(x ⊙ (S W) + |x| ⊙ (S |W|)) / 2``. ``xw (..., out)`` is ``x Wᵀ`` as the forward computed it (the layer's
    output less its ``bias (out,)``), else one more product computes it. Where ``2z⁺`` lands within
    ``ZONE · (|x||W|ᵀ + |b|)`` of 0 (rounding noise of the identity, or z⁺ = 0 exactly), z⁺ is recomputed
    term by term on those rows, so that S is exactly 0 where z⁺ = 0, as ``safe_divide`` defines.

    ``"classic"``: the α=1, β=0 rule with its own denominator per part (four products),
    ``x⁺ ⊙ W⁺ᵀ (r / W⁺x⁺) + x⁻ ⊙ W⁻ᵀ (r / W⁻x⁻)``.

    ``scratch``: where the ``"ours"`` rule's temporaries come from (a ``Scratch`` shared by a pass's calls).
    """
    w = weight.to(x.dtype)
    if rules == "classic":
        pw, nw = w.clamp(min=0), w.clamp(max=0)
        px, nx = x.clamp(min=0), x.clamp(max=0)
        return px * (safe_divide(r, px @ pw.t()) @ pw) + nx * (safe_divide(r, nx @ nw.t()) @ nw)
    scratch = Scratch(0) if scratch is None else scratch
    aw, ax = w.abs(), torch.abs(x, out=scratch.take(x.shape, x))
    xw = (x @ w.t() if xw is None else xw).reshape(-1, w.shape[0])
    twice = torch.addmm(xw, ax.reshape(-1, w.shape[1]), aw.t(), out=scratch.take(xw.shape, x))   # 2 z⁺ = xWᵀ + |x||W|ᵀ
    # in the zone ⇔ 2z⁺ ≤ ZONE·(|x||W|ᵀ + |b|) ⇔ xWᵀ + (1/ZONE − 1)·2z⁺ ≤ |b| (|x||W|ᵀ = 2z⁺ − xWᵀ): one pass
    zone = torch.add(xw, twice, alpha=1.0 / ZONE - 1.0, out=scratch.take(xw.shape, x))
    noisy = torch.le(zone, bias.to(x.dtype).abs() if bias is not None else 0.0)
    scratch.give(zone)
    twice = twice.view(r.shape)
    exact_zero = _recompute_noisy(x, w, twice, noisy.view(r.shape))
    s = torch.div(r, twice.add_(2 * STABILISER), out=twice)             # S / 2 = r / (2 z⁺ + 2·1e-9)
    if exact_zero is not None:
        s.masked_fill_(exact_zero, 0.0)
    s_aw = torch.matmul(s, aw, out=scratch.take(x.shape, x))
    out = (s @ w).mul_(x).addcmul_(s_aw, ax)
    scratch.give(ax, twice, s_aw)
    return out


def _recompute_noisy(x: torch.Tensor, w: torch.Tensor, twice: torch.Tensor,
                     noisy: torch.Tensor) -> Optional[torch.Tensor]:
    """Where ``noisy``, ``twice`` ``(..., out)`` set to ``2 (x⁺W⁺ᵀ + x⁻W⁻ᵀ)`` (in place; only the rows of
    ``x (..., in)`` with a noisy entry are multiplied); the mask of its exact zeros, or None if nothing is
    noisy (then ``twice`` > 0 everywhere)."""
    if not bool(noisy.view(torch.uint8).amax()):                      # (``any`` on bool reads far slower)
        return None
    rows = noisy.flatten(0, -2).any(-1).nonzero().flatten()
    xr = x.flatten(0, -2)[rows]
    z = xr.clamp(min=0) @ w.clamp(min=0).t() + xr.clamp(max=0) @ w.clamp(max=0).t()
    flat, mask = twice.view(-1, twice.shape[-1]), noisy.flatten(0, -2)[rows]
    flat[rows] = torch.where(mask, 2 * z, flat[rows])
    return twice == 0


def add(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, rules: str = "ours") -> Tuple[torch.Tensor, torch.Tensor]:
    """Relevance at the operands of ``a + b`` (``b`` may broadcast against ``a``).

    ``"ours"``: the z-rule shares rescaled per image so that their sums keep the ratio ``|Σa| : |Σb|``
    and add up to ``Σr`` (conservation); ``"classic"``: the z-rule shares as they are.
    """
    b = b.expand_as(a)
    s = safe_divide(r, a + b)
    ra, rb = a * s, b * s
    if rules == "classic":
        return ra, rb
    sa, sb, total = _per_image_sum(ra), _per_image_sum(rb), _per_image_sum(r)
    fa = safe_divide(sa.abs(), sa.abs() + sb.abs()) * total
    fb = safe_divide(sb.abs(), sa.abs() + sb.abs()) * total
    return ra * safe_divide(fa, sa), rb * safe_divide(fb, sb)


def product(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relevance at the operands of the matrix product ``z = a @ b`` (batched) from ``r`` (like z): the
    z-rule over both operands (``a ⊙ (s bᵀ)``, ``b ⊙ (aᵀ s)``, ``s = r / z``), each halved."""
    s = safe_divide(r, a @ b)
    return (s @ b.transpose(-1, -2)).mul_(a).div_(2), (a.transpose(-1, -2) @ s).mul_(b).div_(2)


def clone(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Relevance at ``x`` used twice (the residual and its branch): ``x ⊙ (r₁/x + r₂/x)``."""
    den, zero = _denominator(x)
    return (r1 / den).add_(r2 / den).masked_fill_(zero, 0.0).mul_(x)


def select_row(x: torch.Tensor, r: torch.Tensor, num_tokens: int, row: int = 0) -> torch.Tensor:
    """Relevance at tokens ``(B, N, D)`` from ``r (B, D)`` at the selected ``row`` (its value ``x (B, D)``)."""
    out = r.new_zeros(r.shape[0], num_tokens, r.shape[-1])
    out[:, row] = x * safe_divide(r, x)
    return out


def mean_rows(x: torch.Tensor, r: torch.Tensor, rows: slice) -> torch.Tensor:
    """Relevance at tokens ``x (B, N, D)`` from ``r (B, D)`` at their mean over ``rows``."""
    picked = x[:, rows]
    out = torch.zeros_like(x)
    out[:, rows] = picked * safe_divide(r, picked.mean(1))[:, None] / picked.shape[1]
    return out


def patch_embedding(images: torch.Tensor, conv: nn.Conv2d, r: torch.Tensor) -> torch.Tensor:
    """zβ rule at the pixels ``(B, C, H, W)`` from ``r (B, D, gh, gw)`` at the convolution's output (bias
    left out), with each image's lowest and highest pixel value as the bounds."""
    w = conv.weight.to(images.dtype)
    pw, nw = w.clamp(min=0), w.clamp(max=0)
    low = images.amin(dim=(1, 2, 3), keepdim=True).expand_as(images)
    high = images.amax(dim=(1, 2, 3), keepdim=True).expand_as(images)
    padding = (0, 0) if conv.padding == "valid" else conv.padding      # SigLIP's convolution says "valid"
    kw = dict(stride=conv.stride, padding=padding)
    z = F.conv2d(images, w, **kw) - F.conv2d(low, pw, **kw) - F.conv2d(high, nw, **kw) + STABILISER
    s = r / z

    def back(weight):
        return torch.nn.grad.conv2d_input(images.shape, weight, s, **kw)

    return images * back(w) - low * back(pw) - high * back(nw)
