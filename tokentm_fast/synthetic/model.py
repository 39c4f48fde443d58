"""The small ViT shipped with the synthetic benchmark.

A standard timm pre-norm :class:`~timm.models.vision_transformer.VisionTransformer`
(class token, class-token pooling, no LayerScale, no registers) on 64 x 64
images with 8 x 8 patches, i.e. an 8 x 8 patch grid and N = 65 tokens.  Its
weights are trained by ``python -m tokentm_fast.synthetic.train`` (exact command
and seed in ``assets/synthetic_vit.json``) and shipped in
``assets/synthetic_vit.safetensors``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from .shapes import CLASS_NAMES, IMAGE_SIZE, MEAN, STD

__all__ = [
    "SYNTHETIC_VIT_CONFIG",
    "ASSET_DIR",
    "WEIGHTS_PATH",
    "METADATA_PATH",
    "create_synthetic_vit",
    "synthetic_data_config",
    "load_metadata",
]

#: Keyword arguments of timm's ``VisionTransformer`` for the shipped model.
SYNTHETIC_VIT_CONFIG = dict(
    img_size=IMAGE_SIZE,
    patch_size=8,
    in_chans=3,
    num_classes=len(CLASS_NAMES),
    global_pool="token",
    embed_dim=96,
    depth=4,
    num_heads=3,
    mlp_ratio=4.0,
    qkv_bias=True,
    class_token=True,
    no_embed_class=False,
    pre_norm=False,
    fc_norm=False,
    init_values=None,
    reg_tokens=0,
)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_PATH = ASSET_DIR / "synthetic_vit.safetensors"
METADATA_PATH = ASSET_DIR / "synthetic_vit.json"


def synthetic_data_config() -> dict:
    """timm-style data config of the shipped model (inputs are 64 x 64, [0, 1] -> normalised)."""
    return dict(
        input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
        mean=tuple(MEAN),
        std=tuple(STD),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
    )


def _pretrained_cfg() -> dict:
    cfg = synthetic_data_config()
    cfg.update(
        architecture="vit_synthetic_shapes",
        num_classes=len(CLASS_NAMES),
        label_names=list(CLASS_NAMES),
        first_conv="patch_embed.proj",
        classifier="head",
        file=str(WEIGHTS_PATH),
    )
    return cfg


def load_metadata(path: Optional[Union[str, Path]] = None) -> dict:
    """The training metadata shipped next to the weights (seed, command, accuracies...)."""
    p = Path(path) if path is not None else METADATA_PATH
    if not p.is_file():
        raise FileNotFoundError(f"synthetic ViT metadata not found: {p}")
    return json.loads(p.read_text(encoding="utf-8"))


def create_synthetic_vit(pretrained: bool = True,
                         weights: Optional[Union[str, Path]] = None) -> torch.nn.Module:
    """Build the synthetic-benchmark ViT (float32, on the CPU).

    ``pretrained=True`` loads the shipped weights (or the safetensors file
    ``weights``) and returns the model in eval mode; ``pretrained=False``
    returns a freshly initialised model in train mode.  In both cases
    ``model.pretrained_cfg`` holds mean / std / input size, so
    ``timm.data.resolve_data_config(model=model)`` works.
    """
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**SYNTHETIC_VIT_CONFIG)
    cfg = _pretrained_cfg()
    if pretrained or weights is not None:
        path = Path(weights) if weights is not None else WEIGHTS_PATH
        if not path.is_file():
            raise FileNotFoundError(
                f"synthetic ViT weights not found at {path}. They are shipped with the "
                "package (tokentm_fast/assets/synthetic_vit.safetensors); regenerate them with "
                "`python -m tokentm_fast.synthetic.train --seed 0 --out "
                "tokentm_fast/assets/synthetic_vit.safetensors`."
            )
        from safetensors.torch import load_file

        state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
        model.load_state_dict(state, strict=True)
        model.eval()
        cfg["file"] = str(path)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model
