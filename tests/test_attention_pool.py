"""Attention-pooling ViTs (timm ``global_pool="map"``, SigLIP-like heads): a literal float64 oracle and
every method of the library against it (issue 18 item 4).

The model has no class token (P = 0): a learned latent query attends to the final tokens in timm's
``AttentionPoolLatent`` (``model.attn_pool``), whose output goes through ``fc_norm`` (Identity for
``"map"``) and ``head``. Its explained row is therefore the pool's attention row, not a token row of the
blocks; the maps are (docs/methods.md §3–§6 with the pool's row as the query):

- raw attention: e = mean_h A_pool[h, 0, :];
- rollout: r⁰ = mean_h A_pool[h, 0, :], then r ← r · (½ mean_h Aˡ + ½ I) for l = L … 1;
- GAE: r⁰ = mean_h max(A_pool ⊙ G_pool, 0)[h, 0, :], then r ← r · (I + mean_h max(Aˡ ⊙ Gˡ, 0));
- TokenTM: r⁰ = mean_h max(A_pool ⊙ G_pool, 0)[h, 0, :] ⊙ w^pool (the transformation weights of the
  pool's value tokens: x = what ``attn_pool`` receives, x̃ = ``attn_pool.proj`` of the value vectors), then
  the row update of §3.1 with each block's w_attn, w_mlp and Ā, and e = r ⊙ |X⁰|;
- attention Grad-CAM: α_h = mean_j G_pool[h, 0, j], e = max(mean_h α_h A_pool[h, 0, :], 0);
- LeGrad: for the last two blocks, s_l = the score of the pool applied to Xˡ directly (no final norm), then
  ``fc_norm`` and ``head``; e = Σ_l mean_h max(∂s_l/∂A_pool^{(l)}[h, 0, :], 0).

The oracle below runs the blocks with ``spec_oracle.run_vit`` (the existing independent manual forward) and
the pool by hand from its weights, keeping every attention probability in the autograd graph, and
evaluates each formula literally with explicit row vectors and full matrices. It shares no code with the
package. Random init leaves the pool's latent small and every LayerNorm at 1 / 0, so the models are
perturbed deterministically (:func:`perturb`) and every test checks that the oracle's map is not constant.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_informative, rel_err_l2
from model_families import assert_same, random_affine, snapshot, triton_only
from spec_oracle import run_vit, weights
from torch import nn

import tokentm_fast as tf

SIZE, PATCH, WIDTH, HEADS, CLASSES = 32, 8, 48, 3, 5
GRID = SIZE // PATCH
METHODS = ("tokentm", "gae", "rollout", "raw_attention", "attn_gradcam", "legrad")
FULL_METHODS = ("tokentm", "gae", "rollout")
BACKENDS = ("reference", "torch")
TOL = 1e-5                                   # docs/methods.md §7: float32 paths against the float64 oracle
SEED = 2                                     # the classifier's init; with TARGET no Grad-CAM map is all zero
TARGET = torch.tensor([1, 0])                # the classifier's explained class per image

Score = Callable[[torch.Tensor], torch.Tensor]   # model output (B, K) -> score (B,)



# ------------------------------------------------------------------------------------------------------
# the models
# ------------------------------------------------------------------------------------------------------

def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make a random-init attention-pool ViT non-degenerate, deterministically.

    Every LayerNorm gets weight 1 + 0.3·randn and bias 0.3·randn (from a generator seeded ``seed + 100``),
    the pool's latent is multiplied by 3 and its q / kv weights by 8, the blocks' qkv weights by 4: timm's
    init (weights of std 0.02) leaves every attention row nearly uniform (largest probability ~0.08 for
    16 tokens); after this the largest is ~0.2."""
    random_affine(model, seed)          # the LayerNorms (no class token here)
    with torch.no_grad():
        pool = model.attn_pool
        pool.latent.mul_(3.0)
        pool.q.weight.mul_(8.0)
        pool.kv.weight.mul_(8.0)
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return model


def map_vit(num_classes: int = CLASSES, depth: int = 2, seed: int = 0) -> nn.Module:
    """timm's ``VisionTransformer`` with an attention-pool head and no class token: 32x32 images, 8x8
    patches (N = 16 tokens, a 4x4 grid), width 48, 3 heads, ``depth`` blocks, ``num_classes`` outputs
    (0: the pool's 48-wide embedding), initialised after ``torch.manual_seed(seed)``, :func:`perturb`-ed,
    in eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=depth, num_heads=HEADS,
                              num_classes=num_classes, global_pool="map", class_token=False)
    return perturb(model, seed).eval()


def make_images() -> torch.Tensor:
    """Two standard normal 3x32x32 images."""
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def class_score(c: torch.Tensor) -> Score:
    """The oracle's score of class ``c[b]`` for image b."""
    return lambda out: out[torch.arange(out.shape[0]), c]


