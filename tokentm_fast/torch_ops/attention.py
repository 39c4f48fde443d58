"""The flash formulation of the explanation attention in PyTorch: the CPU twin of ``kernels/attention.py``.

Per image and head, ``P = softmax(scale·QKᵀ)`` and ``dP = dO Vᵀ`` (docs/methods.md §8). The forward keeps
only ``O`` and the row log-sum-exp ``ℓ``; the backward and the row programs recompute ``P`` (and ``dP``)
one tile at a time: ``(G_t, Q_t, N)`` tiles over the ``G = B·H`` (image, head) pairs and the query rows, sized
by ``tile_shape`` to stay within a byte budget each (``BLOCK_BYTES``; on CPU tensors also ``CPU_TILE_BYTES``,
cache-sized): every row of as many heads as fit, or ``Q_t ≥ MIN_BLOCK`` rows of one head. Memory stays O(N)
per tile row beyond small N::

    forward   S_i = scale · Q_i Kᵀ;  ℓ_i = logsumexp_j S_ij;  O_i = exp(S_i − ℓ_i) V
    backward  P_i = exp(S_i − ℓ_i);  dP_i = dO_i Vᵀ;  δ_i = Σ_d dO_i ⊙ O_i
              dV += P_iᵀ dO_i;  dS_i = P_i ⊙ (dP_i − δ_i);  dQ_i = scale · dS_i K;  dK += scale · dS_iᵀ Q_i
              t_j += Σ_{i ∈ tile} row_i · max(dP_ij, 0) · P_ij            (TokenTM / GAE, ``row`` given)
    rows      t_j = Σ_i row_i · P_ij   (q, k, ℓ)   or   Σ_i row_i · max(dP_ij, 0)   (dO, V)

``S_i − ℓ_i`` is one ``baddbmm`` (``−ℓ_i`` its broadcast addend, ``scale`` its factor), exponentiated in
place; ``max(P ⊙ dP, 0) = P ⊙ max(dP, 0)`` (P ≥ 0) is clamped and multiplied in place and summed over the
tile's rows by a ``baddbmm`` into ``t``: one tile-sized tensor per product, no further temporaries.

``input_grads``: True gives dQ, dK, dV; False none of them (only ``t``); ``"v"`` dV alone, the attention
held constant (conservative LRP: no dP, no dS unless ``row`` asks for ``t``). Products in float32 at least
(float64 stays float64); outputs in q's dtype, ``ℓ`` and ``t`` float32 (float64 for float64 inputs).

On CPU tensors the forward and the full backward (dQ, dK, dV) are PyTorch's own fused CPU flash-attention
kernels (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: the same O, ℓ and
gradients, blocked in cache, several times faster than the same products as separate PyTorch operations);
the explanation sums (``t``, the row programs) and the held dV run the tiled loops above. Elsewhere (or
where that operator is missing) every part runs the tiled loops.

BEiT's relative position bias (``bias``, a ``models.relative_bias.RelativePositionBias``: the table ``(R, H)``, the
grid, the class token) is added to ``scale · Q Kᵀ`` tile by tile: ``bias_tile`` gathers ``B`` for the tile's
(image, head) groups and rows ``(G_t, Q_t, N)`` from the table by the relative position (an index tile
``(Q_t, N)``, one gather; never an N×N tensor beyond the tile), and it is the ``baddbmm``'s addend with ``−ℓ_i``
(``S_i + B_i − ℓ_i`` in one product). With a bias the CPU forward and backward run the tiled loops (PyTorch's
fused CPU kernels take no bias here).

The three functions have the signatures of the Triton wrappers (``flash_forward``, ``flash_backward``,
``attention_rows``); ``torch_attention()`` bundles them as the attention triple the flash path takes.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch

#: bytes of one (G_t, Q_t, N) tile of the accumulation dtype: the memory budget (a few such tiles are alive
#: at a time), large enough for BLAS to stay busy on an accelerator
BLOCK_BYTES = 64 << 20
#: the tile budget on CPU tensors: a tile and its twin (P and dP) stay in the last-level cache between the
#: matrix products and the elementwise passes, in few enough tiles that the per-operator thread barriers stay
#: cheap on a loaded machine (at N = 4097, d = 64, 2 threads, the t-only pass: 64 MB tiles over every head
#: 1.9 s; 16 MB 1.2 s; 2 MB 0.8 s idle but 4× slower than 16 MB at a load average of 7;
#: benchmarks/results/cpu-amd-epyc-2c/2026-12-07-highres-2/)
CPU_TILE_BYTES = 16 << 20
#: fewest query rows per tile (matrix products narrower than this waste the BLAS kernels)
MIN_BLOCK = 32


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def tile_shape(g: int, n_q: int, n_k: int, itemsize: int, device: torch.device = torch.device("cpu"),
               budget: Optional[int] = None) -> Tuple[int, int]:
    """``(groups, rows)`` per tile: ``(groups, rows, n_k)`` of ``itemsize`` bytes within ``budget`` (default
    ``BLOCK_BYTES``, and at most ``CPU_TILE_BYTES`` on CPU tensors): every row of as many of the ``g``
    (image, head) groups as fit, else one group and ``rows ≥ MIN_BLOCK`` (at most n_q)."""
    if budget is None:
        budget = BLOCK_BYTES if torch.device(device).type != "cpu" else min(BLOCK_BYTES, CPU_TILE_BYTES)
    row_bytes = max(1, n_k * itemsize)
    if n_q * row_bytes <= budget:
        return int(min(g, budget // (n_q * row_bytes))), n_q
    return 1, int(max(1, min(n_q, max(MIN_BLOCK, budget // row_bytes))))


def _tiles(g: int, n_q: int, n_k: int, itemsize: int, device: torch.device,
           block: Optional[int]) -> Iterator[Tuple[slice, slice]]:
    """``(groups, rows)`` slices covering ``g × n_q``; ``block`` given: every group, ``block`` rows a tile."""
    gs, rs = (g, block) if block else tile_shape(g, n_q, n_k, itemsize, device)
    for g0 in range(0, g, gs):
        for i0 in range(0, n_q, rs):
            yield slice(g0, min(g, g0 + gs)), slice(i0, min(n_q, i0 + rs))


def _flat(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``(B, H, N, d)`` → ``(B·H, N, d)`` in ``acc``."""
    return x.to(acc).reshape(-1, *x.shape[2:])


