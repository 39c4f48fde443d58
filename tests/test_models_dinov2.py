"""Hugging Face DINOv2 (tokentm_fast/models/hf_dinov2.py, issue 29): ``Dinov2Model``,
``Dinov2WithRegistersModel`` and the two ``...ForImageClassification`` heads (class token ⊕ patch mean:
pooling ``"token_avg"``).

- A literal float64 oracle: the blocks written out here from the weights (``state_dict``), not through the
  adapter, equals the model's own forward, and its raw attention, rollout, GAE, TokenTM and attention
  Grad-CAM (docs/methods.md §2–§5 written out with full matrices) equal ``backend="reference"``.
- Every method on every backend and attention path against the reference within the §7 tolerances
  (``test_models.py``'s scheme: float32 maps within 1e-5; the signed sums and the relevance pass on float64
  copies, to the float32 rounding of the returned maps; Triton's against the torch map), on informative maps.
- timm ``vit_small_patch14_dinov2`` ↔ ``Dinov2Model`` with the same weights (tests/model_families.py
  converter): the same output and the same map for every method.
- No N×N tensor on the flash path (the flash path's recorder, tests/helpers.py).

The images are 40x32: a 5x4 grid, the position embedding interpolated from the 4x4 it was built for.
"""
from __future__ import annotations

import copy
import functools
import math

import literal_oracle
import model_families as mf
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FLASH_METHODS,
    FLOAT32_OUTPUT,
    N65,
    ShapeRecorder,
    assert_informative,
    attention_tile,
    float32_bound,
    n_by_n,
    reference_pair,
    rel_err_l2,
)
from model_families import assert_same, snapshot, triton_only

import tokentm_fast as tf
from tokentm_fast.capture import prepared_model
from tokentm_fast.methods import get_method, resolve_options
from tokentm_fast.methods.relevance import RelevancePass, head_rows
from tokentm_fast.models import adapt
from tokentm_fast.models.hf_dinov2 import HFDinov2
from tokentm_fast.paths import TORCH_KERNELS, Materialized
from tokentm_fast.reference import explain_reference

