"""``torch.library`` registration of the tokentm operators (namespace ``tokentm``).

Importing this module (``tokentm_fast.bindings`` does) defines::

    tokentm::transform_weights(Tensor x, Tensor x_tilde, bool use_length=True,
                               bool use_necc=True, float eps=1e-06) -> Tensor
    tokentm::fuse_heads(Tensor attn, Tensor? grad=None, str mode="gae") -> Tensor
    tokentm::row_update(Tensor rows, Tensor attn, Tensor? grad, Tensor? w_attn,
                        Tensor? w_mlp, float w_attn_const=1., float w_mlp_const=0.,
                        str mode="gae") -> Tensor
    tokentm::matrix_update(<same as row_update>, bool allow_tf32=True) -> Tensor
    tokentm::legrad_reduce(Tensor grad_rows, SymInt? num_rows=None) -> Tensor

Shapes: ``x, x_tilde (B, N, D) -> (B, N)``; ``attn, grad (B, H, N, N) -> (B, N, N)``;
``rows (B, Q, N)``, ``w_* (B, N)`` ``-> (B, Q, N)`` (``matrix_update``: ``Q = N``);
``grad_rows (B, H, Q, N) -> (B, N)`` = ``relu(g).sum(2).mean(1) / num_rows``
(``num_rows`` defaults to ``Q``).

Weights: a schema cannot take ``Union[Tensor, float]``, so ``w_attn`` / ``w_mlp``
are optional ``(B, N)`` tensors; where one is ``None`` the constant
``w_attn_const`` / ``w_mlp_const`` is used for every token (GAE: 1 and 0,
rollout: 1 and -1/2). A given tensor wins over its constant.

Every output is a new float32 tensor on the device of the inputs, whatever the
input dtype (the Triton kernels' contract; the CPU path computes in float32 at
least, float64 for float64 inputs, and rounds the result to float32).

Dispatch: CUDA tensors go to the Triton wrappers of ``tokentm_fast.kernels``
(imported lazily, on the first CUDA call), except float64 inputs, which the
kernels refuse and which take the PyTorch path on CUDA too; every other device
uses the PyTorch twins of the kernels, ``tokentm_fast.torch_ops`` (same file names). The fake (meta)
implementations give shape, dtype and device only, so the ops trace under
``torch.compile`` without graph breaks. No autograd formula is registered: the
ops are for explanations computed after (or inside) the backward pass.

Argument checks: every op checks its arguments once, on entry, with one
validator shared by its CPU, CUDA and fake implementations (the ``check_*`` of
``tokentm_fast.validation``, the module that also checks ``tokentm_fast.ops``'
arguments: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong
rank, shape, device or mode; shape, dtype, device and mode only, never values, so
no host synchronisation, and they run on fake tensors while torch.compile traces).
The ops take float32, bfloat16, float16 and float64 tensors
(``validation.OPERATOR_DTYPES``). What they pass on is trusted: the PyTorch
functions and the Triton wrappers of ``tokentm_fast.kernels`` do not check again
(internal callers such as the fast path call those wrappers directly, with
tensors they built themselves).

Importing the module twice (or reloading it) is harmless: ops already defined
in this process are reused, not redefined.
"""
from typing import Optional

import torch
from torch import Tensor

from tokentm_fast.kernels._utils import EPS
from tokentm_fast.precision import compute_dtype
from tokentm_fast.torch_ops.head_fusion import fuse_heads as _torch_fuse_heads
from tokentm_fast.torch_ops.legrad_reduce import legrad_reduce as _torch_legrad_reduce
from tokentm_fast.torch_ops.row_update import row_update as _torch_row_update
from tokentm_fast.torch_ops.transform_weights import transform_weights as _torch_transform_weights
from tokentm_fast.validation import check_fuse_heads, check_legrad_reduce, check_transform_weights, check_update

NAMESPACE = "tokentm"
OP_NAMES = ("transform_weights", "fuse_heads", "row_update", "matrix_update", "legrad_reduce")

_F32 = torch.float32


def _is_defined(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


# --------------------------------------------------------------------------- helpers


def _weight(w: Optional[Tensor], const: float):
    """The weight as the PyTorch fallback and the kernels take it: tensor or float."""
    return float(const) if w is None else w


def _any_f64(*ts: Optional[Tensor]) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in ts)


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == _F32 else t.to(_F32)


