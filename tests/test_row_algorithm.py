"""The row algorithm (spec §3.1) equals the full-matrix product (spec §3), on plain tensors."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentm_fast.aggregation import GAE, ROLLOUT, aggregate_layers, initial_rows, row_update


def full_product(attns, grads, w_attn, w_mlp, c0, mode):
    """Spec §3 literally: C = U^L ... U^1 C^0 with U = (I + diag w_mlp)(I + Ā diag w_attn)."""
    b, _, n, _ = attns[0].shape
    eye = torch.eye(n, dtype=torch.float64).expand(b, n, n)
    c = torch.diag_embed(c0) if c0 is not None else eye.clone()
    for a, g, wa, wm in zip(attns, grads, w_attn, w_mlp):
        if mode == "gae":
            a_bar = (a * g).clamp(min=0).mean(1)
        elif mode == "decoupled":
            a_bar = a.mean(1) * g.clamp(min=0).mean(1)
        else:
            a_bar = a.mean(1)
        wa = torch.full((b, n), wa, dtype=torch.float64) if isinstance(wa, float) else wa
        wm = torch.full((b, n), wm, dtype=torch.float64) if isinstance(wm, float) else wm
        c = (eye + torch.diag_embed(wm)) @ (eye + a_bar @ torch.diag_embed(wa)) @ c
    return c


def random_layers(seed, layers, b, h, n):
    g = torch.Generator().manual_seed(seed)
    attns = [torch.softmax(torch.randn(b, h, n, n, generator=g, dtype=torch.float64) * 2, -1) for _ in range(layers)]
    grads = [torch.randn(b, h, n, n, generator=g, dtype=torch.float64) for _ in range(layers)]
    w_attn = [torch.rand(b, n, generator=g, dtype=torch.float64) * 2 for _ in range(layers)]
    w_mlp = [torch.rand(b, n, generator=g, dtype=torch.float64) for _ in range(layers)]
    c0 = torch.rand(b, n, generator=g, dtype=torch.float64) + 0.5
    return attns, grads, w_attn, w_mlp, c0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layers=st.integers(1, 5), b=st.integers(1, 3), h=st.integers(1, 4),
       n=st.integers(2, 23), mode=st.sampled_from(["gae", "decoupled"]), q=st.integers(0, 22),
       use_c0=st.booleans())
def test_row_algorithm_equals_full_product(seed, layers, b, h, n, mode, q, use_c0):
    attns, grads, w_attn, w_mlp, c0 = random_layers(seed, layers, b, h, n)
    c0 = c0 if use_c0 else None
    q = q % n
    query = torch.zeros(b, n, dtype=torch.float64)
    query[:, q] = 1
    row = aggregate_layers(attns, grads, w_attn, w_mlp, query, c0, mode)
    full = full_product(attns, grads, w_attn, w_mlp, c0, mode)
    torch.testing.assert_close(row, full[:, q], rtol=1e-10, atol=1e-12)
    # starting from the identity, the same engine gives the whole matrix
    mat = aggregate_layers(attns, grads, w_attn, w_mlp, query, c0, mode, full=True)
    torch.testing.assert_close(mat, full, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layers=st.integers(1, 4), n=st.integers(2, 17))
def test_gae_and_rollout_are_engine_configurations(seed, layers, n):
    attns, grads, *_ = random_layers(seed, layers, 2, 3, n)
    eye = torch.eye(n, dtype=torch.float64)
    # GAE: R = R + Ā R, spec §4
    r = eye.expand(2, n, n).clone()
    for a, g in zip(attns, grads):
        r = r + (a * g).clamp(min=0).mean(1) @ r
    rows = initial_rows(eye[0].expand(2, n), full=True)
    for a, g in reversed(list(zip(attns, grads))):
        rows = row_update(rows, a, g, GAE.w_attn, GAE.w_mlp, GAE.fusion)
    torch.testing.assert_close(rows, r, rtol=1e-10, atol=1e-12)
    # Rollout: R = Â R with Â = ½ mean_h A + ½ I; rows still sum to 1
    r = eye.expand(2, n, n).clone()
    for a in attns:
        r = (0.5 * a.mean(1) + 0.5 * eye) @ r
    rows = initial_rows(eye[0].expand(2, n), full=True)
    for a in reversed(attns):
        rows = row_update(rows, a, None, ROLLOUT.w_attn, ROLLOUT.w_mlp, ROLLOUT.fusion)
    torch.testing.assert_close(rows, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, n, dtype=torch.float64))