def cosine_score(emb: torch.Tensor) -> Score:
    """The oracle's score: cosine similarity of each image's output with ``emb[b]`` (float64)."""
    return lambda out: F.cosine_similarity(out, emb.to(out.dtype), dim=-1)


# ------------------------------------------------------------------------------------------------------
# the oracle
# ------------------------------------------------------------------------------------------------------

def apply_pool(m: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The float64 model ``m``'s attention pool on tokens ``x`` (B, N, D), then ``fc_norm`` and ``head``.

    Returns the output (B, K) and a dict: ``attn`` the pool's attention probabilities (B, H, latents, N),
    in the graph; ``x`` the pool's input tokens (B, N, D) and ``x_tilde`` = ``proj`` of the pool's value
    vectors (heads concatenated), (B, N, D), both detached."""
    ap = m.attn_pool
    b, n, c = x.shape
    h, d = ap.num_heads, ap.head_dim
    xp = x if ap.pos_embed is None else x + ap.pos_embed.unsqueeze(0)
    latent = ap.latent.expand(b, -1, -1)                                   # (B, latents, D_latent)
    q = ap.q(latent).reshape(b, ap.latent_len, h, d).transpose(1, 2)       # (B, H, latents, d)
    kv = ap.kv(xp)                                                         # (B, N, 2D): [keys | values]
    k = kv[..., :c].reshape(b, n, h, d).transpose(1, 2)                    # (B, H, N, d)
    v_cat = kv[..., c:]                                                    # (B, N, D)
    v = v_cat.reshape(b, n, h, d).transpose(1, 2)                          # (B, H, N, d)
    q, k = ap.q_norm(q), ap.k_norm(k)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)   # (B, H, latents, N)
    o = (attn @ v).transpose(1, 2).reshape(b, ap.latent_len, c)
    o = ap.proj(o)
    if ap.mlp is not None:
        o = o + ap.mlp(ap.norm(o))
    pooled = o[:, 0] if ap.pool == "token" else o.mean(1) if ap.pool == "avg" else o
    out = m.head(m.fc_norm(pooled))
    return out, dict(attn=attn, x=x.detach(), x_tilde=ap.proj(v_cat).detach())


def forward64(model: nn.Module, images: torch.Tensor):
    """Manual float64 forward: (output (B, K), the blocks' list from ``run_vit``, X⁰ (B, N, D), the
    float64 model copy, the pool's dict of :func:`apply_pool`)."""
    _, layers, x0, m = run_vit(model, images)
    out, pool = apply_pool(m, m.norm(layers[-1]["x_out"]))
    return out, layers, x0, m, pool


def oracle(model: nn.Module, images: torch.Tensor, method: str, score: Score, full: bool = False,
           start_layer: int = -2) -> torch.Tensor:
    """The literal map (B, N) in float64, or with ``full`` (TokenTM, GAE, rollout) the block product
    C = U^L ⋯ U¹ C⁰ (B, N, N), the matrix whose rows the pool's row r⁰ combines (e = r⁰ · C).

    ``start_layer``: LeGrad's first block (default −2, the last two)."""
    out, layers, x0, m, pool = forward64(model, images)
    b, n = x0.shape[:2]
    n_blocks = len(layers)
    P = m.num_prefix_tokens

    if method == "legrad":
        e = torch.zeros(b, n, dtype=torch.float64)
        for l in range(start_layer % n_blocks, n_blocks):
            out_l, pool_l = apply_pool(m, layers[l]["x_out"])              # no final norm before the pool
            (g,) = torch.autograd.grad(score(out_l).sum(), pool_l["attn"], retain_graph=True)
            e = e + g[:, :, 0].clamp(min=0).mean(1)                        # mean_h max(G̃[h, 0, :], 0)
        return e

    a_pool = pool["attn"].detach()[:, :, 0]                                # (B, H, N): the latent's row
    A = [lay["attn"].detach() for lay in layers]                           # (B, H, N, N) each
    if method in ("raw_attention", "rollout"):
        g_pool, G = None, None
    else:
        grads = torch.autograd.grad(score(out).sum(), [pool["attn"]] + [lay["attn"] for lay in layers])
        g_pool, G = grads[0][:, :, 0], grads[1:]

    if method == "raw_attention":
        return a_pool.mean(1)
    if method == "attn_gradcam":
        alpha = g_pool[:, :, P:].mean(-1, keepdim=True)                    # (B, H, 1)
        return (alpha * a_pool).mean(1).clamp(min=0)

    eye = torch.eye(n, dtype=torch.float64).expand(b, n, n)
    if method == "rollout":
        r = a_pool.mean(1)
        c = eye.clone()
        for l in reversed(range(n_blocks)):
            a_hat = 0.5 * A[l].mean(1) + 0.5 * eye
            r = torch.einsum("bi,bij->bj", r, a_hat)
        for l in range(n_blocks):
            c = (0.5 * A[l].mean(1) + 0.5 * eye) @ c
    elif method == "gae":
        r = torch.clamp(a_pool * g_pool, min=0).mean(1)
        c = eye.clone()
        for l in reversed(range(n_blocks)):
            a_bar = torch.clamp(A[l] * G[l], min=0).mean(1)
            r = r + torch.einsum("bi,bij->bj", r, a_bar)
        for l in range(n_blocks):
            c = c + torch.clamp(A[l] * G[l], min=0).mean(1) @ c
    elif method == "tokentm":
        w_pool = weights(pool["x"], pool["x_tilde"])                       # (B, N)
        r = torch.clamp(a_pool * g_pool, min=0).mean(1) * w_pool
        lengths = x0.norm(dim=-1)                                          # C⁰ = diag(|X⁰|)
        c = torch.diag_embed(lengths)
        for l in reversed(range(n_blocks)):
            a_bar = torch.clamp(A[l] * G[l], min=0).mean(1)
            w_attn = weights(layers[l]["x_in"], layers[l]["x_tilde"])
            w_mlp = weights(layers[l]["y"], layers[l]["m"])
            s = r * (1 + w_mlp)
            r = s + torch.einsum("bi,bij->bj", s, a_bar) * w_attn
        r = r * lengths
        for l in range(n_blocks):
            a_bar = torch.clamp(A[l] * G[l], min=0).mean(1)
            w_attn = weights(layers[l]["x_in"], layers[l]["x_tilde"])
            w_mlp = weights(layers[l]["y"], layers[l]["m"])
            c = (eye + torch.diag_embed(w_mlp)) @ (eye + a_bar @ torch.diag_embed(w_attn)) @ c
    else:
        raise ValueError(method)
    return c if full else r


def query_row(model: nn.Module, images: torch.Tensor, method: str, score: Score) -> torch.Tensor:
    """The pool's row r⁰ (B, N) that the block product of ``oracle(..., full=True)`` is read with."""
    out, layers, x0, m, pool = forward64(model, images)
    a_pool = pool["attn"].detach()[:, :, 0]
    if method == "rollout":
        return a_pool.mean(1)
    (g,) = torch.autograd.grad(score(out).sum(), pool["attn"])
    r = torch.clamp(a_pool * g[:, :, 0], min=0).mean(1)
    return r * weights(pool["x"], pool["x_tilde"]) if method == "tokentm" else r


def check(e: torch.Tensor, e_ref: torch.Tensor, shape=(2, GRID, GRID)) -> None:
    """The library's map ``e`` has ``shape``, is finite, and is within TOL of the oracle per image."""
    assert e.shape == shape, e.shape
    assert torch.isfinite(e).all()
    err = rel_err_l2(e.cpu(), e_ref.reshape(e.shape))
    assert (err < TOL).all(), err


# ------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 3], ids=lambda d: f"depth{d}")
def classifier(request):
    """(model, images): the 5-class attention-pool ViT with ``depth`` blocks."""
    return map_vit(depth=request.param, seed=SEED), make_images()


@pytest.fixture(scope="module")
def embedder():
    """(model, images, reference embeddings (2, 48)): the attention-pool ViT without a classifier."""
    emb = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(7))
    return map_vit(num_classes=0), make_images(), emb


# ------------------------------------------------------------------------------------------------------
# the oracle on its own
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes,depth", [(CLASSES, 2), (CLASSES, 3), (0, 2)])
def test_manual_forward_equals_the_model(num_classes, depth):
    model = map_vit(num_classes=num_classes, depth=depth, seed=SEED)
    images = make_images()
    out, layers, x0, m, pool = forward64(model, images)
    expected = copy.deepcopy(model).double()(images.double())
    assert out.shape == expected.shape == (2, num_classes or WIDTH)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert pool["attn"].shape == (2, HEADS, 1, GRID * GRID)
    torch.testing.assert_close(pool["attn"].detach().sum(-1), torch.ones(2, HEADS, 1, dtype=torch.float64))
    # the perturbation took: the attention rows are far from uniform, the outputs differ by image
    assert pool["attn"].detach().amax() > 2.0 / (GRID * GRID)
    assert all(lay["attn"].detach().amax() > 2.0 / (GRID * GRID) for lay in layers)
    assert (out[0] - out[1]).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_oracle_maps_are_informative(classifier, embedder, method):
    model, images = classifier
    assert_informative(oracle(model, images, method, class_score(TARGET)))
    model, images, emb = embedder
    assert_informative(oracle(model, images, method, cosine_score(emb)))


@pytest.mark.parametrize("method", ["tokentm", "gae", "attn_gradcam", "legrad"])
def test_oracle_maps_depend_on_the_target(classifier, method):
    model, images = classifier
    e = oracle(model, images, method, class_score(TARGET))
    other = oracle(model, images, method, class_score(torch.tensor([0, 1])))
    assert (rel_err_l2(other, e) > 1e-2).all()


@pytest.mark.parametrize("method", FULL_METHODS)
def test_oracle_row_update_equals_the_matrix_product(classifier, method):
    """The row algorithm (r carried top-down) equals the pool's row times the block product C."""
    model, images = classifier
    score = class_score(TARGET)
    c = oracle(model, images, method, score, full=True)
    r0 = query_row(model, images, method, score)
    torch.testing.assert_close(torch.einsum("bi,bij->bj", r0, c), oracle(model, images, method, score),
                               rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------------------
# the library against the oracle
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_classifier_maps_match_the_oracle(classifier, method, backend):
    model, images = classifier
    e_ref = oracle(model, images, method, class_score(TARGET))
    assert_informative(e_ref)
    check(tf.explain(model, images, method, target=TARGET, backend=backend), e_ref)




@triton_only
@pytest.mark.parametrize("attention", ["materialized", "flash"])
@pytest.mark.parametrize("method", METHODS)
def test_classifier_maps_match_the_oracle_on_triton(classifier, method, attention, device):
    model, images = classifier
    e_ref = oracle(model, images, method, class_score(TARGET))
    assert_informative(e_ref)
    e = tf.explain(copy.deepcopy(model).to(device), images.to(device), method, target=TARGET.to(device),
                   backend="triton", attention=attention).cpu()
    check(e, e_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_kind", ["cosine_similarity", "class_logit"])
@pytest.mark.parametrize("method", ["legrad", "tokentm"])
def test_embedder_maps_match_the_oracle(embedder, method, target_kind, backend):
    """num_classes=0: the output is the pool's embedding; the score a cosine similarity or one component."""
    model, images, emb = embedder
    if target_kind == "cosine_similarity":
        target, score = tf.cosine_similarity(emb), cosine_score(emb)
    else:
        c = torch.tensor([7, 30])
        target, score = tf.class_logit(c), class_score(c)
    e_ref = oracle(model, images, method, score)
    assert_informative(e_ref)
    check(tf.explain(model, images, method, target=target, backend=backend), e_ref)


@triton_only
@pytest.mark.parametrize("attention", ["materialized", "flash"])
@pytest.mark.parametrize("method", ["legrad", "tokentm"])
def test_embedder_maps_match_the_oracle_on_triton(embedder, method, attention, device):
    model, images, emb = embedder
    e_ref = oracle(model, images, method, cosine_score(emb))
    e = tf.explain(copy.deepcopy(model).to(device), images.to(device), method,
                   target=tf.cosine_similarity(emb.to(device)), backend="triton", attention=attention).cpu()
    check(e, e_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", FULL_METHODS)
def test_full_matrix(classifier, method, backend):
    """``full=True``: (B, N, N), the block product C (docs/methods.md §3.2) whose rows the pool's row combines."""
    model, images = classifier
    c_ref = oracle(model, images, method, class_score(TARGET), full=True)
    n = GRID * GRID
    c = tf.explain(model, images, method, target=TARGET, backend=backend, full=True)
    assert c.shape == (2, n, n)
    assert torch.isfinite(c).all()
    assert (rel_err_l2(c, c_ref) < TOL).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_restored_after_explain(backend):
    """Weights, buffers, training flags (train mode on purpose), requires_grad (one parameter frozen on
    purpose), timm's fused_attn flags, hooks: as before every method; no parameter gradient computed."""
    model = map_vit(seed=SEED).train()
    model.attn_pool.latent.requires_grad_(False)
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    images = make_images()
    snap = snapshot(model)
    for method in METHODS:
        tf.explain(model, images, method, target=TARGET, backend=backend)
        assert_same(model, snap)
    for method in FULL_METHODS:
        tf.explain(model, images, method, target=TARGET, backend=backend, full=True)
        assert_same(model, snap)
    assert model.training and not model.attn_pool.latent.requires_grad