# --------------------------------------------------------------------------- implementations
#
# ``*_torch``: the PyTorch path (every device but CUDA, and CUDA float64 inputs,
# which the kernels refuse). ``*_cuda``: the Triton wrappers, imported lazily.
# ``*_fake``: shape, dtype and device only. The op bodies, ``*_cuda`` and
# ``*_fake`` check their arguments (one of them runs per call); ``*_torch``
# takes checked arguments.


def _kernels(t: Tensor):
    """``tokentm_fast.kernels``, after checking that it can run on ``t``'s device."""
    from tokentm_fast import kernels

    kernels.require_triton(t)
    return kernels


def transform_weights_torch(x, x_tilde, use_length=True, use_necc=True, eps=EPS):
    return _f32(_torch_transform_weights(x, x_tilde, use_length, use_necc, eps))


def transform_weights_cuda(x, x_tilde, use_length=True, use_necc=True, eps=EPS):
    check_transform_weights(x, x_tilde)
    if _any_f64(x, x_tilde):
        return transform_weights_torch(x, x_tilde, use_length, use_necc, eps)
    return _kernels(x).transform_weights(x, x_tilde, use_length=use_length, use_necc=use_necc, eps=eps)


def transform_weights_fake(x, x_tilde, use_length=True, use_necc=True, eps=EPS):
    check_transform_weights(x, x_tilde)
    return x.new_empty(x.shape[:-1], dtype=_F32)


def fuse_heads_torch(attn, grad=None, mode="gae"):
    return _f32(_torch_fuse_heads(attn, grad, mode))


def fuse_heads_cuda(attn, grad=None, mode="gae"):
    check_fuse_heads(attn, grad, mode)
    if _any_f64(attn, grad):
        return fuse_heads_torch(attn, grad, mode)
    return _kernels(attn).fuse_heads(attn, grad, mode=mode)


def fuse_heads_fake(attn, grad=None, mode="gae"):
    check_fuse_heads(attn, grad, mode)
    b, _, n, _ = attn.shape
    return attn.new_empty((b, n, n), dtype=_F32)


def update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const=1.0, w_mlp_const=0.0, mode="gae", allow_tf32=True):
    """``row_update`` and ``matrix_update`` on the PyTorch path (same math; no tf32 there)."""
    rows = rows.to(compute_dtype(rows))  # half-precision rows accumulate in float32
    out = _torch_row_update(rows, attn, grad, _weight(w_attn, w_attn_const), _weight(w_mlp, w_mlp_const), mode)
    return _f32(out)


def row_update_cuda(rows, attn, grad, w_attn, w_mlp, w_attn_const=1.0, w_mlp_const=0.0, mode="gae"):
    check_update(rows, attn, grad, w_attn, w_mlp, mode)
    if _any_f64(rows, attn, grad, w_attn, w_mlp):
        return update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const, w_mlp_const, mode)
    return _kernels(attn).row_update(rows, attn, grad, _weight(w_attn, w_attn_const), _weight(w_mlp, w_mlp_const),
                                     mode=mode)


def matrix_update_cuda(rows, attn, grad, w_attn, w_mlp, w_attn_const=1.0, w_mlp_const=0.0, mode="gae",
                       allow_tf32=True):
    check_update(rows, attn, grad, w_attn, w_mlp, mode)
    if _any_f64(rows, attn, grad, w_attn, w_mlp):
        return update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const, w_mlp_const, mode)
    return _kernels(attn).matrix_update(rows, attn, grad, _weight(w_attn, w_attn_const),
                                        _weight(w_mlp, w_mlp_const), mode=mode, allow_tf32=allow_tf32)


def update_fake(rows, attn, grad, w_attn, w_mlp, w_attn_const=1.0, w_mlp_const=0.0, mode="gae", allow_tf32=True):
    check_update(rows, attn, grad, w_attn, w_mlp, mode)
    return rows.new_empty(rows.shape, dtype=_F32)


def legrad_reduce_torch(grad_rows, num_rows=None):
    """LeGrad's per-layer map (docs/methods.md §6) with the PyTorch fallback."""
    return _f32(_torch_legrad_reduce(grad_rows, num_rows))


def legrad_reduce_cuda(grad_rows, num_rows=None):
    check_legrad_reduce(grad_rows, num_rows)
    if _any_f64(grad_rows):
        return legrad_reduce_torch(grad_rows, num_rows)
    return _kernels(grad_rows).legrad_reduce(grad_rows, num_rows=num_rows)


def legrad_reduce_fake(grad_rows, num_rows=None):
    check_legrad_reduce(grad_rows, num_rows)
    b, _, _, n = grad_rows.shape
    return grad_rows.new_empty((b, n), dtype=_F32)


