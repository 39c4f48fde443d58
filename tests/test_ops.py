"""Tests of the torch.library bindings and the public API ``tokentm_fast.ops``.

(a) every public function against an independent float64 implementation of
    docs/methods.md written here with full N×N matrices (rel. L2 error per
    image ≤ 1e-5, docs/methods.md §7), lists and stacked inputs alike;
(b) input validation;
(c) ``torch.library.opcheck`` of every ``tokentm::*`` op on CPU samples;
(d) ``torch.compile(fullgraph=True)`` through the ops on CPU.

On the CPU torch dispatches to the PyTorch fallback; the Triton kernels are
tested elsewhere.
"""
import importlib

import pytest
import torch
from helpers import max_rel_err_l2

import tokentm_fast.bindings as bindings
from tokentm_fast import ops

TOL = 1e-5
MODES = ("gae", "decoupled", "mean", "rollout")


# --------------------------------------------------------------------------- reference (spec, float64)


def ref_transform(x, xt, use_length=True, use_necc=True, eps=1e-6):
    """docs/methods.md §2, token by token."""
    x, xt = x.double(), xt.double()
    b, n, _ = x.shape
    w = torch.empty(b, n, dtype=torch.float64)
    for i in range(b):
        cos = torch.stack([
            torch.dot(x[i, k], xt[i, k]) / (max(x[i, k].norm(), eps) * max(xt[i, k].norm(), eps)) for k in range(n)
        ])
        necc = torch.exp(cos) / torch.exp(cos).sum() if use_necc else torch.full((n,), 1.0 / n, dtype=torch.float64)
        for k in range(n):
            ratio = xt[i, k].norm() / max(x[i, k].norm(), eps) if use_length else 1.0
            w[i, k] = ratio * necc[k]
    return w


def ref_fuse(attn, grad, mode):
    """docs/methods.md §3/§4 head fusion, summing heads one at a time."""
    a = attn.double()
    g = None if grad is None else grad.double()
    b, h, n, _ = a.shape
    acc = torch.zeros(b, n, n, dtype=torch.float64)
    acc_g = torch.zeros(b, n, n, dtype=torch.float64)
    for k in range(h):
        if mode == "gae":
            acc += torch.maximum(a[:, k] * g[:, k], torch.zeros(()))
        else:
            acc += a[:, k]
            if mode == "decoupled":
                acc_g += torch.maximum(g[:, k], torch.zeros(()))
    acc /= h
    if mode == "decoupled":
        return acc * (acc_g / h)
    if mode == "rollout":
        return 0.5 * acc + 0.5 * torch.eye(n, dtype=torch.float64)
    return acc


def ref_aggregate(attns, grads, w_attn, w_mlp, c0, mode):
    """Cᴸ = Uᴸ ⋯ U¹ C⁰ with Uˡ = (I + diag(w_mlp)) (I + Āˡ diag(w_attn)), full float64 matrices."""
    b, _, n, _ = attns[0].shape
    eye = torch.eye(n, dtype=torch.float64)
    out = []
    for i in range(b):
        c = eye.clone() if c0 is None else torch.diag(c0[i].double())
        for l in range(len(attns)):
            abar = ref_fuse(attns[l][i:i + 1], None if grads is None else grads[l][i:i + 1], mode)[0]
            wa = w_attn[l] if isinstance(w_attn[l], float) else w_attn[l][i].double()
            wm = w_mlp[l] if isinstance(w_mlp[l], float) else w_mlp[l][i].double()
            u_attn = eye + abar @ torch.diag(wa * torch.ones(n, dtype=torch.float64))
            u_mlp = eye + torch.diag(wm * torch.ones(n, dtype=torch.float64))
            c = (u_mlp @ u_attn) @ c
        out.append(c)
    return torch.stack(out)


def ref_legrad(grads):
    """docs/methods.md §6: Σ_l mean_h mean_i max(G, 0)."""
    return sum(torch.maximum(g.double(), torch.zeros(())).mean(dim=(1, 2)) for g in grads)


# --------------------------------------------------------------------------- inputs


