"""The argument checks of the public entries, written once.

Two entries take arguments from users:

- ``tokentm_fast.ops``: per-layer lists or stacked layers, numbers as weights, and the values themselves
  (NaN / Inf, one host synchronisation per call, skipped while ``torch.compile`` traces);
- the ``torch.ops.tokentm.*`` operators (``tokentm_fast.bindings``): the tensors of one call, metadata
  only (shape, dtype, device, mode: no device access, so the checks also run on fake tensors).

Both use the ``Validator`` below. What they pass on is trusted: the PyTorch twins of
``tokentm_fast.torch_ops`` and the Triton wrappers of ``tokentm_fast.kernels`` check nothing.

The two entries differ where their contracts do, and the difference is a parameter of the one validator,
``Validator(dtypes, wording)``:

- accepted dtypes: ``tokentm_fast.ops`` takes every floating-point dtype (``API``: ``dtypes=None``); the
  operators take float32, bfloat16, float16 and float64 (``OPERATORS``), the dtypes their CPU and CUDA
  implementations compute with;
- wording: each entry phrases a refusal its own way (the operators' messages start with ``tokentm:``);
  the messages are part of each entry's contract (``tests/test_ops.py``);
- head-fusion modes: the operators take the kernels' (``kernels._utils.FUSION_MODES``); ``tokentm_fast.ops``
  also takes ``"rollout"`` (``API_MODES``: the rollout method's per-layer matrix, which ``ops`` builds
  from the ``"mean"`` fusion and the engine constants ``aggregation.ROLLOUT``).

Errors: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong rank, shape, device, mode or
value, each naming the argument (``attns[1]``, ``w_mlp[0]``, ...).
"""
from __future__ import annotations

import math
import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .kernels._utils import FUSION_MODES, GRADIENT_MODES

__all__ = [
    "Wording", "Validator", "API", "OPERATORS", "OPERATOR_DTYPES",
    "check_transform_weights", "check_fuse_heads", "check_update", "check_legrad_reduce",
    "InputChecks", "api_transform_weights", "api_fuse_heads", "api_layers", "api_legrad_layers",
    "api_query_index", "api_flag", "check_index",
]

#: the modes ``tokentm_fast.ops`` takes: the kernels' and rollout's (``ops.ROLLOUT_MODE``, no gradient)
API_MODES: Tuple[str, ...] = FUSION_MODES + ("rollout",)


def _gradient_free(modes: Sequence[str]) -> str:
    """The modes that take ``grad=None``, as the messages name them ("'mean' and 'rollout'")."""
    return " and ".join(repr(m) for m in modes if m not in GRADIENT_MODES)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Wording(NamedTuple):
    """One entry's messages: ``str.format`` templates, with the fields named beside each."""

    not_tensor: str  # name, type
    dtype: str  # name, dtype, dtype_name, allowed
    rank: str  # name, rank, shape
    shape: str  # name, shape, what, expected
    device: str  # name, device, ref, ref_device
    mode: str  # mode, modes
    no_grad: str  # name, mode, free (the gradient-free modes)
    square: str  # name, shape


class Validator:
    """The checks shared by the entries, with one entry's accepted dtypes and wording.

    ``dtypes``: the tensor dtypes accepted, or None for every floating-point dtype; ``modes``: the
    head-fusion modes accepted.
    """

    def __init__(self, dtypes: Optional[Tuple[torch.dtype, ...]], wording: Wording,
                 modes: Tuple[str, ...] = FUSION_MODES) -> None:
        self.dtypes = dtypes
        self.wording = wording
        self.modes = modes

    def tensor(self, name: str, t, rank: Optional[int] = None) -> Tensor:
        """``t`` is a tensor of an accepted dtype and, if ``rank`` is given, of that rank."""
        w = self.wording
        if not isinstance(t, Tensor):
            raise TypeError(w.not_tensor.format(name=name, type=type(t).__name__))
        if not (t.is_floating_point() if self.dtypes is None else t.dtype in self.dtypes):
            allowed = ", ".join(_dtype_name(d) for d in self.dtypes or ())
            raise TypeError(w.dtype.format(name=name, dtype=t.dtype, dtype_name=_dtype_name(t.dtype), allowed=allowed))
        if rank is not None and t.dim() != rank:
            raise ValueError(w.rank.format(name=name, rank=rank, shape=tuple(t.shape)))
        return t

    def same_shape(self, name: str, t: Tensor, shape: Sequence[int], what: str) -> None:
        """``t`` has ``shape`` (described as ``what``, e.g. "(B, N) of attns")."""
        if tuple(t.shape) != tuple(shape):
            raise ValueError(self.wording.shape.format(name=name, shape=tuple(t.shape), what=what,
                                                       expected=tuple(shape)))

    def same_device(self, name: str, device: torch.device, ref: str, ref_device: torch.device) -> None:
        """``name`` is on the device of ``ref``."""
        if device != ref_device:
            raise ValueError(self.wording.device.format(name=name, device=device, ref=ref, ref_device=ref_device))

    def fusion_mode(self, mode) -> None:
        """``mode`` is one of this entry's ``modes``."""
        if not isinstance(mode, str) or mode not in self.modes:
            raise ValueError(self.wording.mode.format(mode=mode, modes=self.modes))

    def gradient(self, name: str, grad, mode: str) -> None:
        """A gradient is given where the fusion ``mode`` needs one (``kernels._utils.GRADIENT_MODES``)."""
        if grad is None and mode in GRADIENT_MODES:
            raise ValueError(self.wording.no_grad.format(name=name, mode=mode, free=_gradient_free(self.modes)))

    def square(self, name: str, t: Tensor, hint: str = "") -> None:
        """The maps of ``t`` (its last two dimensions) are square; ``hint`` is appended to the message."""
        if t.shape[-1] != t.shape[-2]:
            raise ValueError(self.wording.square.format(name=name, shape=tuple(t.shape)) + hint)


