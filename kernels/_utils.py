"""Availability, argument forms and launch settings shared by the Triton kernels.

The wrappers in ``tokentm_fast.kernels`` trust their arguments: they are
checked once, at the public entries (``tokentm_fast.ops`` and the
``torch.ops.tokentm`` operators of ``tokentm_fast.bindings``, both with the
checks of ``tokentm_fast.validation``), and internal
callers (the fast path) pass tensors they built themselves. The wrappers only
bring them into launch form (contiguous, weights as pointer or constant,
``out`` allocated) and never read device memory back to the host.

Dtype policy (all kernels): inputs may be float32, bfloat16 or float16; the
kernels load them and accumulate in float32 and always write float32.
float64 belongs to the PyTorch path (``tokentm_fast.transform`` / ``.fusion`` /
``.aggregation``); the operators route it there.

Launch settings: each kernel is wrapped in ``triton.autotune`` with a list of
at most 4 GPU configurations (each audited for sm_90 by
``benchmarks/compile_audit.py``), keyed on its shape (N rounded up to a power of
two, heads or width, a batch bucket) and the input dtypes, with
``cache_results=True``: the chosen configuration is stored in Triton's cache
directory, so another process benchmarks nothing. Under Triton's interpreter a
single configuration (``tuning_configs``).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

from ..fusion import FUSION_TABLE, GRADIENT_MODES  # noqa: F401  (GRADIENT_MODES: the wrappers' import)

#: head fusion mode -> constexpr code shared by the kernels (docs/methods.md §3, §4), read off
#: ``tokentm_fast.fusion.FUSION_TABLE``; the named codes are what the kernels' branches compare with.
MODE_CODES = {m.name: m.code for m in FUSION_TABLE}
MODE_GAE = MODE_CODES["gae"]
MODE_DECOUPLED = MODE_CODES["decoupled"]
MODE_MEAN = MODE_CODES["mean"]
MODE_ROLLOUT = MODE_CODES["rollout"]


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


def _built_for_interpreter() -> bool:
    """Whether ``triton.jit`` builds interpreted functions now: a probe function jitted once, when this
    module is imported, that is, together with the kernel modules (``tokentm_fast.kernels`` imports them)."""
    if not triton_importable():
        return False
    import triton

    @triton.jit
    def _probe():
        pass

    return type(_probe).__name__ == "InterpretedFunction"


_KERNELS_INTERPRETED = _built_for_interpreter()


def kernels_interpreted() -> bool:
    """True when the kernels were built for the interpreter.

    ``triton.jit`` chooses between the compiler and the interpreter when the
    kernel modules are imported, so the environment at import time matters.
    """
    return _KERNELS_INTERPRETED


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


# --------------------------------------------------------------------------- float32 products
def tf32_allowed() -> bool:
    """Whether torch's own switch lets float32 matmuls use TF32 tensor cores: the rule every float32
    ``tl.dot`` of the kernels follows (TF32 when allowed, full float32 / IEEE otherwise).

    torch ≥ 2.9 keeps the switch in ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee", or
    "none": inherit ``torch.backends.fp32_precision``, whose "none" is the default, IEEE); the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.set_float32_matmul_precision("high")`` set it
    too. Reading the legacy flag after the new API was used raises in torch 2.14, so the new attribute is
    read first; older torch falls back to ``allow_tf32`` (``get_float32_matmul_precision() != "highest"``).
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision in ("tf32", "ieee", "none"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


# --------------------------------------------------------------------------- argument forms
def contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when already contiguous (no copy), else a contiguous copy."""
    return t if t.is_contiguous() else t.contiguous()


def weight_arg(w: Union[torch.Tensor, float]) -> Tuple[Optional[torch.Tensor], float]:
    """A trusted weight as the kernels take it: ``(contiguous (B, N) tensor, 0.0)`` or
    ``(None, float constant)`` (a pointer plus a constexpr flag, and the scalar used when it is off)."""
    if isinstance(w, torch.Tensor):
        return contiguous(w), 0.0
    return None, float(w)


def interpreted(device: torch.device) -> bool:
    """True when launches on ``device`` run in Triton's CPU interpreter."""
    return device.type == "cpu"


# --------------------------------------------------------------------------- launch settings
def tuning_configs(gpu: Sequence, interpreter) -> list:
    """The ``triton.autotune`` configurations of a kernel.

    On the GPU: ``gpu`` (all of them are timed on the first call of each
    autotune key; the best is kept for the process and, with ``cache_results``,
    on disk for the next ones). Under the interpreter
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


def num_splits(num_tiles: int, num_units: int, device: torch.device) -> int:
    """How many programs share the reduction range of one output tile (the deterministic split of
    ``row_update`` / ``matrix_update`` over i and of ``legrad_reduce`` over rows).

    1 under the interpreter and whenever ``num_tiles`` (the launch's output tiles at the caller's
    reference tile width) already fills the GPU (about 2 programs per SM); otherwise enough splits to
    get there, at most ``num_units`` (the range in the caller's split units) and 64.
    """
    if device.type != "cuda":
        return 1
    target = 2 * num_sms(device)
    if num_tiles >= target:
        return 1
    return max(1, min(num_units, (target + num_tiles - 1) // num_tiles, 64))  # ⌈target / num_tiles⌉
