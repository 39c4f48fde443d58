"""tokentm_fast: fast, faithful explanations for Vision Transformers.

``explain(model, images, method="tokentm")`` → ``(B, gh, gw)`` relevance maps
for timm ViTs with TokenTM, LeGrad, GAE, rollout, raw attention and attention
Grad-CAM; see ``tokentm_fast.ops`` for the plain-tensor operators.
"""
from .api import BACKENDS, Explainer, explain
from .methods import METHODS

__version__ = "0.1.0"
__all__ = ["explain", "Explainer", "METHODS", "BACKENDS", "__version__"]
