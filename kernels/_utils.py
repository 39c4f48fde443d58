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
float64 belongs to the PyTorch twins (``tokentm_fast.torch_ops``, one module per kernel
family under the kernel's file name); the operators route it there.

This module also owns what is about the kernels and is read by the package above them (it imports
nothing from the package and needs no Triton to import): the head-fusion modes and their codes
(``FUSION_TABLE``), the ε of the norm clamps (``EPS``), the widest head the attention kernels take
(``MAX_HEAD_DIM``), the row window of the update kernels (``support_bounds``) and why the kernels cannot
run on a device (``triton_unusable_reason``).

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
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch


# --------------------------------------------------------------------------- what the kernels define
class FusionMode(NamedTuple):
    """One head-fusion mode: its name, the code the Triton kernels branch on, and whether it reads
    the attention gradient."""

    name: str
    code: int
    needs_gradient: bool


#: every head-fusion mode (docs/methods.md §3, §4), ``attn, grad (B, H, N, N) -> Ā (B, N, N)``:
#:
#: - ``"gae"``:       Ā = mean_h max(A_h ⊙ G_h, 0)           (TokenTM default, GAE)
#: - ``"decoupled"``: Ā = mean_h(A_h) ⊙ mean_h max(G_h, 0)
#: - ``"mean"``:      Ā = mean_h A_h                          (no gradient; rollout is the engine
#:   constants ``tokentm_fast.aggregation.ROLLOUT`` on it)
#:
#: The one list of these modes: the public checks (``tokentm_fast.validation``), the kernels' codes
#: below and the methods' ``head_fusion`` choices are all read off it.
FUSION_TABLE: Tuple[FusionMode, ...] = (
    FusionMode("gae", 0, True),
    FusionMode("decoupled", 1, True),
    FusionMode("mean", 2, False),
)
FUSION_MODES: Tuple[str, ...] = tuple(m.name for m in FUSION_TABLE)
#: the modes that need ``grad`` (TokenTM's ``head_fusion`` choices)
GRADIENT_MODES: Tuple[str, ...] = tuple(m.name for m in FUSION_TABLE if m.needs_gradient)
#: head fusion mode -> constexpr code shared by the kernels; the named codes are what the kernels'
#: branches compare with
MODE_CODES = {m.name: m.code for m in FUSION_TABLE}
MODE_GAE = MODE_CODES["gae"]
MODE_DECOUPLED = MODE_CODES["decoupled"]
MODE_MEAN = MODE_CODES["mean"]

#: ε of the norm clamps of the transformation weights (docs/methods.md §2), in the Triton kernel
#: (``transform_weights``) and its PyTorch twin (``tokentm_fast.torch_ops.transform_weights``)
EPS = 1e-6

#: the stabiliser of the relevance rules' safe division ``a / (b + 1e-9)`` (Chefer et al.'s; docs/methods.md
#: §6.3), in the relevance programs (``attention_relevance``), their twin and ``methods.lrp_rules``
STABILISER = 1e-9

#: the widest head the flash attention kernels take (``kernels/attention.py``: BLOCK_D = 32, 64 or 128;
#: heads of 80, 96, ... are masked tails); wider heads stay on the materialized path
MAX_HEAD_DIM = 128


def support_bounds(support: Optional[slice], n: int) -> Tuple[int, int]:
    """``(lo, hi)`` of a step-1 row ``slice`` clipped to ``[0, n)``; ``(0, n)`` for None (dense): the rows
    of A and G the row update reads (``row_update`` here and in ``tokentm_fast.torch_ops.row_update``)."""
    if support is None:
        return 0, n
    if not isinstance(support, slice):
        raise TypeError(f"support must be a slice of token rows or None, got {type(support).__name__}")
    lo, hi, step = support.indices(n)
    if step != 1:
        raise ValueError(f"support must be a step-1 slice, got {support}")
    return lo, max(lo, hi)


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
    """Whether ``triton.jit`` builds interpreted functions now: a probe function jitted once, at the first
    use of the kernels (``kernels_interpreted``; ``tokentm_fast.kernels`` imports the kernel modules then too,
    so that importing the package imports no Triton)."""
    if not triton_importable():
        return False
    import triton

    @triton.jit
    def _probe():
        pass

    return type(_probe).__name__ == "InterpretedFunction"


_KERNELS_INTERPRETED: Optional[bool] = None


def kernels_interpreted() -> bool:
    """True when the kernels were built for the interpreter.

    ``triton.jit`` chooses between the compiler and the interpreter when the
    kernel modules are imported (at their first use), so the environment then matters.
    """
    global _KERNELS_INTERPRETED
    if _KERNELS_INTERPRETED is None:
        _KERNELS_INTERPRETED = _built_for_interpreter()
    return _KERNELS_INTERPRETED


def triton_unusable_reason(device: Union[str, torch.device, torch.Tensor]) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (a device, its name, or a tensor); None when they can.

    CUDA devices need a working CUDA runtime and kernels compiled for the GPU; CPU tensors need Triton's
    interpreter (``TRITON_INTERPRET=1`` set before triton was imported). The one wording of these
    reasons: ``require_triton`` raises it, ``tokentm_fast.api`` warns or refuses with it.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if not triton_importable():
        return ("Triton is not installed (not importable here); install triton or use the PyTorch path "
                "(backend='torch' / 'reference')")
    if device.type == "cpu":
        if not interpreter_enabled():
            return ("Triton runs on CUDA tensors, and on CPU tensors only under its interpreter, which is off: "
                    "set TRITON_INTERPRET=1 before triton is imported (for testing), move the tensors to a "
                    "CUDA device, or use the PyTorch path")
        if not kernels_interpreted():
            return ("TRITON_INTERPRET=1 was set after tokentm_fast.kernels (and triton) were imported, so the "
                    "kernels were compiled for the GPU; set it before any import")
        return None
    if device.type == "cuda":
        if kernels_interpreted():
            return ("the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 at import time), "
                    "which runs on CPU tensors only; unset TRITON_INTERPRET before importing triton")
        if not torch.cuda.is_available():
            return "torch sees no working CUDA runtime"
        return None
    return f"Triton does not run on {device.type} tensors"


def triton_available(device: Union[str, torch.device, torch.Tensor]) -> bool:
    """Whether the Triton kernels can run on ``device`` (a device, its name, or a tensor): when
    ``triton_unusable_reason`` has nothing to say."""
    return triton_unusable_reason(device) is None


def require_triton(t: torch.Tensor) -> None:
    """Raise a ``RuntimeError`` saying why (``triton_unusable_reason``) when the Triton kernels cannot
    run on ``t``'s device."""
    reason = triton_unusable_reason(t)
    if reason is not None:
        raise RuntimeError(f"tokentm_fast.kernels: {reason}")


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


class AttentionKernels(NamedTuple):
    """One implementation of the explanation attention (the signatures of the wrappers of
    ``kernels.attention`` and of their PyTorch twin ``tokentm_fast.torch_ops.attention``)."""

    #: ``bias``: None or an additive bias of the logits in table form (BEiT's relative position bias,
    #: ``tokentm_fast.models.relative_bias.RelativePositionBias``: ``table (R, H)``, ``grid``, ``prefix``), read
    #: inside the tiles wherever P is formed; callers pass it only where the model has one
    forward: Callable  # (q, k, v, scale, bias=None) -> (o, lse)
    backward: Callable  # (q, k, v, o, lse, do, scale, row=None, input_grads=True | False | "v", bias=None) -> (dq, dk, dv, t)
    rows: Callable  # (row, scale, q=, k=, lse=, bias=None | do=, v=) -> t (B, H, N)
    #: (q, k, v, o, lse, r_o, scale, row=None, do=None, bias=None, rules=None) -> (r_q, r_k, r_v, t): the relevance
    #: pass through the attention (``kernels.attention_relevance`` / ``torch_ops.attention_relevance``); with a
    #: bias, ``rules`` ("ours" / "classic") splits R^A between QKᵀ and B/scale (the add rule)
    relevance: Optional[Callable] = None
