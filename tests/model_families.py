"""Small random-init models of every supported family, the tables the tests run over, the model
snapshot, and weight converters from timm.

A plain helper module, not a test module: ``tests/conftest.py`` serves its factories as the
``make_model`` / ``make_images`` / ``images`` fixtures, and test modules import it for the tables their
parametrisation reads at import time (``FAMILIES``, ``CLASSIFIERS``, ``EMBEDDERS``). No test module
imports another test module.

The converters copy a timm ``VisionTransformer``'s weights into the equivalent Hugging Face
``ViTForImageClassification`` and ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``, torchvision
``VisionTransformer`` and open_clip ``VisionTransformer``. They are written here from the published
module structures of those libraries, independently of the adapters in ``tokentm_fast/models``, so
that the same weights can be explained through every code base and the maps compared.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Tuple, Union

import pytest
import torch
from torch import nn

SIZE, PATCH, WIDTH, HEADS, DEPTH, CLASSES = 32, 8, 48, 3, 2, 5


def spread(model, seed=0):
    """Make random-init weights less degenerate (sharper attention, larger MLP branch) so that
    every term of every method matters; the same for every family."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("qkv" in name or "q_proj" in name or "k_proj" in name or "in_proj" in name):
                p.mul_(2.0)
            elif p.dim() == 1 and ("gamma" in name or name.endswith("ls1.weight") or name.endswith("ls2.weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
    return model


def sharpen(model):
    """The weights of the spec-oracle tests: LayerScale factors drawn from U(0.1, 0.6) with the global
    generator, qkv weights doubled (sharper attention). Random init leaves LayerScale at 1e-6 and
    attention nearly uniform, where some terms of the methods vanish."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand_like(p) * 0.5 + 0.1)
            elif "qkv.weight" in name:
                p.mul_(2.0)
    return model


def timm_model(name="vit_tiny_patch16_224", num_classes=CLASSES, seed=0, sharp=False, **kwargs):
    """``timm.create_model(name, pretrained=False, ...)`` initialised after ``torch.manual_seed(seed)``;
    ``sharp`` applies :func:`sharpen`. Keyword arguments go to timm; one given as None is left out
    (the model's default)."""
    import timm

    torch.manual_seed(seed)
    kw = {k: v for k, v in kwargs.items() if v is not None}
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
    return sharpen(model) if sharp else model


def timm_tiny(num_classes=CLASSES, depth=2, seed=0, **kwargs):
    """The suite's plain small timm ViT: ``vit_tiny_patch16_224`` (width 192, 3 heads) on 32x32 images
    with 8x8 patches (a 4x4 grid), ``depth`` blocks, timm's own initialisation (:func:`timm_model`
    takes the other arguments, ``name`` included)."""
    kw = dict(img_size=SIZE, patch_size=PATCH, depth=depth)
    kw.update(kwargs)
    return timm_model(num_classes=num_classes, seed=seed, **kw)


def timm_narrow(num_classes=CLASSES, depth=3, img_size=SIZE, seed=0, qkv_scale=1.0, head_scale=1.0, **kwargs):
    """timm's ``VisionTransformer`` class built directly (no pretrained config attached), width 32, 2 heads,
    8x8 patches, initialised after ``torch.manual_seed(seed)``, in eval mode; ``qkv_scale`` and
    ``head_scale`` multiply the qkv and head weights (sharper attention, larger logits than timm's init)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    kw = dict(img_size=img_size, patch_size=PATCH, embed_dim=32, depth=depth, num_heads=2, num_classes=num_classes)
    kw.update(kwargs)
    model = VisionTransformer(**kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qkv.weight" in name:
                p.mul_(qkv_scale)
            elif name == "head.weight":
                p.mul_(head_scale)
    return model


def timm_vit(num_classes=CLASSES, seed=0, **kwargs):
    """The timm member of the family tests: width 48, 3 heads, 2 blocks on 32x32 images, :func:`spread`."""
    import timm

    torch.manual_seed(seed)
    kw = dict(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, num_heads=HEADS, depth=DEPTH, qkv_bias=True)
    kw.update(kwargs)
    return spread(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **kw), seed)


def random_affine(model, seed=0):
    """Every LayerNorm's scale and shift and the class token drawn at random (default init leaves
    them at 1, 0 and ~0), so that a converter that drops, swaps or misplaces one changes the output."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
        if getattr(model, "cls_token", None) is not None:
            model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=g))
    return model