#: the dtypes the operators take (float64 runs the PyTorch path on every device)
OPERATOR_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

#: ``tokentm_fast.ops``: any floating-point dtype
API = Validator(None, Wording(
    not_tensor="{name} must be a torch.Tensor, got {type}",
    dtype="{name} must be a floating-point tensor, got dtype {dtype}",
    rank="{name} must have rank {rank}, got shape {shape}",
    shape="{name} has shape {shape}, expected {what} = {expected}",
    device="{name} is on device {device}, but {ref} is on {ref_device}; all inputs must be on the same device",
    mode="mode must be one of {modes}, got {mode!r}",
    no_grad="{name} is required for mode={mode!r} (only {free} need no gradient)",
    square="{name} must be (B, H, N, N) with square maps, got shape {shape}",
), modes=API_MODES)

#: the ``torch.ops.tokentm.*`` operators: ``OPERATOR_DTYPES``
OPERATORS = Validator(OPERATOR_DTYPES, Wording(
    not_tensor="tokentm: {name} must be a torch.Tensor, got {type}",
    dtype="tokentm: {name} must be a floating-point tensor ({allowed}), got {dtype_name}",
    rank="tokentm: {name} must be {rank}-D, got shape {shape}",
    shape="tokentm: {name} must have shape {what} = {expected}, got {shape}",
    device="tokentm: {name} is on {device} but {ref} is on {ref_device}",
    mode="tokentm: unknown head fusion mode {mode!r}; expected one of {modes}",
    no_grad="tokentm: head fusion {mode!r} needs the attention gradient, got {name}=None",
    square="tokentm: {name} must be (B, H, N, N) with square N x N maps, got {shape}",
))


