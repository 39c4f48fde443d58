"""The explanation attention: an autograd Function around the flash kernels that
carries the row state of the row algorithm from one layer's backward to the next.

The math (docs/methods.md §8): per layer l and head h,
``P = softmax(scale·QKᵀ)`` is never stored; the forward keeps Q, K, V, O and the
row log-sum-exp ℓ, and the backward recomputes P and G = dP = dO Vᵀ tile by tile.
While doing so, the dK/dV program of the kernel accumulates

    t[j] = (1/H) Σ_h Σ_i s[i] · max(P_h[i, j] · G_h[i, j], 0),     s = r ⊙ (1 + w_mlp^l)

and the row becomes ``r ← s + t ⊙ w_attn^l`` before autograd reaches the layer
below (``RowState``). Autograd visits the layers top-down, so the state flows
exactly as in the row algorithm and no layer's Aˡ or Gˡ ever exists.

This module also holds the PyTorch equivalents of the kernels in
``tokentm_fast.kernels.attention`` (full matrices, for small N: the oracles the
kernel tests compare with): ``attention_forward_torch``, ``attention_backward_torch``,
``attention_rows_torch``.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

Weights = Tuple[object, object]  # (w_attn, w_mlp): (B, N) tensors or floats


# --------------------------------------------------------------------------- PyTorch equivalents
def attention_forward_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``O = softmax(scale·QKᵀ) V`` ``(B, H, N, d)`` in q's dtype and ``ℓ (B, H, N)`` float32.

    Computed in float32 at least (float64 stays float64), with full ``(B, H, N, N)`` logits.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    s = scale * q.to(acc) @ k.to(acc).transpose(-1, -2)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.exp(s - lse[..., None]) @ v.to(acc)
    return o.to(q.dtype), lse.to(torch.float32) if acc == torch.float32 else lse


def attention_backward_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, scale: float,
    row: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(dq, dk, dv, t)`` of the flash backward with full matrices (see ``kernels/attention.py``).

    ``t (B, H, N)`` = Σ_i row[b, i] · max(P ⊙ dP, 0)[b, h, i, j] when ``row (B, N)`` is given.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v, do = (x.to(acc) for x in (q, k, v, do))
    p = torch.exp(scale * q @ k.transpose(-1, -2) - lse.to(acc)[..., None])
    dp = do @ v.transpose(-1, -2)
    o = p @ v
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq, dk, dv = scale * ds @ k, scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do
    t = None
    if row is not None:
        t = torch.einsum("bi,bhij->bhj", row.to(acc), (p * dp).clamp_min(0))
    return dq, dk, dv, t


def attention_rows_torch(
    row: torch.Tensor, scale: float, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None, do: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(B, H, N)``: Σ_i row[b, i] · P[b, h, i, j] (q, k, lse given) or · max(dP, 0) (do, v given)."""
    if q is not None:
        acc = torch.promote_types(q.dtype, torch.float32)
        f = torch.exp(scale * q.to(acc) @ k.to(acc).transpose(-1, -2) - lse.to(acc)[..., None])
    else:
        acc = torch.promote_types(do.dtype, torch.float32)
        f = (do.to(acc) @ v.to(acc).transpose(-1, -2)).clamp_min(0)
    return torch.einsum("bi,bhij->bhj", row.to(acc), f)


# --------------------------------------------------------------------------- the row state
class RowState:
    """The row ``r (B, N)`` of the row algorithm, updated as autograd reaches each layer.

    ``weights[l] = (w_attn, w_mlp)`` are set in the forward (after layer l ran);
    ``start(query)`` sets ``r`` to the query row once the forward is done;
    ``scaled_row(l)`` gives ``s = r ⊙ (1 + w_mlp^l)`` to layer l's backward and
    ``update(l, t_heads)`` finishes it: ``r ← s + mean_h(t_heads) ⊙ w_attn^l``.
    """

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.next = last
        self.weights: Dict[int, Weights] = {}
        self.rows: Optional[torch.Tensor] = None
        self._s: Optional[torch.Tensor] = None

    def start(self, query: torch.Tensor) -> None:
        self.rows = query.to(torch.float32)

    def scaled_row(self, layer: int) -> torch.Tensor:
        if layer != self.next:
            raise RuntimeError(f"attention gradients arrived out of order (layer {layer}, expected {self.next})")
        w_mlp = self.weights[layer][1]
        w = w_mlp.to(torch.float32) if isinstance(w_mlp, torch.Tensor) else float(w_mlp)
        self._s = self.rows * (1.0 + w)
        return self._s

    def update(self, layer: int, t_heads: torch.Tensor) -> None:
        w_attn = self.weights.pop(layer)[0]
        w = w_attn.to(torch.float32) if isinstance(w_attn, torch.Tensor) else float(w_attn)
        self.rows = self._s + t_heads.mean(1) * w
        self._s = None
        self.next -= 1