def timm_clip(num_classes=16, act_layer="quick_gelu", seed=0, **kwargs):
    """A timm ViT that computes what a CLIP image tower computes (:func:`timm_vit` sizes): a LayerNorm
    after the embeddings (``pre_norm``, which also drops the patch projection's bias), LayerNorm eps
    1e-5, ``act_layer`` ``"quick_gelu"`` (OpenAI CLIP, Hugging Face's default) or ``"gelu"``
    (open_clip's default), the final norm before class-token pooling (after mean pooling with
    ``global_pool="avg"``), and a head without bias: a projection to ``num_classes`` (0: no head, the
    output is the pooled, normalised token). Norms and class token from :func:`random_affine`."""
    model = timm_vit(num_classes=num_classes, seed=seed, pre_norm=True, norm_layer=nn.LayerNorm,
                     act_layer=act_layer, **kwargs)
    random_affine(model, seed)
    if num_classes:
        with torch.no_grad():
            model.head.bias.zero_()
    return model


def hf_vit_config(num_labels=CLASSES):
    from transformers import ViTConfig

    return ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                     intermediate_size=4 * WIDTH, image_size=SIZE, patch_size=PATCH, num_labels=num_labels,
                     qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu", hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def hf_vit_classifier(seed=0):
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    return spread(ViTForImageClassification(hf_vit_config()), seed)


def hf_vit_model(seed=0):
    from transformers import ViTModel

    torch.manual_seed(seed)
    return spread(ViTModel(hf_vit_config()), seed)


def hf_deit_teacher(seed=0):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    cfg = DeiTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                     intermediate_size=4 * WIDTH, image_size=SIZE, patch_size=PATCH, num_labels=CLASSES,
                     layer_norm_eps=1e-6)
    return spread(DeiTForImageClassificationWithTeacher(cfg), seed)


def hf_clip_vision(projection=True, seed=0, **config):
    """``CLIPVisionModelWithProjection`` (``projection=False``: ``CLIPVisionModel``); ``config``
    overrides ``CLIPVisionConfig`` fields (e.g. ``hidden_act``, ``projection_dim``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    kw = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
              image_size=SIZE, patch_size=PATCH, projection_dim=16)
    kw.update(config)
    cfg = CLIPVisionConfig(**kw)
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    return spread(cls(cfg), seed)


def torchvision_vit(seed=0):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS,
                              hidden_dim=WIDTH, mlp_dim=4 * WIDTH, num_classes=CLASSES)
    with torch.no_grad():  # torchvision initialises the classifier to zero
        model.heads.head.weight.normal_(0.0, 0.2)
    return spread(model, seed)


def open_clip_visual(seed=0, **kwargs):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    kw = dict(image_size=SIZE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=4.0,
              output_dim=16)
    kw.update(kwargs)
    return spread(VisionTransformer(**kw), seed)


def images(batch=2, seed=1, size: Union[int, Tuple[int, int]] = SIZE, channels=3):
    """``(batch, channels, H, W)`` standard normal images from a generator seeded ``seed`` (the values
    ``torch.manual_seed(seed); torch.randn(...)`` gives); ``size`` is H = W or ``(H, W)``."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(seed))


# -- the tables the family tests run over ----------------------------------------
#: families whose output is class logits (``target`` may be a class index)
CLASSIFIERS: Dict[str, Callable[..., nn.Module]] = {
    "timm": timm_vit,
    "hf_vit": hf_vit_classifier,
    "hf_deit_teacher": hf_deit_teacher,
    "torchvision": torchvision_vit,
}
#: families whose output is an embedding (``target`` must be a score function)
EMBEDDERS: Dict[str, Callable[..., nn.Module]] = {
    "timm_headless": partial(timm_vit, num_classes=0),
    "hf_vit_model": hf_vit_model,
    "hf_clip_proj": hf_clip_vision,
    "hf_clip": partial(hf_clip_vision, projection=False),
    "open_clip": open_clip_visual,
    "open_clip_avg_ls": partial(open_clip_visual, pool_type="avg", ls_init_value=0.3, final_ln_after_pool=True),
}
FAMILIES: Dict[str, Callable[..., nn.Module]] = {**CLASSIFIERS, **EMBEDDERS}
#: every factory by name: the families, plus the plain small timm ViT (``timm_tiny``), any timm model
#: by name (``timm_model``), the 32-wide timm ViT class (``timm_narrow``) and the CLIP-equivalent timm
#: ViT (``timm_clip``)
MODELS: Dict[str, Callable[..., nn.Module]] = {
    **FAMILIES, "timm_tiny": timm_tiny, "timm_model": timm_model, "timm_narrow": timm_narrow,
    "timm_clip": timm_clip,
}


