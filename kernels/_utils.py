"""Shared argument checks and launch helpers of the Triton kernels.

Every wrapper in ``tokentm_fast.kernels`` validates its arguments here so the
error messages are uniform: a ``TypeError`` for a wrong type or dtype, a
``ValueError`` for a wrong rank, shape, device or layout, and a
``RuntimeError`` when Triton cannot run on the tensors' device.

Dtype policy (all kernels): inputs may be float32, bfloat16 or float16; the
kernels load them and accumulate in float32 and always write float32.
float64 is *rejected* with a ``TypeError``: float64 is the dtype of the
reference computations, which belong to the PyTorch path
(``tokentm_fast.transform`` / ``.fusion`` / ``.aggregation``).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

#: dtypes the kernels read (accumulation and output are always float32).
SUPPORTED_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

#: head fusion mode -> constexpr code shared by the kernels (docs/methods.md §3, §4).
MODE_GAE = 0
MODE_DECOUPLED = 1
MODE_MEAN = 2
MODE_ROLLOUT = 3
MODE_CODES = {"gae": MODE_GAE, "decoupled": MODE_DECOUPLED, "mean": MODE_MEAN, "rollout": MODE_ROLLOUT}
GRADIENT_MODES = ("gae", "decoupled")


# --------------------------------------------------------------------------- availability
def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable() -> bool:
    """True when ``import triton`` works."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_interpreted() -> bool:
    """True when the kernels were built for the interpreter.

    ``triton.jit`` chooses between the compiler and the interpreter when the
    kernel modules are imported, so the environment at import time matters.
    """
    from .transform_weights import _necc_normalize_kernel

    return type(_necc_normalize_kernel).__name__ == "InterpretedFunction"


def triton_available(device: Union[str, torch.device, torch.Tensor]) -> bool:
    """Whether the Triton kernels can run on ``device`` (a device, its name, or a tensor).

    CUDA devices need a working CUDA runtime; CPU tensors need Triton's
    interpreter (``TRITON_INTERPRET=1`` set before triton was imported).
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if not triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and not kernels_interpreted()
    if device.type == "cpu":
        return interpreter_enabled() and kernels_interpreted()
    return False


def require_triton(t: torch.Tensor) -> None:
    """Raise a clear ``RuntimeError`` when the Triton kernels cannot run on ``t``'s device."""
    if not triton_importable():
        raise RuntimeError(
            "tokentm_fast.kernels needs Triton, which is not importable here; "
            "install triton or use the PyTorch path (backend='torch'/'reference')"
        )
    device = t.device
    if device.type == "cpu":
        if not interpreter_enabled():
            raise RuntimeError(
                "Triton kernels got CPU tensors but Triton's interpreter is off: set "
                "TRITON_INTERPRET=1 before triton is imported, move the tensors to a CUDA "
                "device, or use the PyTorch path"
            )
        if not kernels_interpreted():
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after tokentm_fast.kernels (and triton) were "
                "imported, so the kernels were compiled for the GPU; set it before any import"
            )
        return
    if device.type == "cuda":
        if kernels_interpreted():
            raise RuntimeError(
                "the Triton kernels were built for the interpreter (TRITON_INTERPRET=1) "
                "and cannot run on CUDA tensors; unset TRITON_INTERPRET before importing triton"
            )
        return
    raise RuntimeError(f"Triton kernels do not run on device type {device.type!r}")


# --------------------------------------------------------------------------- argument checks
def check_tensor(
    t: object,
    name: str,
    ndim: Union[int, Sequence[int]],
    dtypes: Iterable[torch.dtype] = SUPPORTED_DTYPES,
) -> torch.Tensor:
    """Type, dtype and rank check of one input; returns it unchanged."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        hint = " (float64 is served by the PyTorch path, not the kernels)" if t.dtype == torch.float64 else ""
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}{hint}")
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must be {want}-D, got shape {tuple(t.shape)} ({t.dim()}-D)")
    return t


def check_shape(t: torch.Tensor, name: str, shape: Sequence[int], what: str) -> None:
    """``t.shape == shape`` or a ValueError that names both (``what`` spells the expected layout)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(ref: torch.Tensor, ref_name: str, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when already contiguous (no copy), else a contiguous copy."""
    return t if t.is_contiguous() else t.contiguous()


def check_out(
    out: Optional[torch.Tensor], shape: Sequence[int], device: torch.device, what: str
) -> torch.Tensor:
    """Validate a caller-provided output (float32, contiguous, right shape and device) or allocate one."""
    if out is None:
        return torch.empty(tuple(shape), dtype=torch.float32, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {str(out.dtype).replace('torch.', '')}")
    check_shape(out, "out", shape, what)
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the inputs are on {device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (the kernels write it with dense row-major offsets)")
    return out


def check_mode(mode: object, allowed: Sequence[str] = tuple(MODE_CODES)) -> int:
    if mode not in allowed:
        raise ValueError(f"unknown head fusion mode {mode!r}; expected one of {tuple(allowed)}")
    return MODE_CODES[mode]


def is_scalar(w: object) -> bool:
    """A Python (or numpy) real number used as a constant weight; bools are refused."""
    return isinstance(w, (int, float)) and not isinstance(w, bool)


def check_weight(w: object, name: str, batch: int, num_tokens: int, device: torch.device):
    """A ``(B, N)`` weight tensor (made contiguous) or a Python float constant.

    Returns ``(tensor_or_None, constant)``: the kernels take a pointer plus a
    constexpr flag, and a float scalar used when the flag is off.
    """
    if is_scalar(w):
        return None, float(w)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a (B, N) tensor or a Python float, got {type(w).__name__}")
    check_tensor(w, name, 2)
    check_shape(w, name, (batch, num_tokens), "(B, N)")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but the inputs are on {device}")
    return contiguous(w), 0.0


def interpreted(device: torch.device) -> bool:
    """True when launches on ``device`` run in Triton's CPU interpreter."""
    return device.type == "cpu"


# --------------------------------------------------------------------------- launch settings
def tuning_configs(gpu: Sequence, interpreter) -> list:
    """The ``triton.autotune`` configurations of a kernel.

    On the GPU: ``gpu`` (all of them are timed on the first call of each
    autotune key, the best is kept for the process). Under the interpreter
    (``TRITON_INTERPRET=1`` when the kernel modules are imported): only
    ``interpreter``, so nothing is timed and the CPU tests stay fast (the
    interpreter's cost is per operation, not per element).
    """
    return [interpreter] if interpreter_enabled() else list(gpu)


def batch_bucket(batch: int) -> int:
    """Autotune key of a batch size: the next power of two, capped at 256
    (``1, 2, 4, …, 256``), so nearby batch sizes share one tuning run."""
    b = 1
    while b < batch and b < 256:
        b *= 2
    return b


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 under the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
