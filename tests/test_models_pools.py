"""Attention-pool heads of the Hugging Face and open_clip adapters (issue 18 item 2): Hugging Face
``SiglipVisionModel`` (``SiglipMultiheadAttentionPoolingHead``) and open_clip CoCa towers
(``VisionTransformer(attentional_pool=True)``, an ``AttentionalPooler``).

- SigLIP, independently: a timm ``VisionTransformer(global_pool="map", class_token=False)`` whose weights
  ``model_families.timm_to_hf_siglip`` copies into a ``SiglipVisionModel`` computes the same function
  (float64), and every method's map through the Hugging Face adapter equals the map through the timm
  adapter (which tests/test_attention_pool.py checks against a literal oracle).
- CoCa has no exact timm equivalent: its pool normalises its input tokens itself (``ln_k``, which LeGrad's
  pool application keeps and timm's final norm is not part of) and reads the class token; ``ln_post``
  follows the pool. Its pool-only maps (raw attention, attention Grad-CAM, LeGrad) and TokenTM (blocks
  and pool by hand, full matrices; a pool narrower than the blocks too, docs/methods.md §6.1) are checked
  against a literal float64 computation written here from open_clip's module structure; the others
  through the reference backend.
- Every method on every backend (reference, torch, Triton materialized / flash on the suite's device)
  agrees with the reference for each new model, which comes back unchanged; the LRP relevance pass's float32
  maps within the bound derived from each map's condition (tests/helpers.py), the others within §7's 1e-5.
"""
from __future__ import annotations

import copy
import math

import model_families as mf
import pytest
import torch
from helpers import assert_informative, float32_bound, rel_err_l2
from model_families import assert_same, snapshot, triton_only
from spec_oracle import weights

import tokentm_fast as tf
from tokentm_fast.models import adapt

#: the LRP relevance pass (docs/methods.md §6.3), which runs on the materialized attention only
RELEVANCE_PASS = ("lrp", "partial_lrp", "transformer_attribution")
METHODS = ("tokentm", "gae", "rollout", "raw_attention", "attn_gradcam", "legrad", "conservative_lrp",
           "attcat") + RELEVANCE_PASS
GRID = mf.SIZE // mf.PATCH
TOL = 1e-5
#: float32 against float64 for ATTCAT: a signed sum over layers and channels of h ⊙ ∂s/∂h whose terms cancel
#: (on the SigLIP tower its float32 map is 1.6e-5 off, its float64 map exact), so §7's 1e-5 is raised tenfold
ATTCAT_TOL = 1e-4


#: embedding components explained per image (chosen so that attention Grad-CAM is not clipped to zero)
SIGLIP_TARGET = torch.tensor([18, 21])
COCA_TARGET = torch.tensor([3, 22])


def tol(method: str, bounds: dict):
    """The float32 bound of ``method``'s map against the float64 reference: per image (B,) for the relevance
    pass (``bounds``, derived from the map's condition: its rules divide by cancelling sums), else a number."""
    return bounds[method] if method in RELEVANCE_PASS else ATTCAT_TOL if method == "attcat" else TOL


def siglip_model() -> torch.nn.Module:
    """The float32 SigLIP tower with the weights of ``model_families.timm_siglip``."""
    return mf.timm_to_hf_siglip(mf.timm_siglip())


# ------------------------------------------------------------------------------------------------------
# SigLIP: the same weights as a timm attention-pool ViT
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def siglip_pair():
    """``(timm model, SiglipVisionModel with its weights, images)``, all float64."""
    src = mf.timm_siglip().double().eval()
    return src, mf.timm_to_hf_siglip(src).double().eval(), mf.images().double()


def test_siglip_tower_computes_the_timm_function(siglip_pair):
    """The converter is right: the timm model's output is the tower's ``pooler_output`` (float64), and the
    adapter's forward and head give it too."""
    src, tower, x = siglip_pair
    vit = adapt(tower)
    with torch.no_grad():
        want = src(x)
        got = tower(pixel_values=x).pooler_output
        assert want.shape == got.shape == (2, mf.WIDTH)
        assert want.std() > 1e-2
        assert (got - want).abs().max() <= 1e-10 * want.abs().max()
        assert torch.equal(vit.forward(x), got)
        tokens = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1]   # X^L, before the norm
        assert (vit.head(tokens) - got).abs().max() <= 1e-12 * want.abs().max()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("target_kind", ["class_logit", "cosine_similarity"])