def make_model(family: str, **kwargs: Any) -> nn.Module:
    """``MODELS[family](**kwargs)``: a fresh random-init model (the same weights for the same arguments)."""
    if family not in MODELS:
        raise KeyError(f"unknown test model {family!r}; expected one of {sorted(MODELS)}")
    return MODELS[family](**kwargs)


# -- the model comes back as it was ----------------------------------------------
def snapshot(model: nn.Module) -> Dict[str, Any]:
    """Everything an explanation call could leave changed on ``model``: weights and buffers, training
    flags, timm's ``fused_attn`` flags, ``requires_grad``, hook counts and instance-level ``forward``
    overrides (the attention call-site hook)."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "fused": {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
        # instance-level forward overrides (the attention call-site hook) must all be gone
        "patched": {n: m.__dict__.get("forward") for n, m in model.named_modules() if "forward" in m.__dict__},
    }


def assert_same(model: nn.Module, snap: Dict[str, Any]) -> None:
    """``model`` is as :func:`snapshot` saw it, and no parameter gradient was computed."""
    now = snapshot(model)
    assert now["training"] == snap["training"]
    assert now["fused"] == snap["fused"]
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["hooks"] == snap["hooks"]
    assert now["patched"] == snap["patched"]
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert all(p.grad is None for p in model.parameters()), "parameter gradients were computed"


# -- converters ---------------------------------------------------------------
def timm_to_hf_vit(src):
    """A ``transformers.ViTForImageClassification`` with the weights of timm ViT ``src``."""
    dst = hf_vit_classifier()
    sd = src.state_dict()
    d = WIDTH
    with torch.no_grad():
        emb = dst.vit.embeddings
        emb.cls_token.copy_(sd["cls_token"])
        emb.position_embeddings.copy_(sd["pos_embed"])
        emb.patch_embeddings.projection.weight.copy_(sd["patch_embed.proj.weight"])
        emb.patch_embeddings.projection.bias.copy_(sd["patch_embed.proj.bias"])
        for i, layer in enumerate(dst.vit.layers):
            p = f"blocks.{i}."
            layer.layernorm_before.weight.copy_(sd[p + "norm1.weight"])
            layer.layernorm_before.bias.copy_(sd[p + "norm1.bias"])
            w, b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
            for j, lin in enumerate((layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj)):
                lin.weight.copy_(w[j * d:(j + 1) * d])
                lin.bias.copy_(b[j * d:(j + 1) * d])
            layer.attention.o_proj.weight.copy_(sd[p + "attn.proj.weight"])
            layer.attention.o_proj.bias.copy_(sd[p + "attn.proj.bias"])
            layer.layernorm_after.weight.copy_(sd[p + "norm2.weight"])
            layer.layernorm_after.bias.copy_(sd[p + "norm2.bias"])
            for name in ("fc1", "fc2"):
                getattr(layer.mlp, name).weight.copy_(sd[p + f"mlp.{name}.weight"])
                getattr(layer.mlp, name).bias.copy_(sd[p + f"mlp.{name}.bias"])
        dst.vit.layernorm.weight.copy_(sd["norm.weight"])
        dst.vit.layernorm.bias.copy_(sd["norm.bias"])
        dst.classifier.weight.copy_(sd["head.weight"])
        dst.classifier.bias.copy_(sd["head.bias"])
    return dst.eval()


def timm_to_torchvision(src):
    """A torchvision ``VisionTransformer`` with the weights of timm ViT ``src``."""
    dst = torchvision_vit()
    sd = src.state_dict()
    with torch.no_grad():
        dst.class_token.copy_(sd["cls_token"])
        dst.conv_proj.weight.copy_(sd["patch_embed.proj.weight"])
        dst.conv_proj.bias.copy_(sd["patch_embed.proj.bias"])
        dst.encoder.pos_embedding.copy_(sd["pos_embed"])
        for i, blk in enumerate(dst.encoder.layers):
            p = f"blocks.{i}."
            blk.ln_1.weight.copy_(sd[p + "norm1.weight"])
            blk.ln_1.bias.copy_(sd[p + "norm1.bias"])
            blk.self_attention.in_proj_weight.copy_(sd[p + "attn.qkv.weight"])
            blk.self_attention.in_proj_bias.copy_(sd[p + "attn.qkv.bias"])
            blk.self_attention.out_proj.weight.copy_(sd[p + "attn.proj.weight"])
            blk.self_attention.out_proj.bias.copy_(sd[p + "attn.proj.bias"])
            blk.ln_2.weight.copy_(sd[p + "norm2.weight"])
            blk.ln_2.bias.copy_(sd[p + "norm2.bias"])
            blk.mlp[0].weight.copy_(sd[p + "mlp.fc1.weight"])
            blk.mlp[0].bias.copy_(sd[p + "mlp.fc1.bias"])
            blk.mlp[3].weight.copy_(sd[p + "mlp.fc2.weight"])
            blk.mlp[3].bias.copy_(sd[p + "mlp.fc2.bias"])
        dst.encoder.ln.weight.copy_(sd["norm.weight"])
        dst.encoder.ln.bias.copy_(sd["norm.bias"])
        dst.heads.head.weight.copy_(sd["head.weight"])
        dst.heads.head.bias.copy_(sd["head.bias"])
    return dst.eval()


def _act_name(src) -> str:
    """``"quick_gelu"`` or ``"gelu"``: the MLP activation of timm ViT ``src``."""
    name = type(src.blocks[0].mlp.act).__name__
    if name not in ("QuickGELU", "GELU"):
        raise ValueError(f"no CLIP equivalent of the activation {name}")
    return "quick_gelu" if name == "QuickGELU" else "gelu"


def _check_clip_like(src, layer_scale_ok: bool) -> None:
    """``src`` is built as :func:`timm_clip` builds it (what the CLIP towers can express)."""
    if src.cls_token is None or src.num_prefix_tokens != 1 or isinstance(src.norm_pre, nn.Identity):
        raise ValueError("a CLIP tower has one class token and a LayerNorm after the embeddings (pre_norm=True)")
    if src.patch_embed.proj.bias is not None:
        raise ValueError("a CLIP patch projection has no bias")
    if src.num_classes and src.head.bias.abs().max() > 0:
        raise ValueError("a CLIP projection has no bias: zero the timm head's bias")
    if not layer_scale_ok and not isinstance(src.blocks[0].ls1, nn.Identity):
        raise ValueError("this CLIP tower has no LayerScale")


def _copy_qkv(w: torch.Tensor, b: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
    d = w.shape[1]
    for j, lin in enumerate((q, k, v)):
        lin.weight.copy_(w[j * d:(j + 1) * d])
        lin.bias.copy_(b[j * d:(j + 1) * d])


def _copy_norm(dst: nn.LayerNorm, sd: Dict[str, torch.Tensor], prefix: str) -> None:
    dst.weight.copy_(sd[prefix + ".weight"])
    dst.bias.copy_(sd[prefix + ".bias"])


def _copy_clip_layers(layers, sd: Dict[str, torch.Tensor]) -> None:
    """timm blocks ``blocks.{i}.*`` into CLIP-layout encoder layers (Hugging Face CLIP and SigLIP)."""
    for i, layer in enumerate(layers):
        p = f"blocks.{i}."
        _copy_norm(layer.layer_norm1, sd, p + "norm1")
        att = layer.self_attn
        _copy_qkv(sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"], att.q_proj, att.k_proj, att.v_proj)
        att.out_proj.weight.copy_(sd[p + "attn.proj.weight"])
        att.out_proj.bias.copy_(sd[p + "attn.proj.bias"])
        _copy_norm(layer.layer_norm2, sd, p + "norm2")
        for name in ("fc1", "fc2"):
            getattr(layer.mlp, name).weight.copy_(sd[p + f"mlp.{name}.weight"])
            getattr(layer.mlp, name).bias.copy_(sd[p + f"mlp.{name}.bias"])


def timm_to_open_clip(src):
    """An open_clip ``VisionTransformer`` with the weights and the function of timm ViT ``src`` (built
    as :func:`timm_clip` builds it, with a projection head). Pooling: class token with the final norm
    before it, or (timm ``global_pool="avg"``) the mean of the patch tokens with the norm after it
    (open_clip ``pool_type="avg", final_ln_after_pool=True``); timm's LayerScale is open_clip's
    ``ls_1`` / ``ls_2``; timm's head weight is the transposed ``proj``."""
    from open_clip.transformer import QuickGELU

    _check_clip_like(src, layer_scale_ok=True)
    if not src.num_classes:
        raise ValueError("an open_clip tower always projects: give the timm model a head")
    avg = src.global_pool == "avg"
    if src.global_pool not in ("token", "avg"):
        raise ValueError(f"no open_clip pooling for timm global_pool={src.global_pool!r}")
    layer_scale = not isinstance(src.blocks[0].ls1, nn.Identity)
    act = QuickGELU if _act_name(src) == "quick_gelu" else nn.GELU
    dst = open_clip_visual(output_dim=src.num_classes, act_layer=act, pool_type="avg" if avg else "tok",
                           final_ln_after_pool=avg, ls_init_value=1.0 if layer_scale else None)
    sd = src.state_dict()
    with torch.no_grad():
        dst.conv1.weight.copy_(sd["patch_embed.proj.weight"])
        dst.class_embedding.copy_(sd["cls_token"][0, 0])
        dst.positional_embedding.copy_(sd["pos_embed"][0])
        _copy_norm(dst.ln_pre, sd, "norm_pre")
        for i, blk in enumerate(dst.transformer.resblocks):
            p = f"blocks.{i}."
            _copy_norm(blk.ln_1, sd, p + "norm1")
            blk.attn.in_proj_weight.copy_(sd[p + "attn.qkv.weight"])
            blk.attn.in_proj_bias.copy_(sd[p + "attn.qkv.bias"])
            blk.attn.out_proj.weight.copy_(sd[p + "attn.proj.weight"])
            blk.attn.out_proj.bias.copy_(sd[p + "attn.proj.bias"])
            _copy_norm(blk.ln_2, sd, p + "norm2")
            blk.mlp.c_fc.weight.copy_(sd[p + "mlp.fc1.weight"])
            blk.mlp.c_fc.bias.copy_(sd[p + "mlp.fc1.bias"])
            blk.mlp.c_proj.weight.copy_(sd[p + "mlp.fc2.weight"])
            blk.mlp.c_proj.bias.copy_(sd[p + "mlp.fc2.bias"])
            if layer_scale:
                blk.ls_1.gamma.copy_(sd[p + "ls1.gamma"])
                blk.ls_2.gamma.copy_(sd[p + "ls2.gamma"])
        _copy_norm(dst.ln_post, sd, "fc_norm" if avg else "norm")
        dst.proj.copy_(sd["head.weight"].T)
    return dst.eval()