def bias_tile(bias, heads: int, gs: slice, rs: slice, acc: torch.dtype) -> torch.Tensor:
    """``B[h, i, j]`` ``(G_t, Q_t, N)`` of the groups ``gs`` (group g = image·H + head) and query rows ``rs``,
    gathered from the table of ``bias`` (a ``RelativePositionBias``) in ``acc``."""
    dev = bias.table.device
    hs = torch.arange(gs.start, gs.stop, device=dev) % heads
    return bias.tile(torch.arange(rs.start, rs.stop, device=dev), heads=hs).to(acc)


def _probs(qa: torch.Tensor, kt: torch.Tensor, neg_lse: torch.Tensor, scale: float, gs: slice,
           rs: slice, bias=None, heads: int = 1) -> torch.Tensor:
    """``P = exp(scale·Q Kᵀ + B − ℓ)`` on one tile ``(G_t, Q_t, N)``: one product with ``−ℓ (G, N, 1)`` (plus the
    bias tile, if any) as its addend and ``scale`` as its factor (``baddbmm``), exponentiated in place."""
    if bias is None:
        addend = neg_lse[gs, rs].expand(-1, -1, kt.shape[-1])
    else:
        addend = bias_tile(bias, heads, gs, rs, qa.dtype).add_(neg_lse[gs, rs])
    return torch.baddbmm(addend, qa[gs, rs], kt[gs], alpha=scale).exp_()


def _fused_cpu(*tensors: torch.Tensor) -> bool:
    """Whether PyTorch's fused CPU flash-attention operators serve these tensors."""
    return (hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and all(t.device.type == "cpu" for t in tensors))


def _itemsize(acc: torch.dtype) -> int:
    return torch.finfo(acc).bits // 8


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  block: Optional[int] = None, bias=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``O (B, H, N, d)`` in q's dtype and ``ℓ (B, H, N)`` (float32; float64 for float64 inputs) of
    ``softmax(scale·Q Kᵀ + B) V``; ``bias``: None or a ``RelativePositionBias`` (B read from its table)."""
    if block is None and bias is None and _fused_cpu(q, k, v):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return o, lse.to(_acc(q.dtype))
    acc = _acc(q.dtype)
    b, h, n, _ = q.shape
    qa, kt, va = _flat(q, acc), _flat(k, acc).transpose(-1, -2), _flat(v, acc)
    o = torch.empty((b * h, n, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((b * h, n), dtype=acc, device=q.device)
    for gs, rs in _tiles(b * h, n, k.shape[2], _itemsize(acc), q.device, block):
        if bias is None:
            s = torch.matmul(qa[gs, rs], kt[gs]).mul_(scale)
        else:
            s = torch.baddbmm(bias_tile(bias, h, gs, rs, acc), qa[gs, rs], kt[gs], alpha=scale)
        m = torch.logsumexp(s, dim=-1)
        o[gs, rs] = torch.matmul(s.sub_(m[..., None]).exp_(), va[gs]).to(q.dtype)
        lse[gs, rs] = m
    return o.reshape(b, h, n, -1), lse.reshape(b, h, n)


def flash_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, scale: float, row: Optional[torch.Tensor] = None, input_grads: Union[bool, str] = True,
    block: Optional[int] = None, bias=None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dq, dk, dv, t)`` as ``kernels.attention.flash_backward``: input gradients in q's dtype (None where
    ``input_grads`` leaves them out) and ``t (B, H, N)`` when ``row (B, N)`` is given (None otherwise);
    ``bias``: the forward's ``RelativePositionBias`` (or None)."""
    if input_grads not in (True, False, "v"):
        raise ValueError(f"input_grads must be True, False or 'v', got {input_grads!r}")
    all_grads, any_grads = input_grads is True, input_grads is not False
    if not any_grads and row is None:
        return None, None, None, None
    if all_grads and block is None and bias is None and _fused_cpu(q, k, v, o, do):
        # dQ, dK, dV from PyTorch's fused CPU kernel (its ℓ in its own dtype), then t alone if asked for
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.contiguous(), q, k, v, o, lse.to(torch.float32 if q.dtype != torch.float64 else q.dtype),
            0.0, False, scale=scale)
        t = None if row is None else flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=False)[3]
        return dq, dk, dv, t
    return _tiled_backward(q, k, v, o, lse, do, scale, row, all_grads, any_grads, block, bias)