def test_siglip_maps_equal_timm_maps(siglip_pair, backend, target_kind):
    """Every method's map through the Hugging Face adapter equals the timm adapter's (relative L2 < 1e-5)."""
    src, tower, x = siglip_pair
    if target_kind == "class_logit":
        target = tf.class_logit(SIGLIP_TARGET)
    else:
        emb = torch.randn(mf.WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        target = tf.cosine_similarity(emb)
    snap = snapshot(tower)
    for method in METHODS:
        want = tf.explain(src, x, method, backend=backend, target=target)
        got = tf.explain(tower, x, method, backend=backend, target=target)
        assert got.shape == want.shape == (2, GRID, GRID), method
        if target_kind == "class_logit" or method != "attn_gradcam":
            assert_informative(want)
        assert (rel_err_l2(got, want) < TOL).all(), method
    assert_same(tower, snap)


def test_siglip_adapter_layout():
    vit = adapt(siglip_model())
    from tokentm_fast.models.hf import HFViT

    assert type(vit) is HFViT and vit.kind == "siglip"
    assert vit.attention_pool is vit.model.head
    assert (vit.num_prefix_tokens, vit.has_class_token, vit.num_classes) == (0, False, None)
    assert vit.pool_columns(GRID * GRID) == slice(0, GRID * GRID)


def test_siglip_model_vision_tower():
    """``SiglipModel.vision_model`` (a ``SiglipVisionModel`` in transformers 5) is explained; the SigLIP
    image-text model itself is not a vision model and is refused with the supported classes named."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    text = dict(hidden_size=mf.WIDTH, intermediate_size=4 * mf.WIDTH, num_hidden_layers=1,
                num_attention_heads=mf.HEADS, vocab_size=32, max_position_embeddings=8)
    vision = dict(hidden_size=mf.WIDTH, intermediate_size=4 * mf.WIDTH, num_hidden_layers=mf.DEPTH,
                  num_attention_heads=mf.HEADS, image_size=mf.SIZE, patch_size=mf.PATCH)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    x = mf.images()
    vit = adapt(model.vision_model)
    with torch.no_grad():
        assert torch.equal(vit.forward(x), model.get_image_features(pixel_values=x).pooler_output)
    e = tf.explain(model.vision_model, x, "legrad", target=tf.class_logit(1))
    assert e.shape == (2, GRID, GRID) and torch.isfinite(e).all()
    with pytest.raises(TypeError, match="SiglipVisionModel"):
        adapt(model)


def test_siglip_without_head_is_refused():
    with pytest.raises(ValueError, match="vision_use_head=False"):
        adapt(mf.hf_siglip_vision(vision_use_head=False))


# ------------------------------------------------------------------------------------------------------
# CoCa: a literal float64 computation of its attentional pool
# ------------------------------------------------------------------------------------------------------

def coca_pool(m: torch.nn.Module, x: torch.Tensor, parts: bool = False):
    """open_clip's ``AttentionalPooler`` of model ``m`` on tokens ``x (B, N, width)``, by hand from its
    weights: latents ``(B, Lq, E)`` (after ``out_proj``), the attention probabilities ``(B, H, Lq, N)``,
    in the autograd graph, and the value tokens' ``out_proj`` x̃ ``(B, N, E)`` (TokenTM's, §6.1).
    ``parts=True``: a dict of those and what the LRP rules read (``xk``, ``q``, ``k``, ``v``, ``o``)."""
    ap = m.attn_pool
    mha = ap.attn
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e], mha.in_proj_weight[2 * e:]
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias[:e], mha.in_proj_bias[e:2 * e], mha.in_proj_bias[2 * e:]
    b, n, _ = x.shape
    xk = ap.ln_k(x)
    queries = ap.ln_q(ap.query)                                            # (Lq, E)
    q = (queries @ wq.T + bq).reshape(-1, h, d).transpose(0, 1)           # (H, Lq, d)
    k = (xk @ wk.T + bk).reshape(b, n, h, d).transpose(1, 2)               # (B, H, N, d)
    v = (xk @ wv.T + bv).reshape(b, n, h, d).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)   # (B, H, Lq, N)
    o = (attn @ v).transpose(1, 2).reshape(b, -1, e)
    latents, x_tilde = mha.out_proj(o), mha.out_proj(v.transpose(1, 2).reshape(b, n, e))
    if parts:
        return dict(latents=latents, attn=attn, x_tilde=x_tilde, xk=xk, q=q.expand(b, -1, -1, -1), k=k, v=v, o=o)
    return latents, attn, x_tilde


def coca_oracle(model: torch.nn.Module, images: torch.Tensor, method: str, c: torch.Tensor) -> torch.Tensor:
    """The float64 map (B, N−1) of raw attention, attention Grad-CAM or LeGrad (its last two blocks) for
    the score ``output[b, c[b]]``, from the pool's first latent; the model's output is checked first."""
    m = copy.deepcopy(model).double().eval()
    x = images.double()
    outs = []
    hooks = [blk.register_forward_hook(lambda mod, a, out: outs.append(out)) for blk in m.transformer.resblocks]
    with torch.enable_grad():
        want = m(x)
        for hk in hooks:
            hk.remove()
        rows = torch.arange(x.shape[0])
        latents, attn, _ = coca_pool(m, outs[-1])
        out = m.ln_post(latents)[:, 0] @ m.proj
        assert (out - want).abs().max() <= 1e-12 * want.abs().max()
        if method == "raw_attention":
            return attn[:, :, 0].mean(1).detach()[:, 1:]
        if method == "attn_gradcam":
            (g,) = torch.autograd.grad(out[rows, c].sum(), attn)
            alpha = g[:, :, 0, 1:].mean(-1, keepdim=True)                  # mean over the patch tokens
            return (alpha * attn[:, :, 0].detach()).mean(1).clamp(min=0)[:, 1:]
        assert method == "legrad"
        e = 0
        for x_l in outs[-2:]:                                              # the pool on X^l, no ln_post
            latents_l, attn_l, _ = coca_pool(m, x_l)
            (g,) = torch.autograd.grad((latents_l[:, 0] @ m.proj)[rows, c].sum(), attn_l)
            e = e + g[:, :, 0].clamp(min=0).mean(1)
        return e[:, 1:]


@pytest.mark.parametrize("output_dim", [mf.WIDTH, 24], ids=["same_width", "narrower_pool"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("method", ["raw_attention", "attn_gradcam", "legrad"])
def test_coca_pool_maps_match_the_literal_pool(method, backend, output_dim):
    model = mf.open_clip_coca(output_dim=output_dim)
    x = mf.images()
    want = coca_oracle(model, x, method, COCA_TARGET).reshape(2, GRID, GRID)
    assert_informative(want)
    got = tf.explain(model, x, method, backend=backend, target=tf.class_logit(COCA_TARGET))
    assert got.shape == (2, GRID, GRID)
    assert (rel_err_l2(got, want) < TOL).all()


def test_coca_adapter_layout_and_head():
    """The pool reads every token (class token included); the adapter's head is the model's output."""
    from tokentm_fast.models.open_clip import OpenClipViT

    model = mf.open_clip_coca(output_tokens=True)
    vit = adapt(model)
    assert type(vit) is OpenClipViT and vit.attention_pool is model.attn_pool
    assert (vit.num_prefix_tokens, vit.has_class_token, vit.num_classes) == (1, True, None)
    n = GRID * GRID + 1
    assert vit.pool_columns(n) == slice(0, n)
    x = mf.images()
    outs = []
    hook = model.transformer.resblocks[-1].register_forward_hook(lambda mod, a, out: outs.append(out))
    with torch.no_grad():
        pooled, tokens = model(x)                         # output_tokens=True: (pooled, tokens)
        hook.remove()
        assert torch.equal(vit.forward(x), pooled)
        assert (vit.head(outs[-1]) - pooled).abs().max() <= 1e-6 * pooled.abs().max()


@pytest.mark.parametrize("kwargs,match", [
    (dict(attentional_pool="parallel"), "'parallel'"),
    (dict(attentional_pool="cascade"), "'cascade'"),
    (dict(pool_type="avg"), "pool_type='avg'"),
    (dict(pool_type="none"), "pool_type='none'"),
])
def test_coca_variants_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adapt(mf.open_clip_coca(**kwargs))


def coca_blocks(m: torch.nn.Module, x: torch.Tensor):
    """open_clip ``VisionTransformer`` ``m`` (float64) by hand from its weights up to the last block: the
    tokens X⁰ entering block 1, and per block its input, x̃ = ls_1(out_proj(v)) (§2), the attention
    probabilities ``(B, H, N, N)`` in the autograd graph, Yˡ and the MLP branch; the last block's output."""
    b = x.shape[0]
    t = m.conv1(x).flatten(2).transpose(1, 2)
    t = torch.cat([m.class_embedding.expand(b, 1, -1), t], dim=1) + m.positional_embedding
    x0 = t = m.ln_pre(t)
    layers = []
    for blk in m.transformer.resblocks:
        mha = blk.attn
        h = mha.num_heads
        n, width = t.shape[1:]
        d = width // h
        qkv = (blk.ln_1(t) @ mha.in_proj_weight.T + mha.in_proj_bias).reshape(b, n, 3, h, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))              # (B, H, N, d)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        y = t + blk.ls_1(mha.out_proj((attn @ v).transpose(1, 2).reshape(b, n, width)))
        mlp = blk.ls_2(blk.mlp(blk.ln_2(y)))
        x_tilde = blk.ls_1(mha.out_proj(v.transpose(1, 2).reshape(b, n, width)))
        layers.append(dict(x=t.detach(), x_tilde=x_tilde.detach(), attn=attn, y=y.detach(), mlp=mlp.detach()))
        t = y + mlp
    return x0.detach(), layers, t


