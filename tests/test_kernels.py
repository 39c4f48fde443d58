"""Triton kernels against their PyTorch oracles (docs/methods.md §2, §3, §3.1, §6, §7).

On a machine without CUDA the kernels run on the CPU under Triton's
interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton
is imported); with CUDA they run on the GPU. Every comparison is per image,
err = ‖e − e_ref‖₂ / ‖e_ref‖₂, with e_ref the oracle evaluated in float64 on
the same (upcast) inputs, and the §7 tolerances: 1e-5 for float32 inputs
(5e-3 for tf32 ``tl.dot``), 2e-2 for bfloat16 / float16 inputs. Every output
is first poisoned with NaN so that an element the kernel forgot shows up.
"""
from __future__ import annotations

import importlib
import os
import zlib

import pytest
import torch
from helpers import max_rel_err_l2

import tokentm_fast.kernels as K
from tokentm_fast.kernels import _utils
from tokentm_fast.torch_ops import head_fusion, row_update, transform_weights

#: the suite's device (tests/conftest.py: ``--device`` / TOKENTM_TEST_DEVICE; CPU with the interpreter by default)
DEVICE = torch.device(os.environ["TOKENTM_TEST_DEVICE"])   # set by tests/conftest.py before collection
CUDA = DEVICE.type == "cuda"

pytestmark = pytest.mark.skipif(
    not K.triton_available(os.environ["TOKENTM_TEST_DEVICE"]),
    reason="the kernels cannot run on the suite's device (on the CPU: TRITON_INTERPRET=1 before importing triton)",
)

#: (N, B, H): non powers of two; the big N only with B = H = 1 to keep the interpreter fast.
CASES = [(50, 2, 3), (145, 2, 2), (197, 1, 3), (257, 1, 2), (577, 1, 1), (1025, 1, 1)]
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["gae", "decoupled", "mean"]


def tol(dtype: torch.dtype, tf32: bool = False) -> float:
    if dtype in (torch.bfloat16, torch.float16):
        return 2e-2
    return 5e-3 if (tf32 and CUDA) else 1e-5


def poisoned(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)


def check(out: torch.Tensor, got: torch.Tensor, ref: torch.Tensor, bound: float, what: str = "") -> None:
    assert got is out, "the wrapper must write into and return the given out="
    assert torch.isfinite(got).all(), f"{what}: NaN/Inf left in the output"
    err = max_rel_err_l2(got, ref)
    assert err <= bound, f"{what}: err {err:.3e} > {bound:.0e}"


def gen(*key) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def attn_grad(B, H, N, dtype, g):
    """Attention rows that sum to 1 (softmax of randn) and randn gradients, cast to dtype."""
    a = torch.softmax(2.0 * torch.randn(B, H, N, N, generator=g), dim=-1)
    gr = torch.randn(B, H, N, N, generator=g)
    return a.to(dtype).to(DEVICE), gr.to(dtype).to(DEVICE)


def f64(t):
    """The float64 oracle's input, on the tensor's own device (the oracle runs where its inputs are)."""
    return t.double() if isinstance(t, torch.Tensor) else t


# --------------------------------------------------------------------------- §2 transform weights
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,B,H", CASES)
def test_transform_weights(N, B, H, dtype):
    g = gen("tw", N, dtype)
    D = 8 + 8 * H  # 16..32, and 40 below
    x = torch.randn(B, N, D, generator=g).to(dtype).to(DEVICE)
    xt = (0.3 * torch.randn(B, N, D, generator=g)).to(dtype).to(DEVICE)
    out = poisoned(B, N)
    got = K.transform_weights(x, xt, out=out)
    check(out, got, transform_weights.transform_weights(f64(x), f64(xt)), tol(dtype), "transform_weights")


