"""tokentm_fast: fast, faithful explanations for Vision Transformers.

``explain(model, images, method="tokentm")`` → ``(B, gh, gw)`` relevance maps
for timm ViTs with TokenTM, LeGrad, GAE, rollout, raw attention and attention
Grad-CAM; ``target`` may be a class or a score function of the model output
(``tokentm_fast.targets``); ``tokentm_fast.interop`` has the Quantus and
Captum-style entry points; see ``tokentm_fast.ops`` for the plain-tensor operators.
"""
from . import targets
from .api import BACKENDS, Explainer, explain
from . import interop
from .maps import ConstantMapWarning
from .methods import METHODS
from .targets import class_logit, cosine_similarity

__version__ = "0.1.0"
__all__ = ["explain", "Explainer", "METHODS", "BACKENDS", "targets", "class_logit", "cosine_similarity",
           "interop", "ConstantMapWarning", "__version__"]
