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
uses the PyTorch functions of ``tokentm_fast.transform / fusion / aggregation``. The fake (meta)
implementations give shape, dtype and device only, so the ops trace under
``torch.compile`` without graph breaks. No autograd formula is registered: the
ops are for explanations computed after (or inside) the backward pass.

Importing the module twice (or reloading it) is harmless: ops already defined
in this process are reused, not redefined.
"""
from typing import Optional

import torch
from torch import Tensor

from tokentm_fast.aggregation import row_update as _torch_row_update
from tokentm_fast.fusion import check_fusion_mode
from tokentm_fast.fusion import fuse_heads as _torch_fuse_heads
from tokentm_fast.legrad import legrad_reduce as _torch_legrad_reduce
from tokentm_fast.transform import EPS, compute_dtype
from tokentm_fast.transform import transform_weights as _torch_transform_weights

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


def _check_rank(name: str, t: Optional[Tensor], rank: int) -> None:
    if t is not None:
        torch._check(t.dim() == rank, lambda: f"tokentm: {name} must have rank {rank}, got shape {tuple(t.shape)}")


# --------------------------------------------------------------------------- implementations
#
# ``*_torch``: the PyTorch path (every device but CUDA, and CUDA float64 inputs,
# which the kernels refuse). ``*_cuda``: the Triton wrappers, imported lazily.
# ``*_fake``: shape, dtype and device only.


def transform_weights_torch(x, x_tilde, use_length=True, use_necc=True, eps=EPS):
    return _f32(_torch_transform_weights(x, x_tilde, use_length, use_necc, eps))


def transform_weights_cuda(x, x_tilde, use_length=True, use_necc=True, eps=EPS):
    if _any_f64(x, x_tilde):
        return transform_weights_torch(x, x_tilde, use_length, use_necc, eps)
    from tokentm_fast.kernels import transform_weights as kernel

    return _f32(kernel(x, x_tilde, use_length=use_length, use_necc=use_necc, eps=eps))


def transform_weights_fake(x, x_tilde, use_length=True, use_necc=True, eps=EPS):
    _check_rank("x", x, 3)
    _check_rank("x_tilde", x_tilde, 3)
    return x.new_empty(x.shape[:-1], dtype=_F32)


def fuse_heads_torch(attn, grad=None, mode="gae"):
    return _f32(_torch_fuse_heads(attn, grad, mode))


def fuse_heads_cuda(attn, grad=None, mode="gae"):
    if _any_f64(attn, grad):
        return fuse_heads_torch(attn, grad, mode)
    from tokentm_fast.kernels import fuse_heads as kernel

    return _f32(kernel(attn, grad, mode=mode))


def fuse_heads_fake(attn, grad=None, mode="gae"):
    check_fusion_mode(mode)
    _check_rank("attn", attn, 4)
    _check_rank("grad", grad, 4)
    b, _, n, _ = attn.shape
    return attn.new_empty((b, n, n), dtype=_F32)


def update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const=1.0, w_mlp_const=0.0, mode="gae", allow_tf32=True):
    """``row_update`` and ``matrix_update`` on the PyTorch path (same math; no tf32 there)."""
    rows = rows.to(compute_dtype(rows))  # half-precision rows accumulate in float32
    out = _torch_row_update(rows, attn, grad, _weight(w_attn, w_attn_const), _weight(w_mlp, w_mlp_const), mode)
    return _f32(out)


def row_update_cuda(rows, attn, grad, w_attn, w_mlp, w_attn_const=1.0, w_mlp_const=0.0, mode="gae"):
    if _any_f64(rows, attn, grad, w_attn, w_mlp):
        return update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const, w_mlp_const, mode)
    from tokentm_fast.kernels import row_update as kernel

    return _f32(kernel(rows, attn, grad, _weight(w_attn, w_attn_const), _weight(w_mlp, w_mlp_const), mode=mode))


def matrix_update_cuda(rows, attn, grad, w_attn, w_mlp, w_attn_const=1.0, w_mlp_const=0.0, mode="gae",
                       allow_tf32=True):
    if _any_f64(rows, attn, grad, w_attn, w_mlp):
        return update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const, w_mlp_const, mode)
    from tokentm_fast.kernels import matrix_update as kernel

    return _f32(kernel(rows, attn, grad, _weight(w_attn, w_attn_const), _weight(w_mlp, w_mlp_const), mode=mode,
                       allow_tf32=allow_tf32))


def update_fake(rows, attn, grad, w_attn, w_mlp, w_attn_const=1.0, w_mlp_const=0.0, mode="gae", allow_tf32=True):
    check_fusion_mode(mode)
    _check_rank("rows", rows, 3)
    _check_rank("attn", attn, 4)
    _check_rank("grad", grad, 4)
    _check_rank("w_attn", w_attn, 2)
    _check_rank("w_mlp", w_mlp, 2)
    torch._check(rows.shape[0] == attn.shape[0], lambda: "tokentm: rows and attn differ in batch size")
    torch._check(rows.shape[2] == attn.shape[3], lambda: "tokentm: rows and attn differ in token count")
    return rows.new_empty(rows.shape, dtype=_F32)


def legrad_reduce_torch(grad_rows, num_rows=None):
    """LeGrad's per-layer map (docs/methods.md §6) with the PyTorch fallback."""
    return _f32(_torch_legrad_reduce(grad_rows, num_rows))