def make_inputs(b=2, h=3, n=7, layers=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    attns = [torch.softmax(2 * torch.randn(b, h, n, n, generator=gen), -1).to(dtype) for _ in range(layers)]
    grads = [torch.randn(b, h, n, n, generator=gen).to(dtype) for _ in range(layers)]
    w_attn = [(2 * torch.rand(b, n, generator=gen)).to(dtype) for _ in range(layers)]
    w_mlp = [torch.rand(b, n, generator=gen).to(dtype) for _ in range(layers)]
    c0 = (0.5 + torch.rand(b, n, generator=gen)).to(dtype)
    return attns, grads, w_attn, w_mlp, c0


# --------------------------------------------------------------------------- (a) against the spec


@pytest.mark.parametrize("use_length,use_necc", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transform_weights_matches_spec(use_length, use_necc, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 8, generator=gen).to(dtype)
    xt = (0.5 * x + torch.randn(2, 11, 8, generator=gen)).to(dtype)
    x[0, 3] = 0.0  # a zero token exercises ε
    w = ops.transform_weights(x, xt, use_length, use_necc)
    assert w.shape == (2, 11) and w.dtype == torch.float32
    assert max_rel_err_l2(w, ref_transform(x, xt, use_length, use_necc)) <= TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [5, 16])
def test_fuse_heads_matches_spec(mode, n):
    attns, grads, *_ = make_inputs(n=n, layers=1)
    grad = grads[0] if mode in ("gae", "decoupled") else None
    fused = ops.fuse_heads(attns[0], grad, mode)
    assert fused.shape == (2, n, n) and fused.dtype == torch.float32
    assert max_rel_err_l2(fused, ref_fuse(attns[0], grad, mode)) <= TOL


def test_rollout_is_built_from_the_mean_fusion_and_the_rollout_constants():
    """``mode="rollout"`` is no head fusion of the kernels (issue 27): ``ops`` builds rollout's per-layer matrix
    ``½ I + ½ mean_h A`` from the "mean" operator and ``aggregation.ROLLOUT``, with the bits the removed
    "rollout" fusion gave (``0.5 · mean + 0.5 · I`` in float32, the rounding commutes with the halving),
    and the multi-layer functions run the engine on that matrix with the caller's weights, as the
    float64 formula of docs/methods.md §3 with Ā = ½ I + ½ mean_h A does. The operators refuse it."""
    attns, grads, w_attn, w_mlp, c0 = make_inputs(n=9, layers=3, seed=21)
    mean = torch.ops.tokentm.fuse_heads(attns[0], None, "mean")
    eye = torch.eye(9)
    rollout = ops.fuse_heads(attns[0], grads[0], "rollout")
    torch.testing.assert_close(rollout, 0.5 * mean + 0.5 * eye, rtol=0, atol=0)
    assert (rollout.diagonal(dim1=-2, dim2=-1) > 0.5).all() and rollout[0].std() > 0.05  # informative
    ref = ref_aggregate(attns, None, w_attn, w_mlp, c0, "rollout")
    assert max_rel_err_l2(ops.tokentm_matrix(attns, grads, w_attn, w_mlp, c0, mode="rollout", allow_tf32=False), ref) <= TOL
    for q in (0, -1):
        assert max_rel_err_l2(ops.tokentm_rows(attns, None, w_attn, w_mlp, c0, q, mode="rollout"), ref[:, q]) <= TOL
    with pytest.raises(ValueError, match="unknown head fusion mode 'rollout'"):
        torch.ops.tokentm.fuse_heads(attns[0], None, "rollout")
    with pytest.raises(ValueError, match="unknown head fusion mode 'rollout'"):
        torch.ops.tokentm.row_update(torch.ones(2, 1, 9), attns[0], None, None, None, mode="rollout")


@pytest.mark.parametrize("n", [7, 13, 16])
@pytest.mark.parametrize("mode", ["gae", "decoupled"])
@pytest.mark.parametrize("init", ["length", "identity"])
@pytest.mark.parametrize("query_index", [0, 4, -1])
def test_tokentm_rows_matches_spec(n, mode, init, query_index):
    attns, grads, w_attn, w_mlp, c0 = make_inputs(n=n, layers=3, seed=n)
    init_arg = c0 if init == "length" else "identity"
    ref = ref_aggregate(attns, grads, w_attn, w_mlp, c0 if init == "length" else None, mode)[:, query_index]
    row = ops.tokentm_rows(attns, grads, w_attn, w_mlp, init_arg, query_index, mode=mode)
    assert row.shape == (2, n) and row.dtype == torch.float32
    assert max_rel_err_l2(row, ref) <= TOL
    stacked = ops.tokentm_rows(torch.stack(attns), torch.stack(grads), torch.stack(w_attn), torch.stack(w_mlp),
                               init_arg, query_index, mode=mode)
    torch.testing.assert_close(stacked, row, rtol=0, atol=0)


@pytest.mark.parametrize("n", [6, 9])
@pytest.mark.parametrize("mode", ["gae", "decoupled"])
def test_tokentm_matrix_matches_spec(n, mode):
    attns, grads, w_attn, w_mlp, c0 = make_inputs(n=n, layers=3, seed=10 + n)
    ref = ref_aggregate(attns, grads, w_attn, w_mlp, c0, mode)
    mat = ops.tokentm_matrix(attns, grads, w_attn, w_mlp, c0, mode=mode)
    assert mat.shape == (2, n, n) and mat.dtype == torch.float32
    assert max_rel_err_l2(mat, ref) <= TOL
    stacked = ops.tokentm_matrix(torch.stack(attns), torch.stack(grads), torch.stack(w_attn), torch.stack(w_mlp),
                                 c0, mode=mode)
    torch.testing.assert_close(stacked, mat, rtol=0, atol=0)
    # every row of the matrix is what the row algorithm gives for that query
    for q in (0, n - 1):
        row = ops.tokentm_rows(attns, grads, w_attn, w_mlp, c0, q, mode=mode)
        assert max_rel_err_l2(row, mat[:, q]) <= TOL


def test_constant_weights_gae_and_rollout():
    """Numbers as weights (docs/methods.md §4: GAE w_attn=1, w_mlp=0; rollout via mode="rollout", no grads)."""
    attns, grads, *_ = make_inputs(n=10, layers=3, seed=3)
    ref = ref_aggregate(attns, grads, [1.0] * 3, [0.0] * 3, None, "gae")[:, 0]
    assert max_rel_err_l2(ops.tokentm_rows(attns, grads, 1.0, 0.0, "identity"), ref) <= TOL
    ones, zeros = [torch.ones(2, 10)] * 3, [torch.zeros(2, 10)] * 3
    assert max_rel_err_l2(ops.tokentm_rows(attns, grads, ones, zeros, "identity"), ref) <= TOL
    assert max_rel_err_l2(ops.tokentm_rows(attns, grads, [1.0, ones[1], 1], 0, "identity"), ref) <= TOL
    # rollout: R = Âᴸ ⋯ Â¹ with Â = mean_h A / 2 + I / 2  (w_attn = 1, w_mlp = 0 on the "rollout" fusion
    # would add I once more, so use the "mean" fusion with w_mlp = -1/2 as the engine does)
    roll = ref_aggregate(attns, None, [0.0] * 3, [0.0] * 3, None, "rollout")  # identity
    for l in range(3):
        roll = ref_fuse(attns[l], None, "rollout") @ roll
    got = ops.tokentm_rows(attns, None, 1.0, -0.5, "identity", mode="mean")
    assert max_rel_err_l2(got, roll[:, 0]) <= TOL
    got_mat = ops.tokentm_matrix(torch.stack(attns), None, 1.0, -0.5, "identity", mode="mean")
    assert max_rel_err_l2(got_mat, roll) <= TOL


@pytest.mark.parametrize("n", [7, 16])
def test_legrad_reduce_matches_spec(n):
    _, grads, *_ = make_inputs(n=n, layers=2, seed=5)
    ref = ref_legrad(grads)
    out = ops.legrad_reduce(grads)
    assert out.shape == (2, n) and out.dtype == torch.float32
    assert max_rel_err_l2(out, ref) <= TOL
    torch.testing.assert_close(ops.legrad_reduce(torch.stack(grads)), out, rtol=0, atol=0)
    # only the class-token row non-zero: passing that row with num_rows = N gives the same map
    cls_only = [torch.zeros_like(g) for g in grads]
    for g, c in zip(grads, cls_only):
        c[:, :, 0] = g[:, :, 0]
    rows = [g[:, :, :1] for g in grads]
    assert max_rel_err_l2(ops.legrad_reduce(rows, num_rows=n), ref_legrad(cls_only)) <= TOL


def test_half_precision_inputs():
    """bf16 / fp16 inputs, float32 accumulation: docs/methods.md §7 tolerance 2e-2 against float64 of the same values."""
    attns, grads, w_attn, w_mlp, c0 = make_inputs(n=9, layers=2, dtype=torch.bfloat16, seed=7)
    ref = ref_aggregate(attns, grads, w_attn, w_mlp, c0, "gae")[:, 0]
    row = ops.tokentm_rows(attns, grads, w_attn, w_mlp, c0)
    assert row.dtype == torch.float32 and max_rel_err_l2(row, ref) <= 2e-2
    x = torch.randn(2, 9, 8).half()
    assert max_rel_err_l2(ops.transform_weights(x, 2 * x + 1), ref_transform(x, 2 * x + 1)) <= 2e-2


# --------------------------------------------------------------------------- (b) validation


def _bad_cases():
    attns, grads, w_attn, w_mlp, c0 = make_inputs(n=5, layers=2)
    good = dict(attns=attns, grads=grads, w_attn=w_attn, w_mlp=w_mlp, init=c0)

    def case(**changes):
        return {**good, **changes}

    nan_attn = [attns[0], attns[1].clone()]
    nan_attn[1][0, 0, 0, 0] = float("nan")
    inf_w = torch.stack(w_attn).clone()
    inf_w[0, 1, 2] = float("inf")
    return [
        pytest.param(case(attns=attns[0]), ValueError, "attns", id="attns-rank"),
        pytest.param(case(attns=[]), ValueError, "attns has no layers", id="attns-empty"),
        pytest.param(case(attns="x"), TypeError, "attns", id="attns-type"),
        pytest.param(case(attns=[attns[0], attns[1][:, :2]]), ValueError, r"attns\[1\]", id="attns-heads"),
        pytest.param(case(attns=[a[..., :4] for a in attns]), ValueError, "square", id="attns-square"),
        pytest.param(case(attns=[a.to(torch.int64) for a in attns]), TypeError, r"attns\[0\].*floating",
                     id="attns-int"),
        pytest.param(case(attns=nan_attn), ValueError, r"attns\[1\] contains NaN", id="attns-nan"),
        pytest.param(case(grads=grads[:1]), ValueError, "grads has 1 layers", id="grads-layers"),
        pytest.param(case(grads=[grads[0], grads[1][:1]]), ValueError, r"grads\[1\]", id="grads-batch"),
        pytest.param(case(grads=None), ValueError, "grads is required", id="grads-missing"),
        pytest.param(case(w_attn=[w[:, :4] for w in w_attn]), ValueError, r"w_attn\[0\]", id="w_attn-shape"),
        pytest.param(case(w_attn=inf_w), ValueError, r"w_attn\[0\] contains NaN or Inf", id="w_attn-inf"),
        pytest.param(case(w_mlp=w_mlp[:1]), ValueError, "w_mlp has 1 layers", id="w_mlp-layers"),
        pytest.param(case(w_mlp="zero"), TypeError, "w_mlp", id="w_mlp-type"),
        pytest.param(case(w_mlp=[w.to(torch.int32) for w in w_mlp]), TypeError, r"w_mlp\[0\]", id="w_mlp-int"),
        pytest.param(case(w_mlp=float("nan")), ValueError, "w_mlp is NaN", id="w_mlp-nan-number"),
        pytest.param(case(w_mlp=[w_mlp[0], float("inf")]), ValueError, r"w_mlp\[1\] is NaN or Inf",
                     id="w_mlp-inf-in-list"),
        pytest.param(case(init="length"), ValueError, "init", id="init-string"),
        pytest.param(case(init=c0[:, :3]), ValueError, "init", id="init-shape"),
        pytest.param(case(init=c0.to(torch.int64)), TypeError, "init", id="init-int"),
        pytest.param(case(init=torch.full_like(c0, float("inf"))), ValueError, "init contains NaN", id="init-inf"),
        pytest.param(case(init=c0.to("meta")), ValueError, "init is on device meta", id="init-device"),
        pytest.param(case(grads=[g.to("meta") for g in grads]), ValueError, r"grads\[0\] is on device meta",
                     id="grads-device"),
    ]


@pytest.mark.parametrize("fn", ["rows", "matrix"])
@pytest.mark.parametrize("kwargs,exc,match", _bad_cases())
def test_aggregation_validation(fn, kwargs, exc, match):
    call = ops.tokentm_rows if fn == "rows" else ops.tokentm_matrix
    with pytest.raises(exc, match=match):
        call(**kwargs)


def test_rows_and_matrix_argument_validation():
    attns, grads, w_attn, w_mlp, c0 = make_inputs(n=5, layers=2)
    with pytest.raises(ValueError, match="query_index 5 is out of range"):
        ops.tokentm_rows(attns, grads, w_attn, w_mlp, c0, 5)
    with pytest.raises(TypeError, match="query_index must be an int"):
        ops.tokentm_rows(attns, grads, w_attn, w_mlp, c0, 1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.tokentm_rows(attns, grads, w_attn, w_mlp, c0, mode="max")
    with pytest.raises(TypeError, match="allow_tf32 must be a bool"):
        ops.tokentm_matrix(attns, grads, w_attn, w_mlp, c0, allow_tf32=1)


def test_finite_check_can_be_skipped():
    attns, grads, w_attn, w_mlp, c0 = make_inputs(n=5, layers=2)
    g = [grads[0].clone(), grads[1]]
    g[0][0, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"grads\[0\] contains NaN or Inf"):
        ops.tokentm_rows(attns, g, w_attn, w_mlp, c0)
    ops.tokentm_rows(attns, g, w_attn, w_mlp, c0, check_finite=False)  # no error; result is the caller's problem


@pytest.mark.parametrize("args,exc,match", [
    pytest.param((torch.randn(2, 5), torch.randn(2, 5)), ValueError, "x must have rank 3", id="x-rank"),
    pytest.param((torch.randn(2, 5, 4), torch.randn(2, 5, 3)), ValueError, "x_tilde has shape", id="xt-shape"),
    pytest.param((torch.randn(2, 5, 4), torch.ones(2, 5, 4, dtype=torch.int64)), TypeError, "x_tilde.*floating",
                 id="xt-int"),
    pytest.param((torch.randn(2, 5, 4).tolist(), torch.randn(2, 5, 4)), TypeError, "x must be a torch.Tensor",
                 id="x-list"),
    pytest.param((torch.full((2, 5, 4), float("nan")), torch.randn(2, 5, 4)), ValueError, "x contains NaN",
                 id="x-nan"),
    pytest.param((torch.randn(2, 5, 4), torch.randn(2, 5, 4).to("meta")), ValueError, "x_tilde is on device meta",
                 id="xt-device"),
    pytest.param((torch.randn(2, 5, 4), torch.randn(2, 5, 4), 1), TypeError, "use_length must be a bool",
                 id="use_length-type"),
])
def test_transform_weights_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        ops.transform_weights(*args)


@pytest.mark.parametrize("args,exc,match", [
    pytest.param((torch.rand(2, 3, 5), torch.rand(2, 3, 5)), ValueError, "attn must have rank 4", id="attn-rank"),
    pytest.param((torch.rand(2, 3, 5, 4), torch.rand(2, 3, 5, 4)), ValueError, "square", id="attn-square"),
    pytest.param((torch.rand(2, 3, 5, 5), torch.rand(2, 2, 5, 5)), ValueError, "grad has shape", id="grad-heads"),
    pytest.param((torch.rand(2, 3, 5, 5), None), ValueError, "grad is required", id="grad-missing"),
    pytest.param((torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5), "sum"), ValueError, "mode must be one of",
                 id="mode"),
    pytest.param((torch.rand(2, 3, 5, 5), torch.ones(2, 3, 5, 5, dtype=torch.bool)), TypeError, "grad.*floating",
                 id="grad-bool"),
    pytest.param((torch.rand(2, 3, 5, 5), torch.full((2, 3, 5, 5), float("-inf"))), ValueError, "grad contains",
                 id="grad-inf"),
])
def test_fuse_heads_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        ops.fuse_heads(*args)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    pytest.param((torch.rand(2, 3, 5, 5),), {}, ValueError, "grads must be a list", id="rank"),
    pytest.param(([torch.rand(2, 3, 4, 5)],), {}, ValueError, "square", id="square"),
    pytest.param(([torch.rand(2, 3, 5, 5), torch.rand(2, 3, 6, 6)],), {}, ValueError, r"grads\[1\] has shape",
                 id="layers-differ"),
    pytest.param(([torch.rand(2, 3, 1, 5)],), {"num_rows": 0}, ValueError, "num_rows must be positive",
                 id="num_rows"),
    pytest.param(([torch.rand(2, 3, 5, 5).double(), torch.full((2, 3, 5, 5), float("nan"))],), {}, ValueError,
                 r"grads\[1\] contains NaN", id="nan"),
    pytest.param(([torch.ones(2, 3, 5, 5, dtype=torch.int32)],), {}, TypeError, r"grads\[0\].*floating", id="int"),
])
def test_legrad_reduce_validation(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.legrad_reduce(*args, **kwargs)


def _op_error_cases():
    """(op name, args, kwargs, exception, message) of bad operator calls (one validator per op)."""
    attns, grads, _, _, _ = make_inputs(b=1, h=2, n=6, layers=1)
    a, g = attns[0], grads[0]
    rows, w, x = torch.rand(1, 1, 6), torch.rand(1, 6), torch.randn(1, 6, 8)
    return [
        pytest.param("transform_weights", (x[0], x[0]), {}, ValueError, "x must be 3-D", id="tw-rank"),
        pytest.param("transform_weights", (x, x[:, :4]), {}, ValueError, "x_tilde must have shape", id="tw-shape"),
        pytest.param("transform_weights", (x.int(), x), {}, TypeError, "x must be a floating-point", id="tw-int"),
        pytest.param("transform_weights", (x, x.to("meta")), {}, ValueError, "x_tilde is on meta", id="tw-device"),
        pytest.param("fuse_heads", (a[0], g[0]), {}, ValueError, "attn must be 4-D", id="fuse-rank"),
        pytest.param("fuse_heads", (a[..., :4], g[..., :4]), {}, ValueError, "square", id="fuse-square"),
        pytest.param("fuse_heads", (a, g[:, :1]), {}, ValueError, "grad must have shape", id="fuse-grad-shape"),
        pytest.param("fuse_heads", (a, None), {"mode": "gae"}, ValueError, "needs the attention gradient",
                     id="fuse-no-grad"),
        pytest.param("fuse_heads", (a, g), {"mode": "max"}, ValueError, "unknown head fusion mode", id="fuse-mode"),
        pytest.param("fuse_heads", (a, g.to(torch.int32)), {}, TypeError, "grad must be a floating-point",
                     id="fuse-grad-int"),
        pytest.param("fuse_heads", (a[:, :0], g[:, :0]), {}, ValueError, "no heads", id="fuse-no-heads"),
        pytest.param("row_update", (rows[..., :4], a, g, w, w), {}, ValueError, "rows must be", id="row-rows-n"),
        pytest.param("row_update", (rows[0], a, g, w, w), {}, ValueError, "rows must be 3-D", id="row-rows-rank"),
        pytest.param("row_update", (rows, a, g, w[:, :4], w), {}, ValueError, "w_attn must have shape",
                     id="row-w_attn"),
        pytest.param("row_update", (rows, a, g, w, w.to(torch.int64)), {}, TypeError, "w_mlp must be a floating",
                     id="row-w_mlp-int"),
        pytest.param("row_update", (rows, a, g, w, w.to("meta")), {}, ValueError, "w_mlp is on meta",
                     id="row-device"),
        pytest.param("matrix_update", (rows, a, g, w, w), {"mode": "sum"}, ValueError, "unknown head fusion mode",
                     id="matrix-mode"),
        pytest.param("matrix_update", (rows, a, None, w, w), {"mode": "decoupled"}, ValueError,
                     "needs the attention gradient", id="matrix-no-grad"),
        pytest.param("legrad_reduce", (g[0],), {}, ValueError, "grad_rows must be 4-D", id="legrad-rank"),
        pytest.param("legrad_reduce", (g,), {"num_rows": 0}, ValueError, "num_rows must be a positive int",
                     id="legrad-num_rows"),
    ]


_IMPLS = {"transform_weights": "transform_weights", "fuse_heads": "fuse_heads", "row_update": "update",
          "matrix_update": "update", "legrad_reduce": "legrad_reduce"}


@pytest.mark.parametrize("impl", ["op", "cuda", "fake"])
@pytest.mark.parametrize("name,args,kwargs,exc,match", _op_error_cases())
def test_operator_argument_errors(impl, name, args, kwargs, exc, match):
    """Each operator checks its arguments on entry, with the same validator on every path: the op
    (CPU path here), the CUDA implementation (which then trusts them and launches the Triton
    wrappers) and the fake implementation used while torch.compile traces."""
    lib = bindings.library
    if impl == "op":
        fn = getattr(torch.ops.tokentm, name)
    elif impl == "cuda":
        fn = getattr(lib, f"{name}_cuda")
    else:
        fn = getattr(lib, f"{_IMPLS[name]}_fake")
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_operator_argument_types_before_dispatch():
    """Arguments the schema cannot bind never reach an implementation; the implementations'
    own check names a non-tensor argument."""
    x = torch.randn(1, 6, 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bindings.library.transform_weights_cuda(x.tolist(), x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bindings.library.check_transform_weights(x.tolist(), x)


# --------------------------------------------------------------------------- (c) the registered ops


def test_ops_registered_with_schemas():
    for name in bindings.OP_NAMES:
        assert hasattr(torch.ops.tokentm, name)
    schema = str(torch.ops.tokentm.row_update.default._schema)
    assert schema.startswith("tokentm::row_update(Tensor rows, Tensor attn, Tensor? grad, Tensor? w_attn")


def test_registration_is_idempotent():
    importlib.reload(bindings.library)
    importlib.reload(bindings)
    bindings.register()
    x = torch.randn(1, 4, 3)
    assert torch.ops.tokentm.transform_weights(x, x).shape == (1, 4)


def _op_samples():
    attns, grads, w_attn, w_mlp, _ = make_inputs(b=2, h=2, n=6, layers=1)
    a, g, wa, wm = attns[0], grads[0], w_attn[0], w_mlp[0]
    rows = torch.randn(2, 3, 6)
    eye = torch.eye(6).expand(2, 6, 6).contiguous()
    x = torch.randn(2, 6, 4)
    op = torch.ops.tokentm
    return [
        pytest.param(op.transform_weights, (x, 2 * x + 0.1), {}, id="transform_weights"),
        pytest.param(op.transform_weights, (x.double(), x.double() + 1), {"use_necc": False}, id="transform_f64"),
        pytest.param(op.fuse_heads, (a, g), {"mode": "gae"}, id="fuse_gae"),
        pytest.param(op.fuse_heads, (a, None), {"mode": "mean"}, id="fuse_mean"),
        pytest.param(op.row_update, (rows, a, g, wa, wm), {}, id="row_update"),
        pytest.param(op.row_update, (rows, a, None, None, None), {"w_mlp_const": -0.5, "mode": "mean"},
                     id="row_update_const"),
        pytest.param(op.matrix_update, (eye, a, g, wa, wm), {"mode": "decoupled", "allow_tf32": False},
                     id="matrix_update"),
        pytest.param(op.legrad_reduce, (g,), {}, id="legrad_reduce"),
        pytest.param(op.legrad_reduce, (g[:, :, :1],), {"num_rows": 6}, id="legrad_reduce_rows"),
    ]


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck not in this torch")
@pytest.mark.parametrize("op,args,kwargs", _op_samples())
def test_opcheck(op, args, kwargs):
    torch.library.opcheck(op, args, kwargs)


def test_op_outputs_are_float32():
    attns, grads, w_attn, w_mlp, _ = make_inputs(n=5, layers=1, dtype=torch.float64)
    rows = torch.randn(2, 1, 5, dtype=torch.float64)
    out = torch.ops.tokentm.row_update(rows, attns[0], grads[0], w_attn[0], w_mlp[0])
    assert out.dtype == torch.float32
    assert torch.ops.tokentm.fuse_heads(attns[0].half(), grads[0].half()).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown head fusion mode"):
        torch.ops.tokentm.fuse_heads(attns[0], grads[0], mode="nope")


# --------------------------------------------------------------------------- (d) torch.compile


def _two_layer_pipeline(x, xt, attns, grads, c0):
    """transform_weights then row_update over two layers, through torch.ops.tokentm."""
    w = torch.ops.tokentm.transform_weights(x, xt)
    rows = torch.zeros_like(c0)[:, None, :]
    rows[:, :, 0] = 1.0
    for l in (1, 0):
        rows = torch.ops.tokentm.row_update(rows, attns[l], grads[l], w, w * 0.5)
    return rows[:, 0] * c0


def test_compile_fullgraph_matches_eager():
    attns, grads, _, _, c0 = make_inputs(n=6, layers=2, seed=11)
    x = torch.randn(2, 6, 4)
    xt = torch.randn(2, 6, 4)
    args = (x, xt, attns, grads, c0)
    eager = _two_layer_pipeline(*args)
    torch._dynamo.reset()
    compiled = torch.compile(_two_layer_pipeline, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), eager, rtol=1e-6, atol=1e-7)
    explanation = torch._dynamo.explain(_two_layer_pipeline)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compile_public_api_fullgraph():
    """The public API traces too (its NaN/Inf check is skipped while compiling)."""
    attns, grads, w_attn, w_mlp, c0 = make_inputs(n=6, layers=2, seed=12)
    stacked = tuple(torch.stack(t) for t in (attns, grads, w_attn, w_mlp))

    def fn(a, g, wa, wm, c):
        return ops.tokentm_rows(a, g, wa, wm, c) + ops.legrad_reduce(g)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*stacked, c0), fn(*stacked, c0), rtol=1e-6, atol=1e-7)


