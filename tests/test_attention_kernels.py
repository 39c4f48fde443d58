"""The flash attention kernels (``tokentm_fast.kernels.attention``) against their PyTorch
equivalents in float64 (``tests/attention_torch.py``), under Triton's interpreter, and against their
PyTorch twin (``tokentm_fast.torch_ops.attention``, the fast oracle of the model-level tests).

Inputs come from a ``qkv`` projection reshaped and permuted as timm does, so the
kernels read strided tensors; N is chosen off the tile sizes (37, 50, 197), head
widths 32, 64 and 80 (not a power of two), float32 and bfloat16.
"""
from __future__ import annotations

import os

import pytest
import torch
from attention_torch import attention_backward_torch, attention_forward_torch, attention_rows_torch

from tokentm_fast.kernels import triton_available

#: the suite's device (tests/conftest.py: ``--device`` / TOKENTM_TEST_DEVICE; CPU with the interpreter by default)
DEVICE = torch.device(os.environ.get("TOKENTM_TEST_DEVICE", "cpu"))
pytestmark = pytest.mark.skipif(not triton_available(DEVICE.type),
                                reason=f"the Triton kernels cannot run on {DEVICE.type} (CPU: TRITON_INTERPRET=1)")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
CASES = [  # (B, H, N, d, dtype)
    (2, 2, 37, 32, torch.float32),
    (2, 2, 50, 64, torch.bfloat16),
    (1, 2, 197, 64, torch.float32),
    (1, 2, 50, 80, torch.float32),
    (2, 1, 37, 32, torch.bfloat16),
    (1, 1, 37, 96, torch.float32),
    (1, 1, 37, 128, torch.bfloat16),
    (1, 2, 50, 64, torch.float16),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    assert b.norm() > 0, "vacuous comparison: the oracle is zero"
    return ((a - b).norm() / b.norm()).item()


def _qkv(b, h, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(DEVICE, dtype).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)  # strided views, last dim contiguous


@pytest.mark.parametrize("b,h,n,d,dtype", CASES)
def test_forward_and_backward_match_full_matrices(b, h, n, d, dtype):
    from tokentm_fast.kernels.attention import flash_backward, flash_forward

    q, k, v = _qkv(b, h, n, d, dtype)
    assert not q.is_contiguous()
    scale = d ** -0.5
    o, lse = flash_forward(q, k, v, scale)
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, h, n)
    o_ref, lse_ref = attention_forward_torch(q.double(), k.double(), v.double(), scale)
    assert _rel(o, o_ref) <= TOL[dtype]
    assert (lse.double() - lse_ref).abs().max() <= 1e-5 * lse_ref.abs().max()

    g = torch.Generator().manual_seed(1)
    do = torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype)
    row = torch.rand(b, n, generator=g).to(DEVICE)
    dq, dk, dv, t = flash_backward(q, k, v, o, lse, do, scale, row=row)
    ref = attention_backward_torch(q.double(), k.double(), v.double(), lse_ref, do.double(), scale, row.double())
    for name, got, want in zip(("dq", "dk", "dv", "t"), (dq, dk, dv, t), ref):
        assert _rel(got, want) <= TOL[dtype], name
    # P ⊙ dP has both signs: the clamp must matter, or the test could not tell max(·, 0) from nothing
    unclamped = attention_backward_torch(q.double(), k.double(), v.double(), lse_ref, do.double(), scale, None)
    p = torch.exp(scale * q.double() @ k.double().transpose(-1, -2) - lse_ref[..., None])
    dp = do.double() @ v.double().transpose(-1, -2)
    assert (p * dp).min() < 0 < (p * dp).max() and unclamped[3] is None


@pytest.mark.parametrize("b,h,n,d,dtype", CASES[:2])
def test_explanation_sums_alone_equal_the_full_backward(b, h, n, d, dtype):
    """The lowest explained layer computes only t (no dQ, dK, dV): same t, no gradients."""
    from tokentm_fast.kernels.attention import flash_backward, flash_forward

    q, k, v = _qkv(b, h, n, d, dtype, seed=3)
    o, lse = flash_forward(q, k, v, d ** -0.5)
    do = torch.randn_like(o)
    row = torch.rand(b, n, device=DEVICE)
    *_, t_full = flash_backward(q, k, v, o, lse, do, d ** -0.5, row=row)
    dq, dk, dv, t_only = flash_backward(q, k, v, o, lse, do, d ** -0.5, row=row, input_grads=False)
    assert dq is None and dk is None and dv is None
    torch.testing.assert_close(t_only, t_full, rtol=0, atol=0)
    dq, dk, dv, t_none = flash_backward(q, k, v, o, lse, do, d ** -0.5)
    assert t_none is None and dq is not None


