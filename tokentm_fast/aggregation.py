"""The aggregation engine shared by TokenTM, GAE and rollout (docs/methods.md §3, §3.1, §4).

Every method is the product of per-layer update maps
``Uˡ = (I + diag(w_mlp)) · (I + Āˡ · diag(w_attn))`` applied to ``C⁰``::

    Cᴸ = Uᴸ ⋯ U^{k+1} · C⁰

Only rows of ``Cᴸ`` are needed, so the engine carries a block of rows
``R (B, Q, N)`` from the top layer down (docs/methods.md §3.1)::

    s = R ⊙ (1 + w_mlp)          # column scaling: R · U^{mlp}
    R = s + (s · Ā) ⊙ w_attn      # R · U^{attn}
    result = R · diag(C⁰)

``Q = 1`` (a query row) is the row algorithm; starting from ``R = I`` (``Q = N``)
gives the whole matrix ``Cᴸ`` with the same update. One layer of it (``row_update``,
``scale_rows``, ``add_update``) is the PyTorch twin of the row / matrix update kernels,
``tokentm_fast.torch_ops.row_update``; this module runs it over the layers.

The engine constants, the one table of them (``EngineConstants`` below; the fusion modes are
``tokentm_fast.kernels._utils.FUSION_TABLE``'s):

============  ==================  ===============  =============  ===========
method        fusion              w_attn           w_mlp          C⁰
============  ==================  ===============  =============  ===========
tokentm       gae | decoupled     §2 weights       §2 weights     diag(|X⁰|) or I
gae           gae                 1                0              I
rollout       mean                1                −½             I
============  ==================  ===============  =============  ===========

(rollout: ``s = ½R`` and ``R = ½R + ½R·mean_h A = R·(½I + ½ mean_h A)``, the product of
Abnar & Zuidema's ``½I + ½ mean_h A``: there is no separate "rollout" head fusion.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch

from .torch_ops.row_update import Weight, add_update, row_update, scale_rows


@dataclass(frozen=True)
class EngineConstants:
    """Fusion mode and constant weights of a method (``None`` = per-layer §2 weights)."""

    fusion: str
    w_attn: Optional[float]
    w_mlp: Optional[float]


GAE = EngineConstants(fusion="gae", w_attn=1.0, w_mlp=0.0)
ROLLOUT = EngineConstants(fusion="mean", w_attn=1.0, w_mlp=-0.5)


def query_support(query: torch.Tensor) -> slice:
    """``lo:hi`` around the non-zero columns of a host-side ``(B, N)`` query (what ``support``
    of the top layer's ``row_update`` takes). ``query`` must be a CPU tensor: reading it is
    host arithmetic, never a device synchronisation (build it on the CPU for CUDA runs)."""
    if query.device.type != "cpu":
        raise ValueError(f"query_support reads the query on the host; pass a CPU tensor, got {query.device}")
    cols = query.ne(0).any(0).nonzero().flatten()
    if cols.numel() == 0:
        return slice(0, 0)
    return slice(int(cols[0]), int(cols[-1]) + 1)


def initial_rows(query: torch.Tensor, full: bool) -> torch.Tensor:
    """``(B, N)`` query → ``(B, 1, N)`` rows, or the identity ``(B, N, N)`` for ``full``."""
    if full:
        b, n = query.shape
        return torch.eye(n, dtype=query.dtype, device=query.device).expand(b, n, n).clone()
    return query[:, None, :].clone()


def finish_rows(rows: torch.Tensor, c0: Optional[torch.Tensor]) -> torch.Tensor:
    """Multiply by ``C⁰ = diag(c0)`` on the right (``c0=None`` means ``C⁰ = I``)."""
    return rows if c0 is None else rows * c0.to(rows.dtype)[:, None, :]


def _at(x, l: int):
    """Layer l of a per-layer argument; None and constant floats are the same for every layer."""
    return x if x is None or isinstance(x, float) else x[l]


def aggregate_layers(
    attns: Union[Sequence[torch.Tensor], torch.Tensor],
    grads: Optional[Union[Sequence[torch.Tensor], torch.Tensor]],
    w_attn: Union[Sequence[Weight], torch.Tensor, float],
    w_mlp: Union[Sequence[Weight], torch.Tensor, float],
    query: torch.Tensor,
    c0: Optional[torch.Tensor] = None,
    mode: str = "gae",
    full: bool = False,
    support: Optional[slice] = None,
) -> torch.Tensor:
    """Run the engine over layers given bottom-up (index 0 = block 1).

    Args:
        attns, grads: per-layer ``(B, H, N, N)`` (lists or stacked ``(L, B, H, N, N)``).
        w_attn, w_mlp: per-layer ``(B, N)`` weights (lists or ``(L, B, N)``) or floats.
        query: ``(B, N)`` weights of the rows to read (e.g. one-hot cls); ignored for ``full``.
        c0: ``(B, N)`` diagonal of ``C⁰`` or None for the identity.
        support: the tokens ``lo:hi`` outside which ``query`` is zero, if known
            (then the top layer reads only those rows of A and G; see ``row_update``).
            None: read off ``query`` when it is a CPU tensor (host arithmetic), else dense.

    Returns:
        ``(B, N)`` row ``queryᵀ Cᴸ`` or, with ``full``, the ``(B, N, N)`` matrix ``Cᴸ``.
    """
    if support is None and not full and query.device.type == "cpu":
        support = query_support(query)
    rows = initial_rows(query, full)
    top = len(attns) - 1
    for l in reversed(range(len(attns))):
        sup = support if (l == top and not full) else None
        rows = row_update(rows, attns[l], _at(grads, l), _at(w_attn, l), _at(w_mlp, l), mode, support=sup)
    rows = finish_rows(rows, c0)
    return rows if full else rows[:, 0]


def check_layer_order(layer: int, expected: Optional[int]) -> None:
    """The row algorithm needs the layers' gradients top-down, one after the other (autograd's order
    for a plain ViT); anything else (a model that reuses a block, a hook reordering the backward) would
    silently give a wrong map."""
    if layer != expected:
        raise RuntimeError(f"attention gradients arrived out of order (layer {layer}, expected {expected})")


class RowState:
    """The row ``r (B, N)`` of the row algorithm on the flash path, advanced as autograd reaches each
    layer's attention backward (``tokentm_fast.kernels.attention.ExplanationAttention``).

    ``weights[l] = (w_attn, w_mlp)`` are set in the forward (after layer l ran); ``start(query)`` sets
    ``r`` to the query row once the forward is done; ``scaled_row(l)`` gives ``s = r ⊙ (1 + w_mlp^l)``
    (``scale_rows``) to layer l's backward, and ``update(l, t_heads)`` finishes the step:
    ``r ← s + mean_h(t_heads) ⊙ w_attn^l`` (``add_update``).

    Layers ``first .. last`` run the explanation attention; ``chosen`` (a layer choice, docs/methods.md
    "Layer choice"; default: all of them) are the ones that update the row: the others get no row
    (``scaled_row`` is None: their backward computes dQ, dK, dV only) and leave ``r`` as it is.
    """

    def __init__(self, first: int, last: int, chosen: Optional[Iterable[int]] = None) -> None:
        self.first = first
        self.chosen = None if chosen is None else frozenset(chosen)
        self.next = last if self.chosen is None else max(self.chosen)
        self.weights: Dict[int, Tuple[Weight, Weight]] = {}
        self.rows: Optional[torch.Tensor] = None
        self._s: Optional[torch.Tensor] = None

    def start(self, query: torch.Tensor) -> None:
        self.rows = query.to(torch.float32)

    def _updates(self, layer: int) -> bool:
        return self.chosen is None or layer in self.chosen

    def scaled_row(self, layer: int) -> Optional[torch.Tensor]:
        if not self._updates(layer):
            return None
        check_layer_order(layer, self.next)
        self._s = scale_rows(self.rows, self.weights[layer][1])
        return self._s

    def update(self, layer: int, t_heads: Optional[torch.Tensor]) -> None:
        if not self._updates(layer):
            return
        self.rows = add_update(self._s, t_heads.mean(1), self.weights.pop(layer)[0])
        self._s = None
        below = [c for c in self.chosen if c < layer] if self.chosen is not None else [layer - 1]
        self.next = max(below) if below else self.first - 1