def timm_to_hf_clip(src):
    """A Hugging Face ``CLIPVisionModelWithProjection`` (timm head: ``visual_projection``) or, for a
    headless ``src``, ``CLIPVisionModel`` (output: ``pooler_output``) with the weights and the function
    of timm ViT ``src`` (built as :func:`timm_clip` builds it, class-token pooling, no LayerScale).
    ``hidden_act`` follows timm's ``act_layer``; ``pre_layrnorm`` is timm's ``norm_pre``,
    ``post_layernorm`` (applied to the class token) timm's final ``norm`` (applied to every token)."""
    _check_clip_like(src, layer_scale_ok=False)
    if src.global_pool != "token":
        raise ValueError("a Hugging Face CLIP tower pools the class token")
    projection = bool(src.num_classes)
    config = dict(hidden_act=_act_name(src))
    if projection:
        config["projection_dim"] = src.num_classes
    dst = hf_clip_vision(projection=projection, **config)
    sd = src.state_dict()
    vm = getattr(dst, "vision_model", dst)  # CLIPVisionModel holds the tower itself (transformers 5)
    with torch.no_grad():
        vm.embeddings.patch_embedding.weight.copy_(sd["patch_embed.proj.weight"])
        vm.embeddings.class_embedding.copy_(sd["cls_token"][0, 0])
        vm.embeddings.position_embedding.weight.copy_(sd["pos_embed"][0])
        _copy_norm(vm.pre_layrnorm, sd, "norm_pre")
        _copy_clip_layers(vm.encoder.layers, sd)
        _copy_norm(vm.post_layernorm, sd, "norm")
        if projection:
            dst.visual_projection.weight.copy_(sd["head.weight"])
    return dst.eval()


