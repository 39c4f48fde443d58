"""Model adapters: each supported ViT family mapped onto one protocol (``protocol.ViTAdapter``).

``adapt(model)`` picks the adapter by the model's class:

- timm: ``timm.models.vision_transformer.VisionTransformer`` (a dependency);
- hf: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
  ``DeiTForImageClassification(WithTeacher)``, ``CLIPVisionModel(WithProjection)``,
  ``SiglipVisionModel`` (``pip install "tokentm_fast[hf]"``);
- torchvision: ``torchvision.models.VisionTransformer``, ``vit_b_16`` etc.
  (``pip install "tokentm_fast[torchvision]"``);
- open_clip: ``open_clip.transformer.VisionTransformer``, a CLIP model's ``.visual``
  (CoCa's, with its attentional pool, included) (``pip install "tokentm_fast[clip]"``).
- hf_dinov2: ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``Dinov2ForImageClassification``,
  ``Dinov2WithRegistersForImageClassification`` (``pip install "tokentm_fast[hf]"``).
- timm_eva: timm ``Eva`` (EVA-02: rotary position embedding, SwiGLU, sub-LayerNorm), also open_clip's
  ``TimmModel`` around one (timm is a dependency).
- hf_beit: ``BeitModel``, ``BeitForImageClassification``, ``Data2VecVisionModel``,
  ``Data2VecVisionForImageClassification`` (relative position bias; ``pip install "tokentm_fast[hf]"``).
- timm_beit: timm ``Beit`` (``beit_*``, ``beitv2_*``: relative position bias; timm is a dependency).

Subclasses are accepted; any other class is refused with a ``TypeError`` naming
the supported ones (and the packages that are not installed, with their extra).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import List, NamedTuple

from torch import nn

from .protocol import AttentionCore, PatchedForward, ViTAdapter, merge_heads, split_heads


class Family(NamedTuple):
    name: str
    package: str      # the module the family's classes come from
    module: str       # our adapter module
    extra: str        # pip extra
    classes: str      # for error messages


FAMILIES: List[Family] = [
    Family("timm", "timm", "timm", "", "timm VisionTransformer"),
    Family("hf", "transformers", "hf", "hf",
           "transformers ViTModel / ViTForImageClassification / DeiTModel / DeiTForImageClassification"
           "(WithTeacher) / CLIPVisionModel(WithProjection) / SiglipVisionModel"),
    Family("torchvision", "torchvision", "torchvision", "torchvision",
           "torchvision VisionTransformer (vit_b_16, vit_l_16, ...)"),
    Family("open_clip", "open_clip", "open_clip", "clip",
           "open_clip VisionTransformer (clip_model.visual, CoCa's included)"),
    Family("hf_dinov2", "transformers", "hf_dinov2", "hf",
           "transformers Dinov2Model / Dinov2WithRegistersModel / Dinov2ForImageClassification / "
           "Dinov2WithRegistersForImageClassification"),
    Family("timm_eva", "timm", "timm_eva", "", "timm Eva (EVA-02; also open_clip TimmModel around one)"),
    Family("hf_beit", "transformers", "hf_beit", "hf",
           "transformers BeitModel / BeitForImageClassification / Data2VecVisionModel / "
           "Data2VecVisionForImageClassification"),
    Family("timm_beit", "timm", "timm_beit", "", "timm Beit (beit_*, beitv2_*)"),
]


def supported_classes() -> str:
    """One line naming every supported model class."""
    return "; ".join(f.classes for f in FAMILIES)


def install_hint(family: Family) -> str:
    return f'pip install "tokentm_fast[{family.extra}]"' if family.extra else f"pip install {family.package}"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the wrappers that do not change what it computes: ``torch.compile``'s
    ``OptimizedModule`` (``._orig_mod``), ``nn.DataParallel`` and ``DistributedDataParallel``
    (``.module``), nested in any order."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model


def adapt(model: nn.Module) -> ViTAdapter:
    """The adapter of ``model``'s family (``model`` itself if it already is an adapter).

    A ``torch.compile``d model (``._orig_mod``) and a ``DataParallel`` / ``DistributedDataParallel``
    wrapper (``.module``) are unwrapped: the underlying model is explained, eagerly (the explanation
    hooks into every block, which a compiled graph would not run) and on the one device its
    parameters are on (the batch is not scattered over replicas).

    Raises:
        TypeError: the model's class is not supported (the message names the supported classes).
        ImportError: the model comes from a family whose package cannot be imported.
    """
    if isinstance(model, ViTAdapter):
        return model
    model = unwrap(model)
    root = type(model).__module__.split(".")[0]
    missing = []
    for fam in FAMILIES:
        if fam.package not in sys.modules:
            # A model of that family cannot exist without its package being imported.
            if importlib.util.find_spec(fam.package) is None:
                missing.append(fam)
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{fam.module}")
            adapter_cls = mod.adapter_class(model)
        except ImportError as e:
            if root == fam.package:
                raise ImportError(
                    f"{type(model).__name__} is a {fam.package} model but the {fam.name} adapter cannot load "
                    f"({e}); install a supported version: {install_hint(fam)}"
                ) from e
            continue
        if adapter_cls is not None:
            return adapter_cls(model)
    not_installed = "".join(
        f"; {f.package} is not installed ({install_hint(f)})" for f in missing
    )
    raise TypeError(
        f"unsupported model class {type(model).__module__}.{type(model).__qualname__}: expected one of "
        f"{supported_classes()}{not_installed}"
    )


__all__ = [
    "AttentionCore", "FAMILIES", "PatchedForward", "ViTAdapter", "adapt", "merge_heads",
    "split_heads", "supported_classes", "unwrap",
]
