"""The relevance pass through one attention on the flash path: the PyTorch twin
(``tokentm_fast.torch_ops.attention_relevance``) against a float64 oracle written out here, and the Triton
programs (``tokentm_fast.kernels.attention_relevance``, under the interpreter on the CPU) against the twin.

The oracle (``oracle``) is the LRP z-rule per contribution, with full ``(B, H, N, N, d)`` tensors: O = P V is
a sum of contributions P_ij V_jc, and the relevance R_O,ic is shared among them in proportion
(``P_ij V_jc · R_O,ic ⊘ O_ic``), half of each to the attention P_ij and half to the value V_jc; the attention's
relevance passes the softmax unchanged and is shared among the contributions Q_ic K_jc of Z_ij = Q_i · K_j the
same way, half to each factor. ``⊘`` is the safe division of the twin's docstring (``a / (b + 1e-9)``, 0 where
b = 0, the denominator 1e-9 where b + 1e-9 = 0), written out again here. Nothing here calls
``methods.lrp_rules`` or the twin to make an expected value.

Tolerances (``error_bound``): every comparison is elementwise against a first-order rounding bound of the two
computations, evaluated from the inputs in float64: the products' γ_m = m·u sums (u = 2⁻⁵³ or 2⁻²⁴), the
error of P = exp(scale·Z − ℓ) through its exponent, and the divisions by O and Z, which multiply the relative
error of Z by Σ_c |Q_ic K_jc| / |Z_ij| (the reason tiled and materialized float32 R_q, R_k differ by about
1e-4 at N = 197: issue 28). Entries where Z's rounding could reach Z itself have no finite bound and are not
compared; each test asserts that the bound is finite and small almost everywhere, so it is not vacuous.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import pytest
import torch

from tokentm_fast.kernels import triton_available
from tokentm_fast.torch_ops.attention_relevance import attention_relevance as twin

#: the suite's device (tests/conftest.py: ``--device`` / TOKENTM_TEST_DEVICE; CPU with the interpreter by default)
DEVICE = torch.device(os.environ.get("TOKENTM_TEST_DEVICE", "cpu"))
EPS = 1e-9  # the safe division's stabiliser (docs/methods.md §6.3)
U64, U32 = 2.0 ** -53, 2.0 ** -24
NAMES = ("r_q", "r_k", "r_v", "t")

needs_triton = pytest.mark.skipif(not triton_available(DEVICE.type),
                                  reason=f"the Triton kernels cannot run on {DEVICE.type} (CPU: TRITON_INTERPRET=1)")


# --------------------------------------------------------------------------- the oracle
def safe(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a ⊘ b`` literally: ``a / (b + 1e-9)``, the denominator 1e-9 where ``b + 1e-9 == 0``, 0 where b == 0
    (the denominator is formed in b's dtype)."""
    den = b + EPS
    den = torch.where(den == 0, torch.full_like(den, EPS), den)
    return torch.where(b == 0, torch.zeros_like(a), a / den)


def oracle(q, k, v, o, r_o, scale, row=None, do=None) -> Dict[str, Optional[torch.Tensor]]:
    """``r_q, r_k, r_v, t`` in float64 by the z-rule per contribution (module docstring), from full tensors."""
    q, k, v, o, r_o = (x.double() for x in (q, k, v, o, r_o))
    z = torch.einsum("bhic,bhjc->bhij", q, k)
    p = torch.softmax(scale * z, dim=-1)  # explicit: no ℓ from the forward
    # O_ic = Σ_j P_ij V_jc: contribution (i, j, c) gets P_ij V_jc · R_O,ic ⊘ O_ic
    part = p[..., None] * v[:, :, None, :, :] * safe(r_o, o)[:, :, :, None, :]  # (B, H, i, j, c)
    r_att = part.sum(-1) / 2  # half to P_ij
    r_v = part.sum(2) / 2  # half to V_jc
    # Z_ij = Σ_c Q_ic K_jc: contribution (i, j, c) gets Q_ic K_jc · R^A_ij ⊘ Z_ij
    part = q[:, :, :, None, :] * k[:, :, None, :, :] * safe(r_att, z)[..., None]
    out = {"r_q": part.sum(3) / 2, "r_k": part.sum(2) / 2, "r_v": r_v, "t": None}
    if row is not None:
        f = r_att if do is None else r_att * torch.einsum("bhic,bhjc->bhij", do.double(), v)
        out["t"] = torch.einsum("bi,bhij->bhj", row.double(), f.clamp_min(0))
    return out