# -- attention-pool heads (Hugging Face SigLIP, open_clip CoCa) ---------------------------------
def scale_pool(model, latent, query_key):
    """Scale a random-init attention pool: the latent / probe / queries times ``latent``, the query and key
    projections times ``query_key`` (timm ``attn_pool.q`` / ``attn_pool.kv``; an ``nn.MultiheadAttention``'s
    in-projection). Each family's init gives another sharpness; the factors of the factories below bring
    the pool's largest attention probability over 16 tokens to about 0.2 (uniform: 0.06)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if parts[-1] in ("latent", "probe", "query") and ("attn_pool" in parts or "head" in parts):
                p.mul_(latent)
            elif "attn_pool" in parts and parts[-2:] in (["q", "weight"], ["kv", "weight"]):
                p.mul_(query_key)
            elif ("attn_pool" in parts or "head" in parts) and parts[-1] in ("in_proj_weight", "q_proj_weight",
                                                                             "k_proj_weight"):
                p.mul_(query_key)
    return model


def timm_siglip(seed=0, **kwargs):
    """A timm ViT that computes what a Hugging Face SigLIP image tower computes (:func:`timm_vit` sizes):
    no class token, an attention-pool head (``global_pool="map"``: one latent, the pool's own LayerNorm and
    MLP) after the final norm, no classifier (the output is the pool's 48-wide embedding), exact GELU.
    Norms from :func:`random_affine`, the pool sharpened by :func:`scale_pool` (timm's init leaves it
    nearly uniform)."""
    model = timm_vit(num_classes=0, seed=seed, global_pool="map", class_token=False, **kwargs)
    return scale_pool(random_affine(model, seed), latent=3.0, query_key=8.0)


def hf_siglip_vision(seed=0, **config):
    """``transformers.SiglipVisionModel`` (:func:`hf_vit_config` sizes, exact GELU); ``config`` overrides
    ``SiglipVisionConfig`` fields (e.g. ``vision_use_head=False``)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    kw = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
              image_size=SIZE, patch_size=PATCH, hidden_act="gelu", layer_norm_eps=1e-6)
    kw.update(config)
    model = random_affine(spread(SiglipVisionModel(SiglipVisionConfig(**kw)), seed), seed)
    return scale_pool(model, latent=3.0, query_key=1.0)


