"""timm ``Eva`` / EVA-02 (tokentm_fast/models/timm_eva.py, issue 29): rotary position embedding on q and k
inside the attention, SwiGLU MLP, sub-LayerNorms, LayerScale parameters, ``F.linear`` on the fused qkv.

- A literal float64 oracle: the blocks written out here from the weights (``state_dict`` and the model's
  RoPE sin / cos table), RoPE and SwiGLU by their definitions, equals the model's forward; its raw
  attention, rollout, GAE, TokenTM and attention Grad-CAM (tests/literal_oracle.py) equal
  ``backend="reference"`` — so the kernels, which get the rotated q and k from the call site, are held to
  the rotated logits.
- Every method on every backend and attention path against the reference within the §7 tolerances, as
  tests/test_models_dinov2.py holds them; the LRP relevance pass on the plain Eva (no RoPE, two-layer MLP, the
  attention's sub-LayerNorm) against the reference, and refused with the reason on RoPE / SwiGLU.
- No N×N tensor on the flash path (the flash path's recorder, tests/helpers.py).
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
    n_by_n,
    reference_pair,
    rel_err_l2,
)
from model_families import EVA, EVA_VARIANTS, assert_same, snapshot, triton_only

import tokentm_fast as tf
from tokentm_fast.models import adapt
from tokentm_fast.models.timm_eva import TimmEva

RELEVANCE_PASS = ("lrp", "partial_lrp", "transformer_attribution")
GRID = (EVA["size"] // EVA["patch"],) * 2


def make(variant: str, dtype=torch.float32):
    return mf.timm_eva(variant).to(dtype)


def images(dtype=torch.float32):
    return mf.images().to(dtype)


def has_rope_or_swiglu(variant: str) -> bool:
    return variant.startswith("eva02")


def methods_for(variant: str) -> tuple:
    return tuple(m for m in tf.METHODS if not (has_rope_or_swiglu(variant) and m in RELEVANCE_PASS))


# --------------------------------------------------------------------------- the literal oracle
def _rotate_pairs(t: torch.Tensor) -> torch.Tensor:
    """RoPE's interleaved quarter turn: (t₀, t₁, t₂, t₃, …) → (−t₁, t₀, −t₃, t₂, …)."""
    out = torch.empty_like(t)
    out[..., 0::2] = -t[..., 1::2]
    out[..., 1::2] = t[..., 0::2]
    return out


def _rope(t: torch.Tensor, table: torch.Tensor, p: int) -> torch.Tensor:
    """RoPE on the patch rows of ``t (B, H, N, d)``: ``t cos + quarter_turn(t) sin`` with the table's sin and
    cos halves ``(N − P, d)`` each; the P prefix rows unrotated."""
    sin, cos = table.double().chunk(2, -1)
    patches = t[:, :, p:]
    return torch.cat([t[:, :, :p], patches * cos + _rotate_pairs(patches) * sin], dim=2)