@pytest.mark.parametrize("use_length", [True, False])
@pytest.mark.parametrize("use_necc", [True, False])
def test_transform_weights_switches(use_length, use_necc):
    g = gen("tw-switch", use_length, use_necc)
    x = torch.randn(2, 197, 40, generator=g).to(DEVICE)
    xt = torch.randn(2, 197, 40, generator=g).to(DEVICE)
    x[0, 5] = 0.0  # a zero token exercises the ε clamps
    out = poisoned(2, 197)
    got = K.transform_weights(x, xt, use_length=use_length, use_necc=use_necc, out=out)
    ref = transform_weights.transform_weights(f64(x), f64(xt), use_length=use_length, use_necc=use_necc)
    check(out, got, ref, 1e-5, "switches")


def distinct_images(B, N, D, g):
    """B images whose weights differ in kind: x̃ ≈ x (cos ≈ 1), x̃ ≈ −x (cos ≈ −1), random, ...,
    with token lengths on different scales, so that weights or sums mixed across images show."""
    x = torch.randn(B, N, D, generator=g) * torch.logspace(-1, 1, B)[:, None, None]
    noise = torch.randn(B, N, D, generator=g)
    sign = torch.tensor([1.0, -1.0, 0.0] * B)[:B, None, None]
    xt = sign * x * torch.rand(B, N, 1, generator=g) * 3 + 0.2 * noise * x.norm(dim=-1, keepdim=True) / D**0.5
    return x.to(DEVICE), xt.to(DEVICE)


@pytest.mark.parametrize("use_length", [True, False])
@pytest.mark.parametrize("use_necc", [True, False])
@pytest.mark.parametrize("N", [50, 145])
def test_transform_weights_token_blocks_and_images(N, use_length, use_necc):
    """N not a multiple of the token block, several images that must not mix (both ablations)."""
    B, D = 3, 24
    x, xt = distinct_images(B, N, D, gen("tw-images", N, use_length, use_necc))
    out = poisoned(B, N)
    got = K.transform_weights(x, xt, use_length=use_length, use_necc=use_necc, out=out)
    ref = transform_weights.transform_weights(f64(x), f64(xt), use_length=use_length, use_necc=use_necc)
    check(out, got, ref, 1e-5, "token blocks")
    # the images really differ: their softmax denominators Σ_k exp(cos_k) are far apart
    denom = torch.nn.functional.cosine_similarity(f64(x), f64(xt), dim=-1).exp().sum(1)
    assert denom.max() > 4 * denom.min()
    if not use_length:  # NECC alone is a distribution over the tokens of each image (docs/methods.md §2)
        torch.testing.assert_close(got.sum(1).cpu(), torch.ones(B), rtol=1e-5, atol=0)
    # each image alone gives its row of the batch; reversing the batch reverses the rows
    for b in range(B):
        alone = K.transform_weights(x[b:b + 1], xt[b:b + 1], use_length=use_length, use_necc=use_necc)
        torch.testing.assert_close(alone[0], got[b], rtol=1e-6, atol=0)
    flipped = K.transform_weights(x.flip(0), xt.flip(0), use_length=use_length, use_necc=use_necc)
    torch.testing.assert_close(flipped, got.flip(0), rtol=1e-6, atol=0)


def test_transform_weights_deterministic():
    """No atomics: the same inputs give the same bits."""
    x, xt = distinct_images(2, 197, 40, gen("tw-det"))
    first = K.transform_weights(x, xt)
    for _ in range(2):
        assert torch.equal(K.transform_weights(x, xt), first)


def test_transform_weights_every_gpu_config(monkeypatch):
    """Each tile configuration the GPU autotuner may pick computes the same weights (run here
    one at a time under the interpreter: masks, tails, several D tiles)."""
    tw = importlib.import_module("tokentm_fast.kernels.transform_weights")
    tuner = tw._transform_weights_kernel
    B, N, D = 2, 37, 136  # N below and above every BLOCK_N; D over one, two and three BLOCK_D
    x, xt = distinct_images(B, N, D, gen("tw-configs"))
    ref = transform_weights.transform_weights(f64(x), f64(xt))
    for cfg in tw.GPU_CONFIGS:
        monkeypatch.setattr(tuner, "configs", [cfg])
        monkeypatch.setattr(tuner, "cache", {})
        out = poisoned(B, N)
        check(out, K.transform_weights(x, xt, out=out), ref, 1e-5, f"config {cfg}")


