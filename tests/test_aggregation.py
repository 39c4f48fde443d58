"""The aggregation engine (tokentm_fast/aggregation.py, one layer of it in tokentm_fast/torch_ops/row_update.py): the row algorithm (docs/methods.md §3.1) equals the
full-matrix product (§3), on plain tensors; the engine step and the flash path's row state."""
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentm_fast.aggregation import GAE, ROLLOUT, aggregate_layers, finish_rows, initial_rows
from tokentm_fast.torch_ops.row_update import row_update


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


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layers=st.integers(1, 3), n=st.integers(4, 23),
       mode=st.sampled_from(["gae", "mean", "decoupled"]), lo=st.integers(0, 22), width=st.integers(1, 6))
def test_support_hint_changes_nothing(seed, layers, n, mode, lo, width):
    """Rows zero outside ``support``: reading only those rows of A and G gives the dense result."""
    attns, grads, w_attn, w_mlp, c0 = random_layers(seed, layers, 2, 3, n)
    lo = lo % n
    hi = min(n, lo + width)
    g = torch.Generator().manual_seed(seed)
    query = torch.zeros(2, n, dtype=torch.float64)
    query[:, lo:hi] = torch.rand(2, hi - lo, generator=g, dtype=torch.float64) + 0.1
    rows = initial_rows(query, full=False)
    for l in reversed(range(layers)):  # every row of A and G read
        rows = row_update(rows, attns[l], grads[l], w_attn[l], w_mlp[l], mode)
    dense = finish_rows(rows, c0)[:, 0]
    hinted = aggregate_layers(attns, grads, w_attn, w_mlp, query, c0, mode, support=slice(lo, hi))
    torch.testing.assert_close(hinted, dense, rtol=1e-12, atol=1e-14)
    # a CPU query gives its own support
    torch.testing.assert_close(aggregate_layers(attns, grads, w_attn, w_mlp, query, c0, mode), hinted,
                               rtol=0, atol=0)
    full = full_product(attns, grads, w_attn, w_mlp, c0, mode)
    torch.testing.assert_close(hinted, torch.einsum("bi,bij->bj", query, full), rtol=1e-10, atol=1e-12)
    # the hint really narrows the read: rows of A and G outside it are never used at the top layer
    poisoned = [a.clone() for a in attns]
    poisoned[-1][:, :, :lo] = float("nan")
    poisoned[-1][:, :, hi:] = float("nan")
    rows = row_update(query[:, None], poisoned[-1], grads[-1], w_attn[-1], w_mlp[-1], mode, support=slice(lo, hi))
    if mode != "decoupled" and (hi - lo) * 4 <= n:
        assert torch.isfinite(rows).all()


def test_support_must_be_a_step_one_slice():
    attns, grads, w_attn, w_mlp, _ = random_layers(0, 1, 1, 2, 8)
    rows = torch.zeros(1, 1, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="support must be a slice"):
        row_update(rows, attns[0], grads[0], 1.0, 0.0, "gae", support=[0])
    with pytest.raises(ValueError, match="step-1 slice"):
        row_update(rows, attns[0], grads[0], 1.0, 0.0, "gae", support=slice(0, 8, 2))


class _SyncTrap:
    """Makes ``Tensor.nonzero`` / ``.item`` / ``.tolist`` / ``.cpu`` / ``__bool__`` raise while
    ``torch_ops.row_update.row_update`` is on the stack (the host reads that would synchronise a GPU),
    and counts the calls of ``row_update`` seen there."""

    NAMES = ("nonzero", "item", "tolist", "cpu", "__bool__")

    def __init__(self, monkeypatch):
        self.calls = 0
        code = row_update.__code__

        def inside() -> bool:
            frame = sys._getframe(2)
            while frame is not None:
                if frame.f_code is code:
                    return True
                frame = frame.f_back
            return False

        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def trapped(self_, *args, _original=original, _name=name, **kwargs):
                if inside():
                    raise AssertionError(f"Tensor.{_name} (a host synchronisation on a GPU) inside row_update")
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, trapped)

    def profile(self, frame, event, arg):
        if event == "call" and frame.f_code is row_update.__code__:
            self.calls += 1


@pytest.mark.parametrize("method", ["tokentm", "gae"])
def test_row_update_in_backward_hooks_does_not_synchronise(monkeypatch, method):
    """The torch row update runs inside the backward hooks of an explain call without reading
    anything back to the host (on CUDA each read would stall the backward once per layer)."""
    import timm

    import tokentm_fast as tf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              depth=3).eval()
    images = torch.randn(2, 3, 32, 32)
    expected = tf.explain(model, images, method=method, target=1, backend="torch")
    trap = _SyncTrap(monkeypatch)
    sys.setprofile(trap.profile)
    try:
        got = tf.explain(model, images, method=method, target=1, backend="torch")
    finally:
        sys.setprofile(None)
    monkeypatch.undo()
    assert trap.calls >= 3, "row_update did not run in the explain call (the trap saw nothing)"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.abs().sum() > 0


