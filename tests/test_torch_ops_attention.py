"""``tokentm_fast.torch_ops.attention``: the flash formulation in PyTorch, the CPU fallback's O(N) path.

1. The three functions (forward, backward with the TokenTM column sums, the row programs) equal the
   full-matrix float64 equivalents (``tests/attention_torch.py``) for query blocks that do and do not
   divide N, every ``input_grads`` mode, rows over fewer queries than keys.
2. ``explain(backend="torch", attention="flash")`` equals the literal float64 reference on float64 models
   (the same arithmetic regrouped, in float64; both maps are returned in float32, each element rounded once
   (≤ 2⁻²⁴ relative), so they may differ by 2⁻²³ relative: ``F64_BOUND`` is twice that) and the materialized PyTorch path on float32 models (within
   the method's §7 bound), for every method the flash path serves, on every model family, with layer
   choices and several targets.
3. With blocks smaller than N, no tensor holds two token dimensions (any two dimensions in [N, N + 8]) or
   N² elements in one dimension: recorded with a ``TorchDispatchMode`` over whole explain calls.
4. ``attention="auto"`` on the PyTorch backend takes the flash twin once the materialized path would keep
   more than ``api.TORCH_FLASH_BYTES`` of attention probabilities, and the materialized path below.
"""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from attention_torch import attention_backward_torch, attention_forward_torch, attention_rows_torch
from model_families import CLASSIFIERS, FAMILIES, images, make_model, timm_tiny
from torch.utils._python_dispatch import TorchDispatchMode

import tokentm_fast as tf
import tokentm_fast.torch_ops.attention as ta
from tokentm_fast import api

#: the methods the flash path serves (with their default options)
#: the LRP relevance pass (refused on the distilled DeiT: its two classifier heads)
RELEVANCE_PASS = ("lrp", "partial_lrp", "transformer_attribution")
FLASH_METHODS = [m for m in tf.METHODS if tf.methods.get_method(m).flash_refusal(tf.methods.get_method(m).defaults)
                 is None]


#: float64 computations returned as float32 maps: one rounding each (see the module docstring)
F64_BOUND = 2.0 ** -22


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max())


def _informative(e: torch.Tensor) -> None:
    flat = e.flatten(1)
    assert torch.isfinite(flat).all() and (flat.std(1) > 0).all(), "vacuous: a constant map"


