"""Public plain-tensor API: validated entry points to the ``torch.ops.tokentm`` ops.

For libraries that already hold attention maps, their gradients and token
weights and only want the numbers of docs/methods.md §2, §3, §3.1 and §6.
Everything dispatches through ``torch.ops.tokentm.*``: CPU (and other non-CUDA)
tensors run the PyTorch fallback, CUDA tensors the Triton kernels. Results are
float32 tensors on the inputs' device; inputs may be any floating dtype.

Layers are given bottom-up (index 0 = block 1), either as a list of per-layer
tensors or stacked along a leading layer dimension ``L``.

Every function checks ranks, shapes (B, H, N agree across arguments and
layers), dtypes (floating point only), devices (all the same) and NaN/Inf in
its inputs, and raises ``TypeError`` / ``ValueError`` naming the argument.
The NaN/Inf check reads every input once more (one host sync per call); pass
``check_finite=False`` to skip it. It is skipped while ``torch.compile`` traces
(a data-dependent branch would break the graph).

Where the checks live: these functions check the multi-layer arguments (lists or
stacked layers, per-layer names in the messages, values); each
``torch.ops.tokentm.*`` operator checks the shapes, dtypes and devices of its
own call (``tokentm_fast.bindings.library.check_*``: metadata only, no device
access); the Triton wrappers behind the operators check nothing.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import bindings as _bindings  # noqa: F401  (registers torch.ops.tokentm.*)
from .fusion import FUSION_MODES, GRADIENT_MODES

__all__ = ["transform_weights", "fuse_heads", "tokentm_rows", "tokentm_matrix", "legrad_reduce"]

Layers = Union[Tensor, Sequence[Tensor]]
Weights = Union[Tensor, Sequence[Union[Tensor, float]], float]


# --------------------------------------------------------------------------- validation


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _tensor(name: str, t, rank: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    return t


def _expect_shape(name: str, t: Tensor, shape: Tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {what} = {tuple(shape)}")


class _Checks:
    """Collects device and NaN/Inf checks so that the finite check syncs once."""

    def __init__(self, check_finite: bool):
        self.finite = check_finite and not torch.compiler.is_compiling()
        self.device = None
        self.device_name = None
        self.flags: List[Tuple[List[str], Tensor]] = []

    def add(self, names: Union[str, List[str]], t: Tensor, stacked: bool = False) -> None:
        """Register ``t`` (a stacked ``(L, ...)`` tensor with one name per layer if ``stacked``)."""
        names = [names] if isinstance(names, str) else names
        if self.device is None:
            self.device, self.device_name = t.device, names[0]
        elif t.device != self.device:
            raise ValueError(
                f"{names[0]} is on device {t.device}, but {self.device_name} is on {self.device}; "
                "all inputs must be on the same device"
            )
        if self.finite:
            fin = torch.isfinite(t)
            self.flags.append((names, fin.flatten(1).all(1) if stacked else fin.all().reshape(1)))

    def run(self) -> None:
        if not self.flags:
            return
        ok = torch.cat([f for _, f in self.flags]).tolist()
        names = [n for ns, _ in self.flags for n in ns]
        for name, good in zip(names, ok):
            if not good:
                raise ValueError(f"{name} contains NaN or Inf")


def _layer_tensors(name: str, value, rank: int, checks: _Checks) -> List[Tensor]:
    """Per-layer list from a list/tuple of rank-``rank`` tensors or a stacked rank-``rank+1`` tensor."""
    if isinstance(value, Tensor):
        _tensor(name, value)
        if value.dim() != rank + 1:
            raise ValueError(
                f"{name} must be a list of rank-{rank} tensors or a stacked rank-{rank + 1} tensor "
                f"(layers first), got shape {tuple(value.shape)}"
            )
        if value.shape[0] == 0:
            raise ValueError(f"{name} has no layers")
        checks.add([f"{name}[{l}]" for l in range(value.shape[0])], value, stacked=True)
        return list(value.unbind(0))
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} has no layers")
    out = []
    for l, t in enumerate(value):
        out.append(_tensor(f"{name}[{l}]", t, rank))
        checks.add(f"{name}[{l}]", t)
    return out


def _check_mode(mode) -> None:
    if not isinstance(mode, str) or mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")


def _attn_grad_layers(attns, grads, mode: str, checks: _Checks):
    """Validate per-layer attention/gradient; returns (attns, grads, B, H, N)."""
    _check_mode(mode)
    attn_list = _layer_tensors("attns", attns, 4, checks)
    b, h, n, n2 = attn_list[0].shape
    if n != n2:
        raise ValueError(f"attns[0] must be (B, H, N, N) with square maps, got shape {tuple(attn_list[0].shape)}")
    for l, a in enumerate(attn_list):
        _expect_shape(f"attns[{l}]", a, (b, h, n, n), "(B, H, N, N) of attns[0]")
    if grads is None:
        if mode in GRADIENT_MODES:
            raise ValueError(f"grads is required for mode={mode!r} (only 'mean' and 'rollout' need no gradient)")
        return attn_list, [None] * len(attn_list), b, h, n
    grad_list = _layer_tensors("grads", grads, 4, checks)
    if len(grad_list) != len(attn_list):
        raise ValueError(f"grads has {len(grad_list)} layers but attns has {len(attn_list)}")
    for l, g in enumerate(grad_list):
        _expect_shape(f"grads[{l}]", g, (b, h, n, n), "(B, H, N, N) of attns")
    return attn_list, grad_list, b, h, n


def _weight_layers(name: str, w, num_layers: int, b: int, n: int, checks: _Checks):
    """Per-layer ``(tensor or None, constant)`` pairs from a list, a stacked tensor or a number."""
    if _is_number(w):
        if not math.isfinite(w):
            raise ValueError(f"{name} is NaN or Inf")
        return [(None, float(w))] * num_layers
    if isinstance(w, Tensor):
        items = _layer_tensors(name, w, 2, checks)
    elif isinstance(w, (list, tuple)):
        if len(w) == 0:
            raise ValueError(f"{name} has no layers")
        items = []
        for l, v in enumerate(w):
            if _is_number(v):
                items.append(float(v))
            else:
                items.append(_tensor(f"{name}[{l}]", v, 2))
                checks.add(f"{name}[{l}]", v)
    else:
        raise TypeError(
            f"{name} must be a list of (B, N) tensors, a stacked (L, B, N) tensor or a number, "
            f"got {type(w).__name__}"
        )
    if len(items) != num_layers:
        raise ValueError(f"{name} has {len(items)} layers but attns has {num_layers}")
    out = []
    for l, v in enumerate(items):
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{name}[{l}] is NaN or Inf")
            out.append((None, v))
        else:
            _expect_shape(f"{name}[{l}]", v, (b, n), "(B, N) of attns")
            out.append((v, 0.0))
    return out


def _init_diag(init, b: int, n: int, checks: _Checks) -> Optional[Tensor]:
    if isinstance(init, str):
        if init != "identity":
            raise ValueError(
                f"init must be a (B, N) tensor (the diagonal of C⁰, e.g. token lengths ‖X⁰‖) "
                f"or 'identity', got {init!r}"
            )
        return None
    if not isinstance(init, Tensor):
        raise TypeError(f"init must be a (B, N) tensor or 'identity', got {type(init).__name__}")
    _tensor("init", init, 2)
    _expect_shape("init", init, (b, n), "(B, N) of attns")
    checks.add("init", init)
    return init


def _prepare(attns, grads, w_attn, w_mlp, init, mode, check_finite):
    checks = _Checks(check_finite)
    attn_list, grad_list, b, _, n = _attn_grad_layers(attns, grads, mode, checks)
    wa = _weight_layers("w_attn", w_attn, len(attn_list), b, n, checks)
    wm = _weight_layers("w_mlp", w_mlp, len(attn_list), b, n, checks)
    c0 = _init_diag(init, b, n, checks)
    checks.run()
    return attn_list, grad_list, wa, wm, c0, b, n


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
    checks = _Checks(check_finite)
    _tensor("x", x, 3)
    _tensor("x_tilde", x_tilde, 3)
    _expect_shape("x_tilde", x_tilde, tuple(x.shape), "(B, N, D) of x")
    for name, flag in (("use_length", use_length), ("use_necc", use_necc)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    checks.add("x", x)
    checks.add("x_tilde", x_tilde)
    checks.run()
    return torch.ops.tokentm.transform_weights(x, x_tilde, use_length, use_necc)


def fuse_heads(attn: Tensor, grad: Optional[Tensor], mode: str = "gae", *, check_finite: bool = True) -> Tensor:
    """Head fusion of one layer (docs/methods.md §3, §4): ``attn, grad (B, H, N, N) -> Ā (B, N, N)`` float32.

    ``mode``: ``"gae"`` mean_h max(A⊙G, 0); ``"decoupled"`` mean_h A ⊙ mean_h max(G, 0);
    ``"mean"`` mean_h A; ``"rollout"`` ½ mean_h A + ½ I (the last two take ``grad=None``).
    """
    checks = _Checks(check_finite)
    _check_mode(mode)
    _tensor("attn", attn, 4)
    b, h, n, n2 = attn.shape
    if n != n2:
        raise ValueError(f"attn must be (B, H, N, N) with square maps, got shape {tuple(attn.shape)}")
    checks.add("attn", attn)
    if grad is None:
        if mode in GRADIENT_MODES:
            raise ValueError(f"grad is required for mode={mode!r} (only 'mean' and 'rollout' need no gradient)")
    else:
        _tensor("grad", grad, 4)
        _expect_shape("grad", grad, (b, h, n, n), "(B, H, N, N) of attn")
        checks.add("grad", grad)
    checks.run()
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
    attn_list, grad_list, wa, wm, c0, b, n = _prepare(attns, grads, w_attn, w_mlp, init, mode, check_finite)
    if not isinstance(query_index, int) or isinstance(query_index, bool):
        raise TypeError(f"query_index must be an int, got {type(query_index).__name__}")
    if not -n <= query_index < n:
        raise ValueError(f"query_index {query_index} is out of range for N = {n} tokens")
    q = query_index % n
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
    attn_list, grad_list, wa, wm, c0, b, n = _prepare(attns, grads, w_attn, w_mlp, init, mode, check_finite)
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
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
    checks = _Checks(check_finite)
    grad_list = _layer_tensors("grads", grads, 4, checks)
    b, h, q, n = grad_list[0].shape
    if num_rows is None:
        if q != n:
            raise ValueError(
                f"grads[0] must be (B, H, N, N) with square maps, got shape {tuple(grad_list[0].shape)} "
                "(pass num_rows to reduce a subset of rows)"
            )
    else:
        if not isinstance(num_rows, int) or isinstance(num_rows, bool):
            raise TypeError(f"num_rows must be an int, got {type(num_rows).__name__}")
        if num_rows < 1:
            raise ValueError(f"num_rows must be positive, got {num_rows}")
    for l, g in enumerate(grad_list):
        _expect_shape(f"grads[{l}]", g, (b, h, q, n), "the shape of grads[0]")
    checks.run()
    out = torch.ops.tokentm.legrad_reduce(grad_list[0], num_rows)
    for g in grad_list[1:]:
        out = out + torch.ops.tokentm.legrad_reduce(g, num_rows)
    return out