def error_bound(q, k, v, o, lse, r_o, scale, u, row=None, do=None) -> Dict[str, Optional[torch.Tensor]]:
    """Elementwise first-order bound of |computed − exact| of one computation with unit roundoff ``u``
    (module docstring), from the inputs in float64 (P from the given ℓ, as both implementations form it)::

        δZ  ≤ d u M,  M_ij = Σ_c |Q_ic K_jc|          δP / P ≤ u (N + 4 + 3 (|scale Z| + |ℓ|)) + |scale| δZ
        δR^A ≤ (d + 2) u A + |R^A| (δP/P + u),     A_ij = P_ij Σ_c |S_O,ic V_jc| / 2
        δS_Z ≤ (δR^A + |S_Z| δZ) / (|Z + ε| − δZ) + 2 u |S_Z|     (∞ where δZ ≥ |Z + ε|; 0 where Z = 0 exactly)
        δR_Q,ic ≤ |Q_ic| / 2 Σ_j (δS_Z + (N + 2) u |S_Z|)_ij |K_jc|      (R_K likewise over i)
        δR_V,jc ≤ |V_jc| / 2 Σ_i P_ij (δP/P + (N + 4) u)_ij |S_O,ic|
        δt_j ≤ Σ_i |row_i| (δR^A |G| + |R^A| d u Σ_c |dO_ic V_jc| + (N + 2) u |R^A G|)_ij   (G = 1 without dO)

    S_O is formed with the safe division in the computations' own dtype (float32 for float32 / 16-bit
    inputs), as both implementations form it."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s_o = safe(r_o.to(acc), o.to(acc)).double()
    q, k, v, lse = (x.double() for x in (q, k, v, lse))
    n, d = q.shape[-2], q.shape[-1]
    z = q @ k.transpose(-1, -2)
    m = q.abs() @ k.abs().transpose(-1, -2)
    dz = d * u * m
    p = torch.exp(scale * z - lse[..., None])
    dp = u * (n + 4 + 3 * ((scale * z).abs() + lse.abs()[..., None])) + abs(scale) * dz  # relative
    ra = p * (s_o @ v.transpose(-1, -2)) / 2
    big_a = p * (s_o.abs() @ v.abs().transpose(-1, -2)) / 2
    dra = (d + 2) * u * big_a + ra.abs() * (dp + u)
    den = (z + EPS).abs()
    s_z = safe(ra, z)
    ds_z = (dra + s_z.abs() * dz) / (den - dz) + 2 * u * s_z.abs()
    ds_z = torch.where(dz >= den, torch.full_like(ds_z, float("inf")), ds_z)
    ds_z = torch.where(z == 0, torch.zeros_like(ds_z), ds_z)
    w = ds_z + (n + 2) * u * s_z.abs()
    out = {"r_q": q.abs() * (w @ k.abs()) / 2, "r_k": k.abs() * (w.transpose(-1, -2) @ q.abs()) / 2,
           "r_v": v.abs() * ((p * (dp + (n + 4) * u)).transpose(-1, -2) @ s_o.abs()) / 2, "t": None}
    if row is not None:
        if do is None:
            g, dg = torch.ones_like(ra), torch.zeros_like(ra)
        else:
            do = do.double()
            g, dg = do @ v.transpose(-1, -2), d * u * (do.abs() @ v.abs().transpose(-1, -2))
        f = dra * g.abs() + ra.abs() * dg + (n + 2) * u * (ra * g).abs()
        out["t"] = torch.einsum("bi,bhij->bhj", row.double().abs(), f)
    return out


def assert_within(got: Dict, want: Dict, bounds, name: str, finite_share: float = 0.95, rel_median: float = 1.0):
    """|got − want| ≤ Σ bounds elementwise where the bound is finite; the bound finite on ≥ ``finite_share`` of
    the entries and its median relative to |want| ≤ ``rel_median`` (not vacuous); ``want`` not all zero."""
    tol = sum(b[name] for b in bounds)
    a, w = got[name].double(), want[name].double()
    assert torch.isfinite(a).all(), name
    assert w.abs().max() > 0, f"{name}: vacuous comparison, the oracle is zero"
    finite = torch.isfinite(tol)
    assert finite.double().mean() >= finite_share, (name, finite.double().mean().item())
    nonzero = finite & (w != 0)
    assert (tol[nonzero] / w[nonzero].abs()).median() <= rel_median, name
    err = (a - w).abs()
    bad = finite & (err > tol)
    assert not bad.any(), (name, err[bad][:5], tol[bad][:5], w[bad][:5])


# --------------------------------------------------------------------------- inputs
def make_inputs(b, h, n, d, dtype, seed=0, rows=True, grads=True):
    """q, k, v as timm slices them from one qkv projection (strided, last dim contiguous), O and ℓ of the
    attention (float64, then O in the model dtype, ℓ float32), R_O float32 as a (B, N, H·d) tensor viewed per
    head (strided), a row (B, N) and dO (B, H, N, d) in the model dtype."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(b, n, 3, h, d, generator=g).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    s = (d ** -0.5) * q.double() @ k.double().transpose(-1, -2)
    lse = torch.logsumexp(s, -1)
    o = (torch.exp(s - lse[..., None]) @ v.double()).to(dtype)
    r_o = torch.randn(b, n, h, d, generator=g).transpose(1, 2)
    row = torch.rand(b, n, generator=g) if rows else None
    do = torch.randn(b, h, n, d, generator=g).to(dtype) if grads else None
    lse = lse.to(torch.promote_types(dtype, torch.float32))
    return dict(q=q, k=k, v=v, o=o, lse=lse, r_o=r_o, scale=d ** -0.5, row=row, do=do)