class _NotLaunched:
    """Stand-in for a kernel the call must not launch."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} launched")


@pytest.mark.parametrize("n,d,dtype", [(n, d, dtype) for n in (5, 17) for d in (8, 16)
                                       for dtype in (torch.float32, torch.bfloat16)])
def test_value_gradient_alone_holds_the_attention_constant(monkeypatch, n, d, dtype):
    """``input_grads="v"`` (conservative LRP's attention: P held constant) gives dV = Pᵀ dO alone, equal to
    the full backward's dV and to ``softmax(scale·QKᵀ)ᵀ dO`` in float64; dq = dk = None, neither the δ kernel
    nor the dQ program runs, and with a row the column sums t are those of the full backward."""
    from tokentm_fast.kernels import attention as A

    b, h = 2, 2
    q, k, v = _qkv(b, h, n, d, dtype, seed=11)
    scale = d ** -0.5
    o, lse = A.flash_forward(q, k, v, scale)
    g = torch.Generator().manual_seed(12)
    do = torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype)
    row = torch.rand(b, n, generator=g).to(DEVICE)
    _, _, dv_full, t_full = A.flash_backward(q, k, v, o, lse, do, scale, row=row)

    with monkeypatch.context() as m:
        for name in ("_delta_kernel", "_flash_bwd_dq_kernel"):
            m.setattr(A, name, _NotLaunched(name))
        dq, dk, dv, t = A.triton_attention().backward(q, k, v, o, lse, do, scale, input_grads="v")
        assert dq is None and dk is None and t is None
        assert dv.dtype == dtype and dv.shape == (b, h, n, d)
        dq, dk, dv_row, t_row = A.flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads="v")
        assert dq is None and dk is None
    torch.testing.assert_close(dv, dv_full, rtol=0, atol=0)
    torch.testing.assert_close(dv_row, dv_full, rtol=0, atol=0)
    torch.testing.assert_close(t_row, t_full, rtol=0, atol=0)
    p = torch.softmax(scale * q.double() @ k.double().transpose(-1, -2), -1)
    assert _rel(dv, p.transpose(-1, -2) @ do.double()) <= TOL[dtype]
    with pytest.raises(ValueError, match="input_grads"):
        A.flash_backward(q, k, v, o, lse, do, scale, input_grads="q")


@pytest.mark.parametrize("b,h,n,d,dtype", CASES[:3])
def test_row_sums_against_probabilities_and_positive_gradients(b, h, n, d, dtype):
    from tokentm_fast.kernels.attention import attention_rows, flash_forward

    q, k, v = _qkv(b, h, n, d, dtype, seed=5)
    scale = d ** -0.5
    _, lse = flash_forward(q, k, v, scale)
    _, lse_ref = attention_forward_torch(q.double(), k.double(), v.double(), scale)
    row = torch.rand(b, n, device=DEVICE)
    got = attention_rows(row, scale, q=q, k=k, lse=lse)
    want = attention_rows_torch(row.double(), scale, q=q.double(), k=k.double(), lse=lse_ref)
    assert _rel(got, want) <= TOL[dtype]
    # rows of P sum to 1, so Σ_j t[j] = Σ_i row[i] for every head
    torch.testing.assert_close(got.sum(-1), row.sum(-1, keepdim=True).expand(b, h), rtol=1e-4, atol=1e-4)
    do = torch.randn(b, h, n, d).to(DEVICE, dtype)
    got = attention_rows(row, scale, do=do, v=v)
    want = attention_rows_torch(row.double(), scale, do=do.double(), v=v.double())
    assert _rel(got, want) <= TOL[dtype]


@pytest.mark.parametrize("b,h,n,d,dtype", CASES[:3] + [(1, 2, 50, 80, torch.float32)])
def test_the_pytorch_twin_is_a_fast_oracle(b, h, n, d, dtype):
    """The PyTorch twin (``tokentm_fast.torch_ops.attention``: the same formulation, tiled, on CPU tensors) as
    the kernels' oracle in their own dtype: forward, backward with the explanation sums, both row programs,
    within the dtype's tolerance (float32: two float32 computations of the same sums, 1e-5), tiles of 16 query
    rows so that the twin's key-side sums run over several tiles. The float64 full-matrix oracle above stays
    the oracle of the math; the twin is what the model-level tests compare the Triton flash path with
    (``tests/helpers.py: reference_pair``), where a float64 reference run costs more than the kernels."""
    from tokentm_fast.kernels.attention import attention_rows, flash_backward, flash_forward
    from tokentm_fast.torch_ops import attention as twin

    q, k, v = _qkv(b, h, n, d, dtype, seed=7)
    scale = d ** -0.5
    g = torch.Generator().manual_seed(8)
    do = torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype)
    row = torch.rand(b, n, generator=g).to(DEVICE)
    cpu = [t.cpu() for t in (q, k, v, do, row)]
    o, lse = flash_forward(q, k, v, scale)
    o_t, lse_t = twin.flash_forward(*cpu[:3], scale, block=16)
    assert _rel(o.cpu(), o_t) <= TOL[dtype] and _rel(lse.cpu(), lse_t) <= 1e-6
    got = flash_backward(q, k, v, o, lse, do, scale, row=row)
    want = twin.flash_backward(*cpu[:3], o_t, lse_t, cpu[3], scale, row=cpu[4], block=16)
    for name, a, w in zip(("dq", "dk", "dv", "t"), got, want):
        assert _rel(a.cpu(), w) <= TOL[dtype], name
    assert _rel(attention_rows(row, scale, q=q, k=k, lse=lse).cpu(),
                twin.attention_rows(cpu[4], scale, q=cpu[0], k=cpu[1], lse=lse_t, block=16)) <= TOL[dtype]
    assert _rel(attention_rows(row, scale, do=do, v=v).cpu(),
                twin.attention_rows(cpu[4], scale, do=cpu[3], v=cpu[2], block=16)) <= TOL[dtype]


# --------------------------------------------------------------------------- BEiT's relative position bias
def _written_bias(table: torch.Tensor, grid) -> torch.Tensor:
    """``B (H, N, N)`` float64 of a ``(R, H)`` table, the index rule written out token pair by token pair: patches
    i, j (row-major on the (gh, gw) grid, after the class token) read entry (yi − yj + gh − 1)(2gw − 1) +
    (xi − xj + gw − 1); the class token's query row R − 3, its key column R − 2, the corner R − 1."""
    gh, gw = grid
    r = (2 * gh - 1) * (2 * gw - 1) + 3
    n = 1 + gh * gw
    index = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            if i == 0 or j == 0:
                index[i, j] = r - 1 if i == j == 0 else (r - 3 if i == 0 else r - 2)
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, gw), divmod(j - 1, gw)
                index[i, j] = (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
    return table.double().cpu()[index].permute(2, 0, 1)


BIAS_CASES = [  # (B, H, grid, d, dtype): N = 37, 50, 37 (non-square grid, a head width that is not a power of two)
    (2, 2, (6, 6), 32, torch.float32),
    (2, 3, (7, 7), 64, torch.bfloat16),
    (1, 2, (4, 9), 80, torch.float32),
]


@pytest.mark.parametrize("impl", ["triton", "twin"])
@pytest.mark.parametrize("b,h,grid,d,dtype", BIAS_CASES)
def test_programs_with_a_bias_match_full_matrices(impl, b, h, grid, d, dtype):
    """The programs that form P with BEiT's bias read from its table (forward, dK/dV with the explanation sums,
    dQ, the held dV, the row sums against P) against float64 full matrices with the bias written out by the index
    rule (``_written_bias``) and autograd through softmax(scale·QKᵀ + B)V; the twin on tiles of 16 query rows.
    The bias matters: the unbiased forward is far from the biased one."""
    from tokentm_fast.kernels import attention as A
    from tokentm_fast.models.relative_bias import RelativePositionBias
    from tokentm_fast.torch_ops import attention as twin

    n = 1 + grid[0] * grid[1]
    q, k, v = _qkv(b, h, n, d, dtype, seed=21)
    g = torch.Generator().manual_seed(22)
    table = torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, h, generator=g) * 2.0
    do = torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype)
    row = torch.rand(b, n, generator=g)
    scale = d ** -0.5
    if impl == "triton":
        bias = RelativePositionBias(table.to(DEVICE), grid, 1)
        fwd, bwd, rows, kw = A.flash_forward, A.flash_backward, A.attention_rows, {}
        row = row.to(DEVICE)
    else:
        q, k, v, do = (t.cpu() for t in (q, k, v, do))
        bias = RelativePositionBias(table, grid, 1)
        fwd, bwd, rows, kw = twin.flash_forward, twin.flash_backward, twin.attention_rows, {"block": 16}

    dense = _written_bias(table, grid)
    q64, k64, v64 = (t.double().cpu().requires_grad_(True) for t in (q, k, v))
    p = torch.softmax(scale * q64 @ k64.transpose(-1, -2) + dense, -1)
    o_ref = p @ v64
    o_ref.backward(do.double().cpu())
    p = p.detach()
    dp = do.double().cpu() @ v64.detach().transpose(-1, -2)
    t_ref = torch.einsum("bi,bhij->bhj", row.double().cpu(), (p * dp).clamp(min=0))
    rows_ref = torch.einsum("bi,bhij->bhj", row.double().cpu(), p)

    o, lse = fwd(q, k, v, scale, bias=bias, **kw)
    assert _rel(o.cpu(), o_ref.detach()) <= TOL[dtype]
    assert _rel(fwd(q, k, v, scale, **kw)[0].cpu(), o_ref.detach()) > 0.1    # the bias matters
    dq, dk, dv, t = bwd(q, k, v, o, lse, do, scale, row=row, bias=bias, **kw)
    for name, got, want in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad), ("t", t, t_ref)):
        assert _rel(got.cpu(), want) <= TOL[dtype], name
    _, _, dv_held, _ = bwd(q, k, v, o, lse, do, scale, input_grads="v", bias=bias, **kw)
    assert _rel(dv_held.cpu(), p.transpose(-1, -2) @ do.double().cpu()) <= TOL[dtype]
    assert _rel(rows(row, scale, q=q, k=k, lse=lse, bias=bias, **kw).cpu(), rows_ref) <= TOL[dtype]


