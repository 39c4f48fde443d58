"""The flash formulation of the explanation attention in PyTorch: the CPU twin of ``kernels/attention.py``.

Per image and head, ``P = softmax(scale·QKᵀ)`` and ``dP = dO Vᵀ`` (docs/methods.md §8). The forward keeps
only ``O`` and the row log-sum-exp ``ℓ``; the backward and the row programs recompute ``P`` (and ``dP``)
one block of query rows at a time: ``(B, H, Q_blk, N)`` blocks sized by ``query_block`` to stay within
``BLOCK_BYTES`` each (at least ``MIN_BLOCK`` rows; every row, one N×N block, when that fits the budget:
memory stays O(N) per block row beyond small N)::

    forward   S_i = scale · Q_i Kᵀ;  ℓ_i = logsumexp_j S_ij;  O_i = exp(S_i − ℓ_i) V
    backward  P_i = exp(S_i − ℓ_i);  dP_i = dO_i Vᵀ;  δ_i = Σ_d dO_i ⊙ O_i
              dV += P_iᵀ dO_i;  dS_i = P_i ⊙ (dP_i − δ_i);  dQ_i = scale · dS_i K;  dK += scale · dS_iᵀ Q_i
              t_j += Σ_{i ∈ block} row_i · max(P_ij · dP_ij, 0)            (TokenTM / GAE, ``row`` given)
    rows      t_j = Σ_i row_i · P_ij   (q, k, ℓ)   or   Σ_i row_i · max(dP_ij, 0)   (dO, V)

``input_grads``: True gives dQ, dK, dV; False none of them (only ``t``); ``"v"`` dV alone, the attention
held constant (conservative LRP: no dP, no dS unless ``row`` asks for ``t``). Products in float32 at least
(float64 stays float64); outputs in q's dtype, ``ℓ`` and ``t`` float32 (float64 for float64 inputs).

On CPU tensors the forward and the full backward (dQ, dK, dV) are PyTorch's own fused CPU flash-attention
kernels (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: the same O, ℓ and
gradients, blocked in cache, several times faster than the same products as separate PyTorch operations);
the explanation sums (``t``, the row programs) and the held dV run the blocked loops above. Elsewhere (or
where that operator is missing) every part runs the blocked loops.

The three functions have the signatures of the Triton wrappers (``flash_forward``, ``flash_backward``,
``attention_rows``); ``torch_attention()`` bundles them as the attention triple the flash path takes.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

#: bytes of one (B, H, Q_blk, N) block of the accumulation dtype: large enough for BLAS to stay busy,
#: small against a training step's activations (a few such blocks are alive at a time)
BLOCK_BYTES = 64 << 20
#: fewest query rows per block (matrix products narrower than this waste the BLAS kernels)
MIN_BLOCK = 64


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def query_block(b: int, h: int, n_q: int, n_k: int, itemsize: int, budget: Optional[int] = None) -> int:
    """Query rows per block: ``(B, H, rows, n_k)`` within ``budget`` bytes (default ``BLOCK_BYTES``), at least
    ``MIN_BLOCK``, at most n_q."""
    rows = (BLOCK_BYTES if budget is None else budget) // max(1, b * h * n_k * itemsize)
    return int(max(1, min(n_q, max(MIN_BLOCK, rows))))


def _blocks(n: int, step: int):
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _fused_cpu(*tensors: torch.Tensor) -> bool:
    """Whether PyTorch's fused CPU flash-attention operators serve these tensors."""
    return (hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and all(t.device.type == "cpu" for t in tensors))


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  block: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``O (B, H, N, d)`` in q's dtype and ``ℓ (B, H, N)`` (float32; float64 for float64 inputs)."""
    if block is None and _fused_cpu(q, k, v):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return o, lse.to(_acc(q.dtype))
    acc = _acc(q.dtype)
    b, h, n, _ = q.shape
    kt, va = k.to(acc).transpose(-1, -2), v.to(acc)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=acc, device=q.device)
    step = block or query_block(b, h, n, k.shape[2], torch.finfo(acc).bits // 8)
    for i0, i1 in _blocks(n, step):
        s = torch.matmul(q[:, :, i0:i1].to(acc), kt).mul_(scale)
        m = torch.logsumexp(s, dim=-1)
        s.sub_(m[..., None]).exp_()
        o[:, :, i0:i1] = torch.matmul(s, va).to(q.dtype)
        lse[:, :, i0:i1] = m
    return o, lse


def flash_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, scale: float, row: Optional[torch.Tensor] = None, input_grads: Union[bool, str] = True,
    block: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dq, dk, dv, t)`` as ``kernels.attention.flash_backward``: input gradients in q's dtype (None where
    ``input_grads`` leaves them out) and ``t (B, H, N)`` when ``row (B, N)`` is given (None otherwise)."""
    if input_grads not in (True, False, "v"):
        raise ValueError(f"input_grads must be True, False or 'v', got {input_grads!r}")
    acc = _acc(q.dtype)
    b, h, n, _ = q.shape
    all_grads, any_grads = input_grads is True, input_grads is not False
    if not any_grads and row is None:
        return None, None, None, None
    if all_grads and block is None and _fused_cpu(q, k, v, o, do):
        # dQ, dK, dV from PyTorch's fused CPU kernel (its ℓ in its own dtype), then t alone if asked for
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.contiguous(), q, k, v, o, lse.to(torch.float32 if q.dtype != torch.float64 else q.dtype),
            0.0, False, scale=scale)
        t = None if row is None else flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=False,
                                                     block=query_block(b, h, n, k.shape[2], torch.finfo(acc).bits // 8))[3]
        return dq, dk, dv, t
    qa, ka, va, oa, doa = (x.to(acc) for x in (q, k, v, o, do))
    kt, vt = ka.transpose(-1, -2), va.transpose(-1, -2)
    dq = torch.empty_like(qa) if all_grads else None
    dk = torch.zeros_like(ka) if all_grads else None
    dv = torch.zeros_like(va) if any_grads else None
    t = torch.zeros((b, h, n), dtype=acc, device=q.device) if row is not None else None
    rows = row.to(acc) if row is not None else None
    step = block or query_block(b, h, n, k.shape[2], torch.finfo(acc).bits // 8)
    for i0, i1 in _blocks(n, step):
        q_i, do_i = qa[:, :, i0:i1], doa[:, :, i0:i1]
        p = torch.matmul(q_i, kt).mul_(scale).sub_(lse[:, :, i0:i1, None].to(acc)).exp_()     # (B, H, Q, N)
        if any_grads:
            dv.add_(torch.matmul(p.transpose(-1, -2), do_i))
        if not all_grads and row is None:
            continue
        pdp = torch.matmul(do_i, vt).mul_(p)                                                 # P ⊙ dP
        if row is not None:
            t.add_(torch.matmul(rows[:, None, None, i0:i1], pdp.clamp_min(0))[:, :, 0])
        if all_grads:
            delta = (do_i * oa[:, :, i0:i1]).sum(-1, keepdim=True)                            # δ_i
            ds = pdp.sub_(p.mul_(delta))                                                     # P ⊙ (dP − δ)
            dq[:, :, i0:i1] = torch.matmul(ds, ka).mul_(scale)
            dk.add_(torch.matmul(ds.transpose(-1, -2), q_i), alpha=scale)
    out = tuple(None if g is None else g.to(q.dtype) for g in (dq, dk, dv))
    return (*out, t)


def attention_rows(
    row: torch.Tensor, scale: float, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None, do: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
    block: Optional[int] = None,
) -> torch.Tensor:
    """``(B, H, N)``: ``Σ_i row[b, i] · P[b, h, i, j]`` (give q, k, lse) or ``· max(dP, 0)[b, h, i, j]``
    (give do, v); ``row (B, R)`` over the R query rows of q (or do)."""
    probs = q is not None
    ref, other = (q, k) if probs else (do, v)
    acc = _acc(ref.dtype)
    b, h, r, _ = ref.shape
    n = other.shape[2]
    ot = other.to(acc).transpose(-1, -2)
    rows = row.to(acc)
    t = torch.zeros((b, h, n), dtype=acc, device=ref.device)
    step = block or query_block(b, h, r, n, torch.finfo(acc).bits // 8)
    for i0, i1 in _blocks(r, step):
        f = torch.matmul(ref[:, :, i0:i1].to(acc), ot)
        f = f.mul_(scale).sub_(lse[:, :, i0:i1, None].to(acc)).exp_() if probs else f.clamp_min_(0)
        t.add_(torch.matmul(rows[:, None, None, i0:i1], f)[:, :, 0])
    return t


def torch_attention():
    """The three functions above as the attention triple of the flash path (``paths.Flash``)."""
    from ..kernels._utils import AttentionKernels

    def backward(q, k, v, o, lse, do, scale, row=None, input_grads=True):
        return flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=input_grads)

    return AttentionKernels(flash_forward, backward, attention_rows)
