"""BEiT and data2vec-vision (tokentm_fast/models/hf_beit.py, tokentm_fast/models/timm_beit.py; issue 29 phase 2):
a relative position bias added to the attention logits, per head, gathered from a ((2gh−1)(2gw−1)+3)-entry table
(per layer, shared, or both), LayerScale, mean pooling with a norm after it, q / v biases (timm: ``F.linear``).

- A literal float64 oracle: the blocks written out here from the ``state_dict`` of each layout (Hugging Face
  BEiT, data2vec-vision, timm), the bias gathered from the tables by the relative position written out here
  (not the models' index helpers), equals the model's forward; its raw attention, rollout, GAE, TokenTM and
  attention Grad-CAM (tests/literal_oracle.py) equal ``backend="reference"``.
- Every method on every backend and attention path against the reference within the §7 tolerances, as
  tests/test_models_eva.py holds them, the biased variants on the flash path included (issue 29 item 2: the bias
  read from its table inside the tiles, ``models/relative_bias.py``); ``attention="auto"`` takes the flash path
  for them where it would for a bias-free model; HF ``interpolate_pos_encoding=True`` (a resized dense bias, no
  table lookup) refused on the flash path with the reason; the core gets the table form (per layer plus shared
  summed) and, at another grid, HF's resized table; a layer left to the model's own attention gets the dense bias;
  no N×N tensor on the flash path over a biased BEiT.
- Weight copy: timm ``beit_base_patch16_224``'s layout ↔ Hugging Face ``BeitModel`` (mean and class-token
  pooling): the same output and the same map for every method.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Dict, Optional

import literal_oracle
import model_families as mf
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import (
    FLOAT32_OUTPUT,
    ShapeRecorder,
    assert_informative,
    attention_tile,
    n_by_n,
    reference_pair,
    rel_err_l2,
)
from model_families import CLASSES, assert_same, snapshot, triton_only
from torch import nn

import tokentm_fast as tf
from tokentm_fast.methods import get_method
from tokentm_fast.models import adapt
from tokentm_fast.models.hf_beit import HFBeit
from tokentm_fast.models.timm_beit import TimmBeit

BEIT = dict(width=64, heads=2, depth=3, size=32, patch=8)
GRID = (BEIT["size"] // BEIT["patch"],) * 2
RELEVANCE_PASS = ("lrp", "partial_lrp", "transformer_attribution")

#: the test models: (builder, keyword arguments); every one built for 32x32 images, 8x8 patches
VARIANTS: Dict[str, tuple] = {
    # BeitForImageClassification: a bias table per layer, mean pooling (pooler LayerNorm), LayerScale
    "beit_cls": ("hf", dict(cls="BeitForImageClassification", use_relative_position_bias=True, use_mean_pooling=True)),
    # BeitModel: one shared table, class-token pooling after the final LayerNorm
    "beit_shared": ("hf", dict(cls="BeitModel", use_shared_relative_position_bias=True, use_mean_pooling=False)),
    # no relative position bias: the absolute position embedding (flash path and relevance pass run)
    "beit_abs": ("hf", dict(cls="BeitForImageClassification", use_absolute_position_embeddings=True,
                            use_mean_pooling=False)),
    # data2vec-vision: per-layer and shared tables summed, class-token pooling
    "data2vec": ("hf", dict(cls="Data2VecVisionForImageClassification", use_relative_position_bias=True,
                            use_shared_relative_position_bias=True, use_mean_pooling=False)),
    # timm beit_base_patch16_224's layout: a table per layer, mean pooling with fc_norm
    "timm_beit": ("timm", dict(global_pool="avg")),
    # timm with one shared table and class-token pooling
    "timm_shared": ("timm", dict(global_pool="token", use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
}
HAS_BIAS = {v: v != "beit_abs" for v in VARIANTS}


def _informative(model: nn.Module, seed: int) -> nn.Module:
    """Random bias tables (std 1: zero at init), LayerScale from U(0.1, 0.6), q / v biases, LayerNorm affines and
    the class token drawn at random, the q / k weights doubled, the classifier at std 0.2."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(("lambda_1", "lambda_2", "gamma_1", "gamma_2")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
            elif name.endswith(("q_bias", "v_bias", "q_proj.bias", "v_proj.bias", "query.bias", "value.bias",
                                "cls_token", "position_embeddings")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.mul_(2.0)
            elif name in ("head.weight", "classifier.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def hf_beit(cls: str, seed: int = 0, **config) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    s = BEIT
    kw = dict(hidden_size=s["width"], num_hidden_layers=s["depth"], num_attention_heads=s["heads"],
              intermediate_size=4 * s["width"], image_size=s["size"], patch_size=s["patch"], num_labels=CLASSES,
              hidden_act="gelu", layer_norm_eps=1e-6, layer_scale_init_value=0.1)
    kw.update(config)
    stem = "Data2VecVision" if cls.startswith("Data2Vec") else "Beit"
    model_cls = getattr(transformers, cls)
    cfg = getattr(transformers, f"{stem}Config")(**kw)
    model = model_cls(cfg, add_pooling_layer=True) if cls.endswith("Model") else model_cls(cfg)
    return _informative(model, seed)


def timm_beit(seed: int = 0, **kwargs) -> nn.Module:
    """timm ``beit_base_patch16_224`` (no absolute position embedding, a bias table per layer, LayerScale 0.1)
    on ``BEIT`` sizes."""
    import timm

    torch.manual_seed(seed)
    s = BEIT
    kw = dict(img_size=s["size"], patch_size=s["patch"], embed_dim=s["width"], depth=s["depth"],
              num_heads=s["heads"], num_classes=CLASSES)
    kw.update(kwargs)
    return _informative(timm.create_model("beit_base_patch16_224", **kw), seed)


def make(variant: str, dtype=torch.float32) -> nn.Module:
    kind, kw = VARIANTS[variant]
    return (hf_beit(**kw) if kind == "hf" else timm_beit(**kw)).to(dtype)


def images(dtype=torch.float32) -> torch.Tensor:
    return mf.images().to(dtype)


# --------------------------------------------------------------------------- the literal oracle
def relative_index(gh: int, gw: int) -> torch.Tensor:
    """``(N, N)`` table entries, N = 1 + gh·gw (class token first, patches row-major): patch i at (yᵢ, xᵢ) reads
    patch j at (yⱼ, xⱼ) through entry (yᵢ − yⱼ + gh − 1)(2gw − 1) + (xᵢ − xⱼ + gw − 1); the class token's row,
    column and corner read the last three entries T − 3, T − 2, T − 1 (T = (2gh − 1)(2gw − 1) + 3)."""
    t = (2 * gh - 1) * (2 * gw - 1) + 3
    n = 1 + gh * gw
    index = torch.empty(n, n, dtype=torch.long)
    for i in range(gh * gw):
        for j in range(gh * gw):
            (yi, xi), (yj, xj) = divmod(i, gw), divmod(j, gw)
            index[1 + i, 1 + j] = (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
    index[0, 1:], index[1:, 0], index[0, 0] = t - 3, t - 2, t - 1
    return index


def _gather(table: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The bias ``(H, N, N)`` of a ``(T, H)`` table at the test grid."""
    return None if table is None else table[relative_index(*GRID)].permute(2, 0, 1)


def weights(model: nn.Module) -> dict:
    """The test models' weights in one layout (float64), read from ``state_dict`` by each family's names."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    width = BEIT["width"]
    zeros = torch.zeros(width, dtype=torch.float64)
    if "cls_token" in sd:     # timm
        def block(i):
            p = f"blocks.{i}."
            wq, wk, wv = sd[p + "attn.qkv.weight"].chunk(3)
            return dict(ln1=(sd[p + "norm1.weight"], sd[p + "norm1.bias"]), q=(wq, sd[p + "attn.q_bias"]),
                        k=(wk, zeros), v=(wv, sd[p + "attn.v_bias"]),
                        o=(sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]), g1=sd[p + "gamma_1"],
                        ln2=(sd[p + "norm2.weight"], sd[p + "norm2.bias"]),
                        fc1=(sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]),
                        fc2=(sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]), g2=sd[p + "gamma_2"],
                        table=sd.get(p + "attn.relative_position_bias_table"))
        avg = model.global_pool == "avg"
        return dict(conv=(sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]), cls=sd["cls_token"],
                    pos=sd.get("pos_embed"), shared=sd.get("rel_pos_bias.relative_position_bias_table"),
                    blocks=[block(i) for i in range(len(model.blocks))], avg=avg,
                    norm=(sd["fc_norm.weight"], sd["fc_norm.bias"]) if avg else (sd["norm.weight"], sd["norm.bias"]),
                    head=(sd["head.weight"], sd["head.bias"]) if "head.weight" in sd else None)
    d2v = any(k.startswith("data2vec_vision.") for k in sd) or "encoder.layer.0.lambda_1" in sd
    base = "data2vec_vision." if any(k.startswith("data2vec_vision.") for k in sd) else \
        "beit." if any(k.startswith("beit.") for k in sd) else ""

    def lin(key, bias=True):
        return sd[base + key + ".weight"], sd[base + key + ".bias"] if bias else zeros

    def block(i):
        if d2v:
            p, a = f"encoder.layer.{i}.", f"encoder.layer.{i}.attention.attention."
            names = dict(q=a + "query", k=a + "key", v=a + "value", o=p + "attention.output.dense",
                         fc1=p + "intermediate.dense", fc2=p + "output.dense",
                         table=a + "relative_position_bias.relative_position_bias_table")
        else:
            p = f"layers.{i}."
            a = p + "attention."
            names = dict(q=a + "q_proj", k=a + "k_proj", v=a + "v_proj", o=a + "o_proj", fc1=p + "mlp.fc1",
                         fc2=p + "mlp.fc2", table=p + "relative_position_bias.relative_position_bias_table")
        return dict(ln1=lin(p + "layernorm_before"), q=lin(names["q"]), k=lin(names["k"], bias=False),
                    v=lin(names["v"]), o=lin(names["o"]), g1=sd[base + p + "lambda_1"], ln2=lin(p + "layernorm_after"),
                    fc1=lin(names["fc1"]), fc2=lin(names["fc2"]), g2=sd[base + p + "lambda_2"],
                    table=sd.get(base + names["table"]))

    avg = base + "pooler.layernorm.weight" in sd
    shared = "encoder.relative_position_bias" if d2v else "shared_position_bias"
    return dict(conv=lin("embeddings.patch_embeddings.projection"), cls=sd[base + "embeddings.cls_token"],
                pos=sd.get(base + "embeddings.position_embeddings"),
                shared=sd.get(f"{base}{shared}.relative_position_bias_table"),
                blocks=[block(i) for i in range(BEIT["depth"])], avg=avg,
                norm=lin("pooler.layernorm") if avg else lin("layernorm"),
                head=(sd["classifier.weight"], sd["classifier.bias"]) if "classifier.weight" in sd else None)


