"""The relevance pass through one attention, flash formulation in PyTorch: the CPU twin of
``kernels/attention_relevance.py`` (docs/methods.md §6.3, "On the flash path").

Per image and head, with ``P = softmax(scale·QKᵀ)`` recomputed from the forward's row log-sum-exp ℓ, ``O = P V``
the forward's output and ``R_O`` the relevance at O ``(N, d)``, the rules of ``lrp_rules.product`` applied to
``O = P V`` and then to the logits ``Z = Q Kᵀ`` (the softmax passes relevance on unchanged)::

    S_O   = R_O ⊘ O                                   (N, d)   elementwise
    R^A_ij = P_ij (S_O,i · V_j) / 2                   tile     (the flash backward's P ⊙ dP, dO → S_O)
    R_V,j  = V_j ⊙ Σ_i P_ij S_O,i / 2                 key sum  (its dV)
    S_Z,ij = R^A_ij ⊘ Z_ij,   Z_ij = Q_i · K_j        tile     (Z in IEEE arithmetic: the rule divides by it)
    R_Q,i  = Q_i ⊙ Σ_j S_Z,ij K_j / 2                 query sum (its dQ)
    R_K,j  = K_j ⊙ Σ_i S_Z,ij Q_i / 2                 key sum  (its dK)
    t_j    = Σ_i row_i · max(R^A_ij · ∇A_ij, 0)       key sum, ∇A_ij = dO_i · V_j  (``do`` given; else max(R^A_ij, 0))

``⊘`` is the authors' safe division (``lrp_rules.safe_divide``: ``a / (b + 1e-9)``, 0 where b = 0). No
(N, N) tensor: ``(G_t, Q_t, N)`` tiles over the G = B·H (image, head) pairs and the query rows, sized as the
flash twin's (``torch_ops.attention.tile_shape``), in three tile buffers reused by every tile (Z; P, then ∇A's
terms; R^A, then S_Z): no fresh tile-sized allocation per product. S_O carries R^A's and R_V's ½. S_Z is
``R^A / (Z + 1e-9)`` in two in-place passes on CPU tensors, the exact rule only on tiles with a zero of Z (one
read finds them); the one case this misses, Z + 1e-9 rounding to 0, leaves R_Q non-finite, and the pass then
runs again with the exact rule. Elsewhere (no host read per tile) every tile takes the exact rule. Transformer attribution's row update reads ``t`` with ∇A
from the gradient backward's ``dO``; partial LRP reads it without.

BEiT's relative position bias (``bias``, a ``RelativePositionBias``; logits ``scale·(Z + B/scale)``): P carries
the bias tile (``torch_ops.attention.bias_tile``), and the logits' relevance R^A is split between Z and
``B' = B/scale`` by the add rule (``lrp_rules.add``, as the materialized pass does) before the product rule::

    s_ij   = R^A_ij ⊘ (Z_ij + B'_ij)         R_Z,ij = c_b · Z_ij s_ij        S_Z = R_Z ⊘ Z

``c_b = 1`` for the ``"classic"`` rules; ``"ours"`` rescales per image b so that the two shares keep the ratio
``|Σ Z⊙s| : |Σ B'⊙s|`` and add up to ``Σ R^A`` (sums over every head and tile), ``c_b = (|a_b| / (|a_b| + |b_b|))
· Σ R^A ⊘ a_b`` with ``a_b = Σ Z⊙s``, ``b_b = Σ B'⊙s``: a first pass over the tiles forms the three sums (R^A
needs only P and S_O), the second pass the relevances. The bias's share is dropped.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels._utils import STABILISER
from .attention import _acc, _flat, _itemsize, _tiles, bias_tile

#: the rule sets of the logits' add rule (``lrp_rules.add``)
LOGIT_RULES = ("ours", "classic")


def _safe_divide_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / (b + 1e-9)``, 0 where ``b == 0``, written into ``a`` (``b`` is changed: it holds the denominator)."""
    zero = b == 0
    den = b.add_(STABILISER)
    den.masked_fill_(den == 0, STABILISER)
    return a.div_(den).masked_fill_(zero, 0.0)