# --------------------------------------------------------------------------- op definitions
# (type hints carry the schemas; no ``from __future__ import annotations`` here)


def _finish(op, cuda, fake):
    op.register_kernel("cuda")(cuda)
    op.register_fake(fake)


def _define_transform_weights():
    @torch.library.custom_op(f"{NAMESPACE}::transform_weights", mutates_args=())
    def transform_weights(x: Tensor, x_tilde: Tensor, use_length: bool = True, use_necc: bool = True,
                          eps: float = EPS) -> Tensor:
        """Transformation weights of docs/methods.md §2: ``x, x_tilde (B, N, D) -> w (B, N)`` float32."""
        check_transform_weights(x, x_tilde)
        return transform_weights_torch(x, x_tilde, use_length, use_necc, eps)

    _finish(transform_weights, transform_weights_cuda, transform_weights_fake)


def _define_fuse_heads():
    @torch.library.custom_op(f"{NAMESPACE}::fuse_heads", mutates_args=())
    def fuse_heads(attn: Tensor, grad: Optional[Tensor] = None, mode: str = "gae") -> Tensor:
        """Head fusion (docs/methods.md §3/§4): ``attn, grad (B, H, N, N) -> (B, N, N)`` float32."""
        check_fuse_heads(attn, grad, mode)
        return fuse_heads_torch(attn, grad, mode)

    _finish(fuse_heads, fuse_heads_cuda, fuse_heads_fake)


def _define_row_update():
    @torch.library.custom_op(f"{NAMESPACE}::row_update", mutates_args=())
    def row_update(rows: Tensor, attn: Tensor, grad: Optional[Tensor], w_attn: Optional[Tensor],
                   w_mlp: Optional[Tensor], w_attn_const: float = 1.0, w_mlp_const: float = 0.0,
                   mode: str = "gae") -> Tensor:
        """One layer of the row engine (docs/methods.md §3.1): ``rows (B, Q, N) -> (B, Q, N)`` float32."""
        check_update(rows, attn, grad, w_attn, w_mlp, mode)
        return update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const, w_mlp_const, mode)

    _finish(row_update, row_update_cuda, update_fake)


def _define_matrix_update():
    @torch.library.custom_op(f"{NAMESPACE}::matrix_update", mutates_args=())
    def matrix_update(rows: Tensor, attn: Tensor, grad: Optional[Tensor], w_attn: Optional[Tensor],
                      w_mlp: Optional[Tensor], w_attn_const: float = 1.0, w_mlp_const: float = 0.0,
                      mode: str = "gae", allow_tf32: bool = True) -> Tensor:
        """One layer of the engine on ``Q = N`` rows (tl.dot on CUDA): ``(B, N, N) -> (B, N, N)`` float32."""
        check_update(rows, attn, grad, w_attn, w_mlp, mode)
        return update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const, w_mlp_const, mode, allow_tf32)

    _finish(matrix_update, matrix_update_cuda, update_fake)


def _define_legrad_reduce():
    @torch.library.custom_op(f"{NAMESPACE}::legrad_reduce", mutates_args=())
    def legrad_reduce(grad_rows: Tensor, num_rows: Optional[int] = None) -> Tensor:
        """``grad_rows (B, H, Q, N) -> (B, N)`` = ``relu(g).sum(2).mean(1) / num_rows`` float32."""
        check_legrad_reduce(grad_rows, num_rows)
        return legrad_reduce_torch(grad_rows, num_rows)

    _finish(legrad_reduce, legrad_reduce_cuda, legrad_reduce_fake)


_DEFINERS = {
    "transform_weights": _define_transform_weights,
    "fuse_heads": _define_fuse_heads,
    "row_update": _define_row_update,
    "matrix_update": _define_matrix_update,
    "legrad_reduce": _define_legrad_reduce,
}


def register() -> None:
    """Define every ``tokentm::*`` op not yet defined in this process (idempotent)."""
    for name in OP_NAMES:
        if not _is_defined(name):
            _DEFINERS[name]()


register()

transform_weights = torch.ops.tokentm.transform_weights
fuse_heads = torch.ops.tokentm.fuse_heads
row_update = torch.ops.tokentm.row_update
matrix_update = torch.ops.tokentm.matrix_update
legrad_reduce = torch.ops.tokentm.legrad_reduce

__all__ = [
    "NAMESPACE", "OP_NAMES", "register", "check_transform_weights", "check_fuse_heads", "check_update",
    "check_legrad_reduce", *OP_NAMES,
]