def _on(inputs, device, f64=False):
    return {k: (x.to(device, torch.float64 if f64 and x.is_floating_point() else x.dtype)
                if isinstance(x, torch.Tensor) else x) for k, x in inputs.items()}


def _twin(x, block=None):
    return dict(zip(NAMES, twin(x["q"], x["k"], x["v"], x["o"], x["lse"], x["r_o"], x["scale"], row=x["row"],
                                do=x["do"], block=block)))


def _bound(x, u):
    return error_bound(x["q"], x["k"], x["v"], x["o"], x["lse"], x["r_o"], x["scale"], u, x["row"], x["do"])


CASES = [  # (B, H, N, d): N ∤ 64 (the interpreter's tile), d = 40 a masked tail of BLOCK_D = 64
    (1, 2, 5, 16),
    (2, 1, 37, 40),
    (1, 2, 70, 64),
]
ROWS = [(False, False), (True, False), (True, True)]  # (row, dO): lrp; partial LRP's sum; transformer attribution


# --------------------------------------------------------------------------- (a) the twin against the oracle
@pytest.mark.parametrize("b,h,n,d", CASES)
@pytest.mark.parametrize("block", [None, 16])
def test_twin_equals_the_float64_oracle(b, h, n, d, block):
    """The twin in float64 (whole rows, and 16-row tiles) equals the z-rule oracle within the float64 rounding
    bound of both; with the transformer-attribution row, t's clamp matters (R^A ⊙ ∇A has both signs)."""
    x = _on(make_inputs(b, h, n, d, torch.float64, seed=n + d), "cpu", f64=True)
    got, want = _twin(x, block), oracle(**{k: x[k] for k in ("q", "k", "v", "o", "r_o", "scale", "row", "do")})
    bound = _bound(x, U64)
    for name in NAMES:
        assert_within(got, want, [bound, bound], name, rel_median=1e-10)
    z = x["q"] @ x["k"].transpose(-1, -2)
    ra = torch.softmax(x["scale"] * z, -1) * (safe(x["r_o"], x["o"]) @ x["v"].transpose(-1, -2)) / 2
    g = x["do"] @ x["v"].transpose(-1, -2)
    assert (ra * g).min() < 0 < (ra * g).max() and ra.min() < 0 < ra.max()