def test_biased_launches_choose_among_the_audited_configurations(monkeypatch):
    """The autotuners' pruning hook keeps, for a launch with BEiT's bias (HAS_BIAS), the table's entries less the
    ones whose biased programs spilled in the sm_90 audit (``BIAS_SPILLS``), and the whole entry without it."""
    import triton

    from tokentm_fast.kernels import attention as A

    monkeypatch.setattr(A, "interpreter_enabled", lambda: False)
    for (kind, cls, bd), spilled in A.BIAS_SPILLS.items():
        entries = A.CONFIG_TABLE[(kind, cls, bd)]
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in entries]
        ref = torch.empty(1, dtype=torch.float32 if cls == "32" else torch.bfloat16)

        def kept(**kw):
            return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    for c in A._pruner(kind)(configs, {"q_ptr": ref}, BLOCK_D=bd, **kw)]

        assert kept(HAS_BIAS=False) == entries
        assert kept(HAS_BIAS=True) == [e for e in entries if e not in spilled] != []
        assert set(spilled) <= set(entries)


@pytest.mark.parametrize("rules", ["ours", "classic"])
@pytest.mark.parametrize("b,h,grid,d,dtype", [BIAS_CASES[0], BIAS_CASES[2], (1, 2, (4, 4), 64, torch.bfloat16)])
def test_relevance_programs_with_a_bias_match_the_twin(rules, b, h, grid, d, dtype):
    """The relevance programs through BEiT's bias (P with the bias tile; R^A split between Z and B/scale by the add
    rule, ``"ours"`` with its per-image sums from the sums program) against the PyTorch twin in float64 (itself held
    to ``lrp_rules`` on full matrices in tests/test_relative_bias.py): within 1e-4 + 2·(the float32 twin's own
    error) per output, as tests/helpers.py's ``reference_pair`` bounds two float32 runs of the ill-conditioned
    divisions by Z; R_V and t (no division by Z) within the dtype's tolerance. Both rule sets differ (the split is
    exercised)."""
    from tokentm_fast.kernels.attention_relevance import attention_relevance
    from tokentm_fast.models.relative_bias import RelativePositionBias
    from tokentm_fast.torch_ops.attention import flash_forward
    from tokentm_fast.torch_ops.attention_relevance import attention_relevance as twin

    n = 1 + grid[0] * grid[1]
    q, k, v = _qkv(b, h, n, d, dtype, seed=31)
    g = torch.Generator().manual_seed(32)
    table = torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, h, generator=g) * 2.0
    r_o, do = (torch.randn(b, h, n, d, generator=g) for _ in range(2))
    row = torch.rand(b, n, generator=g)
    scale = d ** -0.5
    cpu = [t.cpu().float() for t in (q, k, v)]
    o, lse = flash_forward(*cpu, scale, bias=RelativePositionBias(table, grid, 1))
    o = o.to(dtype).float()                                  # O as the forward returns it in the model's dtype
    want = twin(*(t.double() for t in cpu), o.double(), lse.double(), r_o.double(), scale, row=row.double(),
                do=do.double(), bias=RelativePositionBias(table.double(), grid, 1), rules=rules)
    own = twin(*cpu, o, lse, r_o, scale, row=row, do=do, bias=RelativePositionBias(table, grid, 1), rules=rules)
    dev = [t.to(DEVICE) for t in (o.to(dtype), lse, r_o, do.to(dtype), row)]
    got = attention_relevance(q, k, v, dev[0], dev[1], dev[2], scale, row=dev[4], do=dev[3],
                              bias=RelativePositionBias(table.to(DEVICE), grid, 1), rules=rules)
    for name, a, w, t32 in zip(("r_q", "r_k", "r_v", "t"), got, want, own):
        bound = 1e-4 + 2 * _rel(t32, w) if name in ("r_q", "r_k") else TOL[dtype]
        assert _rel(a.cpu(), w) <= bound, (name, _rel(a.cpu(), w), bound)
    other = attention_relevance(q, k, v, dev[0], dev[1], dev[2], scale,
                                bias=RelativePositionBias(table.to(DEVICE), grid, 1),
                                rules="classic" if rules == "ours" else "ours")
    assert _rel(other[0].cpu(), want[0]) > 1e-3