def literal_forward(model: nn.Module, x: torch.Tensor, eps: float = 1e-6):
    """The BEiT forward written out from the weights in float64 (output, per block ``dict(x_in, attn, y, m, xt)``,
    X⁰, P): patch convolution, class token, absolute position embedding (if any); per block LN, q / k / v,
    softmax(q kᵀ/√d + B_layer + B_shared) with the biases gathered here, proj, λ₁; LN, fc1, GELU, fc2, λ₂;
    then the patch mean and its LayerNorm, or the LayerNorm and the class token; the classifier."""
    w = weights(model)
    heads, d = BEIT["heads"], BEIT["width"] // BEIT["heads"]
    x = x.double()
    b = x.shape[0]
    t = F.conv2d(x, *w["conv"], stride=BEIT["patch"]).flatten(2).transpose(1, 2)
    t = torch.cat([w["cls"].expand(b, -1, -1), t], 1)
    if w["pos"] is not None:
        t = t + w["pos"]
    x0 = t = t.requires_grad_(True)
    shared = _gather(w["shared"])
    layers = []

    def ln(u, p):
        return F.layer_norm(u, (u.shape[-1],), p[0], p[1], eps)

    def lin(u, p):
        return u @ p[0].T + p[1]

    for blk in w["blocks"]:
        z = ln(t, blk["ln1"])
        q, k, v = (lin(z, blk[n]).reshape(b, -1, heads, d).transpose(1, 2) for n in "qkv")
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)
        for bias in (_gather(blk["table"]), shared):
            if bias is not None:
                logits = logits + bias
        attn = torch.softmax(logits, -1)
        if attn.requires_grad:
            attn.retain_grad()

        def attn_out(u, blk=blk):
            return blk["g1"] * lin(u, blk["o"])

        y = t + attn_out((attn @ v).transpose(1, 2).reshape(b, -1, BEIT["width"]))
        m = blk["g2"] * lin(F.gelu(lin(ln(y, blk["ln2"]), blk["fc1"])), blk["fc2"])
        layers.append(dict(x_in=t, attn=attn, y=y, m=m, xt=attn_out(v.transpose(1, 2).reshape(b, -1, BEIT["width"]))))
        t = y + m
    out = ln(t[:, 1:].mean(1), w["norm"]) if w["avg"] else ln(t, w["norm"])[:, 0]
    return (out if w["head"] is None else lin(out, w["head"])), layers, x0, 1


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x) if not hasattr(model, "config") else model(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out.pooler_output)