class AttentionKernels(NamedTuple):
    """One implementation of the explanation attention (signatures of ``kernels.attention``)."""

    forward: Callable  # (q, k, v, scale) -> (o, lse)
    backward: Callable  # (q, k, v, o, lse, do, scale, row=None, input_grads=True) -> (dq, dk, dv, t)
    rows: Callable  # (row, scale, q=, k=, lse= | do=, v=) -> t (B, H, N)


class ExplanationAttention(torch.autograd.Function):
    """``o = softmax(scale·QKᵀ) V`` whose backward also advances a ``RowState``.

    ``anchor`` is a 0-d tensor that requires grad: every layer's output depends on
    it, so ``torch.autograd.grad(score, anchor)`` runs every layer's backward
    (its gradient is 0). Layers whose q, k, v need no gradient (the lowest
    explained layer) compute only the explanation sums, not dQ, dK, dV.
    """

    @staticmethod
    def forward(ctx, q, k, v, anchor, scale: float, layer: int, state: RowState, kernels: AttentionKernels):
        o, lse = kernels.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse, anchor)
        ctx.scale, ctx.layer, ctx.state, ctx.kernels = scale, layer, state, kernels
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, anchor = ctx.saved_tensors
        state: RowState = ctx.state
        input_grads = any(ctx.needs_input_grad[:3])
        row = state.scaled_row(ctx.layer)
        dq, dk, dv, t = ctx.kernels.backward(q, k, v, o, lse, do, ctx.scale, row=row, input_grads=input_grads)
        state.update(ctx.layer, t)
        return dq, dk, dv, torch.zeros_like(anchor), None, None, None, None


def _torch_forward(q, k, v, scale):
    return attention_forward_torch(q, k, v, scale)


def _torch_backward(q, k, v, o, lse, do, scale, row=None, input_grads=True):
    dq, dk, dv, t = attention_backward_torch(q, k, v, lse, do, scale, row)
    t = None if t is None else t.to(torch.float32)
    if not input_grads:
        dq = dk = dv = None
    else:
        dq, dk, dv = (g.to(q.dtype) for g in (dq, dk, dv))
    return dq, dk, dv, t


def _torch_rows(row, scale, q=None, k=None, lse=None, do=None, v=None):
    return attention_rows_torch(row, scale, q=q, k=k, lse=lse, do=do, v=v).to(torch.float32)


#: the PyTorch equivalents (full matrices of one layer at a time): oracles, not a memory-lean path
TORCH_ATTENTION = AttentionKernels(_torch_forward, _torch_backward, _torch_rows)


def triton_attention() -> AttentionKernels:
    from .kernels.attention import attention_rows, flash_backward, flash_forward

    def fwd(q, k, v, scale):
        return flash_forward(q, k, v, scale, ieee=not _tf32_allowed())

    def bwd(q, k, v, o, lse, do, scale, row=None, input_grads=True):
        return flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=input_grads,
                              ieee=not _tf32_allowed())

    def rows(row, scale, q=None, k=None, lse=None, do=None, v=None):
        return attention_rows(row, scale, q=q, k=k, lse=lse, do=do, v=v, ieee=not _tf32_allowed())

    return AttentionKernels(fwd, bwd, rows)


def _tf32_allowed() -> bool:
    """Follow PyTorch's own switch for float32 matmuls (off by default: full float32)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)