def test_autograd_function_gives_the_gradients_of_plain_attention():
    """ExplanationAttention's dQ, dK, dV equal autograd through softmax(scale·QKᵀ)V, and its
    row state advances by s + mean_h(t) ⊙ w_attn with s = r ⊙ (1 + w_mlp)."""
    from tokentm_fast.aggregation import RowState
    from tokentm_fast.kernels.attention import triton_attention
    from tokentm_fast.paths import ExplanationAttention

    b, h, n, d = 2, 2, 37, 32
    q, k, v = (x.detach().clone().requires_grad_(True) for x in _qkv(b, h, n, d, torch.float32, seed=7))
    anchor = torch.zeros((), requires_grad=True)
    state = RowState(first=0, last=0)
    w_attn, w_mlp = torch.rand(b, n, device=DEVICE), torch.rand(b, n, device=DEVICE)
    state.weights[0] = (w_attn, w_mlp)
    out = ExplanationAttention.apply(q, k, v, anchor, d ** -0.5, 0, state, triton_attention())
    r0 = torch.rand(b, n, device=DEVICE)
    state.start(r0)
    do = torch.randn(b, h, n, d, device=DEVICE)
    grads = torch.autograd.grad(out, (q, k, v, anchor), do)

    q2, k2, v2 = (x.detach().clone().double().requires_grad_(True) for x in (q, k, v))
    a = torch.softmax(d ** -0.5 * q2 @ k2.transpose(-1, -2), -1)
    a.retain_grad()
    (a @ v2).backward(do.double())
    for got, want in zip(grads[:3], (q2.grad, k2.grad, v2.grad)):
        assert _rel(got, want) <= 1e-5
    assert grads[3].item() == 0.0
    s = r0.double() * (1 + w_mlp.double())
    t = torch.einsum("bi,bhij->bj", s, (a * a.grad).clamp_min(0)) / h
    assert _rel(state.rows, s + t * w_attn.double()) <= 1e-5
    assert state.next == -1


