"""BEiT's relative position bias in table form: what the attention cores get instead of an N×N bias.

BEiT (Hugging Face ``BeitModel`` / ``Data2VecVisionModel``, timm ``Beit``) adds to the attention logits of head h a
bias gathered from a learned table ``T (R, H)``, ``R = (2gh−1)(2gw−1) + 3``, by the relative position of the two
tokens. For tokens i, j ≥ ``prefix`` at grid positions (yi, xi), (yj, xj) (row-major, patch p = i − prefix at
``(p // gw, p % gw)``)::

    idx(i, j) = (yi − yj + gh − 1) · (2gw − 1) + (xi − xj + gw − 1)

and for the class token (i or j < ``prefix``): its query row ``R − 3`` (i < prefix ≤ j), its key column ``R − 2``
(j < prefix ≤ i), the corner ``R − 1`` (both); ``B[h, i, j] = T[idx(i, j), h]`` (timm's
``gen_relative_position_index``, Hugging Face's ``BeitRelativePositionBias.generate_relative_position_index``).
A per-layer table plus the shared one is the sum of the two tables (same index).

The flash kernels (``kernels/attention.py``) and their PyTorch twin (``torch_ops/attention.py``) read ``T`` and
form the index from each tile's offsets; :meth:`RelativePositionBias.dense` writes ``B (1, H, N, N)`` out for the
materialized path.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class RelativePositionBias:
    """The additive bias of the logits ``B[h, i, j] = table[idx(i, j), h]`` (module docstring).

    ``table``: ``(R, H)`` float, ``R = (2gh−1)(2gw−1) + 3``; ``grid``: ``(gh, gw)``; ``prefix``: the tokens before
    the patches (the class token: 1). The sequence has ``prefix + gh·gw`` tokens. (A dataclass, not a tuple: no
    PyTorch function mistakes it for a shape or a sequence of tensors.)
    """

    table: torch.Tensor
    grid: Tuple[int, int]
    prefix: int = 1

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    @property
    def num_heads(self) -> int:
        return self.table.shape[1]

    def index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``idx(i, j)`` ``(len(rows), len(cols))`` int64 of the token indices ``rows`` and ``cols`` (1-D)."""
        return relative_index(rows, cols, self.grid, self.prefix)

    def tile(self, rows: Union[slice, torch.Tensor], cols: Union[slice, torch.Tensor, None] = None,
             heads: Union[slice, torch.Tensor] = slice(None)) -> torch.Tensor:
        """``B[heads, rows, cols]`` ``(H', Q_t, N_t)`` gathered from the table (a tile, never more)."""
        dev = self.table.device
        n = self.num_tokens
        rows = _positions(rows, n, dev)
        cols = _positions(slice(None) if cols is None else cols, n, dev)
        return self.table.t()[heads][:, self.index(rows, cols)]

    def dense(self) -> torch.Tensor:
        """``B (1, H, N, N)`` written out (the materialized path, the tests)."""
        return self.tile(slice(None))[None]

    def scaled(self, factor: float) -> "RelativePositionBias":
        """The bias times ``factor`` (``B / scale``: the record of the relevance pass)."""
        return dataclasses.replace(self, table=self.table * factor)

    def detach(self) -> "RelativePositionBias":
        return dataclasses.replace(self, table=self.table.detach())

    def to(self, *args, **kwargs) -> "RelativePositionBias":
        """The table moved / cast as ``Tensor.to`` does."""
        return dataclasses.replace(self, table=self.table.to(*args, **kwargs))

    def __add__(self, other):
        """The sum of two biases of one grid is the sum of their tables; anything else adds to ``dense()``."""
        if isinstance(other, RelativePositionBias):
            if (other.grid, other.prefix) != (self.grid, self.prefix):
                raise ValueError(f"relative position biases of different layouts: grid {self.grid}, prefix "
                                 f"{self.prefix} and grid {other.grid}, prefix {other.prefix}")
            return dataclasses.replace(self, table=self.table + other.table)
        if other is None:
            return self
        return self.dense() + other

    def __radd__(self, other):
        return self if other is None else other + self.dense()


def relative_index(rows: torch.Tensor, cols: torch.Tensor, grid: Tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """The table index ``idx(i, j)`` ``(len(rows), len(cols))`` of tokens ``rows`` × ``cols`` (module docstring)."""
    gh, gw = grid
    r = (2 * gh - 1) * (2 * gw - 1) + 3
    pi, pj = (rows - prefix).clamp_min(0), (cols - prefix).clamp_min(0)
    dy = (pi // gw)[:, None] - (pj // gw)[None, :] + (gh - 1)
    dx = (pi % gw)[:, None] - (pj % gw)[None, :] + (gw - 1)
    idx = dy * (2 * gw - 1) + dx
    qi, kj = (rows < prefix)[:, None], (cols < prefix)[None, :]
    idx = torch.where(qi & ~kj, r - 3, idx)
    idx = torch.where(~qi & kj, r - 2, idx)
    return torch.where(qi & kj, r - 1, idx)


def _positions(sel: Union[slice, torch.Tensor], n: int, device) -> torch.Tensor:
    if isinstance(sel, slice):
        return torch.arange(n, device=device)[sel]
    return sel.to(device)


# --------------------------------------------------------------------------- the adapters' bypass
#: the attribute marking an attention forward of an adapter that takes a table-form bias
_TAKES_TABLE = "_tokentm_takes_table_bias"


def takes_table(forward: Callable) -> Callable:
    """Mark an adapter's attention forward as one that takes a ``RelativePositionBias`` (returns ``forward``)."""
    setattr(forward, _TAKES_TABLE, True)
    return forward


def _patched_by_adapter(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return bool(getattr(getattr(forward, "__func__", None), _TAKES_TABLE, False))


def bypass_bias_module(module: nn.Module, table: Callable[..., Optional[RelativePositionBias]], handles: list,
                       readers: Sequence[nn.Module] = ()) -> None:
    """Make ``module`` (a model's bias module, whose forward gathers ``(1, H, N, N)`` or ``(H, N, N)`` from its
    table) return ``table(*args, **kwargs)`` instead, a ``RelativePositionBias``, when that is not None and every
    attention module in ``readers`` runs an adapter forward marked ``takes_table`` (at the call, so that layers
    left to the model's own attention get the dense bias they read); its own forward otherwise. Undone by
    ``handles``; installed once per module."""
    if "_tokentm_bypass" in module.__dict__:
        return
    previous = module.forward

    def forward(self, *args, **kwargs):
        form = table(*args, **kwargs)
        if form is not None and all(_patched_by_adapter(m) for m in readers):
            return form
        return previous(*args, **kwargs)

    handles.append(_Bypass(module, forward))


class _Bypass:
    """An instance-level forward override of a bias module (``remove()`` puts the old one back)."""

    def __init__(self, module: nn.Module, forward: Callable) -> None:
        self.module, self.had = module, "forward" in module.__dict__
        self.previous = module.__dict__.get("forward")
        module.forward = types.MethodType(forward, module)
        module._tokentm_bypass = forward

    def remove(self) -> None:
        if self.module is None:
            return
        if self.had:
            self.module.forward = self.previous
        else:
            self.module.__dict__.pop("forward", None)
        self.module.__dict__.pop("_tokentm_bypass", None)
        self.module = None