def test_transform_weights_fp16_mixed_noncontiguous():
    g = gen("tw-fp16")
    x = torch.randn(2, 40, 145, generator=g).to(torch.float16).to(DEVICE).transpose(1, 2)  # (2, 145, 40) view
    xt = torch.randn(2, 145, 40, generator=g).to(DEVICE)  # float32: dtypes may differ
    assert not x.is_contiguous()
    out = poisoned(2, 145)
    got = K.transform_weights(x, xt, out=out)
    check(out, got, transform_weights.transform_weights(f64(x), f64(xt)), 2e-2, "fp16 mixed")
    assert K.transform_weights(x, xt).dtype == torch.float32


# --------------------------------------------------------------------------- §3 head fusion
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,B,H", CASES)
def test_fuse_heads(N, B, H, dtype):
    a, gr = attn_grad(B, H, N, dtype, gen("fuse", N, dtype))
    for mode in MODES:
        grad = gr if mode in ("gae", "decoupled") else None
        out = poisoned(B, N, N)
        got = K.fuse_heads(a, grad, mode=mode, out=out)
        check(out, got, head_fusion.fuse_heads(f64(a), f64(grad), mode), tol(dtype), f"fuse_heads[{mode}]")


def test_fuse_heads_fp16():
    a, gr = attn_grad(2, 3, 50, torch.float16, gen("fuse-fp16"))
    for mode in MODES:
        out = poisoned(2, 50, 50)
        got = K.fuse_heads(a, gr, mode=mode, out=out)
        check(out, got, head_fusion.fuse_heads(f64(a), f64(gr), mode), 2e-2, f"fp16 {mode}")


