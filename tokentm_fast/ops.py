"""Public plain-tensor API: validated entry points to the ``torch.ops.tokentm`` ops.

For libraries that already hold attention maps, their gradients and token
weights and only want the numbers of docs/methods.md §2, §3, §3.1 and §6.
Everything dispatches through ``torch.ops.tokentm.*``: CPU (and other non-CUDA)
tensors run the PyTorch fallback, CUDA tensors the Triton kernels. Results are
float32 tensors on the inputs' device; inputs may be any floating dtype.

Layers are given bottom-up (index 0 = block 1), either as a list of per-layer
tensors or stacked along a leading layer dimension ``L``.

Head fusion modes: the kernels' (``"gae"``, ``"decoupled"``, ``"mean"``) and ``"rollout"``, the rollout
method's per-layer matrix ``½ I + ½ mean_h A``, which is no head fusion of the kernels: it is built here
from the ``"mean"`` fusion and the engine constants ``aggregation.ROLLOUT`` (``_rollout_matrix``), and
the multi-layer functions run the engine on it as a one-head attention.

Every function checks ranks, shapes (B, H, N agree across arguments and
layers), dtypes (floating point only), devices (all the same) and NaN/Inf in
its inputs, and raises ``TypeError`` / ``ValueError`` naming the argument.
The NaN/Inf check reads every input once more (one host sync per call); pass
``check_finite=False`` to skip it. It is skipped while ``torch.compile`` traces
(a data-dependent branch would break the graph).

Where the checks live: ``tokentm_fast.validation``, written once for both entries: these functions
check the multi-layer arguments (lists or stacked layers, per-layer names in the messages, values);
each ``torch.ops.tokentm.*`` operator checks the shapes, dtypes and devices of its own call
(metadata only, no device access); the PyTorch functions and Triton wrappers behind the operators
check nothing.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import bindings as _bindings  # noqa: F401  (registers torch.ops.tokentm.*)
from .aggregation import ROLLOUT
from .validation import (
    Layers,
    Weights,
    api_flag,
    api_fuse_heads,
    api_layers,
    api_legrad_layers,
    api_query_index,
    api_transform_weights,
)

__all__ = ["transform_weights", "fuse_heads", "tokentm_rows", "tokentm_matrix", "legrad_reduce"]

#: the mode ``ops`` adds to the kernels' head fusions (``validation.API_MODES``)
ROLLOUT_MODE = "rollout"


def _rollout_matrix(mean_fused: Tensor) -> Tensor:
    """Rollout's per-layer matrix from the ``"mean"`` fusion ``Ā (B, N, N)``: the engine's update map
    ``(1 + w_mlp) · (I + Ā · w_attn)`` with the constants ``aggregation.ROLLOUT`` (w_attn = 1, w_mlp = −½),
    that is ``½ I + ½ mean_h A`` (docs/methods.md §4). Same dtype and device as ``mean_fused``."""
    eye = torch.eye(mean_fused.shape[-1], dtype=mean_fused.dtype, device=mean_fused.device)
    return (mean_fused * ROLLOUT.w_attn + eye) * (1.0 + ROLLOUT.w_mlp)


def _engine_layers(attn_list: List[Tensor], grad_list: List[Optional[Tensor]],
                   mode: str) -> Tuple[List[Tensor], List[Optional[Tensor]], str]:
    """The layers as the update operators take them: for ``"rollout"`` each layer's ``_rollout_matrix`` as a
    one-head attention ``(B, 1, N, N)`` under the ``"mean"`` fusion (no gradients); other modes unchanged."""
    if mode != ROLLOUT_MODE:
        return attn_list, grad_list, mode
    fused = [_rollout_matrix(torch.ops.tokentm.fuse_heads(a, None, ROLLOUT.fusion))[:, None] for a in attn_list]
    return fused, [None] * len(fused), ROLLOUT.fusion


# --------------------------------------------------------------------------- API


def transform_weights(x: Tensor, x_tilde: Tensor, use_length: bool = True, use_necc: bool = True,
                      *, check_finite: bool = True) -> Tensor:
    """Token transformation weights (docs/methods.md §2).

    Args:
        x: ``(B, N, D)`` tokens entering the sub-layer.
        x_tilde: ``(B, N, D)`` transformed tokens.
        use_length, use_necc: ablation switches (False: length ratio 1 / NECC 1/N).

    Returns:
        ``(B, N)`` float32 weights ``|x̃| / max(|x|, ε) · NECC``.
    """
    api_transform_weights(x, x_tilde, use_length, use_necc, check_finite)
    return torch.ops.tokentm.transform_weights(x, x_tilde, use_length, use_necc)


def fuse_heads(attn: Tensor, grad: Optional[Tensor], mode: str = "gae", *, check_finite: bool = True) -> Tensor:
    """Head fusion of one layer (docs/methods.md §3, §4): ``attn, grad (B, H, N, N) -> Ā (B, N, N)`` float32.

    ``mode``: ``"gae"`` mean_h max(A⊙G, 0); ``"decoupled"`` mean_h A ⊙ mean_h max(G, 0);
    ``"mean"`` mean_h A; ``"rollout"`` ½ mean_h A + ½ I (the last two take ``grad=None``).
    """
    api_fuse_heads(attn, grad, mode, check_finite)
    if mode == ROLLOUT_MODE:
        return _rollout_matrix(torch.ops.tokentm.fuse_heads(attn, None, ROLLOUT.fusion))
    return torch.ops.tokentm.fuse_heads(attn, grad, mode)


def tokentm_rows(attns: Layers, grads: Optional[Layers], w_attn: Weights, w_mlp: Weights,
                 init: Union[Tensor, str], query_index: int = 0, *, mode: str = "gae",
                 check_finite: bool = True) -> Tensor:
    """One row of the TokenTM aggregate, ``Cᴸ[query_index, :]``, by the row algorithm (docs/methods.md §3.1).

    Args:
        attns, grads: per-layer ``(B, H, N, N)`` attention and its gradient, bottom-up
            (lists or stacked ``(L, B, H, N, N)``). ``grads`` may be None for
            ``mode="mean"`` / ``"rollout"``.
        w_attn, w_mlp: per-layer ``(B, N)`` weights (lists or ``(L, B, N)``), or a number
            used for every layer and token (GAE: 1 and 0).
        init: ``(B, N)`` diagonal of ``C⁰`` (e.g. token lengths ‖X⁰‖) or ``"identity"``.
        query_index: the row to return (negative indices count from the end).
        mode: head fusion, see ``fuse_heads``.

    Returns:
        ``(B, N)`` float32 ``e_qᵀ · Uᴸ ⋯ U¹ · C⁰``.
    """
    attn_list, grad_list, wa, wm, c0, b, n = api_layers(attns, grads, w_attn, w_mlp, init, mode, check_finite)
    q = api_query_index(query_index, n)
    attn_list, grad_list, mode = _engine_layers(attn_list, grad_list, mode)
    rows = torch.zeros(b, 1, n, dtype=torch.float32, device=attn_list[0].device)
    rows[:, 0, q] = 1.0
    for l in reversed(range(len(attn_list))):
        (wa_t, wa_c), (wm_t, wm_c) = wa[l], wm[l]
        rows = torch.ops.tokentm.row_update(rows, attn_list[l], grad_list[l], wa_t, wm_t, wa_c, wm_c, mode)
    if c0 is not None:
        rows = rows * c0.to(torch.float32)[:, None, :]
    return rows[:, 0]


def tokentm_matrix(attns: Layers, grads: Optional[Layers], w_attn: Weights, w_mlp: Weights,
                   init: Union[Tensor, str], *, mode: str = "gae", allow_tf32: bool = True,
                   check_finite: bool = True) -> Tensor:
    """The full TokenTM aggregate ``Cᴸ = Uᴸ ⋯ U¹ · C⁰`` (docs/methods.md §3), ``(B, N, N)`` float32.

    Same arguments as ``tokentm_rows``. Starts from identity rows and applies
    ``torch.ops.tokentm.matrix_update`` top-down. On CUDA, ``allow_tf32=True``
    lets the kernel use tf32 matrix units (docs/methods.md §7 tolerance 5e-3 instead of 1e-5).
    """
    attn_list, grad_list, wa, wm, c0, b, n = api_layers(attns, grads, w_attn, w_mlp, init, mode, check_finite)
    api_flag("allow_tf32", allow_tf32)
    attn_list, grad_list, mode = _engine_layers(attn_list, grad_list, mode)
    rows = torch.eye(n, dtype=torch.float32, device=attn_list[0].device).expand(b, n, n).contiguous()
    for l in reversed(range(len(attn_list))):
        (wa_t, wa_c), (wm_t, wm_c) = wa[l], wm[l]
        rows = torch.ops.tokentm.matrix_update(rows, attn_list[l], grad_list[l], wa_t, wm_t, wa_c, wm_c, mode,
                                               allow_tf32)
    if c0 is not None:
        rows = rows * c0.to(torch.float32)[:, None, :]
    return rows


def legrad_reduce(grads: Layers, *, num_rows: Optional[int] = None, check_finite: bool = True) -> Tensor:
    """LeGrad map (docs/methods.md §6): ``Σ_l mean_h mean_i max(G̃ˡ_h[i, j], 0)`` → ``(B, N)`` float32.

    Args:
        grads: per-layer ``(B, H, N, N)`` gradients (list or stacked ``(L, B, H, N, N)``).
            With ``num_rows`` given, each layer may hold only the non-zero rows,
            ``(B, H, Q, N)``, and the row mean divides by ``num_rows`` instead of ``Q``
            (class-token pooling: Q = 1, num_rows = N).
    """
    grad_list = api_legrad_layers(grads, num_rows, check_finite)
    out = torch.ops.tokentm.legrad_reduce(grad_list[0], num_rows)
    for g in grad_list[1:]:
        out = out + torch.ops.tokentm.legrad_reduce(g, num_rows)
    return out