def _tiled_backward(q, k, v, o, lse, do, scale, row, all_grads, any_grads, block, bias=None):
    """The tiled loop of ``flash_backward`` (module docstring), on ``G = B·H`` flattened groups."""
    acc = _acc(q.dtype)
    b, h, n, d = q.shape
    qa, ka = _flat(q, acc), _flat(k, acc)
    kt, neg_lse = ka.transpose(-1, -2), lse.to(acc).reshape(b * h, n, 1).neg()
    doa, vt = _flat(do, acc), _flat(v, acc).transpose(-1, -2)
    dq = torch.empty((b * h, n, d), dtype=acc, device=q.device) if all_grads else None
    dk = torch.zeros((b * h, n, d), dtype=acc, device=q.device) if all_grads else None
    dv = torch.zeros((b * h, n, v.shape[-1]), dtype=acc, device=q.device) if any_grads else None
    t = torch.zeros((b * h, 1, n), dtype=acc, device=q.device) if row is not None else None
    rows = row.to(acc).repeat_interleave(h, dim=0)[:, None] if row is not None else None     # (G, 1, N)
    if all_grads:
        delta = (doa * _flat(o, acc)).sum(-1, keepdim=True)                                  # δ (G, N, 1)
    for gs, rs in _tiles(b * h, n, k.shape[2], _itemsize(acc), q.device, block):
        do_i = doa[gs, rs]
        p = _probs(qa, kt, neg_lse, scale, gs, rs, bias, h)                                   # (G_t, Q_t, N)
        if any_grads:
            dv[gs].baddbmm_(p.transpose(-1, -2), do_i)
        if not all_grads and row is None:
            continue
        dp = torch.matmul(do_i, vt[gs])                                                      # dP
        if row is not None:
            pos = dp.clamp_min_(0) if not all_grads else torch.clamp_min(dp, 0)
            t[gs].baddbmm_(rows[gs, :, rs], pos.mul_(p))                                     # row · max(P ⊙ dP, 0)
        if all_grads:
            ds = dp.sub_(delta[gs, rs]).mul_(p)                                               # P ⊙ (dP − δ)
            dq[gs, rs] = torch.matmul(ds, ka[gs]).mul_(scale)
            dk[gs].baddbmm_(ds.transpose(-1, -2), qa[gs, rs], alpha=scale)
    out = tuple(None if g is None else g.to(q.dtype).reshape(b, h, n, -1) for g in (dq, dk, dv))
    return (*out, None if t is None else t.reshape(b, h, n))


def attention_rows(
    row: torch.Tensor, scale: float, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None, do: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
    block: Optional[int] = None, bias=None,
) -> torch.Tensor:
    """``(B, H, N)``: ``Σ_i row[b, i] · P[b, h, i, j]`` (give q, k, lse; and the forward's ``bias``, if any) or
    ``· max(dP, 0)[b, h, i, j]`` (give do, v); ``row (B, R)`` over the R query rows of q (or do)."""
    probs = q is not None
    ref, other = (q, k) if probs else (do, v)
    acc = _acc(ref.dtype)
    b, h, r, _ = ref.shape
    n = other.shape[2]
    left, right = _flat(ref, acc), _flat(other, acc).transpose(-1, -2)
    neg_lse = lse.to(acc).reshape(b * h, r, 1).neg() if probs else None
    rows = row.to(acc).repeat_interleave(h, dim=0)[:, None]                                  # (G, 1, R)
    t = torch.zeros((b * h, 1, n), dtype=acc, device=ref.device)
    for gs, rs in _tiles(b * h, r, n, _itemsize(acc), ref.device, block):
        f = (_probs(left, right, neg_lse, scale, gs, rs, bias, h) if probs
             else torch.matmul(left[gs, rs], right[gs]).clamp_min_(0))
        t[gs].baddbmm_(rows[gs, :, rs], f)
    return t.reshape(b, h, n)


def torch_attention():
    """The three functions above and the relevance twin (``attention_relevance``) as the attention kernels of
    the flash path (``paths.Flash``)."""
    from ..kernels._utils import AttentionKernels

    def forward(q, k, v, scale, bias=None):
        return flash_forward(q, k, v, scale, bias=bias)

    def backward(q, k, v, o, lse, do, scale, row=None, input_grads=True, bias=None):
        return flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=input_grads, bias=bias)

    def rows(row, scale, q=None, k=None, lse=None, do=None, v=None, bias=None):
        return attention_rows(row, scale, q=q, k=k, lse=lse, do=do, v=v, bias=bias)

    from .attention_relevance import attention_relevance

    return AttentionKernels(forward, backward, rows, attention_relevance)