def literal_maps(variant: str, score) -> dict:
    model, x = make(variant, torch.float64), images(torch.float64)
    out, layers, x0, p = literal_forward(model, x)
    return literal_oracle.maps(out, layers, x0, p, score)


@functools.lru_cache(maxsize=None)
def predicted(variant: str) -> torch.Tensor:
    with torch.no_grad():
        return output(make(variant, torch.float64), images(torch.float64)).argmax(-1)


@functools.lru_cache(maxsize=None)
def gradcam_channels(variant: str) -> tuple:
    """Per image, the output channel whose literal Grad-CAM map is largest (the clamp of §5 zeroes many)."""
    k = output(make(variant, torch.float64), images(torch.float64)).shape[-1]
    norms = torch.stack([literal_maps(variant, lambda out, c=c: out[:, c])["attn_gradcam"].norm(dim=1)
                         for c in range(k)])
    return tuple(norms.argmax(0).tolist())


def gradcam_tolerance(variant: str) -> torch.Tensor:
    """tests/test_targets.py::gradcam_tolerance's float32 bound: 8·L·u times the head sum's condition, ≥ 1e-5."""
    chosen = torch.tensor(gradcam_channels(variant))
    kappa = literal_maps(variant, lambda out: out.gather(1, chosen[:, None])[:, 0])["gradcam_condition"]
    return (8 * BEIT["depth"] * 2.0 ** -24 * kappa).clamp(min=1e-5)


