"""Triton kernels of tokentm_fast (installed as ``tokentm_fast.kernels``).

Each kernel has a thin wrapper that allocates (or takes a caller-provided
``out=``) and launches. The wrappers trust their arguments: they are checked
once, at the public entries (``tokentm_fast.ops``, ``torch.ops.tokentm.*``),
and internal callers pass tensors they built. The PyTorch functions each
wrapper must match are its twins in ``tokentm_fast.torch_ops``, each under the
kernel's file name (``torch_ops.transform_weights``, ``.head_fusion``, ``.row_update``
(also ``matrix_update``'s twin), ``.legrad_reduce``, ``.attention``).

- ``transform_weights(x, x_tilde, use_length, use_necc, eps, out)``   docs/methods.md §2
- ``fuse_heads(attn, grad, mode, out)``                               docs/methods.md §3, §4
- ``row_update(rows, attn, grad, w_attn, w_mlp, mode, out, support)`` docs/methods.md §3.1 (small Q)
- ``matrix_update(rows, attn, grad, w_attn, w_mlp, mode, allow_tf32, out)``  docs/methods.md §3 (Q = N)
- ``legrad_reduce(grad_rows, num_rows, out, accumulate)``             docs/methods.md §6

Dtypes: inputs float32 / bfloat16 / float16, fp32 accumulation, float32
output; float64 belongs to the PyTorch path. Launch settings are autotuned
on the GPU over at most 4 configurations per kernel and input class, every one
checked for sm_90 by the compile audit (``benchmarks/compile_audit.py``: no
register spills, shared memory within an H100's); the choice is cached on disk
per power-of-two bucket of N (one small configuration under the interpreter).
On CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is imported); ``triton_available`` / ``require_triton`` tell
(``_utils.triton_unusable_reason`` says why).
If triton is not importable at all, the wrappers exist but raise RuntimeError.
"""
from __future__ import annotations

import sys
import types

from ._utils import kernels_interpreted, require_triton, triton_available, triton_importable

__all__ = [
    "transform_weights",
    "fuse_heads",
    "row_update",
    "matrix_update",
    "legrad_reduce",
    "triton_available",
    "require_triton",
]

_WRAPPERS = {
    "transform_weights": ".transform_weights",
    "fuse_heads": ".head_fusion",
    "row_update": ".row_update",
    "matrix_update": ".matrix_update",
    "legrad_reduce": ".legrad_reduce",
}


class _Package(types.ModuleType):
    """This package's module type: a wrapper's name stays the wrapper's. Importing a kernel module
    (``import tokentm_fast.kernels.row_update``, ``importlib.import_module(...)``) makes the import system bind
    the module to the package attribute of the same name, where it would shadow the lazily imported wrapper
    (``kernels.row_update(...)`` would call a module); that binding is dropped, so ``__getattr__`` answers.
    The module itself stays reachable through ``sys.modules`` / ``importlib.import_module``."""

    def __setattr__(self, name: str, value) -> None:
        if name in _WRAPPERS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    """The kernel wrappers, imported on first use: importing the package (and ``kernels._utils``, which
    the package reads at import time) does not import Triton or build any kernel."""
    if name not in _WRAPPERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if triton_importable():
        from importlib import import_module

        kernels_interpreted()           # the probe of the mode the kernel modules are built in, taken now
        wrapper = getattr(import_module(_WRAPPERS[name], __name__), name)
    else:  # pragma: no cover - exercised only where triton is missing
        def wrapper(*args, **kwargs):
            raise RuntimeError(
                f"tokentm_fast.kernels.{name} needs Triton, which is not importable here; "
                "install triton or use the PyTorch path"
            )

        wrapper.__name__ = name
    globals()[name] = wrapper
    return wrapper