# --------------------------------------------------------------------------- §3.1 row update
def weights(B, N, g):
    return (torch.rand(B, N, generator=g) + 0.1).to(DEVICE), (torch.rand(B, N, generator=g) + 0.1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,B,H", CASES)
def test_row_update(N, B, H, dtype):
    g = gen("row", N, dtype)
    a, gr = attn_grad(B, H, N, dtype, g)
    wa, wm = weights(B, N, g)
    for Q in ([1, 3] if N <= 145 else [1]):
        rows = torch.rand(B, Q, N, generator=g).to(DEVICE)
        for mode in MODES:
            grad = gr if mode in ("gae", "decoupled") else None
            out = poisoned(B, Q, N)
            got = K.row_update(rows, a, grad, wa, wm, mode=mode, out=out)
            ref = row_update.row_update(f64(rows), f64(a), f64(grad), f64(wa), f64(wm), mode)
            check(out, got, ref, tol(dtype), f"row_update[{mode}, Q={Q}]")


def test_row_update_fp16_weights_and_rows():
    g = gen("row-fp16")
    a, gr = attn_grad(2, 2, 145, torch.float16, g)
    wa, wm = weights(2, 145, g)
    rows = torch.rand(2, 1, 145, generator=g).to(torch.float16).to(DEVICE)
    out = poisoned(2, 1, 145)
    got = K.row_update(rows, a, gr, wa.half(), wm.bfloat16(), out=out)
    ref = row_update.row_update(f64(rows), f64(a), f64(gr), f64(wa.half()), f64(wm.bfloat16()), "gae")
    check(out, got, ref, 2e-2, "fp16 row_update")


@pytest.mark.parametrize("update", ["row", "matrix"])
def test_float_constant_weights(update):
    """GAE (1.0 / 0.0) and rollout (1.0 / −0.5) constants equal the same weights as tensors."""
    fn = K.row_update if update == "row" else K.matrix_update
    kw = {} if update == "row" else {"allow_tf32": False}
    B, H, N = 2, 2, 145
    g = gen("const", update)
    a, gr = attn_grad(B, H, N, torch.float32, g)
    Q = 1 if update == "row" else N
    rows = torch.rand(B, Q, N, generator=g).to(DEVICE)
    for mode, w_attn, w_mlp in [("gae", 1.0, 0.0), ("mean", 1.0, -0.5), ("decoupled", 0.7, 0.25)]:
        grad = gr if mode != "mean" else None
        out_c = poisoned(B, Q, N)
        got_c = fn(rows, a, grad, w_attn, w_mlp, mode=mode, out=out_c, **kw)
        out_t = poisoned(B, Q, N)
        full = lambda v: torch.full((B, N), v, device=DEVICE)  # noqa: E731
        got_t = fn(rows, a, grad, full(w_attn), full(w_mlp), mode=mode, out=out_t, **kw)
        ref = row_update.row_update(f64(rows), f64(a), f64(grad), w_attn, w_mlp, mode)
        check(out_c, got_c, ref, 1e-5, f"{update} constants {mode}")
        check(out_t, got_t, ref, 1e-5, f"{update} tensors {mode}")
        assert torch.allclose(got_c, got_t, rtol=1e-6, atol=1e-7)
    # rollout as the engine (1.0 / −0.5 on "mean") is R · (½ I + ½ mean_h A) (docs/methods.md §4)
    got = fn(rows, a, None, 1.0, -0.5, mode="mean", **kw)
    eye = torch.eye(N, dtype=torch.float64, device=DEVICE)
    ref = torch.bmm(f64(rows), 0.5 * eye + 0.5 * f64(a).mean(1))  # Abnar & Zuidema's ½ I + ½ mean_h A
    assert max_rel_err_l2(got, ref) <= 1e-5


@pytest.mark.parametrize("N,B,H", [(145, 1, 2), (257, 2, 1)])
def test_split_k_paths(monkeypatch, N, B, H):
    """The deterministic split-K path (used on GPUs when the batch is small) matches too."""
    ru_mod = importlib.import_module("tokentm_fast.kernels.row_update")
    monkeypatch.setattr(ru_mod, "num_splits", lambda *a: 3)  # plans the splits of both kernels
    g = gen("split", N)
    a, gr = attn_grad(B, H, N, torch.float32, g)
    wa, wm = weights(B, N, g)
    for mode in MODES:
        rows = torch.rand(B, 1, N, generator=g).to(DEVICE)
        out = poisoned(B, 1, N)
        ref = row_update.row_update(f64(rows), f64(a), f64(gr), f64(wa), f64(wm), mode)
        check(out, K.row_update(rows, a, gr, wa, wm, mode=mode, out=out), ref, 1e-5, f"split row {mode}")
        rows = torch.rand(B, 40, N, generator=g).to(DEVICE)
        out = poisoned(B, 40, N)
        ref = row_update.row_update(f64(rows), f64(a), f64(gr), f64(wa), -0.5, mode)
        got = K.matrix_update(rows, a, gr, wa, -0.5, mode=mode, allow_tf32=False, out=out)
        check(out, got, ref, 1e-5, f"split matrix {mode}")


def test_noncontiguous_inputs():
    B, H, N = 2, 2, 50
    g = gen("noncontig")
    a, gr = attn_grad(B, H, N, torch.float32, g)
    a_nc = a.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, strided view
    gr_nc = gr.transpose(-1, -2).contiguous().transpose(-1, -2)
    wa, wm = weights(B, 2 * N, g)
    wa_nc, wm_nc = wa[:, ::2], wm[:, 1::2]
    rows = torch.rand(B, 1, 2 * N, generator=g).to(DEVICE)[..., ::2]  # (B, 1, N) strided
    assert not (a_nc.is_contiguous() or wa_nc.is_contiguous() or rows.is_contiguous())
    ref = row_update.row_update(f64(rows), f64(a), f64(gr), f64(wa_nc), f64(wm_nc), "gae")
    out = poisoned(B, 1, N)
    check(out, K.row_update(rows, a_nc, gr_nc, wa_nc, wm_nc, out=out), ref, 1e-5, "non-contiguous row")
    out = poisoned(B, 1, N)
    check(out, K.matrix_update(rows, a_nc, gr_nc, wa_nc, wm_nc, allow_tf32=False, out=out), ref, 1e-5,
          "non-contiguous matrix")
    out = poisoned(B, N, N)
    check(out, K.fuse_heads(a_nc, gr_nc, out=out), head_fusion.fuse_heads(f64(a), f64(gr)), 1e-5, "non-contiguous fuse")
    # contiguous tensors are passed through untouched (no copy)
    assert _utils.contiguous(a) is a


# --------------------------------------------------------------------------- §3 matrix update
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,B,H", CASES)
def test_matrix_update(N, B, H, dtype):
    g = gen("matrix", N, dtype)
    a, gr = attn_grad(B, H, N, dtype, g)
    wa, wm = weights(B, N, g)
    Q = N if N <= 257 else 24  # the full matrix where the interpreter affords it
    rows = torch.rand(B, Q, N, generator=g).to(DEVICE)
    modes = MODES if N <= 257 else ["gae", "decoupled"]
    for mode in modes:
        grad = gr if mode in ("gae", "decoupled") else None
        ref = row_update.row_update(f64(rows), f64(a), f64(grad), f64(wa), f64(wm), mode)
        for tf32 in ((False, True) if mode == modes[0] else (False,)):
            out = poisoned(B, Q, N)
            got = K.matrix_update(rows, a, grad, wa, wm, mode=mode, allow_tf32=tf32, out=out)
            check(out, got, ref, tol(dtype, tf32), f"matrix_update[{mode}, tf32={tf32}]")


def test_matrix_update_identity_start_fp16():
    """Starting from R = I (explain(full=True)) with fp16 attention."""
    B, H, N = 1, 2, 197
    g = gen("matrix-eye")
    a, gr = attn_grad(B, H, N, torch.float16, g)
    rows = torch.eye(N, device=DEVICE).expand(B, N, N)  # stride-0 batch: made contiguous by the wrapper
    out = poisoned(B, N, N)
    got = K.matrix_update(rows, a, gr, 1.0, 0.0, mode="gae", allow_tf32=False, out=out)
    ref = row_update.row_update(f64(rows), f64(a), f64(gr), 1.0, 0.0, "gae")
    check(out, got, ref, 2e-2, "identity start")


# --------------------------------------------------------------------------- §6 LeGrad reduction
def legrad_ref(gr, num_rows=None):
    gr = f64(gr)
    return gr.clamp_min(0).sum(2).mean(1) / (gr.shape[2] if num_rows is None else num_rows)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("N,B,H", CASES)
def test_legrad_reduce(N, B, H, dtype):
    g = gen("legrad", N, dtype)
    for Q, num_rows in [(1, N), (3, None)]:
        gr = torch.randn(B, H, Q, N, generator=g).to(dtype).to(DEVICE)
        out = poisoned(B, N)
        got = K.legrad_reduce(gr, num_rows=num_rows, out=out)
        check(out, got, legrad_ref(gr, num_rows), tol(dtype), f"legrad Q={Q}")


def test_legrad_reduce_layers():
    B, H, N, L = 2, 3, 197, 3
    g = gen("legrad-layers")
    stacked = torch.randn(L, B, H, 1, N, generator=g).to(DEVICE)
    ref = sum(legrad_ref(stacked[l], N) for l in range(L))
    out = poisoned(B, N)
    check(out, K.legrad_reduce(stacked, num_rows=N, out=out), ref, 1e-5, "5-D")
    out = poisoned(B, N)
    check(out, K.legrad_reduce(list(stacked), num_rows=N, out=out), ref, 1e-5, "list")
    # a list may mix heads and rows per layer, with one num_rows per layer
    layers = [torch.randn(B, 2, 1, N, generator=g).to(DEVICE), torch.randn(B, 3, 4, N, generator=g).bfloat16().to(DEVICE)]
    out = poisoned(B, N)
    got = K.legrad_reduce(layers, num_rows=[N, 4], out=out)
    check(out, got, legrad_ref(layers[0], N) + legrad_ref(layers[1], 4), 1e-5, "mixed list")
    # accumulate=True sums layers over several calls
    out = torch.zeros(B, N, device=DEVICE)
    for l in range(L):
        K.legrad_reduce(stacked[l], num_rows=N, out=out, accumulate=True)
    check(out, out, ref, 1e-5, "accumulate")


def test_legrad_reduce_row_split(monkeypatch):
    """The split of the rows over several programs (used on GPUs when the column blocks are few)
    sums the same, deterministically, also accumulating and over stacked layers."""
    lr_mod = importlib.import_module("tokentm_fast.kernels.legrad_reduce")
    monkeypatch.setattr(lr_mod, "num_splits", lambda *a: 3)
    B, H, Q, N, L = 2, 3, 50, 77, 2  # R = 150 rows per layer: three splits, the last one partial
    g = gen("legrad-split")
    stacked = torch.randn(L, B, H, Q, N, generator=g).to(DEVICE)
    ref = sum(legrad_ref(stacked[l], N) for l in range(L))
    out = poisoned(B, N)
    check(out, K.legrad_reduce(stacked, num_rows=N, out=out), ref, 1e-5, "split 5-D")
    assert torch.equal(K.legrad_reduce(stacked, num_rows=N), out)
    base = torch.rand(B, N, generator=g).to(DEVICE)
    out = base.clone()
    K.legrad_reduce(stacked[0], num_rows=N, out=out, accumulate=True)
    check(out, out, f64(base) + legrad_ref(stacked[0], N), 1e-5, "split accumulate")


# The sm_90 compile check of every GPU configuration (registers, spills, shared memory) is the compile audit:
# tests/test_compile_audit.py and benchmarks/compile_audit.py.


def test_wrappers_read_nothing_back_to_the_host(monkeypatch):
    """The row / matrix / fusion / LeGrad wrappers (run inside backward hooks) and their helpers never
    call ``.item()``, ``.nonzero()``, ``.tolist()``, ``.cpu()`` or ``bool()`` on a tensor: on a GPU
    each would synchronise the device once per layer. (Triton's own launch code is not ours to check.)"""
    import sys

    ours = {importlib.import_module(f"tokentm_fast.kernels.{m}").__file__
            for m in ("row_update", "matrix_update", "head_fusion", "legrad_reduce", "transform_weights", "_utils")}
    seen = []
    for name in ("nonzero", "item", "tolist", "cpu", "__bool__"):
        original = getattr(torch.Tensor, name)

        def trapped(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller in ours:
                seen.append(f"Tensor.{_name} called from {caller}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, trapped)
    monkeypatch.setattr(importlib.import_module("tokentm_fast.kernels.row_update"), "num_splits", lambda *a: 2)
    B, H, N = 2, 2, 145
    g = gen("no-sync")
    a, gr = attn_grad(B, H, N, torch.float32, g)
    wa, wm = weights(B, N, g)
    rows = torch.zeros(B, 1, N, device=DEVICE)
    rows[..., 0] = 1.0
    outs = [
        K.row_update(rows, a, gr, wa, wm, support=slice(0, 1)),
        K.row_update(torch.rand(B, 1, N, generator=g).to(DEVICE), a, gr, wa, 0.0, mode="decoupled"),
        K.matrix_update(torch.rand(B, 9, N, generator=g).to(DEVICE), a, None, 1.0, -0.5, mode="mean"),
        K.fuse_heads(a, gr),
        K.legrad_reduce(gr[:, :, :3], num_rows=N),
        K.transform_weights(torch.randn(B, N, 16, generator=g).to(DEVICE), torch.randn(B, N, 16, generator=g).to(DEVICE)),
    ]
    monkeypatch.undo()
    assert not seen, seen
    assert all(torch.isfinite(o).all() and o.abs().sum() > 0 for o in outs)


# --------------------------------------------------------------------------- availability
# (argument errors are the public entries' job: tests/test_ops.py checks them on the operators)
def test_require_triton(monkeypatch):
    t = torch.zeros(2, device=DEVICE)
    K.require_triton(t)  # fine where the tests run at all
    assert K.triton_available(DEVICE)
    if DEVICE.type == "cpu":
        monkeypatch.setattr(_utils, "interpreter_enabled", lambda: False)
        assert not K.triton_available("cpu")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            K.require_triton(t)
        x = torch.randn(1, 50, 8)
        from tokentm_fast.bindings import library

        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # the operator's kernel path says so
            library.transform_weights_cuda(x, x)
        monkeypatch.undo()
    monkeypatch.setattr(_utils, "triton_importable", lambda: False)
    assert not K.triton_available(DEVICE)
    with pytest.raises(RuntimeError, match="not importable"):
        K.require_triton(t)


def force_configs(monkeypatch, module: str, kernel: str):
    """Yield each GPU configuration of an autotuned kernel, made the only one (run here under the
    interpreter): every tile the GPU autotuner may pick must give the same numbers."""
    mod = importlib.import_module(f"tokentm_fast.kernels.{module}")
    tuner = getattr(mod, kernel)
    configs = {"row_update": "ROW_GPU_CONFIGS"}.get(module, "GPU_CONFIGS")
    for cfg in getattr(mod, configs):
        monkeypatch.setattr(tuner, "configs", [cfg])
        monkeypatch.setattr(tuner, "cache", {})
        yield cfg


def test_every_gpu_config(monkeypatch):
    """The GPU launch configurations (small tiles, several rows, tails in every dimension) match."""
    B, H, N = 2, 2, 75
    g = gen("gpu-configs")
    a, gr = attn_grad(B, H, N, torch.float32, g)
    wa, wm = weights(B, N, g)
    ref = head_fusion.fuse_heads(f64(a), f64(gr), "decoupled")
    for cfg in force_configs(monkeypatch, "head_fusion", "_fuse_heads_kernel"):
        out = poisoned(B, N, N)
        check(out, K.fuse_heads(a, gr, "decoupled", out=out), ref, 1e-5, f"fuse {cfg}")
    for Q in (1, 6):
        rows = torch.rand(B, Q, N, generator=g).to(DEVICE)
        ref = row_update.row_update(f64(rows), f64(a), f64(gr), f64(wa), f64(wm), "gae")
        for cfg in force_configs(monkeypatch, "row_update", "_row_update_kernel"):
            out = poisoned(B, Q, N)
            check(out, K.row_update(rows, a, gr, wa, wm, out=out), ref, 1e-5, f"row Q={Q} {cfg}")
        for cfg in force_configs(monkeypatch, "matrix_update", "_matrix_update_kernel"):
            out = poisoned(B, Q, N)
            got = K.matrix_update(rows, a, gr, wa, wm, allow_tf32=False, out=out)
            check(out, got, ref, 1e-5, f"matrix Q={Q} {cfg}")
    rows_g = torch.randn(B, H, 3, N, generator=g).to(DEVICE)
    for cfg in force_configs(monkeypatch, "legrad_reduce", "_legrad_reduce_kernel"):
        out = poisoned(B, N)
        check(out, K.legrad_reduce(rows_g, num_rows=N, out=out), legrad_ref(rows_g, N), 1e-5, f"legrad {cfg}")


@pytest.mark.parametrize("lo,hi", [(0, 1), (7, 9), (1, 145)])
def test_row_update_support(lo, hi):
    """Rows zero outside ``support``: only rows lo:hi of A and G are read (NaN elsewhere stays
    unread), with and without split-K, and the result is the dense one."""
    B, H, N = 2, 2, 145
    g = gen("support", lo, hi)
    a, gr = attn_grad(B, H, N, torch.float32, g)
    wa, wm = weights(B, N, g)
    rows = torch.zeros(B, 1, N, device=DEVICE)
    rows[..., lo:hi] = torch.rand(B, 1, hi - lo, generator=g).to(DEVICE) + 0.1
    ref = row_update.row_update(f64(rows), f64(a), f64(gr), f64(wa), f64(wm), "gae")
    a_nan, g_nan = a.clone(), gr.clone()
    for t in (a_nan, g_nan):
        t[:, :, :lo] = float("nan")
        t[:, :, hi:] = float("nan")
    out = poisoned(B, 1, N)
    check(out, K.row_update(rows, a_nan, g_nan, wa, wm, out=out, support=slice(lo, hi)), ref, 1e-5, "support")
    ru_mod = importlib.import_module("tokentm_fast.kernels.row_update")
    orig = ru_mod.num_splits
    try:
        ru_mod.num_splits = lambda *args: 2
        out = poisoned(B, 1, N)
        check(out, K.row_update(rows, a_nan, g_nan, wa, wm, out=out, support=slice(lo, hi)), ref, 1e-5,
              "support split")
    finally:
        ru_mod.num_splits = orig
    ref = row_update.row_update(f64(rows), f64(a), None, f64(wa), f64(wm), "mean")
    out = poisoned(B, 1, N)
    check(out, K.row_update(rows, a_nan, None, wa, wm, "mean", out=out, support=slice(lo, hi)), ref, 1e-5,
          "support mean")
    # without the hint every row is read: the NaN rows show (the checks above are not vacuous)
    if hi - lo < N:
        assert not torch.isfinite(K.row_update(rows, a_nan, None, wa, wm, "mean")).all()


def test_out_may_share_a_buffer_with_rows_without_overlap():
    B, H, N = 1, 1, 50
    a, gr = attn_grad(B, H, N, torch.float32, gen("pingpong"))
    buf = torch.rand(2, B, 1, N, device=DEVICE)
    ref = row_update.row_update(f64(buf[0]), f64(a), f64(gr), 1.0, 0.0, "gae")
    out = buf[1]
    out.fill_(float("nan"))
    check(out, K.row_update(buf[0], a, gr, 1.0, 0.0, out=out), ref, 1e-5, "ping-pong buffer")


def test_a_kernel_module_imported_first_does_not_shadow_its_wrapper():
    """``tokentm_fast.kernels.<name>`` is the wrapper function even when the module of the same name was
    imported first (the import system binds a submodule to its parent's attribute; a fresh interpreter, so that
    no earlier call has cached the wrapper)."""
    import subprocess
    import sys

    from helpers import subprocess_env

    code = ("import importlib, types\n"
            "names = ('transform_weights', 'row_update', 'matrix_update', 'legrad_reduce')\n"
            "mods = [importlib.import_module('tokentm_fast.kernels.' + n) for n in names]\n"
            "import tokentm_fast.kernels as K\n"
            "from tokentm_fast.kernels import row_update\n"
            "assert all(isinstance(m, types.ModuleType) for m in mods)\n"
            "for n, m in zip(names, mods):\n"
            "    f = getattr(K, n)\n"
            "    assert callable(f) and not isinstance(f, types.ModuleType), (n, f)\n"
            "    assert f is getattr(m, n), n\n"
            "assert row_update is K.row_update\n")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