#: name -> hf_dinov2 keyword arguments
VARIANTS = {
    "model": {},
    "classifier": {"kind": "classifier"},
    "registers": {"registers": 2},
    "registers_classifier": {"kind": "classifier", "registers": 2},
}
SIZE = (40, 32)
GRID = (SIZE[0] // mf.DINO["patch"], SIZE[1] // mf.DINO["patch"])
#: the relevance pass (docs/methods.md §6.3), on every head ("token_avg": the classifier's input relevance split)
RELEVANCE_PASS = ("lrp", "partial_lrp", "transformer_attribution")


def make(variant: str, dtype=torch.float32):
    return mf.hf_dinov2(**VARIANTS[variant]).to(dtype)


def images(dtype=torch.float32, batch=2):
    """Two 40x32 images; seed 3: every variant has, per image, an output channel whose attention Grad-CAM map
    is not zeroed by its clamp (with seeds 1 and 2 one image of one variant has none)."""
    return mf.images(batch=batch, size=SIZE, seed=3).to(dtype)


def is_classifier(variant: str) -> bool:
    return "classifier" in variant


def target_for(variant: str):
    """The predicted class for a classifier; for an embedding ``out[:, 0] − ½ out[:, 1]`` (a score whose start
    relevance does not sum to 0, which the relevance pass's rescaled residuals would pass on as 0, §6.3)."""
    return None if is_classifier(variant) else (lambda out: out[:, 0] - 0.5 * out[:, 1])


# --------------------------------------------------------------------------- the literal oracle
def literal_forward(model, x: torch.Tensor):
    """The DINOv2 forward written out from ``model.state_dict()`` in float64: output ``(B, K)`` or ``(B, D)``,
    per block ``dict(x_in, attn, y, m, xt)`` (``attn (B, H, N, N)`` retains its gradient; ``xt`` = γ₁ ⊙
    o_proj(v_j), §2), X⁰ and the prefix count P. The position embedding is resized as transformers documents
    it (bicubic in float32; with registers antialiased), the registers inserted after the class token."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    cfg = model.config
    pre = next(p for p in ("dinov2.", "dinov2_with_registers.", "") if p + "layernorm.weight" in sd)
    heads, width, eps, patch = cfg.num_attention_heads, cfg.hidden_size, cfg.layer_norm_eps, cfg.patch_size
    d, regs = width // heads, getattr(cfg, "num_register_tokens", 0)
    x = x.double()
    b = x.shape[0]
    conv = pre + "embeddings.patch_embeddings.projection."
    patches = F.conv2d(x, sd[conv + "weight"], sd[conv + "bias"], stride=patch).flatten(2).transpose(1, 2)
    gh, gw = x.shape[2] // patch, x.shape[3] // patch
    pos = sd[pre + "embeddings.position_embeddings"][0]
    g0 = math.isqrt(pos.shape[0] - 1)
    grid = pos[1:].reshape(1, g0, g0, width).permute(0, 3, 1, 2)
    if (gh, gw) != (g0, g0):
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False,
                             antialias=bool(regs)).double()
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, width)])
    t = torch.cat([sd[pre + "embeddings.cls_token"].expand(b, 1, width), patches], 1) + pos
    if regs:
        t = torch.cat([t[:, :1], sd[pre + "embeddings.register_tokens"].expand(b, regs, width), t[:, 1:]], 1)
    x0 = t = t.requires_grad_(True)
    layers = []
    for i in range(cfg.num_hidden_layers):
        def w(name, i=i):
            return sd[f"{pre}encoder.layer.{i}.{name}"]

        def lin(u, name):
            return u @ w(name + ".weight").T + w(name + ".bias")

        def norm(u, name):
            return F.layer_norm(u, (width,), w(name + ".weight"), w(name + ".bias"), eps)

        z = norm(t, "norm1")
        q, k, v = (lin(z, f"attention.{c}_proj").reshape(b, -1, heads, d).transpose(1, 2) for c in "qkv")
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
        if attn.requires_grad:
            attn.retain_grad()
        merged = (attn @ v).transpose(1, 2).reshape(b, -1, width)
        y = t + w("layer_scale1.lambda1") * lin(merged, "attention.o_proj")
        m = w("layer_scale2.lambda1") * lin(F.gelu(lin(norm(y, "norm2"), "mlp.fc1")), "mlp.fc2")
        xt = w("layer_scale1.lambda1") * lin(v.transpose(1, 2).reshape(b, -1, width), "attention.o_proj")
        layers.append(dict(x_in=t, attn=attn, y=y, m=m, xt=xt))
        t = y + m
    out = F.layer_norm(t, (width,), sd[pre + "layernorm.weight"], sd[pre + "layernorm.bias"], eps)
    if "classifier.weight" in sd:
        pooled = torch.cat([out[:, 0], out[:, 1 + regs:].mean(1)], -1)
        out = pooled @ sd["classifier.weight"].T + sd["classifier.bias"]
    else:
        out = out[:, 0]
    return out, layers, x0, 1 + regs


def literal_maps(model, x, score) -> dict:
    """raw attention, rollout, GAE, TokenTM and attention Grad-CAM (tests/literal_oracle.py: docs/methods.md
    §2–§5 with full N×N matrices) over :func:`literal_forward`; ``score(out) -> (B,)``."""
    out, layers, x0, p = literal_forward(model, x)
    return literal_oracle.maps(out, layers, x0, p, score)


def identity_share(variant: str, method: str) -> float:
    """The constant that transformer attribution's identity term puts on every patch column of a "token_avg"
    head's map (its row weights ½ · 1/(N−P) there, docs/methods.md §6.3), taken off before a map is checked to be
    informative; 0 for the other maps."""
    return 0.5 / (GRID[0] * GRID[1]) if is_classifier(variant) and method == "transformer_attribution" else 0.0


def literal_score(variant: str, model, x):
    """The score the oracle differentiates, the one ``target_for`` gives ``explain``: the predicted class's
    logit, or ``out[:, 0] − ½ out[:, 1]``."""
    if not is_classifier(variant):
        return target_for(variant)
    with torch.no_grad():
        cls = model(pixel_values=x).logits.argmax(-1)
    return lambda out: out.gather(1, cls[:, None])[:, 0]


@functools.lru_cache(maxsize=None)
def gradcam_channels(variant: str) -> tuple:
    """Per image, the output channel (of the first ``CLASSES``) whose literal Grad-CAM map is largest: on a
    random model the clamp of §5 zeroes the map of many targets, the predicted class's too."""
    model, x = make(variant, torch.float64), images(torch.float64)
    norms = torch.stack([literal_maps(model, x, lambda out, c=c: out[:, c])["attn_gradcam"].norm(dim=1)
                         for c in range(mf.CLASSES)])                              # (classes, B)
    return tuple(norms.argmax(0).tolist())


def gradcam_tolerance(variant: str) -> torch.Tensor:
    """Per image, the float32 bound of attention Grad-CAM under :func:`gradcam_channels`' targets, as
    tests/test_targets.py::gradcam_tolerance derives it: 8·L·u (u = 2⁻²⁴) times the condition of the head
    sum, never below §7's 1e-5."""
    model, x = make(variant, torch.float64), images(torch.float64)
    channels = torch.tensor(gradcam_channels(variant))
    kappa = literal_maps(model, x, lambda out: out.gather(1, channels[:, None])[:, 0])["gradcam_condition"]
    return (8 * mf.DINO["depth"] * 2.0 ** -24 * kappa).clamp(min=1e-5)


def method_target(variant: str, method: str):
    """``target_for``, but for attention Grad-CAM the channels of :func:`gradcam_channels`."""
    if method != "attn_gradcam":
        return target_for(variant)
    chosen = torch.tensor(gradcam_channels(variant))
    return chosen if is_classifier(variant) else tf.class_logit(chosen)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_literal_forward_is_the_model(variant):
    """The written-out forward equals transformers' forward (float64, interpolated position embedding)."""
    model, x = make(variant, torch.float64), images(torch.float64)
    with torch.no_grad():
        out = model(pixel_values=x)
        want = out.logits if is_classifier(variant) else out.pooler_output
        got = literal_forward(model, x)[0].detach()
        assert want.std() > 1e-2
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()
        assert (adapt(model).forward(x) - want).abs().max() == 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_literal_maps_equal_the_reference(variant):
    """Raw attention, rollout, GAE, TokenTM and attention Grad-CAM of the literal forward equal
    ``explain(backend="reference")`` to the float32 rounding of its maps, on informative maps."""
    model, x = make(variant, torch.float64), images(torch.float64)
    maps = literal_maps(model, x, literal_score(variant, model, x))
    channels = torch.tensor(gradcam_channels(variant))
    maps["attn_gradcam"] = literal_maps(model, x, lambda out: out.gather(1, channels[:, None])[:, 0])["attn_gradcam"]
    del maps["gradcam_condition"]
    for method, want in maps.items():
        got = tf.explain(model, x, method, backend="reference", target=method_target(variant, method))
        assert got.shape == (2, *GRID), method
        assert_informative(want.reshape(got.shape))
        assert (rel_err_l2(got, want) <= FLOAT32_OUTPUT).all(), (method, rel_err_l2(got, want))


# --------------------------------------------------------------------------- every backend and path
#: (variant, backend, attention): torch for every variant; the interpreted Triton kernels (slow) for the plain
#: model and the classifier with registers, which between them hold every part the others have
CASES = [(v, "torch", a) for v in VARIANTS for a in ("materialized", "flash")] + [
    pytest.param(v, "triton", a, marks=triton_only)
    for v in ("model", "registers_classifier") for a in ("materialized", "flash")]


def _explain_on(model, x, method, backend, attention, device, target):
    on_device = copy.deepcopy(model).to(device)
    return tf.explain(on_device, x.to(device), method, backend=backend, attention=attention, target=target).cpu()


@pytest.mark.parametrize("variant,backend,attention", CASES)
def test_every_method_on_every_backend_and_path(variant, backend, attention, device):
    """§7: each float32 map within 1e-5 (relative L2 per image) of the float64 reference; the signed sums and
    the relevance pass on float64 copies within the float32 rounding of the maps (torch) or, on Triton (float32 only), within 1e-4 of
    the float32 torch map on the same path, as tests/test_models.py holds them (``helpers.reference_pair``).
    The relevance pass runs on both paths."""
    model, x = make(variant), images()
    model64, x64 = make(variant, torch.float64), images(torch.float64)
    target = target_for(variant)
    snap = snapshot(model)
    for method in tf.METHODS:
        target = method_target(variant, method)
        ref, got, tol = reference_pair(method, model, x, model64, x64, attention, target,
                                       lambda: _explain_on(model, x, method, backend, attention, device, target), backend, gradcam_tolerance(variant))
        assert got.shape[0] == 2 and got.shape[-2:] == ref.shape[-2:], method
        assert_informative(ref - identity_share(variant, method))
        assert (rel_err_l2(got, ref) <= tol).all(), (method, rel_err_l2(got, ref))
    assert_same(model, snap)


# --------------------------------------------------------------------------- the relevance pass on "token_avg"
CLASSIFIERS = [v for v in VARIANTS if is_classifier(v)]
#: fixed classes per image (not the prediction: the float32 bound's perturbed copies must keep the target)
RELEVANCE_TARGET = torch.tensor([1, 3])
#: two float64 computations of one relevance map (the pass and the reference): float64 rounding
F64_TOL = 1e-10


def _relevance(model, x, method, backend):
    """The map of ``method`` (lrp: the pixel map itself, ``upsample=True``), in the model's dtype."""
    kw = {"upsample": True} if method == "lrp" else {}
    return tf.explain(model, x, method, backend=backend, target=RELEVANCE_TARGET, **kw)


def _float64_maps(model, x, method):
    """(reference, torch pass) maps ``(B, ...)`` of a float64 model, kept in float64 (``explain`` returns
    float32): the entries ``explain`` calls, on the materialized path."""
    vit = adapt(model)
    options = resolve_options(method, {}, vit.num_layers)
    want = explain_reference(vit, x, method, RELEVANCE_TARGET, options)
    got = get_method(method).explain(vit, x, [RELEVANCE_TARGET], options, Materialized(TORCH_KERNELS))[0]
    return want.flatten(1), got.flatten(1)


@functools.lru_cache(maxsize=None)
def _float32_relevance_case(variant: str, method: str):
    """(float64 reference map, per-image float32 bound (B,)): tests/helpers.py's bound from the reference's
    measured condition, as tests/test_relevance_lrp.py derives it (three reference runs on perturbed copies)."""
    model, x = make(variant), images()
    want = _relevance(model.double(), x.double(), method, "reference")
    bound = float32_bound(lambda m, xx: _relevance(m, xx, method, "reference"), make(variant), x, mf.DINO["depth"])
    return want, bound


@pytest.mark.parametrize("variant", CLASSIFIERS)
@pytest.mark.parametrize("method", RELEVANCE_PASS)
def test_relevance_pass_on_the_token_avg_head(variant, method):
    """lrp, partial LRP and transformer attribution through ``classifier(concat(cls, patch mean))``: float64
    equals the literal reference (tokentm_fast/reference_relevance.py, its own rules) to 1e-10, float32 within
    the derived float32 bound; maps informative (transformer attribution less its identity share ½·1/(N−P)
    on every patch column, which the head's row weights put there)."""
    want, got = _float64_maps(make(variant, torch.float64), images(torch.float64), method)
    assert want.dtype == got.dtype == torch.float64
    assert_informative(want - identity_share(variant, method))
    assert (rel_err_l2(got, want) <= F64_TOL).all(), rel_err_l2(got, want)
    want32, bound = _float32_relevance_case(variant, method)
    for backend in ("reference", "torch"):
        got32 = _relevance(make(variant), images(), method, backend)
        assert got32.dtype == torch.float32
        assert (rel_err_l2(got32, want32) <= bound).all(), (backend, rel_err_l2(got32, want32), bound)


@pytest.mark.parametrize("variant", CLASSIFIERS)
def test_token_avg_relevance_is_conserved(variant):
    """"ours" with a one-hot start: what enters the last block (class row ⊕ patch rows, none on the
    registers) sums to 1 with both parts non-zero, and what reaches the pixels plus the shares of the position
    embedding and the prefix tokens is 1, up to the stabiliser's leak."""
    model, x = make(variant, torch.float64), images(torch.float64)
    vit = adapt(model)
    p = vit.num_prefix_tokens
    run = RelevancePass(vit, x, range(vit.num_layers), "ours", Materialized(TORCH_KERNELS), pixels=True)
    with prepared_model(vit) as handles, torch.no_grad():
        output = run.forward(handles)
        r, _ = run.head(F.one_hot(RELEVANCE_TARGET, output.shape[-1]).double())
        ones = torch.ones(2, dtype=torch.float64)
        torch.testing.assert_close(r.sum((1, 2)), ones, rtol=0, atol=1e-6)
        cls_part, patch_part = r[:, 0].sum(-1), r[:, p:].sum((1, 2))
        assert (cls_part.abs() > 0.05).all() and (patch_part.abs() > 0.05).all(), (cls_part, patch_part)
        if p > 1:                                                      # registers: outside the mean
            assert r[:, 1:p].abs().max() == 0
        for l in reversed(range(vit.num_layers)):
            r, _ = run.block(l, r)
        pixels, shares = run.pixels(r)
    assert_informative(pixels)
    total = pixels.sum((1, 2)) + shares["position"] + shares["prefix"]
    torch.testing.assert_close(total, ones, rtol=0, atol=1e-6)


def test_token_avg_head_rows():
    """partial LRP's and transformer attribution's row weights on a "token_avg" head (docs/methods.md §6.3):
    ½ on the class row, ½ spread evenly over the patch rows, none on the registers."""
    vit = adapt(make("registers_classifier"))
    n = 3 + 20
    want = torch.zeros(2, n, dtype=torch.float64)
    want[:, 0] = 0.5
    want[:, 3:] = 0.5 / 20
    assert torch.equal(head_rows(vit, 2, n, torch.float64, "cpu"), want)


# --------------------------------------------------------------------------- the adapter's parts
def test_adapter_layout():
    """Prefix tokens (class token, registers), poolings, outputs; the "token_avg" head through the adapter is
    the model's classifier."""
    layouts = {name: adapt(make(name)) for name in VARIANTS}
    assert all(type(v) is HFDinov2 for v in layouts.values())
    assert {n: (v.num_prefix_tokens, v.pooling, v.num_classes) for n, v in layouts.items()} == {
        "model": (1, "token", None), "classifier": (1, "token_avg", mf.CLASSES),
        "registers": (3, "token", None), "registers_classifier": (3, "token_avg", mf.CLASSES)}
    vit = layouts["registers_classifier"]
    tokens = torch.randn(2, 3 + 20, mf.DINO["width"])
    pooled = vit.pool_tokens(tokens)
    assert torch.equal(pooled, torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], -1))
    with torch.no_grad():
        normed = vit.final_norm(tokens)
        want = vit.model.classifier(torch.cat([normed[:, 0], normed[:, 3:].mean(1)], -1))
        assert torch.equal(vit.head(tokens), want)
        v = torch.randn(2, mf.DINO["width"])       # the head of tokens that all equal v
        assert (vit.pooled_head(v) - vit.head(v[:, None].expand(2, 23, -1))).abs().max() <= 1e-6


