"""Micro-benchmark of the transformation-weight kernel (docs/methods.md §2) against the copy bandwidth.

One sub-layer: tokens ``x, x̃ (B, N, D)`` → weights ``(B, N)`` float32, with
length ratio and NECC. The kernel must read both token tensors once and write
the weights, so its bandwidth is

    bytes = 2 · B · N · D · itemsize + B · N · 4,   fraction = bytes / time / copy bandwidth

with the copy bandwidth of a plain device-to-device ``copy_`` measured in the
same run (``extra_info["copy_bw_Bps"]``), the time from CUDA events over
back-to-back calls (``extra_info["device_time_s"]``; on the CPU the median wall
time). The target on an H100/H200 is ``copy_fraction ≥ 0.7``
(``extra_info["target_fraction"]``); a case below it warns, it does not fail
(timings are never assertions). Backends: ``torch`` (the PyTorch function)
and ``triton`` (the kernel, where it runs).

Every case first checks its output against the formula of docs/methods.md §2 in float64,
written here (per-image relative L2 error within docs/methods.md §7).

    python -m pytest benchmarks/test_bench_transform_weights.py --benchmark-only -q
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Dict, List

import pytest
import torch

from tokentm_fast.torch_ops import transform_weights

TARGET_FRACTION = 0.7
ITEMSIZE = {"float32": 4, "bfloat16": 2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    what: str  # the model / resolution the shape comes from
    B: int
    N: int
    D: int
    dtype: str
    backend: str

    @property
    def label(self) -> str:
        return f"{self.what} B={self.B} N={self.N} D={self.D} {self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.what}-B{self.B}-N{self.N}-D{self.D}-{self.dtype}-{self.backend}"

    def bytes(self) -> int:
        """Bytes the operation must move at least: both token tensors read once, the weights written."""
        return 2 * self.B * self.N * self.D * ITEMSIZE[self.dtype] + self.B * self.N * 4

    def memory(self) -> int:
        """Peak estimate: inputs, the float64 oracle's copies and temporaries."""
        return 2 * self.B * self.N * self.D * (ITEMSIZE[self.dtype] + 3 * 8)


def _shapes(scale: str, cuda: bool) -> List[tuple]:
    """(what, B, N, D) per scale: ViT-B/16 at 224 px for several batches, ViT-L/16 at 384 px,
    ViT-B/16 at 1024 and 1536 px (the image sizes of the performance targets)."""
    if scale == "tiny":
        return [("vit_b16_224", 2, 197, 768)]
    if scale == "small" and not cuda:
        return [("vit_b16_224", 8, 197, 768), ("vit_b16_1024", 1, 4097, 768)]
    shapes = [("vit_b16_224", b, 197, 768) for b in (1, 8, 64, 256)]
    shapes += [("vit_l16_384", 16, 577, 1024), ("vit_b16_1024", 1, 4097, 768), ("vit_b16_1536", 1, 9217, 768)]
    if scale == "full":
        shapes += [("vit_b16_2048", 1, 16385, 768), ("vit_s16_224", 64, 197, 384), ("vit_l16_224", 64, 197, 1024)]
    return shapes


def build_cases(ctx) -> List[Case]:
    backends = ctx.backends(with_reference=False)
    cases = []
    for what, b, n, d in _shapes(ctx.scale, ctx.cuda):
        for dtype in ctx.dtypes():
            probe = Case(what, b, n, d, dtype, "torch")
            if not ctx.fits(probe.memory(), f"transform_weights {probe.label}"):
                continue
            cases.extend(Case(what, b, n, d, dtype, backend) for backend in backends)
    return cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = build_cases(metafunc.config.tokentm_bench)
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def oracle(x: torch.Tensor, xt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """docs/methods.md §2 in float64: w_i = |x̃_i| / max(|x_i|, ε) · exp(cos_i) / Σ_k exp(cos_k)."""
    x, xt = x.double(), xt.double()
    lx, lt = x.norm(dim=-1), xt.norm(dim=-1)
    cos = (x * xt).sum(-1) / (lx.clamp_min(eps) * lt.clamp_min(eps))
    return lt / lx.clamp_min(eps) * cos.exp() / cos.exp().sum(-1, keepdim=True)


_DATA: Dict[str, object] = {"key": None, "data": None}


@pytest.fixture(scope="module", autouse=True)
def _free_data(bench):
    yield
    _DATA["key"], _DATA["data"] = None, None
    bench.release()


def _inputs(case: Case, device):
    key = (case.B, case.N, case.D, case.dtype)
    if _DATA["key"] != key:
        _DATA["key"], _DATA["data"] = None, None
        g = torch.Generator(device=device)
        g.manual_seed(11 + case.N + 7 * case.B)
        x = torch.randn(case.B, case.N, case.D, device=device, generator=g)
        xt = 0.5 * x + torch.randn(case.B, case.N, case.D, device=device, generator=g)
        x, xt = x.to(DTYPES[case.dtype]), xt.to(DTYPES[case.dtype])
        _DATA["data"] = (x, xt, oracle(x, xt))
        _DATA["key"] = key
    return _DATA["data"]


def test_transform_weights_bandwidth(benchmark, bench, case):
    x, xt, ref = _inputs(case, bench.device)
    if case.backend == "triton":
        from tokentm_fast.kernels import transform_weights as fn
    else:
        fn = transform_weights.transform_weights

    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(x, xt, True, True)
    bench.sync()
    first = time.perf_counter() - t0
    bench.check(benchmark, out, ref, bench.tolerance(case.dtype), f"transform_weights {case.id}")
    del out
    benchmark.group = f"transform_weights {case.label}"
    extra = dict(suite="transform_weights_bw", case=case.label, backend=case.backend, B=case.B, N=case.N,
                 D=case.D, dtype=case.dtype, bytes=case.bytes(), target_fraction=TARGET_FRACTION)

    def timed():
        with torch.no_grad():
            return fn(x, xt, True, True)

    bench.measure(benchmark, timed, extra, first_call_s=first, device_time=True)
    seconds = benchmark.extra_info.get("device_time_s")
    if seconds is None and benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
    if not seconds:
        return
    copy_bw = benchmark.extra_info.get("copy_bw_Bps")
    achieved = case.bytes() / seconds
    benchmark.extra_info["bandwidth_Bps"] = achieved
    if copy_bw:
        fraction = achieved / copy_bw
        benchmark.extra_info["copy_fraction"] = fraction
        if bench.cuda and case.backend == "triton" and fraction < TARGET_FRACTION:
            warnings.warn(f"transform_weights {case.label}: {fraction:.0%} of the copy bandwidth "
                          f"(target {TARGET_FRACTION:.0%})")