def open_clip_coca(seed=0, **kwargs):
    """An open_clip ``VisionTransformer`` with CoCa's attentional pool (``attentional_pool=True``, 4 queries,
    3 heads, ``output_dim`` 48 unless given), :func:`open_clip_visual` sizes; norms and class token from
    :func:`random_affine`; the pool's query and key projections halved (:func:`spread` doubled them, which
    makes its attention nearly one-hot)."""
    kw = dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=HEADS, output_dim=WIDTH)
    kw.update(kwargs)
    model = open_clip_visual(seed=seed, **kw)
    return scale_pool(random_affine(model, seed), latent=1.0, query_key=0.5).eval()


def timm_to_hf_siglip(src):
    """A Hugging Face ``SiglipVisionModel`` with the weights and the function of timm ViT ``src`` (built as
    :func:`timm_siglip` builds it). timm's pool ``latent`` is the head's ``probe``; its ``q`` and ``kv``
    projections stacked are the ``nn.MultiheadAttention``'s in-projection (query, key, value rows), its
    ``proj`` the ``out_proj``, its ``norm`` / ``mlp`` the head's ``layernorm`` / ``mlp``; the final ``norm``
    is ``post_layernorm``."""
    pool = src.attn_pool
    if src.cls_token is not None or src.num_prefix_tokens or src.global_pool != "map":
        raise ValueError("a SigLIP tower has no class token and an attention-pool head (global_pool='map')")
    if src.num_classes or not isinstance(src.fc_norm, nn.Identity) or not isinstance(src.norm_pre, nn.Identity):
        raise ValueError("a SigLIP tower has no classifier, no fc_norm and no norm before the blocks")
    if not isinstance(src.blocks[0].ls1, nn.Identity) or type(src.blocks[0].mlp.act) is not nn.GELU:
        raise ValueError("this SigLIP tower has no LayerScale and an exact GELU")
    if pool.latent_len != 1 or pool.pos_embed is not None or not isinstance(pool.q_norm, nn.Identity):
        raise ValueError("a SigLIP head has one probe, no position embedding and no q/k norm")
    dst = hf_siglip_vision(layer_norm_eps=src.norm.eps)
    sd = src.state_dict()
    with torch.no_grad():
        emb = dst.embeddings
        emb.patch_embedding.weight.copy_(sd["patch_embed.proj.weight"])
        emb.patch_embedding.bias.copy_(sd["patch_embed.proj.bias"])
        emb.position_embedding.weight.copy_(sd["pos_embed"][0])
        _copy_clip_layers(dst.encoder.layers, sd)
        _copy_norm(dst.post_layernorm, sd, "norm")
        head = dst.head
        head.probe.copy_(sd["attn_pool.latent"])
        mha = head.attention
        mha.in_proj_weight.copy_(torch.cat([sd["attn_pool.q.weight"], sd["attn_pool.kv.weight"]]))
        mha.in_proj_bias.copy_(torch.cat([sd["attn_pool.q.bias"], sd["attn_pool.kv.bias"]]))
        mha.out_proj.weight.copy_(sd["attn_pool.proj.weight"])
        mha.out_proj.bias.copy_(sd["attn_pool.proj.bias"])
        _copy_norm(head.layernorm, sd, "attn_pool.norm")
        for name in ("fc1", "fc2"):
            getattr(head.mlp, name).weight.copy_(sd[f"attn_pool.mlp.{name}.weight"])
            getattr(head.mlp, name).bias.copy_(sd[f"attn_pool.mlp.{name}.bias"])
    return dst.eval()