def test_image_size_and_refusals():
    vit = adapt(make("model"))
    assert vit.check_image_size(40, 32) == (5, 4)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tf.explain(vit.model, torch.randn(1, 3, 36, 32), "rollout")
    swiglu = mf.hf_dinov2(use_swiglu_ffn=True)
    with pytest.raises(ValueError, match="SwiGLU"):
        tf.explain(swiglu, images(), "lrp", target=target_for("model"))
    e = tf.explain(swiglu, images(), "tokentm", target=target_for("model"))   # the other methods run
    assert_informative(e)


# --------------------------------------------------------------------------- timm ↔ Hugging Face
def test_timm_dinov2_weights_give_the_same_maps():
    """timm ``vit_small_patch14_dinov2`` (small config, native 4x4 grid: the two libraries' interpolations
    differ, so each runs at the grid it was built for) and ``Dinov2Model`` with its weights: the same output
    and, for every method on the reference and torch backends, the same map (float64 models; to the float32 rounding of the maps)."""
    src = mf.timm_dinov2().double()
    dst = mf.timm_to_hf_dinov2(src).double()
    x = mf.images().double()
    with torch.no_grad():
        want = src(x)
        assert want.std() > 1e-2
        assert (adapt(dst).forward(x) - want).abs().max() <= 1e-12 * want.abs().max()
    # attention Grad-CAM: per image the output channel whose map its clamp leaves largest (a choice of input)
    norms = torch.stack([tf.explain(src, x, "attn_gradcam", backend="reference", target=tf.class_logit(c))
                         .flatten(1).norm(dim=1) for c in range(mf.CLASSES)])
    gradcam = tf.class_logit(norms.argmax(0))
    for method in tf.METHODS:
        target = gradcam if method == "attn_gradcam" else target_for("model")
        for backend in ("reference", "torch"):
            e = tf.explain(src, x, method, backend=backend, target=target)
            assert_informative(e)
            got = tf.explain(dst, x, method, backend=backend, target=target)
            assert (rel_err_l2(got, e) <= FLOAT32_OUTPUT).all(), (method, backend)