def attention_relevance(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, r_o: torch.Tensor,
    scale: float, row: Optional[torch.Tensor] = None, do: Optional[torch.Tensor] = None,
    block: Optional[int] = None, bias=None, rules: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(R_Q, R_K, R_V, t)`` (module docstring) of one attention.

    Args:
        q, k, v, o: ``(B, H, N, d)`` as the flash forward had them (``o`` its output).
        lse: ``(B, H, N)`` the forward's row log-sum-exp ℓ.
        r_o: ``(B, H, N, d)`` the relevance at ``o``.
        scale: the logits' factor (P = softmax(scale · Q Kᵀ)).
        row: ``(B, N)`` weights of the query rows for ``t``, or None (no ``t``).
        do: ``(B, H, N, d)`` ∂s/∂O of the gradient backward (∇A = dO Vᵀ in ``t``), or None.
        block: query rows per tile over every head (tests); default ``tile_shape``.
        bias: the forward's ``RelativePositionBias`` (BEiT), or None.
        rules: with a bias, the add rule's rule set between Z and B/scale, ``"ours"`` or ``"classic"``.

    Returns:
        ``R_Q, R_K, R_V`` ``(B, H, N, d)`` and ``t`` ``(B, H, N)`` (None without ``row``), in the
        accumulation dtype (float32; float64 for float64 inputs).
    """
    if bias is not None and rules not in LOGIT_RULES:
        raise ValueError(f"the relevance through a bias of the logits needs the rule set, one of {LOGIT_RULES}; "
                         f"got {rules!r}")
    acc = _acc(q.dtype)
    b, h, n, d = q.shape
    qa, ka, va = _flat(q, acc), _flat(k, acc), _flat(v, acc)
    kt, vt = ka.transpose(-1, -2), va.transpose(-1, -2)
    neg_lse = lse.to(acc).reshape(b * h, n, 1).neg()
    s_o = _safe_divide_(_flat(r_o, acc).clone(), _flat(o, acc).clone()).mul_(0.5)           # S_O / 2 (G, N, d)
    doa = _flat(do, acc) if do is not None else None
    rows = row.to(acc).repeat_interleave(h, dim=0)[:, None] if row is not None else None    # (G, 1, N)
    tiles = list(_tiles(b * h, n, n, _itemsize(acc), q.device, block))
    size = max((gs.stop - gs.start) * (rs.stop - rs.start) for gs, rs in tiles) * n
    buffers = [torch.empty(size, dtype=acc, device=q.device) for _ in range(3)]             # Z, P, R^A tiles

    def tile_buffer(i: int, gs: slice, rs: slice) -> torch.Tensor:
        return buffers[i][:(gs.stop - gs.start) * (rs.stop - rs.start) * n].view(gs.stop - gs.start, -1, n)

    def relevance_tile(gs: slice, rs: slice):
        """Z, P and R^A of one tile (in the three buffers), and the scaled bias tile B' = B/scale (None without
        a bias); the key sum of R_V (without its factor V) added."""
        z = torch.bmm(qa[gs, rs], kt[gs], out=tile_buffer(0, gs, rs))                        # Z (G_t, Q_t, N)
        b_s = None if bias is None else bias_tile(bias, h, gs, rs, acc).div_(scale)          # B' = B / scale
        logits = z if b_s is None else z + b_s
        p = torch.add(neg_lse[gs, rs], logits, alpha=scale, out=tile_buffer(1, gs, rs)).exp_()   # P from Z (+ B')
        r_v[gs].baddbmm_(p.transpose(-1, -2), s_o[gs, rs])                                    # Σ_i P_ij S_O,i / 2
        ra = torch.bmm(s_o[gs, rs], vt[gs], out=tile_buffer(2, gs, rs)).mul_(p)               # R^A
        return z, p, ra, b_s

    r_v = torch.zeros((b * h, n, v.shape[-1]), dtype=acc, device=q.device)
    share = _logit_shares(tiles, relevance_tile, b, h, acc, q.device) if bias is not None and rules == "ours" \
        else None
    for exact in ((False, True) if q.device.type == "cpu" else (True,)):   # no host read per tile off the CPU
        r_q = torch.empty((b * h, n, d), dtype=acc, device=q.device)
        r_k = torch.zeros((b * h, n, d), dtype=acc, device=q.device)
        r_v.zero_()
        t = torch.zeros((b * h, 1, n), dtype=acc, device=q.device) if row is not None else None
        for gs, rs in tiles:
            z, p, ra, b_s = relevance_tile(gs, rs)
            if t is not None:                                         # P's buffer is free: ∇A, then the terms
                f = (torch.clamp_min(ra, 0, out=p) if doa is None
                     else torch.bmm(doa[gs, rs], vt[gs], out=p).mul_(ra).clamp_min_(0))
                t[gs].baddbmm_(rows[gs, :, rs], f)
            if b_s is not None:                                                               # Z's share of R^A
                ra = _safe_divide_(ra, z + b_s).mul_(z)
                if share is not None:
                    ra.mul_(share[gs, None, None])
            s_z = _safe_divide_(ra, z) if exact or _has_zero(z) else ra.div_(z.add_(STABILISER))   # S_Z, in place
            if r_q[gs, rs].is_contiguous():
                torch.bmm(s_z, ka[gs], out=r_q[gs, rs])
            else:                                                     # tests' row blocks over several groups
                r_q[gs, rs] = torch.bmm(s_z, ka[gs])
            r_k[gs].baddbmm_(s_z.transpose(-1, -2), qa[gs, rs])
        # the fast division leaves a non-finite S_Z only where Z + 1e-9 rounds to 0 (Z = −1e-9 ≠ 0, so its K_j ≠ 0
        # and R_Q's row i turns non-finite with it): then the pass is run again with the exact rule
        if exact or bool(torch.isfinite(r_q).all()):
            break
    r_q.mul_(qa).mul_(0.5)
    r_k.mul_(ka).mul_(0.5)
    r_v.mul_(va)
    out = tuple(x.reshape(b, h, n, -1) for x in (r_q, r_k, r_v))
    return (*out, None if t is None else t.reshape(b, h, n))


def _has_zero(z: torch.Tensor) -> bool:
    """Whether the tile ``z`` has an exact zero (one read, no mask written)."""
    return int(torch.count_nonzero(z)) < z.numel()


def _logit_shares(tiles, relevance_tile, b: int, h: int, acc: torch.dtype, device) -> torch.Tensor:
    """``c`` per group ``(G,)`` (each image's factor repeated over its heads): the first pass of the ``"ours"``
    add rule between Z and B' (module docstring) over every tile, ``c_b = |a_b| / (|a_b| + |b_b|) · Σ R^A ⊘ a_b``."""
    sums = torch.zeros((3, b * h), dtype=acc, device=device)                                 # Σ Z⊙s, Σ B'⊙s, Σ R^A
    for gs, rs in tiles:
        z, _, ra, b_s = relevance_tile(gs, rs)
        sums[2, gs] += ra.sum((1, 2))
        s = _safe_divide_(ra, z + b_s)
        sums[0, gs] += (z * s).sum((1, 2))
        sums[1, gs] += s.mul_(b_s).sum((1, 2))
    sa, sb, total = sums.reshape(3, b, h).sum(-1)                                           # per image
    fa = _safe_divide_(sa.abs(), sa.abs() + sb.abs()).mul_(total)
    return _safe_divide_(fa, sa.clone()).repeat_interleave(h)