# --------------------------------------------------------------------------- the operators (one call)
def _operator_devices(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None:
            OPERATORS.same_device(name, t.device, ref_name, ref.device)


def check_transform_weights(x, x_tilde) -> None:
    """``x, x_tilde``: ``(B, N, D)`` tensors of one shape, on one device."""
    OPERATORS.tensor("x", x, 3)
    OPERATORS.tensor("x_tilde", x_tilde, 3)
    OPERATORS.same_shape("x_tilde", x_tilde, x.shape, "(B, N, D) of x")
    _operator_devices("x", x, x_tilde=x_tilde)


def check_fuse_heads(attn, grad, mode) -> None:
    """``attn (B, H, N, N)`` with H ≥ 1; ``grad`` of the same shape, required by "gae" / "decoupled"."""
    OPERATORS.fusion_mode(mode)
    OPERATORS.tensor("attn", attn, 4)
    OPERATORS.square("attn", attn)
    if attn.shape[1] == 0:
        raise ValueError("tokentm: attn has no heads (H = 0); the head mean is undefined")
    OPERATORS.gradient("grad", grad, mode)
    if grad is None:
        return
    OPERATORS.tensor("grad", grad, 4)
    OPERATORS.same_shape("grad", grad, attn.shape, "(B, H, N, N) of attn")
    _operator_devices("attn", attn, grad=grad)


def check_update(rows, attn, grad, w_attn, w_mlp, mode) -> None:
    """``rows (B, Q, N)``, ``attn / grad`` as for ``fuse_heads``, ``w_* (B, N)`` or None."""
    check_fuse_heads(attn, grad, mode)
    b, _, n, _ = attn.shape
    OPERATORS.tensor("rows", rows, 3)
    if rows.shape[0] != b or rows.shape[2] != n:
        raise ValueError(
            f"tokentm: rows must be (B, Q, N) = ({b}, Q, {n}) to match attn {tuple(attn.shape)}, "
            f"got {tuple(rows.shape)}"
        )
    for name, w in (("w_attn", w_attn), ("w_mlp", w_mlp)):
        if w is not None:
            OPERATORS.tensor(name, w, 2)
            OPERATORS.same_shape(name, w, (b, n), "(B, N)")
    _operator_devices("attn", attn, rows=rows, w_attn=w_attn, w_mlp=w_mlp)


def check_legrad_reduce(grad_rows, num_rows) -> None:
    """``grad_rows (B, H, Q, N)``; ``num_rows`` None or a positive int."""
    OPERATORS.tensor("grad_rows", grad_rows, 4)
    if num_rows is not None and (isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows <= 0):
        raise ValueError(f"tokentm: num_rows must be a positive int (the rows the mean runs over), got {num_rows!r}")


# --------------------------------------------------------------------------- tokentm_fast.ops (layers, values)
Layers = Union[Tensor, Sequence[Tensor]]
Weights = Union[Tensor, Sequence[Union[Tensor, float]], float]
#: a layer's weight as the operators take it: ``(tensor, 0.0)`` or ``(None, constant)``
LayerWeight = Tuple[Optional[Tensor], float]


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class InputChecks:
    """The inputs of one ``tokentm_fast.ops`` call: one device for all of them, and the NaN/Inf check
    collected so that it synchronises once (``run``)."""

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
        else:
            API.same_device(names[0], t.device, self.device_name, self.device)
        if self.finite:
            fin = torch.isfinite(t)
            self.flags.append((names, fin.flatten(1).all(1) if stacked else fin.all().reshape(1)))

    def run(self) -> None:
        """Raise ``ValueError`` naming the first input (layer) that holds NaN or Inf."""
        if not self.flags:
            return
        ok = torch.cat([f for _, f in self.flags]).tolist()
        names = [n for ns, _ in self.flags for n in ns]
        for name, good in zip(names, ok):
            if not good:
                raise ValueError(f"{name} contains NaN or Inf")


def _layer_tensors(name: str, value, rank: int, checks: InputChecks) -> List[Tensor]:
    """Per-layer list from a list/tuple of rank-``rank`` tensors or a stacked rank-``rank+1`` tensor."""
    if isinstance(value, Tensor):
        API.tensor(name, value)
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
        out.append(API.tensor(f"{name}[{l}]", t, rank))
        checks.add(f"{name}[{l}]", t)
    return out


def _attn_grad_layers(attns, grads, mode: str, checks: InputChecks):
    """Per-layer attention / gradient; returns ``(attns, grads, B, H, N)``."""
    API.fusion_mode(mode)
    attn_list = _layer_tensors("attns", attns, 4, checks)
    b, h, n, _ = attn_list[0].shape
    API.square("attns[0]", attn_list[0])
    for l, a in enumerate(attn_list):
        API.same_shape(f"attns[{l}]", a, (b, h, n, n), "(B, H, N, N) of attns[0]")
    if grads is None:
        API.gradient("grads", grads, mode)
        return attn_list, [None] * len(attn_list), b, h, n
    grad_list = _layer_tensors("grads", grads, 4, checks)
    if len(grad_list) != len(attn_list):
        raise ValueError(f"grads has {len(grad_list)} layers but attns has {len(attn_list)}")
    for l, g in enumerate(grad_list):
        API.same_shape(f"grads[{l}]", g, (b, h, n, n), "(B, H, N, N) of attns")
    return attn_list, grad_list, b, h, n


def _weight_layers(name: str, w, num_layers: int, b: int, n: int, checks: InputChecks) -> List[LayerWeight]:
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
                items.append(API.tensor(f"{name}[{l}]", v, 2))
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
            API.same_shape(f"{name}[{l}]", v, (b, n), "(B, N) of attns")
            out.append((v, 0.0))
    return out


def _init_diag(init, b: int, n: int, checks: InputChecks) -> Optional[Tensor]:
    """The ``(B, N)`` diagonal of C⁰, or None for ``"identity"``."""
    if isinstance(init, str):
        if init != "identity":
            raise ValueError(
                f"init must be a (B, N) tensor (the diagonal of C⁰, e.g. token lengths ‖X⁰‖) "
                f"or 'identity', got {init!r}"
            )
        return None
    if not isinstance(init, Tensor):
        raise TypeError(f"init must be a (B, N) tensor or 'identity', got {type(init).__name__}")
    API.tensor("init", init, 2)
    API.same_shape("init", init, (b, n), "(B, N) of attns")
    checks.add("init", init)
    return init


def api_layers(attns: Layers, grads: Optional[Layers], w_attn: Weights, w_mlp: Weights, init, mode,
               check_finite: bool):
    """The arguments of ``ops.tokentm_rows`` / ``ops.tokentm_matrix``, checked.

    Returns ``(attns, grads, w_attn, w_mlp, c0, B, N)``: per-layer lists (``grads`` entries None when
    not given), the weights as ``(tensor or None, constant)`` per layer, ``c0`` the ``(B, N)`` diagonal
    of C⁰ or None.
    """
    checks = InputChecks(check_finite)
    attn_list, grad_list, b, _, n = _attn_grad_layers(attns, grads, mode, checks)
    wa = _weight_layers("w_attn", w_attn, len(attn_list), b, n, checks)
    wm = _weight_layers("w_mlp", w_mlp, len(attn_list), b, n, checks)
    c0 = _init_diag(init, b, n, checks)
    checks.run()
    return attn_list, grad_list, wa, wm, c0, b, n


def api_flag(name: str, value) -> None:
    """``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_index(name: str, value, n: int, what: str, symbol: Optional[str] = None) -> int:
    """The one index rule of the package (Python's): ``value`` is an int in ``[-n, n)``, a negative one
    counting from the end (``-1`` is the last of the ``n``); returns it in ``[0, n)``.

    ``name`` names the argument in the messages (``option start_layer``, ``option layers[1]``);
    ``what`` is the counted thing with ``n`` (``"a model with 12 blocks"``); ``symbol`` stands for the
    value in the valid range (default: the last word of ``name``). ``TypeError`` for a non-int (a bool
    too), ``ValueError`` naming the valid range otherwise.
    """
    symbol = symbol or name.split()[-1]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not -n <= value < n:
        raise ValueError(f"{name}={value} out of range for {what} (expected {-n} <= {symbol} < {n}; "
                         f"negative values count from the end)")
    return value % n


def api_query_index(query_index, n: int) -> int:
    """``query_index`` is an int in ``[-N, N)`` (``check_index``'s rule); returns it in ``[0, N)``."""
    if not isinstance(query_index, int) or isinstance(query_index, bool):
        raise TypeError(f"query_index must be an int, got {type(query_index).__name__}")
    if not -n <= query_index < n:
        raise ValueError(f"query_index {query_index} is out of range for N = {n} tokens "
                         f"(expected {-n} <= query_index < {n})")
    return query_index % n


def api_transform_weights(x, x_tilde, use_length, use_necc, check_finite: bool) -> None:
    """The arguments of ``ops.transform_weights``: ``(B, N, D)`` tensors of one shape, bool switches."""
    checks = InputChecks(check_finite)
    API.tensor("x", x, 3)
    API.tensor("x_tilde", x_tilde, 3)
    API.same_shape("x_tilde", x_tilde, tuple(x.shape), "(B, N, D) of x")
    api_flag("use_length", use_length)
    api_flag("use_necc", use_necc)
    checks.add("x", x)
    checks.add("x_tilde", x_tilde)
    checks.run()


def api_fuse_heads(attn, grad, mode, check_finite: bool) -> None:
    """The arguments of ``ops.fuse_heads``: ``attn (B, H, N, N)``, ``grad`` of its shape or None."""
    checks = InputChecks(check_finite)
    API.fusion_mode(mode)
    API.tensor("attn", attn, 4)
    API.square("attn", attn)
    checks.add("attn", attn)
    API.gradient("grad", grad, mode)
    if grad is not None:
        API.tensor("grad", grad, 4)
        API.same_shape("grad", grad, tuple(attn.shape), "(B, H, N, N) of attn")
        checks.add("grad", grad)
    checks.run()


def api_legrad_layers(grads: Layers, num_rows, check_finite: bool) -> List[Tensor]:
    """The arguments of ``ops.legrad_reduce``: per-layer ``(B, H, Q, N)`` gradients (square unless
    ``num_rows``, a positive int, is given); returns the per-layer list."""
    checks = InputChecks(check_finite)
    grad_list = _layer_tensors("grads", grads, 4, checks)
    if num_rows is None:
        API.square("grads[0]", grad_list[0], " (pass num_rows to reduce a subset of rows)")
    else:
        if not isinstance(num_rows, int) or isinstance(num_rows, bool):
            raise TypeError(f"num_rows must be an int, got {type(num_rows).__name__}")
        if num_rows < 1:
            raise ValueError(f"num_rows must be positive, got {num_rows}")
    for l, g in enumerate(grad_list):
        API.same_shape(f"grads[{l}]", g, tuple(grad_list[0].shape), "the shape of grads[0]")
    checks.run()
    return grad_list