def _triton_runs() -> bool:
    """Whether the Triton kernels run on the suite's device (``TOKENTM_TEST_DEVICE``, set by tests/conftest.py)."""
    import os

    try:
        from tokentm_fast.kernels import triton_available
    except ImportError:
        return False
    return triton_available(os.environ["TOKENTM_TEST_DEVICE"])


#: the mark of tests that need the Triton kernels on the suite's device (on the CPU: the interpreter)
triton_only = pytest.mark.skipif(not _triton_runs(), reason="Triton cannot run on the suite's device here "
                                                            "(on the CPU: TRITON_INTERPRET=1)")


# -- DINOv2 (Hugging Face), issue 29 ------------------------------------------------------------------
#: the DINOv2 test models: width 64, 2 heads (32 wide), 3 blocks, 8x8 patches, built for 32x32 images
DINO = dict(width=64, heads=2, depth=3, size=32, patch=8)


def hf_dinov2(kind="model", registers=0, seed=0, **config):
    """A random-init Hugging Face DINOv2 (``DINO`` sizes, exact GELU, LayerNorm eps 1e-6) in eval mode:
    ``kind`` ``"model"`` (``Dinov2Model`` / ``Dinov2WithRegistersModel``) or ``"classifier"``
    (``...ForImageClassification``, ``CLASSES`` labels: the head reads the class token and the patch mean);
    ``registers`` > 0 picks the with-registers classes. ``config`` overrides config fields. Made informative:
    LayerScale factors from U(0.1, 0.6) (init: ``layerscale_value`` everywhere), q / k projections doubled,
    LayerNorm affines, the class token and the register tokens drawn at random (init: 1, 0, ~0)."""
    import transformers

    torch.manual_seed(seed)
    s = DINO
    kw = dict(hidden_size=s["width"], num_hidden_layers=s["depth"], num_attention_heads=s["heads"], mlp_ratio=4,
              image_size=s["size"], patch_size=s["patch"], num_labels=CLASSES, hidden_act="gelu",
              layer_norm_eps=1e-6, layerscale_value=1.0)
    stem = "Dinov2WithRegisters" if registers else "Dinov2"
    if registers:
        kw["num_register_tokens"] = registers
    kw.update(config)
    cfg = getattr(transformers, f"{stem}Config")(**kw)
    cls = getattr(transformers, f"{stem}Model" if kind == "model" else f"{stem}ForImageClassification")
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(2.0)
            elif name.endswith(("cls_token", "register_tokens")):
                p.copy_(torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model


def timm_dinov2(seed=0, **kwargs):
    """timm ``vit_small_patch14_dinov2`` (LayerScale, class token, no head) on ``DINO`` sizes: width 64, 2
    heads, 3 blocks, 8x8 patches, 32x32 images, :func:`spread` and :func:`random_affine`."""
    kw = dict(img_size=DINO["size"], patch_size=DINO["patch"], embed_dim=DINO["width"], num_heads=DINO["heads"],
              depth=DINO["depth"])
    kw.update(kwargs)
    model = timm_model("vit_small_patch14_dinov2", num_classes=0, seed=seed, **kw)
    return random_affine(spread(model, seed), seed).eval()


def timm_to_hf_dinov2(src):
    """A Hugging Face ``Dinov2Model`` with the weights and the function of timm DINOv2 ``src`` (built as
    :func:`timm_dinov2` builds it, no registers, no head): timm's ``qkv`` split into ``q/k/v_proj``,
    ``proj`` is ``o_proj``, ``ls1.gamma`` / ``ls2.gamma`` are ``layer_scale1/2.lambda1``, ``norm`` is
    ``layernorm``; both pool the normalised class token."""
    if src.num_classes or src.num_prefix_tokens != 1 or src.global_pool != "token":
        raise ValueError("the converter takes a headless timm DINOv2 with one class token and token pooling")
    dst = hf_dinov2(num_hidden_layers=len(src.blocks), layer_norm_eps=src.norm.eps)
    sd = src.state_dict()
    with torch.no_grad():
        emb = dst.embeddings
        emb.cls_token.copy_(sd["cls_token"])
        emb.position_embeddings.copy_(sd["pos_embed"])
        emb.patch_embeddings.projection.weight.copy_(sd["patch_embed.proj.weight"])
        emb.patch_embeddings.projection.bias.copy_(sd["patch_embed.proj.bias"])
        for i, layer in enumerate(dst.encoder.layer):
            p = f"blocks.{i}."
            _copy_norm(layer.norm1, sd, p + "norm1")
            att = layer.attention
            _copy_qkv(sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"], att.q_proj, att.k_proj, att.v_proj)
            att.o_proj.weight.copy_(sd[p + "attn.proj.weight"])
            att.o_proj.bias.copy_(sd[p + "attn.proj.bias"])
            layer.layer_scale1.lambda1.copy_(sd[p + "ls1.gamma"])
            _copy_norm(layer.norm2, sd, p + "norm2")
            for name in ("fc1", "fc2"):
                getattr(layer.mlp, name).weight.copy_(sd[p + f"mlp.{name}.weight"])
                getattr(layer.mlp, name).bias.copy_(sd[p + f"mlp.{name}.bias"])
            layer.layer_scale2.lambda1.copy_(sd[p + "ls2.gamma"])
        _copy_norm(dst.layernorm, sd, "norm")
    return dst.eval()


# -- timm Eva (EVA-02), issue 29 ------------------------------------------------------------------------
#: the Eva test models: width 64, 2 heads (32 wide), 3 blocks, 8x8 patches, 32x32 images
EVA = dict(width=64, heads=2, depth=3, size=32, patch=8)
#: variants: EVA-02 proper (RoPE on q and k, SwiGLU MLP with its inner LayerNorm, a sub-LayerNorm in the
#: attention, LayerScale, class token), the same mean-pooled without a class token, and a plain Eva (no
#: RoPE, timm's two-layer Mlp with its inner norm, the attention's sub-LayerNorm, two register tokens)
EVA_VARIANTS = {
    "eva02": dict(use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                  global_pool="token"),
    "eva02_avg": dict(use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                      class_token=False, global_pool="avg"),
    "eva_plain": dict(use_rot_pos_emb=False, swiglu_mlp=False, scale_mlp=True, scale_attn_inner=True,
                      num_reg_tokens=2, global_pool="token"),
}


def timm_eva(variant="eva02", num_classes=CLASSES, seed=0, **kwargs):
    """A random-init timm ``Eva`` (``EVA`` sizes, ``EVA_VARIANTS[variant]``, keyword overrides) in eval mode,
    made informative: LayerScale γ from U(0.1, 0.6), q / v biases, LayerNorm affines, class and register
    tokens drawn at random (init: 0, 1 and 0, ~0), the qkv weights doubled, the head's weights at std 0.2
    (timm's ``head_init_scale`` leaves them 1e-3 of their init)."""
    from timm.models.eva import Eva

    torch.manual_seed(seed)
    kw = dict(img_size=EVA["size"], patch_size=EVA["patch"], embed_dim=EVA["width"], depth=EVA["depth"],
              num_heads=EVA["heads"], mlp_ratio=4 * 2 / 3, qkv_fused=True, init_values=0.3,
              ref_feat_shape=(EVA["size"] // EVA["patch"],) * 2, num_classes=num_classes)
    kw.update(EVA_VARIANTS[variant])
    kw.update(kwargs)
    model = Eva(**kw).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
            elif name.endswith(("q_bias", "v_bias", "cls_token", "reg_token")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("qkv.weight"):
                p.mul_(2.0)
            elif name == "head.weight":
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model