def target_for(variant: str, method: str, device=None):
    """The output channel per image, as a score (the embedding models need one): the predicted class, for
    attention Grad-CAM the channel of ``gradcam_channels``."""
    c = torch.tensor(gradcam_channels(variant)) if method == "attn_gradcam" else predicted(variant)
    return tf.class_logit(c.to(device))


def mean_pooled(variant: str) -> bool:
    return weights(make(variant, torch.float64))["avg"]


def identity_share(variant: str, method: str) -> float:
    """The constant that transformer attribution's identity term puts on every patch column of a mean-pooled
    head's map (its row weights 1/(N−P) there, docs/methods.md §6.3), taken off before the map is checked to be
    informative; 0 for the other maps."""
    return 1.0 / (GRID[0] * GRID[1]) if method == "transformer_attribution" and mean_pooled(variant) else 0.0


def methods_for(variant: str) -> tuple:
    """Every method, less attention Grad-CAM on a mean-pooled head: it reads the class token's row of the last attention, whose gradient is
    zero when the head does not read the class token (§5: an all-zero map, nothing to compare)."""
    return tuple(m for m in tf.METHODS
                 if not (m == "attn_gradcam" and mean_pooled(variant)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_literal_forward_is_the_model(variant):
    model, x = make(variant, torch.float64), images(torch.float64)
    with torch.no_grad():
        want = output(model, x)
        got = literal_forward(model, x)[0]
        assert want.std() > 1e-2
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()
        assert (adapt(model).forward(x) - want).abs().max() == 0


@pytest.mark.parametrize("variant", ["beit_cls", "data2vec", "timm_shared"])
def test_the_bias_matters(variant):
    """The oracle with its bias tables zeroed is another function, with other attention probabilities (so its
    maps could not pass by chance)."""
    model, x = make(variant, torch.float64), images(torch.float64)
    with torch.no_grad():
        want, layers = literal_forward(model, x)[:2]
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.zero_()
        unbiased, plain = literal_forward(model, x)[:2]
    assert (unbiased - want).abs().max() > 1e-4 * want.abs().max()
    for a, u in zip(layers, plain):
        assert (a["attn"] - u["attn"]).norm() > 0.1 * a["attn"].norm()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_literal_maps_equal_the_reference(variant):
    model, x = make(variant, torch.float64), images(torch.float64)
    cls = predicted(variant)
    want = literal_maps(variant, lambda out: out.gather(1, cls[:, None])[:, 0])
    del want["gradcam_condition"]
    if mean_pooled(variant):
        assert want["attn_gradcam"].abs().max() == 0   # the head does not read the class token (methods_for)
        del want["attn_gradcam"]
    else:
        chosen = torch.tensor(gradcam_channels(variant))
        want["attn_gradcam"] = literal_maps(variant, lambda out: out.gather(1, chosen[:, None])[:, 0])["attn_gradcam"]
    for method, e in want.items():
        got = tf.explain(model, x, method, backend="reference", target=target_for(variant, method))
        assert got.shape == (2, *GRID), method
        assert_informative(e.reshape(got.shape))
        assert (rel_err_l2(got, e) <= FLOAT32_OUTPUT).all(), (method, rel_err_l2(got, e))


# --------------------------------------------------------------------------- every backend and path
PATHS = [("torch", "materialized"), ("torch", "flash"),
         pytest.param("triton", "materialized", marks=triton_only),
         pytest.param("triton", "flash", marks=triton_only)]
#: the variants the interpreted Triton kernels run on (every part: both layouts, both biases, both poolings)
TRITON_VARIANTS = ("beit_cls", "beit_abs", "data2vec", "timm_beit")


def _explain_on(model, x, method, backend, attention, device, variant):
    target = target_for(variant, method, device)
    return tf.explain(copy.deepcopy(model).to(device), x.to(device), method, backend=backend, attention=attention,
                      target=target).cpu()


@pytest.mark.parametrize("backend,attention", PATHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_method_on_every_backend_and_path(variant, backend, attention, device):
    """§7 as tests/test_models_eva.py holds it: float32 maps within 1e-5 of the float64 reference (attention
    Grad-CAM within its derived bound), the signed sums and the relevance pass on float64 copies to the maps'
    float32 rounding (torch) or within 1e-4 of the float32 torch map (Triton); the biased variants on the flash
    path too (the bias read from its table in the tiles); the relevance pass through the bias (the add rule
    between QKᵀ and B / scale, docs/methods.md §6.3)."""
    if backend == "triton" and variant not in TRITON_VARIANTS:
        pytest.skip("the interpreted Triton kernels run on the variants of TRITON_VARIANTS")
    model, x = make(variant), images()
    model64, x64 = make(variant, torch.float64), images(torch.float64)
    snap = snapshot(model)
    for method in methods_for(variant):
        target = target_for(variant, method)
        ref, got, tol = reference_pair(method, model, x, model64, x64, attention, target,
                                       lambda: _explain_on(model, x, method, backend, attention, device, variant), backend, gradcam_tolerance(variant))
        assert_informative(ref - identity_share(variant, method))
        assert (rel_err_l2(got, ref) <= tol).all(), (method, rel_err_l2(got, ref))
    assert_same(model, snap)


# --------------------------------------------------------------------------- the relevance pass through the bias
@pytest.mark.parametrize("variant", [v for v in VARIANTS if HAS_BIAS[v]])
@pytest.mark.parametrize("method", RELEVANCE_PASS)
def test_relevance_pass_splits_the_bias(variant, method, monkeypatch):
    """Logits scale·(QKᵀ + B/scale): the add rule's share of QKᵀ enters the q·kᵀ product rule (docs/methods.md
    §6.3). Float64: the pass equals the reference (its own rules) to 1e-10, on informative maps; and the bias
    matters below the top block: the pass with the bias record dropped (all of R to QKᵀ) moves the maps of lrp and
    transformer attribution by far more than that (partial LRP reads the top block above the logits)."""
    from tokentm_fast.capture import LayerRecorder
    from tokentm_fast.methods import resolve_options
    from tokentm_fast.paths import TORCH_KERNELS, Materialized
    from tokentm_fast.reference import explain_reference

    vit, x = adapt(make(variant, torch.float64)), images(torch.float64)
    options = resolve_options(method, {}, vit.num_layers)
    target = tf.class_logit(3)
    want = explain_reference(vit, x, method, target, options).flatten(1)

    floor = identity_share(variant, method)          # compared above the identity's constant floor

    def fast():
        e = get_method(method).explain(vit, x, [target], options, Materialized(TORCH_KERNELS))[0].flatten(1)
        return e - floor

    want = want - floor
    got = fast()
    assert want.dtype == got.dtype == torch.float64
    assert_informative(want)
    assert (rel_err_l2(got, want) <= 1e-10).all(), rel_err_l2(got, want)
    if method == "partial_lrp":      # R^{Aᴸ} of the top block is taken before the logits: the split is below it
        return
    store = LayerRecorder._store
    monkeypatch.setattr(LayerRecorder, "_store", lambda self, l, key, t: key == "bias" or store(self, l, key, t))
    assert (rel_err_l2(fast(), want) > 1e-4).all()


# --------------------------------------------------------------------------- the attention path choice
@pytest.mark.parametrize("variant", ["beit_cls", "data2vec", "timm_beit", "timm_shared"])
def test_auto_takes_the_flash_path_for_biased_models(variant, monkeypatch):
    """With a bias, ``attention="auto"`` resolves to the flash path wherever it does for the bias-free BEiT: the
    PyTorch backend above its byte threshold, and the Triton backend on CUDA images (a stand-in: the choice reads
    ``images.is_cuda`` only); no model-level refusal is left."""
    import types

    from tokentm_fast import api

    monkeypatch.setattr(api, "TORCH_FLASH_BYTES", 0)
    x = images()
    cuda_images = types.SimpleNamespace(is_cuda=True)
    for name in (variant, "beit_abs"):
        model = make(name)
        assert adapt(model).flash_refusal is None
        for method in ("tokentm", "rollout", "lrp"):
            explainer = tf.Explainer(model, method, backend="torch")
            assert explainer.attention_for(x, "torch") == "flash", (name, method)
            assert explainer.attention_for(cuda_images, "triton") == "flash", (name, method)
            tf.Explainer(model, method, backend="triton", attention="flash")           # accepted at the entry


def _interpolating(model: nn.Module):
    """The HF model asked for ``interpolate_pos_encoding=True`` (transformers resizes the (N, N) bias itself)."""
    vit = adapt(model)
    classifies = vit.classifies

    def forward(images: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=images, interpolate_pos_encoding=True)
        return out.logits if classifies else out.pooler_output

    vit.forward = forward
    return vit


@pytest.mark.parametrize("variant", ["beit_cls", "data2vec"])
def test_interpolated_bias_is_served_materialized_and_refused_on_flash(variant):
    """HF ``interpolate_pos_encoding=True`` resizes the (N, N) bias bilinearly (no table lookup): the core gets the
    dense bias; the materialized path computes the model's own attention with it (the score of the model), the
    flash path refuses it with the reason, whichever method."""
    from tokentm_fast.paths import TORCH_KERNELS, Flash, Materialized
    from tokentm_fast.torch_ops.attention import torch_attention

    model, x = make(variant, torch.float64), images(torch.float64)
    vit = _interpolating(model)
    seen = []

    def core(l, q, k, v, scale, bias=None):
        seen.append(bias)
        return torch.softmax(scale * q @ k.transpose(-1, -2) + bias, -1) @ v

    handles = []
    with torch.no_grad():
        want = vit.forward(x)
        vit.replace_attention(range(vit.num_layers), core, handles)
        got = vit.forward(x)
    for h in handles:
        h.remove()
    assert all(isinstance(b, torch.Tensor) for b in seen) and len(seen) == vit.num_layers
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    rows = Materialized(TORCH_KERNELS).query_attention(vit, x, vit.num_layers - 1)
    assert rows.shape == (2, 1 + GRID[0] * GRID[1]) and rows.sum(-1).sub(1).abs().max() < 1e-12
    flash = Flash(TORCH_KERNELS, torch_attention(), max_head_dim=None)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True resizes the \\(N, N\\) bias bilinearly"):
        flash.query_attention(vit, x, vit.num_layers - 1)
    with pytest.raises(ValueError, match="no table lookup"):
        flash.block_outputs(vit, x, [0])


def _bias_seen(model: nn.Module, x: torch.Tensor, layers) -> tuple:
    """The biases the core of ``layers`` gets, and the model's output with that core (softmax with the dense bias)."""
    from tokentm_fast.capture import dense_bias

    vit = adapt(model)
    seen, handles = {}, []

    def core(l, q, k, v, scale, bias=None):
        seen[l] = bias
        return torch.softmax(scale * q @ k.transpose(-1, -2) + dense_bias(bias), -1) @ v

    with torch.no_grad():
        vit.replace_attention(layers, core, handles)
        try:
            got = vit.forward(x)
        finally:
            for h in handles:
                h.remove()
    return seen, got


@pytest.mark.parametrize("variant", ["data2vec", "timm_beit", "beit_shared", "beit_cls", "timm_shared"])
def test_the_core_gets_the_models_bias_in_table_form(variant):
    """The call site hands the core the bias in table form (per layer plus shared: the tables summed), whose dense
    form is the bias gathered here by the written relative index; a core computing softmax(scale q kᵀ + B) v
    reproduces the model, also with a single layer replaced (the others, left to the model's own attention, get
    the dense shared bias: the bypass of the shared module holds only while every layer is the adapter's)."""
    from tokentm_fast.models.relative_bias import RelativePositionBias

    model, x = make(variant, torch.float64), images(torch.float64)
    vit = adapt(model)
    with torch.no_grad():
        want = output(model, x)
    seen, got = _bias_seen(model, x, range(vit.num_layers))
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    w = weights(model)
    for l, blk in enumerate(w["blocks"]):
        expected = sum(b for b in (_gather(blk["table"]), _gather(w["shared"])) if b is not None)
        assert isinstance(seen[l], RelativePositionBias) and seen[l].grid == GRID and seen[l].prefix == 1
        assert (seen[l].dense()[0] - expected).abs().max() <= 1e-12, (variant, l)
    seen, got = _bias_seen(model, x, [1])
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    assert list(seen) == [1]


@pytest.mark.parametrize("variant", ["beit_cls", "data2vec"])
def test_hf_table_at_another_grid_is_transformers_resized_table(variant):
    """At 48 px (grid 6 × 6, the config's 4 × 4) transformers resizes the table bilinearly; the core's table form is
    that resized table: the dense bias equals the model's own bias module output and the model is reproduced."""
    from tokentm_fast.models.hf_beit import hf_table

    model = make(variant, torch.float64)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        want = output(model, x)
        seen, got = _bias_seen(model, x, range(adapt(model).num_layers))
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()
        assert seen[0].grid == (6, 6) and seen[0].table.shape[0] == 11 * 11 + 3
        vit = adapt(model)
        module = vit.base.encoder.relative_position_bias if vit.data2vec else vit.blocks[0].relative_position_bias
        own = module((6, 6), False, dim_size=37)
        assert (hf_table(module, (6, 6)).dense() - own).abs().max() <= 1e-12
        assert (hf_table(module, GRID).table - module.relative_position_bias_table).abs().max() == 0


def test_adapter_layout_and_refusals():
    vits = {v: adapt(make(v)) for v in VARIANTS}
    assert {n: (type(v).__name__, v.pooling, v.num_classes) for n, v in vits.items()} == {
        "beit_cls": ("HFBeit", "avg", CLASSES), "beit_shared": ("HFBeit", "token", None),
        "beit_abs": ("HFBeit", "token", CLASSES), "data2vec": ("HFBeit", "token", CLASSES),
        "timm_beit": ("TimmBeit", "avg", CLASSES), "timm_shared": ("TimmBeit", "token", CLASSES)}
    assert all(isinstance(v, (HFBeit, TimmBeit)) for v in vits.values())
    import transformers

    bare = transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8))
    with pytest.raises(ValueError, match="add_pooling_layer=True"):
        adapt(bare)
    with pytest.raises(ValueError, match="global_pool=''"):
        adapt(timm_beit(global_pool=""))
    with pytest.raises(ValueError, match="SwiGLU"):
        tf.explain(timm_beit(use_rel_pos_bias=False, use_abs_pos_emb=True, swiglu_mlp=True), images(), "lrp")


# --------------------------------------------------------------------------- weight copy timm ↔ Hugging Face
def timm_to_hf_beit(src: nn.Module) -> nn.Module:
    """A Hugging Face ``BeitModel`` with the weights of the headless timm Beit ``src`` (a table per layer, no
    absolute position embedding): timm's ``qkv`` split into ``q/k/v_proj`` (``q_bias`` / ``v_bias`` their biases,
    k without one in both), ``proj`` is ``o_proj``, ``gamma_1/2`` are ``lambda_1/2``, ``norm1/2`` are
    ``layernorm_before/after``, each block's table is its layer's; ``fc_norm`` is the pooler's LayerNorm (mean
    pooling) or ``norm`` the final ``layernorm`` (class-token pooling)."""
    avg = src.global_pool == "avg"
    dst = hf_beit("BeitModel", use_relative_position_bias=True, use_mean_pooling=avg)
    sd = src.state_dict()
    with torch.no_grad():
        emb = dst.embeddings
        emb.cls_token.copy_(sd["cls_token"])
        emb.patch_embeddings.projection.weight.copy_(sd["patch_embed.proj.weight"])
        emb.patch_embeddings.projection.bias.copy_(sd["patch_embed.proj.bias"])
        for i, layer in enumerate(dst.layers):
            p = f"blocks.{i}."
            att = layer.attention
            wq, wk, wv = sd[p + "attn.qkv.weight"].chunk(3)
            att.q_proj.weight.copy_(wq)
            att.q_proj.bias.copy_(sd[p + "attn.q_bias"])
            att.k_proj.weight.copy_(wk)
            att.v_proj.weight.copy_(wv)
            att.v_proj.bias.copy_(sd[p + "attn.v_bias"])
            att.o_proj.weight.copy_(sd[p + "attn.proj.weight"])
            att.o_proj.bias.copy_(sd[p + "attn.proj.bias"])
            layer.relative_position_bias.relative_position_bias_table.copy_(sd[p + "attn.relative_position_bias_table"])
            for mine, theirs in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"),
                                 ("mlp.fc2", "mlp.fc2")):
                part = layer.get_submodule(mine)
                part.weight.copy_(sd[p + theirs + ".weight"])
                part.bias.copy_(sd[p + theirs + ".bias"])
            layer.lambda_1.copy_(sd[p + "gamma_1"])
            layer.lambda_2.copy_(sd[p + "gamma_2"])
        norm = dst.pooler.layernorm if avg else dst.layernorm
        norm.weight.copy_(sd["fc_norm.weight" if avg else "norm.weight"])
        norm.bias.copy_(sd["fc_norm.bias" if avg else "norm.bias"])
    return dst.eval()


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_timm_beit_and_hf_beit_model_with_the_same_weights(pool):
    """timm ``beit_base_patch16_224``'s layout (headless) and the Hugging Face ``BeitModel`` holding its weights
    give the same embedding and, for output channel 3, the same map for every method, the relevance pass through
    the bias included — attention Grad-CAM on the class-token pooling only (mean pooling: all zero)."""
    src = timm_beit(num_classes=0, global_pool=pool).double()
    dst = timm_to_hf_beit(src).double()
    x = images(torch.float64)
    with torch.no_grad():
        want = src(x)
        assert want.std() > 1e-2
        assert (dst(pixel_values=x).pooler_output - want).abs().max() <= 1e-12 * want.abs().max()
    target = tf.class_logit(3)
    for method in tf.METHODS:
        if method == "attn_gradcam" and pool == "avg":
            continue
        floor = 1.0 / (GRID[0] * GRID[1]) if method == "transformer_attribution" and pool == "avg" else 0.0
        a = tf.explain(src, x, method, backend="torch", target=target) - floor     # above the identity's floor
        b = tf.explain(dst, x, method, backend="torch", target=target) - floor
        assert_informative(a)
        assert (rel_err_l2(b, a) <= FLOAT32_OUTPUT).all(), (method, rel_err_l2(b, a))