def coca_tokentm_oracle(model: torch.nn.Module, images: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """TokenTM (docs/methods.md §3, §6.1) of an open_clip CoCa tower, float64, with full N×N matrices:
    r⁰ = mean_h max(A_pool ⊙ G_pool, 0)[h, 0, :] ⊙ w^pool, then r ← r · Uᴸ ⋯ U¹, e = r ⊙ |X⁰| on the
    patch tokens, with Uˡ = (I + diag(w^{mlp,l})) (I + Āˡ diag(w^{attn,l})).

    w^pool: the pool reads the last block's output x (width D) and writes x̃ = out_proj(v) (its latents'
    width D'). D' = D: §2's weight. D' < D: no angle between x and x̃, so NECC is 1/N and the weight is
    the length ratio |x̃| / |x| divided by N (the choice of docs/methods.md §6.1)."""
    m = copy.deepcopy(model).double().eval()
    x = images.double()
    with torch.enable_grad():
        x0, layers, x_last = coca_blocks(m, x)
        latents, a_pool, xt_pool = coca_pool(m, x_last)
        out = m.ln_post(latents)[:, 0] @ m.proj
        with torch.no_grad():
            want = m(x)
        assert (out - want).abs().max() <= 1e-12 * want.abs().max()
        score = out[torch.arange(x.shape[0]), c].sum()
        grads = torch.autograd.grad(score, [a_pool] + [rec["attn"] for rec in layers])
    g_pool, g_blocks = grads[0], grads[1:]
    xp, xt_pool = x_last.detach(), xt_pool.detach()
    n = xp.shape[1]
    if xt_pool.shape[-1] == xp.shape[-1]:
        w_pool = weights(xp, xt_pool)
    else:
        w_pool = xt_pool.norm(dim=-1) / xp.norm(dim=-1).clamp(min=1e-6) / n
    r = (a_pool.detach() * g_pool).clamp(min=0).mean(1)[:, 0] * w_pool           # (B, N)
    eye = torch.eye(n, dtype=torch.float64)
    for rec, g in zip(reversed(layers), reversed(g_blocks)):
        a_bar = (rec["attn"].detach() * g).clamp(min=0).mean(1)                   # (B, N, N)
        w_attn, w_mlp = weights(rec["x"], rec["x_tilde"]), weights(rec["y"], rec["mlp"])
        u = (eye + torch.diag_embed(w_mlp)) @ (eye + a_bar @ torch.diag_embed(w_attn))
        r = torch.einsum("bi,bij->bj", r, u)
    return (r * x0.norm(dim=-1))[:, 1:]


def test_coca_narrower_pool_weights_are_the_length_ratio_over_n():
    """The pool's weight of a narrower pool (§6.1): |x̃_j| / max(|x_j|, ε) / M, NECC's 1/M in place of the
    undefined angle; for one width it is §2's weight (checked against the tests' own §2)."""
    from tokentm_fast.methods.pool import pool_transform_weights
    from tokentm_fast.torch_ops.transform_weights import transform_weights

    g = torch.Generator().manual_seed(3)
    x, narrow, same = (torch.randn(2, 5, w, generator=g, dtype=torch.float64) for w in (12, 7, 12))
    x0 = x.clone()
    x0[0, 2] = 0                                                                      # |x| clamped at ε
    got = pool_transform_weights(x0, narrow, transform_weights)
    want = narrow.norm(dim=-1) / x0.norm(dim=-1).clamp(min=1e-6) / 5
    assert got.shape == (2, 5) and torch.allclose(got, want, rtol=1e-12, atol=0)
    assert torch.allclose(pool_transform_weights(x, narrow, transform_weights, use_length=False),
                          torch.full((2, 5), 0.2, dtype=torch.float64))
    assert torch.allclose(pool_transform_weights(x, same, transform_weights), weights(x, same), rtol=1e-12)
    assert torch.allclose(pool_transform_weights(x, same, transform_weights, use_necc=False),
                          weights(x, same, use_necc=False), rtol=1e-12)


def coca_partial_lrp_oracle(model: torch.nn.Module, images: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Partial LRP of a CoCa tower at its pool (docs/methods.md §6.3), float64, with the rules of the tests'
    own LRP oracle (tests/lrp_oracle.py): R = one-hot at the output; ``@ proj`` (α1β0) with input
    ln_post(latents)[:, 0]; ln_post and the selection of latent 0 unchanged; ``out_proj`` (α1β0) with input the
    merged heads of every latent (R 0 on latents 1…); A·V z-rule, halved; e = mean_h max(R^{A_pool}, 0)
    of latent 0 over the patch tokens."""
    import lrp_oracle as lo

    m = copy.deepcopy(model).double().eval()
    x = images.double()
    outs = []
    hook = m.transformer.resblocks[-1].register_forward_hook(lambda mod, a, out: outs.append(out))
    with torch.no_grad():
        want = m(x)
        hook.remove()
        p = coca_pool(m, outs[-1], parts=True)
        post = m.ln_post(p["latents"])
        out = post[:, 0] @ m.proj
        assert (out - want).abs().max() <= 1e-12 * want.abs().max()
        b, lq, e = p["latents"].shape
        h = p["attn"].shape[1]
        r = lo.linear_relevance(post[:, 0], m.proj.t(), lo.one_hot(out, c), "ours")       # (B, E)
        r_lat = torch.zeros(b, lq, e, dtype=torch.float64)
        r_lat[:, 0] = r
        r_o = lo.linear_relevance(p["o"], m.attn_pool.attn.out_proj.weight, r_lat, "ours")
        r_attn, _ = lo.matmul_relevance(p["attn"], p["v"], r_o.reshape(b, lq, h, -1).transpose(1, 2))
    return (r_attn[:, :, 0] / 2).clamp(min=0).mean(1)[:, 1:]


@pytest.mark.parametrize("output_dim", [mf.WIDTH, 24], ids=["same_width", "narrower_pool"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("method", ["tokentm", "partial_lrp"])
def test_coca_blocks_and_pool_match_the_literal_oracles(method, backend, output_dim):
    """TokenTM and partial LRP of CoCa towers, the released kind whose pool is narrower than the blocks
    (48 → 24) included, against the float64 oracles above."""
    oracle = coca_tokentm_oracle if method == "tokentm" else coca_partial_lrp_oracle
    model = mf.open_clip_coca(output_dim=output_dim)
    x = mf.images()
    want = oracle(model, x, COCA_TARGET).reshape(2, GRID, GRID)
    assert_informative(want)
    got = tf.explain(model, x, method, backend=backend, target=tf.class_logit(COCA_TARGET))
    assert got.shape == (2, GRID, GRID)
    assert (rel_err_l2(got, want) < TOL).all()


# ------------------------------------------------------------------------------------------------------
# the pool's call site, and every method on every backend
# ------------------------------------------------------------------------------------------------------

POOL_MODELS = {
    "hf_siglip": siglip_model,
    "open_clip_coca": mf.open_clip_coca,
    "open_clip_coca_narrow": lambda: mf.open_clip_coca(output_dim=24),
}
TARGETS = {"hf_siglip": SIGLIP_TARGET, "open_clip_coca": COCA_TARGET, "open_clip_coca_narrow": COCA_TARGET}


@pytest.mark.parametrize("name", list(POOL_MODELS))
def test_replace_pool_attention_is_exact_and_undone(name):
    model = POOL_MODELS[name]().eval()
    vit = adapt(model)
    x = mf.images()
    snap = snapshot(model)
    calls = []

    def core(q, k, v, scale):
        calls.append((tuple(q.shape), tuple(k.shape), scale))
        return torch.softmax(scale * q @ k.transpose(-2, -1), -1) @ v

    with torch.no_grad():
        before = vit.forward(x)
        handles = []
        vit.replace_pool_attention(core, handles)
        patched = vit.forward(x)
        for hnd in reversed(handles):
            hnd.remove()
        after = vit.forward(x)
        handles = []
        vit.replace_pool_attention(lambda q, k, v, s: v[:, :, :q.shape[2]], handles)   # a wrong core
        wrong = vit.forward(x)
        for hnd in reversed(handles):
            hnd.remove()
    mha = getattr(vit.attention_pool, "attention", None) or vit.attention_pool.attn
    d = mha.embed_dim // mha.num_heads
    latents = 1 if name == "hf_siglip" else 4
    n = GRID * GRID + vit.num_prefix_tokens
    assert calls == [((2, mha.num_heads, latents, d), (2, mha.num_heads, n, d), pytest.approx(d ** -0.5))]
    assert (patched - before).abs().max() <= 1e-5 * before.abs().max()
    assert torch.equal(after, before)
    assert (wrong - before).abs().max() > 1e-3 * before.abs().max()
    assert_same(model, snap)


@pytest.fixture(scope="module", params=list(POOL_MODELS))
def pool_case(request):
    """``(name, model, images, target, {method: reference map}, {relevance-pass method: float32 bound (B,)})``;
    the bounds from the reference's condition on float64 copies (tests/helpers.py; blocks plus the pool)."""
    name = request.param
    model, x, c = POOL_MODELS[name](), mf.images(), TARGETS[name]
    refs = {m: tf.explain(model, x, m, backend="reference", target=tf.class_logit(c)) for m in METHODS}
    layers = adapt(model).num_layers + 1
    bounds = {m: float32_bound(lambda m64, x64, m=m: tf.explain(m64, x64, m, backend="reference",
                                                                 target=tf.class_logit(c)), model, x, layers)
              for m in RELEVANCE_PASS}
    return name, model, x, c, refs, bounds


def test_reference_maps_are_informative(pool_case):
    name, model, x, c, refs, bounds = pool_case
    for method, e in refs.items():
        assert e.shape == (2, GRID, GRID), method
        assert_informative(e)


def test_torch_equals_reference(pool_case):
    """The torch backend's float32 maps against the reference's, within each method's float32 bound."""
    name, model, x, c, refs, bounds = pool_case
    model.train()                                       # the explanation runs the model in eval mode
    snap = snapshot(model)
    for method, ref in refs.items():
        e = tf.explain(model, x, method, backend="torch", target=tf.class_logit(c))
        assert e.shape == ref.shape and e.dtype == torch.float32, method
        assert (rel_err_l2(e, ref) <= tol(method, bounds)).all(), (method, rel_err_l2(e, ref))
        assert_same(model, snap)
    model.eval()


@triton_only
@pytest.mark.parametrize("attention", ["materialized", "flash"])
def test_triton_equals_reference(pool_case, attention, device):
    """The Triton backend (materialized and flash attention; on the flash path the relevance pass runs the
    relevance programs, the pool's one-row attention as on the materialized path) against the reference,
    within each method's float32 bound."""
    name, model, x, c, refs, bounds = pool_case
    on_device = copy.deepcopy(model).to(device)
    snap = snapshot(on_device)
    for method, ref in refs.items():
        e = tf.explain(on_device, x.to(device), method, backend="triton", attention=attention,
                       target=tf.class_logit(c.to(device))).cpu()
        assert e.shape == ref.shape, method
        assert (rel_err_l2(e, ref) <= tol(method, bounds)).all(), (method, rel_err_l2(e, ref))
        assert_same(on_device, snap)