# --------------------------------------------------------------------------- 1. the functions
@pytest.mark.parametrize("n,block", [(37, 8), (37, 37), (50, 64), (29, 5), (41, None)])  # None: the fused CPU kernels
def test_functions_equal_the_full_matrix_equivalents(n, block):
    g = torch.Generator().manual_seed(n + (block or 0))
    b, h, d, scale = 2, 3, 16, 0.37
    q, k, v, do = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(4))
    row = torch.rand(b, n, generator=g, dtype=torch.float64)
    o, lse = ta.flash_forward(q, k, v, scale, block=block)
    o_ref, lse_ref = attention_forward_torch(q, k, v, scale)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-12)
    full = attention_backward_torch(q, k, v, lse_ref, do, scale, row=row)
    for got, want in zip(ta.flash_backward(q, k, v, o, lse, do, scale, row=row, block=block), full):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    dq, dk, dv, t = ta.flash_backward(q, k, v, o, lse, do, scale, input_grads="v", block=block)
    assert dq is None and dk is None and t is None
    torch.testing.assert_close(dv, full[2], rtol=0, atol=1e-11)
    dq, dk, dv, t = ta.flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=False, block=block)
    assert dq is None and dk is None and dv is None
    torch.testing.assert_close(t, full[3], rtol=0, atol=1e-11)
    assert ta.flash_backward(q, k, v, o, lse, do, scale, input_grads=False) == (None, None, None, None)
    torch.testing.assert_close(ta.attention_rows(row, scale, q=q, k=k, lse=lse, block=block),
                               attention_rows_torch(row, scale, q=q, k=k, lse=lse_ref), rtol=0, atol=1e-11)
    few = do[:, :, : n // 2]   # fewer query rows than keys (LeGrad's rows over dO and V)
    torch.testing.assert_close(ta.attention_rows(row[:, : n // 2], 1.0, do=few, v=v, block=block),
                               attention_rows_torch(row[:, : n // 2], 1.0, do=few, v=v), rtol=0, atol=1e-11)


@pytest.mark.parametrize("heads_per_tile", [2, 0])   # 0: a budget below one head's rows (MIN_BLOCK-row tiles)
def test_cpu_tiles_over_heads_and_rows_equal_the_full_matrix_equivalents(monkeypatch, heads_per_tile):
    """The default tiles (no ``block``: the fused kernels for dQ, dK, dV, tiles for t, the held dV and the rows)
    split the B·H = 6 heads in threes of two, or one head's N = 45 rows in MIN_BLOCK = 32 and 13."""
    n, b, h, d, scale = 45, 2, 3, 16, 0.29
    monkeypatch.setattr(ta, "CPU_TILE_BYTES", heads_per_tile * n * n * 8 or n * 8)
    assert ta.tile_shape(b * h, n, n, 8) == ((heads_per_tile, n) if heads_per_tile else (1, ta.MIN_BLOCK))
    g = torch.Generator().manual_seed(11 + heads_per_tile)
    q, k, v, do = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(4))
    row = torch.randn(b, n, generator=g, dtype=torch.float64)          # signed rows, as the row states may be
    o, lse = attention_forward_torch(q, k, v, scale)
    full = attention_backward_torch(q, k, v, lse, do, scale, row=row)
    _informative(full[3].flatten(1))
    for got, want in zip(ta.flash_backward(q, k, v, o, lse, do, scale, row=row), full):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    torch.testing.assert_close(ta.flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=False)[3],
                               full[3], rtol=0, atol=1e-11)
    torch.testing.assert_close(ta.flash_backward(q, k, v, o, lse, do, scale, input_grads="v")[2],
                               full[2], rtol=0, atol=1e-11)
    torch.testing.assert_close(ta.attention_rows(row, scale, q=q, k=k, lse=lse),
                               attention_rows_torch(row, scale, q=q, k=k, lse=lse), rtol=0, atol=1e-11)
    torch.testing.assert_close(ta.attention_rows(row[:, :40], 1.0, do=do[:, :, :40], v=v),
                               attention_rows_torch(row[:, :40], 1.0, do=do[:, :, :40], v=v), rtol=0, atol=1e-11)


def test_half_inputs_keep_their_dtype_and_accumulate_in_float32():
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 2, 40, 32, generator=g).to(torch.bfloat16) for _ in range(4))
    o, lse = ta.flash_forward(q, k, v, 0.2, block=16)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    o_ref, _ = attention_forward_torch(q.double(), k.double(), v.double(), 0.2)
    assert _max_rel(o.float(), o_ref) < 1e-2
    dq, dk, dv, t = ta.flash_backward(q, k, v, o, lse, do, 0.2, row=torch.ones(1, 40), block=16)
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16 and t.dtype == torch.float32
    with pytest.raises(ValueError, match="input_grads"):
        ta.flash_backward(q, k, v, o, lse, do, 0.2, input_grads="k")


def test_tile_shape_stays_within_its_budget():
    cpu, budget = ta.tile_shape, min(ta.BLOCK_BYTES, ta.CPU_TILE_BYTES)
    gs, rs = cpu(12, 4097, 4097, 4)                    # one head, as many rows as the cache budget holds
    assert (gs, rs) == (1, max(ta.MIN_BLOCK, budget // (4097 * 4))) and gs * rs * 4097 * 4 <= budget
    gs, rs = cpu(4 * 12, 197, 197, 4)                   # small N: every row of as many heads as fit
    assert rs == 197 and gs == min(48, budget // (197 * 197 * 4)) and gs * rs * 197 * 4 <= budget
    assert cpu(2, 10, 10, 4) == (2, 10)                 # everything in one tile
    assert cpu(64 * 16, 16385, 16385, 4, budget=1) == (1, ta.MIN_BLOCK)
    meta = torch.device("meta")                         # other devices: the memory budget alone
    assert ta.tile_shape(12, 4097, 4097, 4, meta) == (1, ta.BLOCK_BYTES // (4097 * 4))
    assert ta.tile_shape(48, 197, 197, 4, meta) == (48, 197)


@pytest.mark.parametrize("g,n_q,n_k,gs,rs", [(12, 4097, 4097, 1, 64), (48, 197, 197, 3, 197)])
def test_tiles_cover_every_group_and_row_once(monkeypatch, g, n_q, n_k, gs, rs):
    monkeypatch.setattr(ta, "CPU_TILE_BYTES", 3 * 197 * 197 * 4 if n_q == 197 else 64 * 4097 * 4)
    assert ta.tile_shape(g, n_q, n_k, 4) == (gs, rs)
    seen = torch.zeros(g, n_q, dtype=torch.int64)
    for gsl, rsl in ta._tiles(g, n_q, n_k, 4, torch.device("cpu"), None):
        assert gsl.stop - gsl.start <= gs and rsl.stop - rsl.start <= rs
        seen[gsl, rsl] += 1
    assert bool((seen == 1).all())


# --------------------------------------------------------------------------- 2. end to end
def _target(model, name: str, k: int = 0):
    if name in CLASSIFIERS:
        return k
    with torch.no_grad():
        dim = tf.models.adapt(model).forward(images(1)).shape[-1]   # the embedding the score reads
    return tf.cosine_similarity(torch.randn(dim, generator=torch.Generator().manual_seed(7 + k)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_flash_method_on_every_family_equals_the_reference_and_the_materialized_path(family):
    model = make_model(family)
    x = images(2)
    target = _target(model, family)
    m64, x64 = model.double(), x.double()
    # the distilled DeiT's two classifier heads are refused by the LRP relevance pass (tests/test_relevance_lrp.py)
    methods = [m for m in FLASH_METHODS if not (family == "hf_deit_teacher" and m in RELEVANCE_PASS)]
    for method in methods:
        ref = tf.explain(m64, x64, method, target=target, backend="reference")
        _informative(ref) if method != "attn_gradcam" else None   # Grad-CAM may clip to 0 on random heads
        e = tf.explain(m64, x64, method, target=target, backend="torch", attention="flash")
        assert _max_rel(e, ref) <= F64_BOUND, (family, method, _max_rel(e, ref))
    m32 = model.float()
    for method in methods:
        mat = tf.explain(m32, x, method, target=target, backend="torch", attention="materialized")
        e = tf.explain(m32, x, method, target=target, backend="torch", attention="flash")
        bound = max(1e-5, tf.methods.get_method(method).float32_tolerance)
        assert _max_rel(e, mat) <= bound or float((e - mat).abs().max()) <= 1e-7, (family, method)


@pytest.mark.parametrize("method,options", [("tokentm", {"start_layer": 1}), ("tokentm", {"layers": [0, 2]}),
                                            ("rollout", {"start_layer": -2}), ("legrad", {"start_layer": 0}),
                                            ("tokentm", {"use_necc": False, "init": "identity"})])
def test_layer_choices_and_options(method, options):
    model, x = timm_tiny(depth=3).double(), images(2).double()
    ref = tf.explain(model, x, method, target=1, backend="reference", **options)
    _informative(ref)
    e = tf.explain(model, x, method, target=1, backend="torch", attention="flash", **options)
    assert _max_rel(e, ref) <= F64_BOUND


def test_several_targets_equal_one_call_each():
    model, x = timm_tiny(depth=2), images(2)
    targets = torch.tensor([[0, 3], [2, 1]])
    for method in ("tokentm", "legrad", "attn_gradcam", "attcat", "conservative_lrp"):
        both = tf.explain(model, x, method, target=targets, backend="torch", attention="flash")
        assert both.shape[:2] == (2, 2)
        for k in range(2):
            one = tf.explain(model, x, method, target=targets[:, k], backend="torch", attention="flash")
            torch.testing.assert_close(both[:, k], one, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(both[:, 0], both[:, 1])


# --------------------------------------------------------------------------- 3. no N×N tensor
class TokenPairRecorder(TorchDispatchMode):
    """Flags every operator output with two dimensions in [N, N + slack] or one dimension ≥ N²."""

    def __init__(self, n: int, slack: int, skip: Tuple[int, ...]) -> None:
        super().__init__()
        self.n, self.slack, self.skip = n, slack, skip
        self.flagged: List[Tuple[str, Tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape) not in self.skip:
                near = [s for s in t.shape if self.n <= s <= self.n + self.slack]
                if len(near) >= 2 or any(s >= self.n * self.n for s in t.shape):
                    self.flagged.append((str(func), tuple(t.shape)))
        return out


def _recorded(model, x, n, **kwargs) -> List[Tuple[str, Tuple[int, ...]]]:
    rec = TokenPairRecorder(n, 8, skip=(tuple(x.shape),))
    with rec:
        tf.explain(model, x, backend="torch", attention="flash", **kwargs)
    return rec.flagged


def test_no_token_pair_tensor_on_the_flash_twin(monkeypatch):
    """N = 65 (128 px, patch 16, a class token); width 96, heads of 48, MLP 384, batch 2: no legitimate
    dimension lies in [65, 73] or reaches 65² = 4225. Query blocks of 16 rows (budget shrunk)."""
    monkeypatch.setattr(ta, "MIN_BLOCK", 16)
    monkeypatch.setattr(ta, "BLOCK_BYTES", 1)
    model = timm_tiny(depth=2, img_size=128, patch_size=16, embed_dim=96, num_heads=2, mlp_ratio=4.0)
    x = images(2, size=128)
    n = 65
    for method in FLASH_METHODS:
        assert not _recorded(model, x, n, method=method, target=1), method
    assert not _recorded(model, x, n, method="tokentm", target=torch.tensor([[0, 1], [2, 3]]), start_layer=1)
    assert not _recorded(model, x, n, method="legrad", target=2, start_layer=0)
    # the recorder is not vacuous: the materialized path keeps (B, H, N, N) probabilities
    rec = TokenPairRecorder(n, 8, skip=(tuple(x.shape),))
    with rec:
        tf.explain(model, x, "tokentm", target=1, backend="torch", attention="materialized")
    assert any(s[-2:] == (n, n) for _, s in rec.flagged)
    rec = TokenPairRecorder(n, 8, skip=())
    with rec:
        torch.zeros(2 * 2, n * n + 3)      # a flattened (B·H, N·N) buffer
        torch.zeros(2, n + 5, n + 1)       # one padded to the tile
    assert len(rec.flagged) == 2


# --------------------------------------------------------------------------- 4. dispatch
def test_auto_takes_the_flash_twin_above_the_budget(monkeypatch):
    model, x = timm_tiny(depth=2), images(2)
    explainer = tf.Explainer(model, "tokentm", backend="torch")
    need = api.materialized_bytes(explainer.vit, x)
    assert need == 2 * 2 * 3 * (16 + 1) ** 2 * 4                 # L·B·H·N²·4 (timm_tiny: 3 heads, 4×4 grid)
    assert explainer.attention_for(x, "torch") == "materialized"   # far below the default budget
    monkeypatch.setattr(api, "TORCH_FLASH_BYTES", need - 1)
    assert explainer.attention_for(x, "torch") == "flash"
    for method in ("lrp", "transformer_attribution"):              # the relevance pass too (its twin)
        assert tf.Explainer(model, method, backend="torch").attention_for(x, "torch") == "flash"
    assert tf.Explainer(model, "tokentm", backend="torch", full=True).attention_for(x, "torch") == "materialized"
    torch.testing.assert_close(tf.explain(model, x, "tokentm", target=1, backend="torch"),
                               tf.explain(model, x, "tokentm", target=1, backend="torch", attention="flash"))
    with pytest.raises(ValueError, match="reference"):
        tf.explain(model, x, "tokentm", backend="reference", attention="flash")


def test_auto_takes_the_flash_twin_for_lrp_and_partial_lrp_at_every_size():
    """lrp and partial LRP take the twin under the budget too (docs/methods.md §8: as fast or faster at N = 197); the
    other methods, transformer attribution among them, stay materialized there; ``attention=`` still forces."""
    model, x = timm_tiny(depth=2), images(2)
    assert api.materialized_bytes(tf.Explainer(model, "lrp").vit, x) < api.TORCH_FLASH_BYTES
    for method in tf.METHODS:
        want = "flash" if method in ("lrp", "partial_lrp") else "materialized"
        assert tf.Explainer(model, method, backend="torch").attention_for(x, "torch") == want, method
    forced = tf.Explainer(model, "lrp", backend="torch", attention="materialized")
    assert forced.attention_for(x, "torch") == "materialized"
    # measured on the CPU only: tensors elsewhere (here on the meta device) keep the byte rule
    assert tf.Explainer(model, "lrp", backend="torch").attention_for(x.to("meta"), "torch") == "materialized"
