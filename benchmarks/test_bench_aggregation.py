"""Kernel / aggregation-level benchmarks on synthetic tensors (no model).

Synthetic layers of a ViT: per layer A = softmax(2·randn) (B, H, N, N), G = randn,
w_attn ~ U(0, 1), w_mlp ~ U(0, ½) (B, N), C⁰ = diag(U(½, 1½)); query = one_hot(cls).

Suites (``extra_info["suite"]``):

- ``aggregation``: the TokenTM row over all L layers (head fusion "gae").
  reference = the literal full-matrix aggregation of spec §3
  (Ā, U^attn = I + Ā·diag(w_attn), U^mlp = I + diag(w_mlp), C ← U^mlp·U^attn·C
  with N×N matmuls) in float64 on float64 A and G (converted before timing), as
  ``backend="reference"`` runs it; ``TOKENTM_BENCH_REF_DTYPE=float32`` times the
  same products in float32 instead (the conservative comparison), torch = the row algorithm
  ``aggregation.aggregate_layers`` (``torch_ops.row_update`` per layer),
  triton = ``kernels.row_update`` per layer. bytes = 2·L·B·H·N²·itemsize (A and G once).
- ``aggregation_full``: the whole matrix Cᴸ. reference as above, torch =
  ``aggregate_layers(full=True)``, triton = ``kernels.matrix_update`` (tf32).
- ``head_fusion``: one layer, torch ``torch_ops.head_fusion.fuse_heads`` vs ``kernels.fuse_heads``.
  bytes = 2·B·H·N²·itemsize + B·N²·4 (write Ā).
- ``transform_weights``: one sub-layer (B, N, D) tokens. bytes = 2·B·N·D·itemsize.
- ``legrad_reduce``: one layer of gradient rows (B, H, Q, N), Q = 1 (what the fast
  path passes) and Q = N (a full gradient). bytes = B·H·Q·N·itemsize.

Every case first checks its output against a float64 oracle written here from
the spec (not the code under test), per-image relative L2 error within spec §7.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from bench_memory import aggregation_peak

from tokentm_fast import aggregation
from tokentm_fast.torch_ops import head_fusion as twin_fusion
from tokentm_fast.torch_ops import legrad_reduce as twin_legrad
from tokentm_fast.torch_ops import transform_weights as twin_transform

# ViT configurations: layers, heads, width.
CONFIGS = {
    "vit_s16": dict(L=12, H=6, D=384),
    "vit_b16": dict(L=12, H=12, D=768),
    "vit_l16": dict(L=24, H=16, D=1024),
}
RESOLUTION = {197: "224/16", 785: "448/16", 1370: "518/14"}
CONFIG_ORDER = tuple(CONFIGS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
MODE = "gae"


@dataclass(frozen=True)
class Case:
    suite: str
    config: str
    N: int
    B: int
    dtype: str
    backend: str
    Q: int = 1  # legrad_reduce rows

    @property
    def L(self) -> int:
        return CONFIGS[self.config]["L"]

    @property
    def H(self) -> int:
        return CONFIGS[self.config]["H"]

    @property
    def D(self) -> int:
        return CONFIGS[self.config]["D"]

    @property
    def label(self) -> str:
        """The case without the backend (one table row)."""
        q = f" Q={self.Q}" if self.suite == "legrad_reduce" else ""
        return f"{self.config} N={self.N} B={self.B} {self.dtype}{q}"

    @property
    def id(self) -> str:
        q = f"-Q{self.Q}" if self.suite == "legrad_reduce" else ""
        return f"{self.config}-N{self.N}-B{self.B}-{self.dtype}{q}-{self.backend}"

    def data_key(self) -> Tuple:
        return (self.suite, self.config, self.N, self.B, self.dtype, self.Q)

    def extra(self) -> Dict[str, Any]:
        return dict(suite=self.suite, case=self.label, backend=self.backend, config=self.config,
                    L=self.L, H=self.H, N=self.N, D=self.D, B=self.B, dtype=self.dtype, Q=self.Q,
                    resolution=RESOLUTION.get(self.N, ""), bytes=self.bytes(), mode=MODE)

    def bytes(self) -> int:
        """Bytes the operation must move at least (its input read once, for the bandwidth figure)."""
        sz = ITEMSIZE[self.dtype]
        B, H, N, L, D = self.B, self.H, self.N, self.L, self.D
        if self.suite in ("aggregation", "aggregation_full"):
            return 2 * L * B * H * N * N * sz
        if self.suite == "head_fusion":
            return 2 * B * H * N * N * sz + B * N * N * 4
        if self.suite == "transform_weights":
            return 2 * B * N * D * sz + B * N * 4
        if self.suite == "legrad_reduce":
            return B * H * self.Q * N * sz + B * N * 4
        raise ValueError(self.suite)

    def memory(self) -> int:
        """Estimated peak bytes of this case: its data, the float64 oracle, and the backend's call
        (``bench_memory.aggregation_peak``; the reference adds its float64 copy of A and G)."""
        return aggregation_peak(self.suite, self.backend, L=self.L, H=self.H, N=self.N, B=self.B, D=self.D,
                                itemsize=ITEMSIZE[self.dtype], ref_itemsize=REF_DTYPE.itemsize, Q=self.Q)


# --------------------------------------------------------------------------- sweeps


def _shapes(suite: str, scale: str, cuda: bool) -> List[Tuple[str, int, int]]:
    """(config, N, B) per suite, scale and device."""
    all_cfg = CONFIG_ORDER
    if scale == "tiny":
        return [("vit_s16", 197, 1), ("vit_s16", 197, 2)] if suite == "aggregation" else [("vit_s16", 197, 2)]
    if suite == "aggregation":
        if scale == "small":
            if cuda:
                return ([(c, 197, b) for c in all_cfg for b in (1, 8, 64)]
                        + [("vit_b16", 785, b) for b in (1, 8)] + [("vit_b16", 1370, 1)])
            return [(c, 197, b) for c in all_cfg for b in (1, 8)] + [("vit_b16", 785, 1)]
        return [(c, n, b) for c in all_cfg for n in RESOLUTION for b in (1, 4, 16, 64, 256)]
    if suite == "aggregation_full":
        if scale == "small":
            return [("vit_b16", 197, b) for b in ((8, 64) if cuda else (1, 8))]
        return [(c, 197, b) for c in all_cfg for b in (1, 4, 16, 64)] + [("vit_b16", 785, b) for b in (1, 4)]
    # one-layer kernels
    if scale == "full" and suite in ("transform_weights", "legrad_reduce"):
        return [(c, 197, b) for c in all_cfg for b in (1, 64, 256)] + [("vit_b16", n, 16) for n in (785, 1370)]
    if scale == "small":
        if cuda:
            return [("vit_b16", 197, 8), ("vit_b16", 197, 64), ("vit_b16", 785, 8)]
        return [("vit_b16", 197, 8), ("vit_b16", 785, 1)]
    return ([(c, 197, b) for c in all_cfg for b in (1, 16, 64, 256)]
            + [("vit_b16", n, b) for n in (785, 1370) for b in (1, 16, 64)])


def build_cases(suite: str, ctx) -> List[Case]:
    with_ref = suite in ("aggregation", "aggregation_full")
    backends = ctx.backends(with_reference=with_ref)
    cases = []
    for config, n, b in _shapes(suite, ctx.scale, ctx.cuda):
        dtypes = ["float32"]
        if suite not in ("aggregation_full",) and ctx.scale != "tiny":
            # bfloat16 inputs on CUDA; for the L-layer aggregation only ViT-B (it doubles the sweep)
            dtypes = [d for d in ctx.dtypes() if d == "float32" or suite != "aggregation" or config == "vit_b16"]
        qs = (1, n) if suite == "legrad_reduce" else (1,)
        for dtype in dtypes:
            for q in qs:
                for backend in backends:  # each backend's own peak (the reference's float64 copy included)
                    case = Case(suite, config, n, b, dtype, backend, q)
                    if ctx.fits(case.memory(), f"{suite} {case.label} {backend}"):
                        cases.append(case)
    return cases


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    ctx = metafunc.config.tokentm_bench
    suite = getattr(metafunc.function, "suite")
    cases = build_cases(suite, ctx)
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def suite(name: str):
    def mark(fn):
        fn.suite = name
        return fn

    return mark


# --------------------------------------------------------------------------- data (one shape alive at a time)


def _data(case: Case, ctx, make):
    """The synthetic data of the case's size, shared with the other backends of that size (``bench.cache``)."""
    return ctx.cache.get(case.data_key(), lambda: make(case, ctx.device))


