"""The performance protocol (benchmarks/README.md): explain against the training step and the literal implementation.

Per size of the protocol's table "Sizes that matter to users" (``extra_info["case"]``):

- ``step`` (variant ``training step``): forward, target logit summed, backward
  with parameter gradients, fused attention on (timm's default), then
  ``zero_grad(set_to_none=True)`` (``bench_models.training_step``);
- ``literal`` (tokentm, gae): the method the way its authors' code is written,
  in the model's own dtype: hooks record every layer's full ``(B, H, N, N)``
  attention and gradient, then the recursion with N×N matrices
  (``bench_models.literal_explain``);
- ``explain`` per method: on CUDA ``backend="triton"`` with
  ``attention="flash"`` and ``attention="materialized"`` (marked
  ``bench_cuda``: generated with ``--bench-device cuda``, and on the CPU only
  under ``TOKENTM_BENCH_TRITON_INTERPRET=1``, to check their code path) and
  ``backend="torch"``; on the CPU ``backend="torch"`` (no ``attention=``).

Every case records, for its first call (Triton compiles and autotunes there on
CUDA) and for a warm call: the peak memory (``extra_info["first_peak_bytes"]``,
``extra_info["peak_bytes"]``: CUDA ``max_memory_allocated`` minus the memory
allocated before the call, after ``reset_peak_memory_stats``; CPU:
``bench_memory.PeakTracker``) and the first call's wall time
(``extra_info["first_call_s"]``, device synchronized; on the CPU the calls run
under the ``PeakTracker``, so the first call's time there is an upper bound); the table
(``benchtable.py``) gives explain ÷ training step (time and warm peak),
literal ÷ explain, the first call's time and peak. Each explain / literal map is first checked against the
float64 reference of the first images (spec §7 tolerances) where that fits in
memory, else against the ``torch`` backend's map (itself checked at the smaller
sizes), else recorded as unchecked (``extra_info["checked_against"]``).

Methods: every registered method (``tf.METHODS``) by default, each on both attention paths (the LRP
relevance pass — lrp, partial_lrp, transformer_attribution — too: its flash path is the relevance programs of
``kernels/attention_relevance.py``); a method whose default options the flash path refuses
(``MethodSpec.flash_refusal``) gets the materialized case only. ``--bench-methods`` /
``TOKENTM_BENCH_METHODS=tokentm,gae`` selects some. Sizes whose estimated peak does not fit are not
generated (listed at the start of the run).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from bench_memory import explain_peak, measure_peak, step_peak
from bench_models import literal_explain, random_images, random_vit, training_step
from benchtable import flash_explain_peak

import tokentm_fast as tf

METHODS = tuple(tf.METHODS)  # every registered method
LITERAL_METHODS = ("tokentm", "gae")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ITEMSIZE = {"float32": 4, "bfloat16": 2}
CHECK_BATCH = 2  # images checked against the float64 reference when the whole batch does not fit
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# name -> (timm model, L, H, D, params at 224 px, patch)
MODELS = {
    "vit_tiny_patch16_224": (12, 3, 192, 5.7e6, 16),
    "vit_base_patch16_224": (12, 12, 768, 86.6e6, 16),
    "vit_large_patch16_384": (24, 16, 1024, 304.7e6, 16),
}


@dataclass(frozen=True)
class Size:
    """One row of the protocol's table of sizes that matter to users."""

    tag: str  # imagenet | large | hires (| tiny)
    model: str
    img: int
    B: int
    dtype: str

    @property
    def N(self) -> int:
        return (self.img // MODELS[self.model][4]) ** 2 + 1

    @property
    def label(self) -> str:
        return f"{self.model} {self.img}px N={self.N} B={self.B} {self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.tag}-{self.model}-{self.img}px-B{self.B}-{self.dtype}"

    def shape(self) -> Dict[str, int]:
        L, H, D, params, patch = MODELS[self.model]
        # the position embedding grows with the grid (N·D more parameters than at 224 px)
        extra = (self.N - (224 // patch) ** 2 - 1) * D
        return dict(L=L, H=H, D=D, N=self.N, B=self.B, params=int(params + extra), image_pixels=self.img ** 2,
                    itemsize=ITEMSIZE[self.dtype])


@dataclass(frozen=True)
class PCase:
    size: Size
    kind: str  # step | literal | explain
    method: str = ""
    backend: str = ""  # torch | triton (explain)
    attention: str = ""  # flash | materialized (triton on CUDA) | "" (no keyword)

    @property
    def variant(self) -> str:
        if self.kind == "step":
            return "training step"
        if self.kind == "literal":
            return f"literal ({self.size.dtype})"
        return f"{self.backend} {self.attention}".strip()

    @property
    def id(self) -> str:
        what = {"step": "step", "literal": f"literal-{self.method}"}.get(self.kind)
        what = what or f"{self.method}-{self.backend}" + (f"-{self.attention}" if self.attention else "")
        return f"{self.size.id}-{what}"

    def memory(self) -> int:
        """Estimated peak (``bench_memory``): the model, its parameter gradients where any, and the call."""
        shape = self.size.shape()
        model = shape["params"] * shape["itemsize"]
        if self.kind == "step":
            return model + step_peak(**shape, fused=True)
        if self.kind == "literal":  # the graph in the model's dtype, A and G of every layer, parameter gradients
            return 2 * model + explain_peak(self.method, "literal", **shape)
        if self.attention == "flash":  # no N×N tensor (benchtable.flash_explain_peak)
            return model + flash_explain_peak(self.method, shape)
        return model + explain_peak(self.method, self.backend, **shape)

    def extra(self) -> Dict[str, Any]:
        s = self.size
        L, H, D, _, _ = MODELS[s.model]
        return dict(suite="perf", case=s.label, size=s.tag, kind=self.kind, variant=self.variant,
                    method=self.method, backend=self.backend or self.kind, attention=self.attention,
                    model=s.model, img_size=s.img, N=s.N, B=s.B, L=L, H=H, D=D, dtype=s.dtype)


def attention_paths(method: str) -> Tuple[str, ...]:
    """The attention paths of ``method``'s triton cases: flash and materialized, or materialized alone
    where the flash path refuses the method's default options (``MethodSpec.flash_refusal``)."""
    spec = tf.methods.get_method(method)
    return ("materialized",) if spec.flash_refusal(spec.defaults) else ("flash", "materialized")


def sizes(scale: str, cuda: bool) -> List[Size]:
    """The sizes per scale; the CPU runs scaled-down stand-ins (same kinds of case)."""
    if scale == "tiny":
        dts = ("float32", "bfloat16") if cuda else ("float32",)
        return ([Size("tiny", "vit_tiny_patch16_224", 64, 2, d) for d in dts]
                + [Size("tiny-hires", "vit_tiny_patch16_224", 128, 1, dts[-1])])
    if cuda:
        imagenet = [Size("imagenet", "vit_base_patch16_224", 224, b, d)
                    for b in ((64,) if scale == "small" else (64, 256)) for d in ("bfloat16", "float32")]
        large = [Size("large", "vit_large_patch16_384", 384, 16, d)
                 for d in (("bfloat16",) if scale == "small" else ("bfloat16", "float32"))]
        hires = [Size("hires", "vit_base_patch16_224", img, 1, "bfloat16")
                 for img in ((1024,) if scale == "small" else (1024, 1536, 2048))]
        return imagenet + large + hires
    out = [Size("imagenet", "vit_base_patch16_224", 224, 8, "float32"),
           Size("hires", "vit_base_patch16_224", 512, 1, "float32")]
    if scale == "full":
        out += [Size("large", "vit_large_patch16_384", 384, 2, "float32"),
                Size("hires", "vit_base_patch16_224", 1024, 1, "float32")]
    return out


def build_cases(ctx) -> List[Any]:
    methods = ctx.methods(METHODS)
    out: List[Any] = []
    for size in sizes(ctx.scale, ctx.cuda):
        cases = [PCase(size, "step")]
        cases += [PCase(size, "literal", m) for m in methods if m in LITERAL_METHODS]
        for m in methods:
            if ctx.triton:  # CUDA; on the CPU only with TOKENTM_BENCH_TRITON_INTERPRET=1 (checks the code path)
                cases += [PCase(size, "explain", m, "triton", a) for a in attention_paths(m)]
            cases.append(PCase(size, "explain", m, "torch"))
        for c in cases:
            if not ctx.fits(c.memory(), f"perf {c.id}"):
                continue
            marks = [pytest.mark.bench_cuda] if c.attention else []
            out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def pytest_generate_tests(metafunc):
    if "pcase" in metafunc.fixturenames:
        metafunc.parametrize("pcase", build_cases(metafunc.config.tokentm_bench))


# --------------------------------------------------------------------------- state of one size


def _state(size: Size, ctx) -> Dict[str, Any]:
    """Model, images, targets and the maps checked against, shared by the cases of one size."""

    def make():
        model = random_vit(size.model, ctx.device, dtype=DTYPES[size.dtype], fused_attn=True, img_size=size.img)
        images, target = random_images(model, size.B, ctx.device)
        return dict(model=model, images=images, target=target, refs={})

    return ctx.cache.get(size, make)


def _oracle(case: PCase, state: Dict[str, Any], ctx) -> Tuple[Optional[torch.Tensor], str]:
    """(map to check against, what it is): the float64 reference of the first images where it fits,
    else the torch backend's map where that fits, else nothing."""
    key = case.method
    if key not in state["refs"]:
        size, shape = case.size, case.size.shape()
        model, images, target = state["model"], state["images"], state["target"]
        ref, what = None, "none"
        for k in (size.B, min(size.B, CHECK_BATCH)):
            need = explain_peak(case.method, "reference", **{**shape, "B": k})
            if ctx.fits(need + 2 * shape["params"] * shape["itemsize"]):
                ref = tf.explain(model, images[:k], method=case.method, target=target[:k], backend="reference")
                what = "reference"
                break
        if ref is None and ctx.fits(explain_peak(case.method, "torch", **shape)):
            ref = tf.explain(model, images, method=case.method, target=target, backend="torch")
            what = "torch"
        state["refs"][key] = (None if ref is None else ref.flatten(1).clone(), what)
    return state["refs"][key]


def _call(case: PCase, state: Dict[str, Any]):
    model, images, target = state["model"], state["images"], state["target"]
    if case.kind == "step":
        return training_step(model, images, target)
    if case.kind == "literal":
        return lambda: literal_explain(model, images, target, case.method)
    kwargs = {"attention": case.attention} if case.attention else {}
    return lambda: tf.explain(model, images, method=case.method, target=target, backend=case.backend, **kwargs)


# --------------------------------------------------------------------------- the case


def test_perf(benchmark, bench, pcase: PCase):
    state = _state(pcase.size, bench)
    benchmark.group = f"perf {pcase.size.label} {pcase.method or 'step'}"
    fn = _call(pcase, state)
    oom = None
    try:
        # the first call (on CUDA Triton compiles and autotunes there), then a warm call: time and peak of each
        t0 = time.perf_counter()
        out, first_peak = measure_peak(fn, bench.device)
        bench.sync()
        first = time.perf_counter() - t0
        out2, peak = measure_peak(fn, bench.device)
        del out2
        benchmark.extra_info.update(first_call_s=first, first_peak_bytes=first_peak, peak_bytes=peak)
        if pcase.kind == "step":
            assert torch.isfinite(out), f"perf {pcase.id}: the training step's score is not finite"
            grads = [p.grad for p in state["model"].parameters() if p.grad is not None]
            assert not grads, "the training step must leave no parameter gradient (zero_grad(set_to_none=True))"
        else:
            ref, what = _oracle(pcase, state, bench)
            benchmark.extra_info["checked_against"] = what
            if ref is not None:
                got = out.flatten(1)[: ref.shape[0]]
                # float32 products stay IEEE unless --bench-tf32 (the flash kernels follow torch's TF32 flag)
                tol = bench.tolerance(pcase.size.dtype, tf32=bench.tf32 and bench.cuda, method=pcase.method)
                # the literal baseline is not a library path: its error is recorded, asserted for float32 only
                if pcase.kind == "literal" and pcase.size.dtype != "float32":
                    tol = None
                bench.check(benchmark, got, ref, tol, f"perf {pcase.id} vs {what}")
            else:
                assert torch.isfinite(out).all(), f"perf {pcase.id}: NaN or Inf in the output"
        del out
        bench.measure(benchmark, fn, pcase.extra(), explain=True, first_call_s=first)
    except _OOM as e:  # an estimate is an estimate: never let one size take the run down
        oom = f"out of memory at {pcase.id}: {str(e).splitlines()[0][:200]}"
    finally:
        state["model"].zero_grad(set_to_none=True)
    if oom is not None:  # outside the except block: the error's frames (and tensors) are gone by now
        bench.release()
        pytest.skip(oom)
