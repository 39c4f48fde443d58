"""Whole-explain benchmarks on random-init timm ViTs (suite ``explain``).

For each (model, batch):

- ``baseline`` (id ``fwd_bwd``): the training step of the performance protocol
  (``bench_models.training_step``): timm's defaults (fused attention, SDPA),
  ``logits[range(B), target].sum().backward()`` with parameter gradients, then
  ``zero_grad(set_to_none=True)``. The explain/baseline ratio is what an
  explanation costs over a normal training step (without the optimizer).
- ``explain(method=m, backend=b)`` for m in tokentm, legrad, rollout and b in
  reference, torch, triton (CUDA only). The reference runs the literal spec in
  float64 on a float64 copy of the model (``tokentm_fast.reference``).

Targets are fixed random classes (the same for every backend; the argmax of a
random-init model can differ between float32 and float64 when logits nearly
tie). The qkv weights are scaled ×2 so that attention is not nearly uniform
(see ``bench_models.random_vit`` for why not more).

``--bench-methods`` (``TOKENTM_BENCH_METHODS``) replaces the methods. The size
filter uses ``bench_memory.explain_peak`` (the reference: float64 model copy,
its graph and every layer's A and G in float64) per backend.

Every torch/triton case first checks its map against the reference map (float64)
of the same images: per-image relative L2 error ≤ 1e-5 (5e-3 with --bench-tf32).
When the reference at the full batch does not fit in memory, the first few images
are checked against a reference on those images only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import pytest
import torch
from bench_memory import explain_peak, step_peak
from bench_models import random_images, random_vit, training_step

import tokentm_fast as tf

# name -> (L, H, D, parameters at 224 px); 16 px patches: N = 197 at 224 px (the tiny scale: 64 px, N = 17).
MODELS = {
    "vit_tiny_patch16_224": (12, 3, 192, 5.7e6),
    "vit_small_patch16_224": (12, 6, 384, 22.1e6),
    "vit_base_patch16_224": (12, 12, 768, 86.6e6),
    "vit_large_patch16_224": (24, 16, 1024, 304.3e6),
}
TINY_IMG = 64  # the tiny scale's image size (N = 17): a smoke test of every case kind in seconds
METHODS = ("tokentm", "legrad", "rollout")
CHECK_BATCH = {"cpu": 2, "cuda": 8}
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class ECase:
    model: str
    B: int
    backend: str  # baseline | reference | torch | triton
    method: str = ""
    img: int = 224

    @property
    def N(self) -> int:
        return (self.img // 16) ** 2 + 1

    @property
    def label(self) -> str:
        return f"{self.model} B={self.B}" + ("" if self.img == 224 else f" {self.img}px")

    @property
    def id(self) -> str:
        what = "fwd_bwd" if self.backend == "baseline" else f"{self.method}-{self.backend}"
        return f"{self.model}-B{self.B}" + ("" if self.img == 224 else f"-{self.img}px") + f"-{what}"

    def extra(self) -> Dict[str, Any]:
        L, H, D, _ = MODELS[self.model]
        return dict(suite="explain", case=self.label, backend=self.backend, method=self.method,
                    model=self.model, B=self.B, L=L, H=H, D=D, N=self.N, img_size=self.img, dtype="float32")


def memory(model: str, batch: int, backend: str, method: str = "tokentm", img: int = 224) -> float:
    """Estimated peak bytes of one case (``bench_memory``): the model (params, float32) plus the call."""
    L, H, D, params = MODELS[model]
    shape = dict(L=L, H=H, N=(img // 16) ** 2 + 1, D=D, B=batch, params=int(params), image_pixels=img * img,
                 itemsize=4)
    if backend == "baseline":
        need = step_peak(**shape, fused=True)
    else:
        need = explain_peak(method, backend, **shape)
    return 4 * params + need


def _sweep(scale: str, cuda: bool) -> List[Tuple[str, int]]:
    if scale == "tiny":
        return [("vit_tiny_patch16_224", 2)]  # at TINY_IMG px
    if scale == "small":
        if cuda:
            return [("vit_base_patch16_224", 8), ("vit_base_patch16_224", 64)]
        return [("vit_small_patch16_224", 8), ("vit_base_patch16_224", 8)]
    if cuda:
        return [(m, b) for m in ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")
                for b in (1, 8, 64, 256)]
    return ([(m, b) for m in ("vit_small_patch16_224", "vit_base_patch16_224") for b in (1, 8, 32)]
            + [("vit_large_patch16_224", b) for b in (1, 8)])


def build_cases(ctx) -> List[ECase]:
    cases = []
    methods = ctx.methods(METHODS)
    img = TINY_IMG if ctx.scale == "tiny" else 224
    for model, b in _sweep(ctx.scale, ctx.cuda):
        if not ctx.fits(memory(model, b, "baseline", img=img), f"explain {model} B={b}"):
            continue
        cases.append(ECase(model, b, "baseline", img=img))
        for method in methods:
            for backend in ctx.backends():
                if ctx.fits(memory(model, b, backend, method, img), f"explain {backend} {model} B={b} {method}"):
                    cases.append(ECase(model, b, backend, method, img))
    return cases


def pytest_generate_tests(metafunc):
    if "ecase" in metafunc.fixturenames:
        cases = build_cases(metafunc.config.tokentm_bench)
        metafunc.parametrize("ecase", cases, ids=[c.id for c in cases])


# --------------------------------------------------------------------------- model / images / reference maps

def _state(case: ECase, ctx) -> Dict[str, Any]:
    """The model, images, targets and reference maps of one (model, batch), shared through ``bench.cache``."""

    def make():
        model = random_vit(case.model, ctx.device, img_size=case.img)
        images, target = random_images(model, case.B, ctx.device)
        return dict(model=model, images=images, target=target, refs={})

    return ctx.cache.get((case.model, case.B, case.img), make)


def _reference_map(case: ECase, state: Dict[str, Any], ctx) -> torch.Tensor:
    """Reference map of the case's images (kept with the size), or of its first few images when
    the batch does not fit."""
    if case.method not in state["refs"]:
        k = case.B
        if not ctx.fits(memory(case.model, k, "reference", case.method, case.img)):
            k = min(case.B, CHECK_BATCH[ctx.device.type])
        state["refs"][case.method] = tf.explain(state["model"], state["images"][:k], method=case.method,
                                                target=state["target"][:k], backend="reference").clone()
    return state["refs"][case.method]


# --------------------------------------------------------------------------- the case


def test_explain(benchmark, bench, ecase: ECase):
    state = _state(ecase, bench)
    model, images, target = state["model"], state["images"], state["target"]
    benchmark.group = f"explain {ecase.label} {ecase.method or 'fwd+bwd'}"
    oom = None
    try:
        if ecase.backend == "baseline":
            fn = training_step(model, images, target)
            t0 = time.perf_counter()
            score = fn()
            bench.sync()
            first = time.perf_counter() - t0
            assert torch.isfinite(score), "the training step's score is not finite"
            assert all(p.grad is None for p in model.parameters()), "zero_grad(set_to_none=True) left gradients"
        else:
            def fn():
                return tf.explain(model, images, method=ecase.method, target=target, backend=ecase.backend)

            t0 = time.perf_counter()
            out = fn()
            bench.sync()
            first = time.perf_counter() - t0
            if ecase.backend == "reference":
                state["refs"][ecase.method] = out.clone()  # a copy: never a view of a larger tensor
                bench.check(benchmark, out, out, None, ecase.id)
            else:
                ref = _reference_map(ecase, state, bench)
                tol = bench.tolerance("float32", tf32=bench.tf32 and bench.cuda, method=ecase.method)
                bench.check(benchmark, out[: ref.shape[0]], ref, tol, f"explain {ecase.id}")
            del out
        benchmark.extra_info["first_call_s"] = first
        bench.measure(benchmark, fn, ecase.extra(), explain=True, first_call_s=first)
    except _OOM as e:  # the estimate is an estimate: never let one size take the run down
        oom = f"out of memory at {ecase.id}: {str(e).splitlines()[0][:200]}"
    finally:
        model.zero_grad(set_to_none=True)
    if oom is not None:  # outside the except block: the error's frames (and tensors) are gone by now
        bench.release()
        pytest.skip(oom)