# --------------------------------------------------------------------------- no N×N on the flash path
def test_no_n_by_n_tensor_on_the_flash_path_without_a_bias(monkeypatch):
    """A BEiT without a relative position bias takes the flash path: every flash method through the adapter, no
    recorded tensor could hold an N×N matrix (tests/helpers.py's recorder and criterion, N = 65)."""
    from helpers import FLASH_METHODS, N65

    from tokentm_fast.torch_ops import attention

    monkeypatch.setattr(attention, "BLOCK_BYTES", 1)
    s = N65
    model = hf_beit("BeitForImageClassification", use_absolute_position_embeddings=True, use_mean_pooling=False,
                    hidden_size=s["width"], num_attention_heads=s["heads"], intermediate_size=s["mlp"],
                    num_hidden_layers=s["depth"], image_size=s["size"], patch_size=s["patch"])
    x = torch.randn(2, 3, s["size"], s["size"], generator=torch.Generator().manual_seed(1))
    flagged = {}
    for method in FLASH_METHODS:
        with ShapeRecorder() as rec:
            tf.explain(model, x, method, backend="torch", attention="flash", target=torch.tensor([[0, 1], [2, 3]]))
        assert len(rec.shapes) > 50, "the recorder saw nothing: the test would be vacuous"
        flagged[method] = n_by_n(rec.shapes, 65, attention_tile(torch.device("cpu")), tuple(x.shape))[:5]
    assert not any(flagged.values()), flagged