def test_query_support():
    """The span of the non-zero columns of a host-side query; refused off the CPU."""
    from tokentm_fast.aggregation import query_support

    q = torch.zeros(2, 9)
    q[:, 0] = 1.0
    assert query_support(q) == slice(0, 1)
    q = torch.zeros(2, 9)
    q[:, 2:] = 1 / 7
    assert query_support(q) == slice(2, 9)
    q = torch.zeros(2, 9)
    q[0, 3], q[1, 6] = 1.0, 2.0  # a span over all images
    assert query_support(q) == slice(3, 7)
    assert query_support(torch.zeros(1, 9)) == slice(0, 0)
    with pytest.raises(ValueError, match="CPU tensor"):
        query_support(torch.zeros(1, 9, device="meta"))


# --------------------------------------------------------------------------- the engine step, once
def test_engine_step_on_rows_and_on_one_row():
    """``scale_rows`` / ``add_update`` are the two halves of docs/methods.md §3.1's step
    (``s = R ⊙ (1 + w_mlp)``, ``R = s + t ⊙ w_attn``), for (B, Q, N) rows and for one (B, N) row, with
    per-token weights or constants."""
    from tokentm_fast.torch_ops.row_update import add_update, scale_rows

    g = torch.Generator().manual_seed(3)
    rows = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    w_mlp, w_attn, t = (torch.rand(2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    s = scale_rows(rows, w_mlp)
    for q in range(3):
        torch.testing.assert_close(s[:, q], rows[:, q] * (1 + w_mlp), rtol=0, atol=0)
        torch.testing.assert_close(scale_rows(rows[:, q], w_mlp), s[:, q], rtol=0, atol=0)
    torch.testing.assert_close(add_update(s, t[:, None], w_attn)[:, 1], s[:, 1] + t * w_attn, rtol=0, atol=0)
    torch.testing.assert_close(add_update(s[:, 0], t, w_attn), s[:, 0] + t * w_attn, rtol=0, atol=0)
    # constants (rollout: w_mlp = -1/2 halves the rows)
    torch.testing.assert_close(scale_rows(rows, -0.5), rows / 2, rtol=0, atol=0)
    torch.testing.assert_close(add_update(rows, t[:, None], 1.0), rows + t[:, None], rtol=0, atol=0)


def _step_state(state, layer, t_heads):
    row = state.scaled_row(layer)
    state.update(layer, t_heads)
    return row


def test_row_state_runs_the_engine_step_top_down():
    """The flash path's row state: the same step as ``row_update`` (with t the head mean), top-down,
    and an error naming the layers when the backward reaches them in another order."""
    from tokentm_fast.aggregation import RowState

    g = torch.Generator().manual_seed(5)
    b, h, n = 2, 3, 6
    state = RowState(first=1, last=3)
    weights = {l: (torch.rand(b, n, generator=g), torch.rand(b, n, generator=g)) for l in (1, 2, 3)}
    state.weights.update(weights)
    r = torch.rand(b, n, generator=g)
    state.start(r)
    for l in (3, 2, 1):
        t = torch.rand(b, h, n, generator=g)
        s = r * (1 + weights[l][1])
        assert torch.equal(_step_state(state, l, t), s)
        r = s + t.mean(1) * weights[l][0]
        assert torch.equal(state.rows, r)
    assert state.next == 0 and not state.weights
    wrong = RowState(first=0, last=2)
    wrong.weights[1] = weights[1]
    with pytest.raises(RuntimeError, match=r"out of order \(layer 1, expected 2\)"):
        wrong.scaled_row(1)


def test_row_state_with_a_layer_choice_passes_the_other_blocks():
    """Blocks outside the choice get no row (their backward computes dQ, dK, dV only) and leave it as
    it is; the chosen ones update it in order, from the highest chosen block."""
    from tokentm_fast.aggregation import RowState

    b, h, n = 1, 2, 4
    state = RowState(first=0, last=3, chosen=[0, 2])
    state.weights.update({l: (torch.full((b, n), 2.0), torch.full((b, n), 1.0)) for l in (0, 2)})
    state.start(torch.ones(b, n))
    assert state.next == 2
    assert _step_state(state, 3, None) is None and torch.equal(state.rows, torch.ones(b, n))
    assert _step_state(state, 2, torch.ones(b, h, n)) is not None
    torch.testing.assert_close(state.rows, torch.full((b, n), 2.0 + 2.0))    # s = 1·2, r = s + 1·2
    assert state.next == 0
    assert _step_state(state, 1, None) is None and state.next == 0
    _step_state(state, 0, torch.zeros(b, h, n))
    torch.testing.assert_close(state.rows, torch.full((b, n), 8.0))           # s = 4·2, t = 0
    with pytest.raises(RuntimeError, match="out of order"):
        RowState(first=0, last=3, chosen=[0, 2]).scaled_row(0)