def _set_tf32(setting: str):
    """Switch float32 matmul TF32 through torch's legacy entry points (the new ``fp32_precision`` API is
    tried in a subprocess below: mixing the two makes torch 2.14 raise on the legacy getters)."""
    if setting == "precision_high":
        torch.set_float32_matmul_precision("high")
    elif setting == "precision_highest":
        torch.set_float32_matmul_precision("highest")
    else:
        torch.backends.cuda.matmul.allow_tf32 = setting == "allow_tf32"


@pytest.mark.parametrize("setting,allowed", [("default", False), ("allow_tf32", True), ("precision_high", True),
                                             ("precision_highest", False)])
def test_float32_products_follow_torchs_tf32_switch(monkeypatch, setting, allowed):
    """Float32 ``tl.dot``: TF32 only where torch's own switch allows it (``allow_tf32`` /
    ``set_float32_matmul_precision``). The library's wrappers pass ``ieee = not allowed`` and the kernels
    get ``IEEE`` for float32 inputs only; ``kernels._utils.tf32_allowed`` states the same rule."""
    from tokentm_fast.kernels import _utils
    from tokentm_fast.kernels import attention as A

    before_flag, before_precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    if setting != "default":
        _set_tf32(setting)
    try:
        seen = []
        for name in ("flash_forward", "flash_backward", "attention_rows"):
            monkeypatch.setattr(A, name, lambda *a, **kw: seen.append(kw["ieee"]))
        fwd, bwd, rows = tuple(A.triton_attention())[:3]
        q, k, v = _qkv(1, 1, 8, 16, torch.float32)
        fwd(q, k, v, 0.25)
        bwd(q, k, v, q, q[..., 0], q, 0.25)
        rows(q[:, 0, :, 0], 0.25, q=q, k=k, lse=q[..., 0])
        assert seen == [not allowed] * 3
        assert A.tf32_allowed() is allowed  # the rule the attention module's wrappers follow
        assert _utils.tf32_allowed() is allowed
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.empty(1, dtype=dtype, device=DEVICE)
            flags = A._dot_flags(t, ieee=not A.tf32_allowed())
            assert flags["IEEE"] is (dtype == torch.float32 and not allowed)
            assert flags["UPCAST"] is (DEVICE.type == "cpu" and dtype == torch.bfloat16)
    finally:
        torch.set_float32_matmul_precision(before_precision)
        torch.backends.cuda.matmul.allow_tf32 = before_flag


