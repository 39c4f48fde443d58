"""Tiny random-init models of every supported family, and weight converters from timm.

Shared by ``tests/test_models_*.py``. The converters copy a timm
``VisionTransformer``'s weights into the equivalent Hugging Face
``ViTForImageClassification`` and torchvision ``VisionTransformer`` (written
here, independently of the adapters), so that the same weights can be
explained through three different code bases.
"""
from __future__ import annotations

import torch

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


def timm_vit(num_classes=CLASSES, seed=0, **kwargs):
    import timm

    torch.manual_seed(seed)
    kw = dict(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, num_heads=HEADS, depth=DEPTH, qkv_bias=True)
    kw.update(kwargs)
    return spread(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **kw), seed)


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


def hf_clip_vision(projection=True, seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH,
                           num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH, projection_dim=16)
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


def images(batch=2, seed=1):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


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