def _gen(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _attn_grad(B, H, N, dtype, device, g):
    a = torch.softmax(2.0 * torch.randn(B, H, N, N, device=device, generator=g), dim=-1).to(dtype)
    grad = torch.randn(B, H, N, N, device=device, generator=g).to(dtype)
    return a, grad


def _fused64(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Spec §3 head fusion in float64: mean_h max(A_h ⊙ G_h, 0)."""
    return (a.double() * g.double()).clamp_min(0).mean(1)


def make_layers(case: Case, device) -> Dict[str, Any]:
    """L synthetic layers, weights, query, C⁰, and the float64 oracle (the row, or Cᴸ for the full suite)."""
    g = _gen(1234 + case.N + 7 * case.B, device)
    B, H, N, L = case.B, case.H, case.N, case.L
    dtype = DTYPES[case.dtype]
    attns, grads = [], []
    for _ in range(L):
        a, gr = _attn_grad(B, H, N, dtype, device, g)
        attns.append(a)
        grads.append(gr)
    w_attn = [torch.rand(B, N, device=device, generator=g) for _ in range(L)]
    w_mlp = [0.5 * torch.rand(B, N, device=device, generator=g) for _ in range(L)]
    c0 = torch.rand(B, N, device=device, generator=g) + 0.5
    query = torch.zeros(B, N, device=device)
    query[:, 0] = 1.0
    # Oracle, spec §3 literally in float64: C ← U^mlp (U^attn C), C⁰ = diag(c0).
    with torch.no_grad():
        c = torch.diag_embed(c0.double())
        for l in range(L):
            a_bar = _fused64(attns[l], grads[l])
            c = c + (a_bar * w_attn[l].double()[:, None, :]) @ c
            c = c * (1.0 + w_mlp[l].double())[:, :, None]
        oracle = c if case.suite == "aggregation_full" else torch.einsum("bi,bij->bj", query.double(), c)
        del c
    return dict(attns=attns, grads=grads, w_attn=w_attn, w_mlp=w_mlp, c0=c0, query=query, oracle=oracle)


# The reference backend aggregates float64 A and G (spec §7: e_ref in float64).
REF_DTYPE = getattr(torch, os.environ.get("TOKENTM_BENCH_REF_DTYPE", "float64"))


def reference_aggregation(attns, grads, w_attn, w_mlp, query, c0, full: bool) -> torch.Tensor:
    """The literal full-matrix aggregation of spec §3, as ``tokentm_fast.reference`` does it."""
    b, n = query.shape
    eye = torch.eye(n, dtype=query.dtype, device=query.device).expand(b, n, n)
    c = torch.diag_embed(c0)
    for l in range(len(attns)):
        a_bar = twin_fusion.fuse_heads(attns[l], grads[l], MODE)
        u_attn = eye + a_bar @ torch.diag_embed(w_attn[l])
        u_mlp = eye + torch.diag_embed(w_mlp[l])
        c = u_mlp @ u_attn @ c
    return c if full else torch.einsum("bi,bij->bj", query, c)


def triton_aggregation(attns, grads, w_attn, w_mlp, query, c0, full: bool) -> torch.Tensor:
    """The row (or matrix) algorithm with the Triton kernels, top layer first (spec §3.1)."""
    from tokentm_fast import kernels

    update = kernels.matrix_update if full else kernels.row_update
    rows = aggregation.initial_rows(query, full)
    for l in reversed(range(len(attns))):
        rows = update(rows, attns[l], grads[l], w_attn[l], w_mlp[l], mode=MODE)
    rows = aggregation.finish_rows(rows, c0)
    return rows if full else rows[:, 0]


def torch_aggregation(attns, grads, w_attn, w_mlp, query, c0, full: bool) -> torch.Tensor:
    return aggregation.aggregate_layers(attns, grads, w_attn, w_mlp, query, c0, mode=MODE, full=full)


IMPLS = {"reference": reference_aggregation, "torch": torch_aggregation, "triton": triton_aggregation}


def _run(bench, benchmark, case: Case, fn, ref, tf32: bool = False, device_time: bool = True):
    """Check (first call) then time."""
    import time

    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    bench.sync()
    first = time.perf_counter() - t0
    # The timed float32 reference is not a fast path: its error is recorded, not asserted.
    tol = None if case.backend == "reference" else bench.tolerance(case.dtype, tf32)
    bench.check(benchmark, out, ref, tol, f"{case.suite} {case.id}")
    del out
    benchmark.group = f"{case.suite} {case.label}"

    def timed():
        with torch.no_grad():
            return fn()

    bench.measure(benchmark, timed, case.extra(), first_call_s=first,
                  device_time=device_time and case.backend != "reference")


# --------------------------------------------------------------------------- cases


def _as_reference_inputs(d: Dict[str, Any]) -> Dict[str, Any]:
    """The reference's inputs in REF_DTYPE, made for this case only (freed when it ends; never cached)."""
    cast = lambda xs: [x.to(REF_DTYPE) for x in xs]  # noqa: E731
    return {**d, "attns": cast(d["attns"]), "grads": cast(d["grads"]), "w_attn": cast(d["w_attn"]),
            "w_mlp": cast(d["w_mlp"]), "query": d["query"].to(REF_DTYPE), "c0": d["c0"].to(REF_DTYPE)}


@suite("aggregation")
def test_aggregation(benchmark, bench, case):
    d = _data(case, bench, make_layers)
    if case.backend == "reference":
        d = _as_reference_inputs(d)
    impl = IMPLS[case.backend]
    fn = lambda: impl(d["attns"], d["grads"], d["w_attn"], d["w_mlp"], d["query"], d["c0"], False)  # noqa: E731
    # The torch row update's bmm runs in TF32 on CUDA with --bench-tf32; kernels.row_update never uses tl.dot.
    tf32 = case.backend == "torch" and bench.tf32 and bench.cuda
    _run(bench, benchmark, case, fn, d["oracle"], tf32=tf32)


@suite("aggregation_full")
def test_aggregation_full(benchmark, bench, case):
    d = _data(case, bench, make_layers)
    if case.backend == "reference":
        d = _as_reference_inputs(d)
    impl = IMPLS[case.backend]
    fn = lambda: impl(d["attns"], d["grads"], d["w_attn"], d["w_mlp"], d["query"], d["c0"], True)  # noqa: E731
    # kernels.matrix_update multiplies with tl.dot in TF32 by default; the torch bmm does when --bench-tf32.
    tf32 = (case.backend == "triton") or (bench.tf32 and bench.cuda)
    _run(bench, benchmark, case, fn, d["oracle"], tf32=tf32)


def make_fusion(case: Case, device):
    g = _gen(99 + case.N + 7 * case.B, device)
    a, gr = _attn_grad(case.B, case.H, case.N, DTYPES[case.dtype], device, g)
    return dict(attn=a, grad=gr, oracle=_fused64(a, gr))


@suite("head_fusion")
def test_head_fusion(benchmark, bench, case):
    d = _data(case, bench, make_fusion)
    if case.backend == "triton":
        from tokentm_fast.kernels import fuse_heads
    else:
        fuse_heads = twin_fusion.fuse_heads
    _run(bench, benchmark, case, lambda: fuse_heads(d["attn"], d["grad"], MODE), d["oracle"])


def _transform64(x: torch.Tensor, xt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spec §2 in float64: w_i = |x̃_i| / max(|x_i|, ε) · softmax_i(cos_i)."""
    x, xt = x.double(), xt.double()
    lx, lt = x.norm(dim=-1), xt.norm(dim=-1)
    cos = (x * xt).sum(-1) / (lx.clamp_min(eps) * lt.clamp_min(eps))
    necc = cos.exp() / cos.exp().sum(-1, keepdim=True)
    return lt / lx.clamp_min(eps) * necc


def make_transform(case: Case, device):
    g = _gen(7 + case.N + 7 * case.B, device)
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.B, case.N, case.D, device=device, generator=g).to(dtype)
    xt = (0.5 * x.float() + torch.randn(case.B, case.N, case.D, device=device, generator=g)).to(dtype)
    return dict(x=x, xt=xt, oracle=_transform64(x, xt))


@suite("transform_weights")
def test_transform_weights(benchmark, bench, case):
    d = _data(case, bench, make_transform)
    if case.backend == "triton":
        from tokentm_fast.kernels import transform_weights
    else:
        transform_weights = twin_transform.transform_weights
    _run(bench, benchmark, case, lambda: transform_weights(d["x"], d["xt"], True, True), d["oracle"])


def make_legrad(case: Case, device):
    g = _gen(5 + case.N + 7 * case.B + case.Q, device)
    rows = torch.randn(case.B, case.H, case.Q, case.N, device=device, generator=g).to(DTYPES[case.dtype])
    oracle = rows.double().clamp_min(0).sum(-2).mean(1) / case.N
    return dict(rows=rows, oracle=oracle)


@suite("legrad_reduce")
def test_legrad_reduce(benchmark, bench, case):
    d = _data(case, bench, make_legrad)
    if case.backend == "triton":
        from tokentm_fast.kernels import legrad_reduce
    else:
        legrad_reduce = twin_legrad.legrad_reduce
    _run(bench, benchmark, case, lambda: legrad_reduce(d["rows"], case.N), d["oracle"])