def test_tf32_rule_reads_torchs_new_precision_api():
    """``torch.backends.cuda.matmul.fp32_precision`` (torch ≥ 2.9; "none" inherits
    ``torch.backends.fp32_precision``) decides too, also after the legacy flag was used (then torch 2.14's
    legacy getters raise). In a subprocess: the suite's own torch state stays on the legacy API."""
    import subprocess
    import sys

    code = r"""
import warnings
warnings.simplefilter("ignore")
import torch
from tokentm_fast.kernels._utils import tf32_allowed
if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
    print("old torch"); raise SystemExit
out = [tf32_allowed()]
torch.backends.cuda.matmul.allow_tf32 = True          # legacy on
out.append(tf32_allowed())
torch.backends.cuda.matmul.fp32_precision = "ieee"    # new API off
out.append(tf32_allowed())
torch.backends.cuda.matmul.fp32_precision = "tf32"    # new API on (legacy getters now raise)
out.append(tf32_allowed())
torch.backends.cuda.matmul.fp32_precision = "none"    # inherit the global switch
torch.backends.fp32_precision = "tf32"
out.append(tf32_allowed())
torch.backends.fp32_precision = "ieee"
out.append(tf32_allowed())
print(out)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    if last == "old torch":
        pytest.skip("torch without fp32_precision")
    assert last == "[False, True, False, True, True, False]", last