@pytest.mark.parametrize("rows,grads", ROWS)
def test_twin_row_variants(rows, grads):
    """t without a row is None; with a row and no dO it is partial LRP's Σ_i row_i max(R^A_ij, 0), with dO
    transformer attribution's Σ_i row_i max(R^A_ij ∇A_ij, 0) (oracle, float64 bound); R_Q, R_K, R_V do not
    depend on the variant (bit for bit)."""
    x = _on(make_inputs(2, 2, 37, 16, torch.float64, seed=3, rows=rows, grads=grads), "cpu", f64=True)
    got = _twin(x)
    want = oracle(**{k: x[k] for k in ("q", "k", "v", "o", "r_o", "scale", "row", "do")})
    bound = _bound(x, U64)
    assert (got["t"] is None) == (not rows)
    for name in NAMES if rows else NAMES[:3]:
        assert_within(got, want, [bound, bound], name, rel_median=1e-10)
    plain = _twin(dict(x, row=None, do=None))
    for name in NAMES[:3]:
        assert torch.equal(got[name], plain[name])


# --------------------------------------------------------------------------- (b) the Triton programs
@needs_triton
@pytest.mark.parametrize("b,h,n,d", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_twin(b, h, n, d, dtype):
    """The Triton programs equal the twin on the same float32 / bfloat16 tensors (both compute in float32)
    within twice the float32 rounding bound, with the transformer-attribution row; float32 outputs."""
    from tokentm_fast.kernels.attention_relevance import attention_relevance

    x = _on(make_inputs(b, h, n, d, dtype, seed=7 * n + d), DEVICE)
    got = dict(zip(NAMES, attention_relevance(x["q"], x["k"], x["v"], x["o"], x["lse"], x["r_o"], x["scale"],
                                              row=x["row"], do=x["do"])))
    assert all(got[k].dtype == torch.float32 and got[k].shape == (b, h, n, d) for k in NAMES[:3])
    assert got["t"].shape == (b, h, n) and got["t"].dtype == torch.float32
    ref = _twin(_on(x, "cpu"))
    bound = _bound(_on(x, "cpu"), U32)
    for name in NAMES:
        assert_within({k: v.cpu() for k, v in got.items()}, ref, [bound, bound], name, rel_median=1e-2)


@needs_triton
@pytest.mark.parametrize("rows,grads", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_row_variants(rows, grads, dtype):
    """Each ``ROW`` variant of the key program (no t; partial LRP's; transformer attribution's) against the
    twin, N = 70 over two key and two query tiles with masked tails, head width 40 (a masked BLOCK_D tail)."""
    from tokentm_fast.kernels.attention_relevance import attention_relevance

    x = _on(make_inputs(1, 2, 70, 40, dtype, seed=5, rows=rows, grads=grads), DEVICE)
    got = dict(zip(NAMES, attention_relevance(x["q"], x["k"], x["v"], x["o"], x["lse"], x["r_o"], x["scale"],
                                              row=x["row"], do=x["do"])))
    assert (got["t"] is None) == (not rows)
    ref, bound = _twin(_on(x, "cpu")), _bound(_on(x, "cpu"), U32)
    for name in NAMES if rows else NAMES[:3]:
        assert_within({k: v.cpu() for k, v in got.items() if v is not None}, ref, [bound, bound], name,
                      rel_median=1e-2)


# --------------------------------------------------------------------------- (c) exact zeros of O and Z
def zero_inputs(dtype=torch.float32):
    """Inputs whose O and Z have exact zeros with non-zero factors: keys 0 and 1 equal and V[:, c] = (a, −a, 0, …)
    make O[:, c] = 0 exactly (set so: it is the exact value), and q_0 = (1, 1, 0, …), k_2 = (1, −1, 0, …) make
    Z_02 = 0 exactly with q_0 ⊙ k_2 ≠ 0. Without the safe division's zeros, S_O[:, c] and S_Z,02 would be
    ~1e9 times their numerators and reach R_Q, R_K, R_V and t."""
    x = make_inputs(1, 2, 37, 16, torch.float32, seed=9)
    q, k, v = (x[n].contiguous() for n in ("q", "k", "v"))
    k[:, :, 1] = k[:, :, 0]
    v[:, :, :, 3] = 0
    v[:, :, 0, 3], v[:, :, 1, 3] = 0.75, -0.75
    q[:, :, 0] = 0
    q[:, :, 0, :2] = 1
    k[:, :, 2] = 0
    k[:, :, 2, 0], k[:, :, 2, 1] = 1, -1
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # ±1, ±0.75 and 0 are exact in every dtype
    s = x["scale"] * q.double() @ k.double().transpose(-1, -2)
    lse = torch.logsumexp(s, -1)
    o = torch.exp(s - lse[..., None]) @ v.double()
    o[..., 3] = 0  # exact: P_i0 = P_i1 and V_03 = −V_13
    return dict(x, q=q, k=k, v=v, o=o.to(dtype), lse=lse.to(torch.promote_types(dtype, torch.float32)),
                do=x["do"].to(dtype))


def _unsafe_oracle_r_q(x):
    """R_Q of the oracle with plain ``a / (b + 1e-9)`` (no zero rule): what a kernel without it would give."""
    q, k, v, o, r_o = (x[n].double() for n in ("q", "k", "v", "o", "r_o"))
    z = q @ k.transpose(-1, -2)
    ra = torch.softmax(x["scale"] * z, -1) * ((r_o / (o + EPS)) @ v.transpose(-1, -2)) / 2
    return q * ((ra / (z + EPS)) @ k) / 2


def test_exact_zeros_twin():
    """The twin (float32 and float64) on inputs with exact zeros of O and Z equals the oracle (safe division's
    0 there); the zero rule matters: without it R_Q would differ from the oracle by far more than the bound."""
    x32, x64 = zero_inputs(), zero_inputs(torch.float64)
    z = x32["q"] @ x32["k"].transpose(-1, -2)
    assert (x32["o"][..., 3] == 0).all() and (z[:, :, 0, 2] == 0).all()
    for x, u in ((x64, U64), (x32, U32)):
        want = oracle(**{k: x[k] for k in ("q", "k", "v", "o", "r_o", "scale", "row", "do")})
        got, bound = _twin(x), _bound(x, u)
        for name in NAMES:
            assert_within(got, want, [bound, bound], name, rel_median=1e-2)
    unsafe, b32 = _unsafe_oracle_r_q(x32), _bound(x32, U32)
    assert ((unsafe - want["r_q"]).abs() > 1e3 * b32["r_q"]).any()


def test_twin_logit_denominator_rounding_to_zero():
    """Z_01 = −1e-9 (float32: Z + 1e-9 rounds to 0 there, where the twin's fast division would give ±inf): the twin
    takes the denominator 1e-9 as the safe division defines, equal to the literal rule in float32 (full matrices,
    this file's ``safe``). Z's row 0 is exact in both (q_0 has one non-zero entry), so only the other rows'
    rounding differs: float32 products over d = 16 and N = 5 terms, well within 1e-4 of each tensor's largest
    entry, while the 1e-9 denominator's term in R_Q is checked to be of that tensor's size."""
    x = make_inputs(1, 1, 5, 16, torch.float32, seed=3, grads=False)
    q, k = x["q"].clone(), x["k"].clone()
    q[0, 0, 0] = 0
    q[0, 0, 0, 0] = -EPS
    k[0, 0, 1] = 0
    k[0, 0, 1, 0] = 1
    z = q @ k.transpose(-1, -2)
    assert z[0, 0, 0, 1] + EPS == 0                                       # float32
    s = x["scale"] * q.double() @ k.double().transpose(-1, -2)
    lse = torch.logsumexp(s, -1)
    o = (torch.exp(s - lse[..., None]) @ x["v"].double()).float()
    x = dict(x, q=q, k=k, o=o, lse=lse.float())
    got = _twin(x)
    p = torch.exp(x["scale"] * z - x["lse"][..., None])
    ra = p * (safe(x["r_o"], o) @ x["v"].transpose(-1, -2)) / 2
    s_z = safe(ra, z)
    want = {"r_q": q * (s_z @ k) / 2, "r_k": k * (s_z.transpose(-1, -2) @ q) / 2,
            "t": torch.einsum("bi,bhij->bhj", x["row"], ra.clamp_min(0))}
    for name, w in want.items():
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-4 * w.abs().max().item(), msg=name)
    term = (q[0, 0, 0, 0] * s_z[0, 0, 0, 1] * k[0, 0, 1, 0] / 2).abs()    # −1e-9 · R^A_01 / 1e-9 / 2
    assert term > 0.1 * want["r_q"].abs().max()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_zeros_kernel(dtype):
    """The Triton programs on the same inputs: finite, equal to the oracle within the float32 bound (the zero
    rule applied on load for S_O and in the tiles for S_Z)."""
    from tokentm_fast.kernels.attention_relevance import attention_relevance

    x = zero_inputs(dtype)
    want = oracle(**{k: x[k] for k in ("q", "k", "v", "o", "r_o", "scale", "row", "do")})
    xd = _on(x, DEVICE)
    got = dict(zip(NAMES, attention_relevance(xd["q"], xd["k"], xd["v"], xd["o"], xd["lse"], xd["r_o"],
                                              x["scale"], row=xd["row"], do=xd["do"])))
    bound = _bound(x, U32)
    for name in NAMES:
        assert_within({k: v.cpu() for k, v in got.items()}, want, [bound, bound], name, rel_median=1e-2)


@needs_triton
def test_kernel_denominator_rounding_to_zero():
    """O = −1e-9 (float32), where O + 1e-9 rounds to 0 in float32: the denominator is 1e-9, as the twin has it;
    the kernel's R_V row follows the twin's (≈ 1e9 R_O there), finite."""
    from tokentm_fast.kernels.attention_relevance import attention_relevance

    x = make_inputs(1, 1, 5, 16, torch.float32, seed=2, rows=False, grads=False)
    x["o"] = x["o"].clone()
    x["o"][0, 0, 1, 2] = -torch.tensor(EPS, dtype=torch.float32)
    assert (x["o"][0, 0, 1, 2] + EPS) == 0  # float32
    xd = _on(x, DEVICE)
    got = dict(zip(NAMES, attention_relevance(xd["q"], xd["k"], xd["v"], xd["o"], xd["lse"], xd["r_o"],
                                              x["scale"])))
    ref, bound = _twin(x), _bound(x, U32)
    for name in NAMES[:3]:
        assert_within({k: v.cpu() for k, v in got.items() if v is not None}, ref, [bound, bound], name,
                      rel_median=1e-2)
    assert ref["r_v"].abs().max() > 1e6 * x["r_o"].abs().max()  # the 1e-9 denominator was taken


# --------------------------------------------------------------------------- launches
class _Recorder:
    """Stand-in for an autotuned program: records the launch grid, runs nothing."""

    def __init__(self, grids, name):
        self.grids, self.name = grids, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append((self.name, grid({"BLOCK_M": 16, "BLOCK_N": 16, **kwargs})))
        return launch


def test_grid_second_axis_stays_within_cuda_limit(monkeypatch):
    """B·H > 65535: every launch's second grid axis ≤ 65535 and the launches cover every (image, head), for
    both programs; the outputs have the full shapes."""
    from tokentm_fast.kernels import attention_relevance as R

    grids = []
    for name in ("_relevance_kv_kernel", "_relevance_q_kernel"):
        monkeypatch.setattr(R, name, _Recorder(grids, name))
    b, h, n, d = 4100, 16, 5, 16  # B·H = 65600
    x = torch.zeros(1, 1, n, d).expand(b, h, n, d)  # zero strides: no memory
    lse = torch.zeros(1, 1, n).expand(b, h, n)
    row = torch.zeros(1, n).expand(b, n)
    r_q, r_k, r_v, t = R.attention_relevance(x, x, x, x, lse, x, 0.25, row=row, do=x)
    assert r_q.shape == r_k.shape == r_v.shape == (b, h, n, d) and t.shape == (b, h, n)
    for name in ("_relevance_kv_kernel", "_relevance_q_kernel"):
        got = [g for k, g in grids if k == name]
        assert all(1 <= g[1] <= 65535 for g in got) and sum(g[1] for g in got) == b * h, name


def test_triton_attention_carries_the_relevance_programs():
    """``triton_attention()``'s fourth field is this module's wrapper (the flash path's relevance), which takes a
    bias of the logits (BEiT's, in table form; tests/test_attention_kernels.py) only with the add rule's rule set,
    refusing it by name otherwise."""
    from tokentm_fast.kernels.attention import triton_attention
    from tokentm_fast.kernels.attention_relevance import attention_relevance
    from tokentm_fast.models.relative_bias import RelativePositionBias

    assert triton_attention().relevance is attention_relevance
    x = torch.zeros(1, 1, 5, 16)
    bias = RelativePositionBias(torch.zeros(3 * 3 + 3, 1), (2, 2), 1)
    for rules in (None, "z"):
        with pytest.raises(ValueError, match="bias of the logits needs the rule set"):
            attention_relevance(x, x, x, x, x[..., 0], x, 0.25, bias=bias, rules=rules)