def test_compile_inductor_cpu():
    """One inductor compile (the default backend) on CPU, to prove the fakes are good enough for codegen."""
    attns, grads, _, _, c0 = make_inputs(n=6, layers=2, seed=13)
    x, xt = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    args = (x, xt, attns, grads, c0)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(_two_layer_pipeline, fullgraph=True)
        out = compiled(*args)
    except Exception as exc:  # pragma: no cover - no C++ compiler on this machine
        if "compiler" in str(exc).lower() or "InvalidCxxCompiler" in type(exc).__name__:
            pytest.skip(f"inductor cannot build CPU code here: {exc}")
        raise
    torch.testing.assert_close(out, _two_layer_pipeline(*args), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- CUDA glue (run on CPU)


def _interpreter_available():
    try:
        from tokentm_fast.kernels import triton_available
    except Exception:  # pragma: no cover - kernels missing or broken
        return False
    return triton_available("cpu")


@pytest.mark.skipif(not _interpreter_available(), reason="Triton interpreter not available for CPU tensors")
def test_cuda_glue_calls_kernels_like_the_torch_path():
    """The functions registered for CUDA pass their arguments correctly to the Triton wrappers.

    Called directly on CPU tensors (Triton interpreter), tiny shapes; the kernels'
    numerics are tested in tests/test_kernels.py.
    """
    lib = bindings.library
    attns, grads, w_attn, w_mlp, _ = make_inputs(b=1, h=2, n=5, layers=1, seed=21)
    a, g, wa, wm = attns[0], grads[0], w_attn[0], w_mlp[0]
    x = torch.randn(1, 5, 4)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lib.transform_weights_cuda(x, x + 1, True, False),
                               lib.transform_weights_torch(x, x + 1, True, False), **close)
    torch.testing.assert_close(lib.fuse_heads_cuda(a, g, "decoupled"), lib.fuse_heads_torch(a, g, "decoupled"),
                               **close)
    rows = torch.randn(1, 2, 5)
    for args in [(rows, a, g, wa, wm, 1.0, 0.0, "gae"), (rows, a, None, None, None, 1.0, -0.5, "mean")]:
        torch.testing.assert_close(lib.row_update_cuda(*args), lib.update_torch(*args), **close)
    eye = torch.eye(5)[None].contiguous()
    torch.testing.assert_close(lib.matrix_update_cuda(eye, a, g, wa, None, 1.0, 0.25, "gae", False),
                               lib.update_torch(eye, a, g, wa, None, 1.0, 0.25, "gae"), **close)
    torch.testing.assert_close(lib.legrad_reduce_cuda(g[:, :, :1], 5), lib.legrad_reduce_torch(g[:, :, :1], 5),
                               **close)
    # float64 goes to the PyTorch path even on the CUDA kernel
    assert lib.fuse_heads_cuda(a.double(), g.double()).dtype == torch.float32