# --------------------------------------------------------------------------- no N×N on the flash path
def _n65_dinov2(kind: str):
    """``helpers.N65`` sizes as a DINOv2: 64 px images, 8x8 patches, one class token: N = 65."""
    return mf.hf_dinov2(kind=kind, hidden_size=N65["width"], num_attention_heads=N65["heads"],
                        num_hidden_layers=N65["depth"], mlp_ratio=N65["mlp"] // N65["width"],
                        image_size=N65["size"], patch_size=N65["patch"])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
@pytest.mark.parametrize("kind", ["model", "classifier"])
def test_no_n_by_n_tensor_on_the_flash_path(kind, backend, device, monkeypatch):
    """Every flash method through both DINOv2 heads (two targets per image) on each backend's flash path:
    no recorded tensor could hold an N×N matrix (the flash path's recorder, tests/helpers.py and criterion; the
    PyTorch twin's blocks held to 64 query rows, fewer than N)."""
    from tokentm_fast.torch_ops import attention

    monkeypatch.setattr(attention, "BLOCK_BYTES", 1)
    model = copy.deepcopy(_n65_dinov2(kind)).to(device)
    x = torch.randn(2, 3, N65["size"], N65["size"], generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.tensor([[0, 1], [2, 3]]) if kind == "classifier" else [tf.class_logit(0), tf.class_logit(3)]
    methods = FLASH_METHODS if backend == "torch" else ["tokentm", "legrad", "attcat"]
    flagged = {}
    for method in methods:
        with ShapeRecorder() as rec:
            out = tf.explain(model, x, method, backend=backend, attention="flash", target=targets)
        assert len(rec.shapes) > 50, "the recorder saw nothing: the test would be vacuous"
        assert torch.isfinite(torch.as_tensor(out)).all()
        flagged[method] = n_by_n(rec.shapes, 65, attention_tile(device), tuple(x.shape))[:5]
    assert not any(flagged.values()), flagged