@pytest.mark.parametrize("kind", ["hf", "timm"])
def test_no_n_by_n_tensor_on_the_flash_path_with_a_bias(kind, monkeypatch):
    """A BEiT with its relative position bias (HF: per layer and shared; timm: per layer) on the flash path: every
    flash method, the relevance pass included, through the adapter, no recorded tensor could hold an N×N matrix
    (the bias read from its (R, H) table by index tiles of the tile's size; tests/helpers.py's criterion, N = 65);
    the same calls on the materialized path do build N×N tensors (the recorder sees them)."""
    from helpers import FLASH_METHODS, N65

    from tokentm_fast.torch_ops import attention

    monkeypatch.setattr(attention, "BLOCK_BYTES", 1)
    s = N65
    if kind == "hf":
        model = hf_beit("BeitForImageClassification", use_relative_position_bias=True,
                        use_shared_relative_position_bias=True, use_mean_pooling=False, hidden_size=s["width"],
                        num_attention_heads=s["heads"], intermediate_size=s["mlp"], num_hidden_layers=s["depth"],
                        image_size=s["size"], patch_size=s["patch"])
    else:
        model = _informative(timm.create_model(
            "beit_base_patch16_224", img_size=s["size"], patch_size=s["patch"], embed_dim=s["width"],
            depth=s["depth"], num_heads=s["heads"], mlp_ratio=s["mlp"] / s["width"], num_classes=CLASSES), 0)
    assert adapt(model).has_bias
    x = torch.randn(2, 3, s["size"], s["size"], generator=torch.Generator().manual_seed(1))
    tile = attention_tile(torch.device("cpu"))
    flagged = {}
    for method in FLASH_METHODS:
        with ShapeRecorder() as rec:
            tf.explain(model, x, method, backend="torch", attention="flash", target=torch.tensor([[0, 1], [2, 3]]))
        assert len(rec.shapes) > 50, "the recorder saw nothing: the test would be vacuous"
        flagged[method] = n_by_n(rec.shapes, 65, tile, tuple(x.shape))[:5]
    assert not any(flagged.values()), flagged
    with ShapeRecorder() as rec:
        tf.explain(model, x, "rollout", backend="torch", attention="materialized", target=0)
    assert n_by_n(rec.shapes, 65, tile, tuple(x.shape))