def literal_forward(model, x: torch.Tensor):
    """The Eva forward written out from ``model.state_dict()`` in float64 (output, per block
    ``dict(x_in, attn, y, m, xt)``, X⁰, P): fused qkv with the q / v biases, RoPE, softmax, the sub-LayerNorm
    on the merged heads, proj, γ₁; LN₂, SwiGLU (SiLU(x W_g) ⊙ x W_x, LayerNorm, W₂) or fc1, GELU, LayerNorm,
    fc2, γ₂; final norm, class token or patch mean, fc norm, head."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    width, heads = EVA["width"], EVA["heads"]
    d, eps = width // heads, model.blocks[0].norm1.eps
    p = model.num_prefix_tokens
    x = x.double()
    b = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=EVA["patch"])
    t = t.flatten(2).transpose(1, 2)
    prefix = [sd[k].expand(b, -1, -1) for k in ("cls_token", "reg_token") if k in sd]
    t = torch.cat(prefix + [t], 1) + sd["pos_embed"]
    table = model.rope.get_embed() if model.rope is not None else None
    x0 = t = t.requires_grad_(True)
    layers = []

    def norm(u, key):
        return F.layer_norm(u, (u.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], eps) if key + ".weight" in sd else u

    def lin(u, key):
        return u @ sd[key + ".weight"].T + sd[key + ".bias"]

    for i in range(len(model.blocks)):
        pre = f"blocks.{i}."
        z = norm(t, pre + "norm1")
        bias = torch.cat([sd[pre + "attn.q_bias"], torch.zeros(width, dtype=torch.float64), sd[pre + "attn.v_bias"]])
        q, k, v = (z @ sd[pre + "attn.qkv.weight"].T + bias).reshape(b, -1, 3, heads, d).permute(2, 0, 3, 1, 4)
        if table is not None:
            q, k = _rope(q, table, p), _rope(k, table, p)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
        if attn.requires_grad:
            attn.retain_grad()

        def attn_out(u, pre=pre):
            return sd[pre + "gamma_1"] * lin(norm(u, pre + "attn.norm"), pre + "attn.proj")

        y = t + attn_out((attn @ v).transpose(1, 2).reshape(b, -1, width))
        h = norm(y, pre + "norm2")
        if pre + "mlp.fc1_g.weight" in sd:
            h = F.silu(lin(h, pre + "mlp.fc1_g")) * lin(h, pre + "mlp.fc1_x")
        else:
            h = F.gelu(lin(h, pre + "mlp.fc1"))
        m = sd[pre + "gamma_2"] * lin(norm(h, pre + "mlp.norm"), pre + "mlp.fc2")
        layers.append(dict(x_in=t, attn=attn, y=y, m=m, xt=attn_out(v.transpose(1, 2).reshape(b, -1, width))))
        t = y + m
    out = norm(t, "norm")
    out = out[:, 0] if model.global_pool == "token" else out[:, p:].mean(1)
    return lin(norm(out, "fc_norm"), "head"), layers, x0, p


def literal_maps(variant: str, score) -> dict:
    model, x = make(variant, torch.float64), images(torch.float64)
    out, layers, x0, p = literal_forward(model, x)
    query = None
    if model.cls_token is None:   # §1: the mean over the pooled rows
        query = torch.zeros(x0.shape[:2], dtype=torch.float64)
        query[:, p:] = 1.0 / (x0.shape[1] - p)
    return literal_oracle.maps(out, layers, x0, p, score, query)


def predicted(variant: str) -> torch.Tensor:
    with torch.no_grad():
        return make(variant, torch.float64)(images(torch.float64)).argmax(-1)


@functools.lru_cache(maxsize=None)
def gradcam_channels(variant: str) -> tuple:
    """Per image, the class whose literal Grad-CAM map is largest (the clamp of §5 zeroes many)."""
    norms = torch.stack([literal_maps(variant, lambda out, c=c: out[:, c])["attn_gradcam"].norm(dim=1)
                         for c in range(mf.CLASSES)])
    return tuple(norms.argmax(0).tolist())


def gradcam_tolerance(variant: str) -> torch.Tensor:
    """tests/test_targets.py::gradcam_tolerance's float32 bound: 8·L·u times the head sum's condition, ≥ 1e-5."""
    chosen = torch.tensor(gradcam_channels(variant))
    kappa = literal_maps(variant, lambda out: out.gather(1, chosen[:, None])[:, 0])["gradcam_condition"]
    return (8 * EVA["depth"] * 2.0 ** -24 * kappa).clamp(min=1e-5)


def target_for(variant: str, method: str):
    return torch.tensor(gradcam_channels(variant)) if method == "attn_gradcam" else None


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_literal_forward_is_the_model(variant):
    model, x = make(variant, torch.float64), images(torch.float64)
    with torch.no_grad():
        want = model(x)
        got = literal_forward(model, x)[0]
        assert want.std() > 1e-2
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()
        assert (adapt(model).forward(x) - want).abs().max() == 0


def test_the_oracle_rotates():
    """RoPE matters here: the oracle without it is another function (so its maps could not pass by chance)."""
    model, x = make("eva02", torch.float64), images(torch.float64)
    with torch.no_grad():
        want = model(x)
        rope, model.rope = model.rope, None
        try:
            unrotated = literal_forward(model, x)[0]
        finally:
            model.rope = rope
    assert (unrotated - want).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_literal_maps_equal_the_reference(variant):
    model, x = make(variant, torch.float64), images(torch.float64)
    cls = predicted(variant)
    want = literal_maps(variant, lambda out: out.gather(1, cls[:, None])[:, 0])
    chosen = torch.tensor(gradcam_channels(variant))
    want["attn_gradcam"] = literal_maps(variant, lambda out: out.gather(1, chosen[:, None])[:, 0])["attn_gradcam"]
    del want["gradcam_condition"]
    for method, e in want.items():
        got = tf.explain(model, x, method, backend="reference", target=target_for(variant, method))
        assert got.shape == (2, *GRID), method
        assert_informative(e.reshape(got.shape))
        assert (rel_err_l2(got, e) <= FLOAT32_OUTPUT).all(), (method, rel_err_l2(got, e))


# --------------------------------------------------------------------------- every backend and path
PATHS = [("torch", "materialized"), ("torch", "flash"),
         pytest.param("triton", "materialized", marks=triton_only),
         pytest.param("triton", "flash", marks=triton_only)]


def _explain_on(model, x, method, backend, attention, device, target):
    target = target.to(device) if isinstance(target, torch.Tensor) else target
    return tf.explain(copy.deepcopy(model).to(device), x.to(device), method, backend=backend, attention=attention,
                      target=target).cpu()


@pytest.mark.parametrize("backend,attention", PATHS)
@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_every_method_on_every_backend_and_path(variant, backend, attention, device):
    """§7 as tests/test_models_dinov2.py holds it: float32 maps within 1e-5 of the float64 reference
    (attention Grad-CAM within its derived bound), the signed sums and the relevance pass on float64 copies
    to the maps' float32 rounding (torch) or within 1e-4 of the float32 torch map on the same path (Triton);
    the relevance pass refused on RoPE / SwiGLU with the reason, on both paths elsewhere."""
    model, x = make(variant), images()
    model64, x64 = make(variant, torch.float64), images(torch.float64)
    snap = snapshot(model)
    if has_rope_or_swiglu(variant):
        for method in RELEVANCE_PASS:
            with pytest.raises(ValueError, match="RoPE"):
                tf.explain(model, x, method, backend=backend, attention="materialized")
    for method in methods_for(variant):
        target = target_for(variant, method)
        ref, got, tol = reference_pair(method, model, x, model64, x64, attention, target,
                                       lambda: _explain_on(model, x, method, backend, attention, device, target), backend, gradcam_tolerance(variant))
        assert_informative(ref)
        assert (rel_err_l2(got, ref) <= tol).all(), (method, rel_err_l2(got, ref))
    assert_same(model, snap)


# --------------------------------------------------------------------------- the adapter's parts
def test_adapter_layout_and_refusals():
    vits = {v: adapt(make(v)) for v in EVA_VARIANTS}
    assert all(type(v) is TimmEva for v in vits.values())
    assert {n: (v.num_prefix_tokens, v.has_class_token, v.pooling) for n, v in vits.items()} == {
        "eva02": (1, True, "token"), "eva02_avg": (0, False, "avg"), "eva_plain": (3, True, "token")}
    with pytest.raises(ValueError, match="SwiGLU"):
        tf.explain(mf.timm_eva("eva02", use_rot_pos_emb=False), images(), "lrp")
    with pytest.raises(ValueError, match="global_pool='map'"):
        adapt(mf.timm_eva("eva_plain", global_pool="map"))
    gated = mf.timm_eva("eva_plain")
    gated.blocks[1].attn.gate = torch.nn.Linear(EVA["width"], EVA["width"])
    with pytest.raises(ValueError, match="block 1 uses gated attention"):
        adapt(gated)


def test_the_call_site_sees_rotated_queries_and_keys():
    """The core receives q and k after RoPE (and before the scale): its softmax(scale q kᵀ) v reproduces the
    model, and a core fed the unrotated q, k (RoPE removed from the model) gives another output."""
    model, x = make("eva02", torch.float64), images(torch.float64)
    vit = adapt(model)
    seen, handles = [], []

    def core(l, q, k, v, scale):
        seen.append((q, k))
        return torch.softmax(scale * q @ k.transpose(-1, -2), -1) @ v

    with torch.no_grad():
        want = model(x)
        vit.replace_attention(range(vit.num_layers), core, handles)
        got = vit.forward(x)
        for h in handles:
            h.remove()
        _, layers, _, _ = literal_forward(model, x)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    z = F.layer_norm(layers[0]["x_in"], (EVA["width"],), model.blocks[0].norm1.weight, model.blocks[0].norm1.bias,
                     model.blocks[0].norm1.eps)
    table = model.rope.get_embed()
    w = model.blocks[0].attn.qkv.weight[:EVA["width"]]
    q_plain = (z @ w.T + model.blocks[0].attn.q_bias).reshape(2, -1, EVA["heads"], 32).transpose(1, 2)
    assert (seen[0][0] - _rope(q_plain, table, 1)).abs().max() <= 1e-12
    assert (seen[0][0] - q_plain).abs().max() > 1e-2


# --------------------------------------------------------------------------- no N×N on the flash path
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_no_n_by_n_tensor_on_the_flash_path(backend, device, monkeypatch):
    """Every flash method through the EVA-02 adapter (RoPE, SwiGLU, sub-LayerNorms), two targets per image:
    no recorded tensor could hold an N×N matrix (the flash path's recorder, tests/helpers.py and criterion, its N = 65
    sizes; the PyTorch twin's blocks held to 64 query rows)."""
    from tokentm_fast.torch_ops import attention

    monkeypatch.setattr(attention, "BLOCK_BYTES", 1)
    s = N65
    model = mf.timm_eva("eva02", img_size=s["size"], patch_size=s["patch"], embed_dim=s["width"],
                        num_heads=s["heads"], depth=s["depth"], mlp_ratio=s["mlp"] / s["width"],
                        ref_feat_shape=(s["size"] // s["patch"],) * 2).to(device)
    x = torch.randn(2, 3, s["size"], s["size"], generator=torch.Generator().manual_seed(1)).to(device)
    assert adapt(model).num_prefix_tokens + (s["size"] // s["patch"]) ** 2 == 65
    # the relevance pass refuses RoPE / SwiGLU (test_every_method_on_every_backend_and_path)
    methods = [m for m in FLASH_METHODS if m not in RELEVANCE_PASS] if backend == "torch" else ["tokentm", "legrad", "attcat"]
    flagged = {}
    for method in methods:
        with ShapeRecorder() as rec:
            tf.explain(model, x, method, backend=backend, attention="flash", target=torch.tensor([[0, 1], [2, 3]]))
        assert len(rec.shapes) > 50, "the recorder saw nothing: the test would be vacuous"
        flagged[method] = n_by_n(rec.shapes, 65, attention_tile(device), tuple(x.shape))[:5]
    assert not any(flagged.values()), flagged


# --------------------------------------------------------------------------- open_clip's TimmModel around an Eva
@pytest.fixture(scope="module")
def open_clip_eva():
    """``{variant: (open_clip TimmModel, the same Eva with the projection as its classifier)}``, float64: open_clip
    builds ``eva02_tiny_patch14_224`` with a linear projection, whose trunk is swapped for the small headless
    test Eva (``num_classes=0``: its output is the pooled token) and whose projection is resized to it; the
    twin is a copy of that trunk whose classifier is the projection (bias 0)."""
    from open_clip.timm_model import TimmModel

    out = {}
    for variant in ("eva02", "eva_plain"):
        wrapper = TimmModel("eva02_tiny_patch14_224", embed_dim=16, proj="linear", pool="token")
        wrapper.trunk = mf.timm_eva(variant, num_classes=0)
        torch.manual_seed(5)
        wrapper.head.proj = torch.nn.Linear(EVA["width"], 16, bias=False)
        wrapper = wrapper.double().eval()
        twin = copy.deepcopy(wrapper.trunk)
        twin.reset_classifier(16)
        twin = twin.double().eval()
        with torch.no_grad():
            twin.head.weight.copy_(wrapper.head.proj.weight)
            twin.head.bias.zero_()
        out[variant] = (wrapper, twin)
    return out


@pytest.mark.parametrize("variant", ["eva02", "eva_plain"])
def test_open_clip_timm_model_around_an_eva(open_clip_eva, variant):
    """The wrapper is adapted (the EVA-CLIP towers' layout) and explains as a timm Eva whose classifier is the
    projection: the same output, and every method's map of output channel 3 equal (float64; to the maps'
    float32 rounding), the relevance pass included where it runs (its linear rule at the projection is the
    classifier's); refused on RoPE / SwiGLU through the wrapper too."""
    from tokentm_fast.models.timm_eva import OpenClipTimmEva

    wrapper, twin = open_clip_eva[variant]
    vit = adapt(wrapper)
    assert type(vit) is OpenClipTimmEva and vit.num_classes is None and vit.family == "open_clip"
    x = images(torch.float64)
    with torch.no_grad():
        want = twin(x)
        assert want.std() > 1e-2
        assert (vit.forward(x) - want).abs().max() <= 1e-12 * want.abs().max()
    target = tf.class_logit(3)
    for method in tf.METHODS:
        if has_rope_or_swiglu(variant) and method in RELEVANCE_PASS:
            with pytest.raises(ValueError, match="RoPE"):
                tf.explain(wrapper, x, method, backend="torch", target=target)
            continue
        want = tf.explain(twin, x, method, backend="torch", target=target)
        got = tf.explain(wrapper, x, method, backend="torch", target=target)
        assert_informative(want)
        assert (rel_err_l2(got, want) <= FLOAT32_OUTPUT).all(), (method, rel_err_l2(got, want))