def legrad_reduce_cuda(grad_rows, num_rows=None):
    if _any_f64(grad_rows):
        return legrad_reduce_torch(grad_rows, num_rows)
    from tokentm_fast.kernels import legrad_reduce as kernel

    return _f32(kernel(grad_rows, num_rows=num_rows))


def legrad_reduce_fake(grad_rows, num_rows=None):
    _check_rank("grad_rows", grad_rows, 4)
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
        return transform_weights_torch(x, x_tilde, use_length, use_necc, eps)

    _finish(transform_weights, transform_weights_cuda, transform_weights_fake)


def _define_fuse_heads():
    @torch.library.custom_op(f"{NAMESPACE}::fuse_heads", mutates_args=())
    def fuse_heads(attn: Tensor, grad: Optional[Tensor] = None, mode: str = "gae") -> Tensor:
        """Head fusion (docs/methods.md §3/§4): ``attn, grad (B, H, N, N) -> (B, N, N)`` float32."""
        return fuse_heads_torch(attn, grad, mode)

    _finish(fuse_heads, fuse_heads_cuda, fuse_heads_fake)


def _define_row_update():
    @torch.library.custom_op(f"{NAMESPACE}::row_update", mutates_args=())
    def row_update(rows: Tensor, attn: Tensor, grad: Optional[Tensor], w_attn: Optional[Tensor],
                   w_mlp: Optional[Tensor], w_attn_const: float = 1.0, w_mlp_const: float = 0.0,
                   mode: str = "gae") -> Tensor:
        """One layer of the row engine (docs/methods.md §3.1): ``rows (B, Q, N) -> (B, Q, N)`` float32."""
        return update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const, w_mlp_const, mode)

    _finish(row_update, row_update_cuda, update_fake)


def _define_matrix_update():
    @torch.library.custom_op(f"{NAMESPACE}::matrix_update", mutates_args=())
    def matrix_update(rows: Tensor, attn: Tensor, grad: Optional[Tensor], w_attn: Optional[Tensor],
                      w_mlp: Optional[Tensor], w_attn_const: float = 1.0, w_mlp_const: float = 0.0,
                      mode: str = "gae", allow_tf32: bool = True) -> Tensor:
        """One layer of the engine on ``Q = N`` rows (tl.dot on CUDA): ``(B, N, N) -> (B, N, N)`` float32."""
        return update_torch(rows, attn, grad, w_attn, w_mlp, w_attn_const, w_mlp_const, mode, allow_tf32)

    _finish(matrix_update, matrix_update_cuda, update_fake)


def _define_legrad_reduce():
    @torch.library.custom_op(f"{NAMESPACE}::legrad_reduce", mutates_args=())
    def legrad_reduce(grad_rows: Tensor, num_rows: Optional[int] = None) -> Tensor:
        """``grad_rows (B, H, Q, N) -> (B, N)`` = ``relu(g).sum(2).mean(1) / num_rows`` float32."""
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

__all__ = ["NAMESPACE", "OP_NAMES", "register", *OP_NAMES]
