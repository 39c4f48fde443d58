"""tokentm_fast: fast, faithful explanations for Vision Transformers.

``explain(model, images, method="tokentm")`` → ``(B, gh, gw)`` relevance maps. Methods
(``tokentm_fast.METHODS``): ``tokentm``, ``legrad``, ``gae``, ``rollout``, ``raw_attention``,
``attn_gradcam``, ``conservative_lrp``, ``attcat``, ``lrp``, ``partial_lrp``,
``transformer_attribution``. Models: timm ``VisionTransformer``; Hugging Face ViT / DeiT / CLIP /
SigLIP vision models; torchvision ``VisionTransformer``; open_clip image towers
(``tokentm_fast.models.adapt`` picks the adapter). Backends: ``auto`` (Triton on CUDA), ``torch``
(the CPU fallback), ``reference`` (float64, the oracle).

``Explainer`` explains many batches with one configuration; ``target`` may be a class or a score
function of the model output (``tokentm_fast.targets``); ``tokentm_fast.interop`` has the Quantus
and Captum entry points; ``tokentm_fast.ops`` the plain-tensor operators; ``tokentm_fast.evaluation``
the resumable evaluation runner; the command line is ``tokentm-fast`` (``python -m tokentm_fast``).

The docstrings cite ``docs/methods.md`` (the math of every method) and ``docs/evaluation.md``; an
installed package carries them: ``tokentm_fast.docs.path("methods.md")``.
"""
from . import interop, targets
from .api import BACKENDS, Explainer, explain
from .maps import ConstantMapWarning
from .methods import METHODS
from .targets import class_logit, cosine_similarity

__version__ = "0.1.0"
__all__ = ["explain", "Explainer", "METHODS", "BACKENDS", "targets", "class_logit", "cosine_similarity",
           "interop", "ConstantMapWarning", "__version__"]
