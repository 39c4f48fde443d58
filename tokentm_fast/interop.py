"""Entry points in the conventions of other explainability libraries.

- :func:`explain_func`: Quantus' ``explain_func(model, inputs, targets, **kwargs)``
  — numpy arrays or tensors in, a numpy ``(B, 1, H, W)`` attribution out, at
  the input resolution; Quantus' ``device=`` is accepted.
- :class:`TokenTMAttribution`: a Captum-style attribution object,
  ``TokenTMAttribution(model, method=...).attribute(inputs, target=...)`` →
  ``(B, 1, H, W)`` tensor.

Both are thin wrappers over :class:`tokentm_fast.Explainer` with
``upsample=True``; the maps are those of ``explain`` (raw values unless
``normalize=True``).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .api import Explainer
from .maps import minmax_normalize
from .targets import Target

__all__ = ["explain_func", "TokenTMAttribution", "as_target"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _as_images(inputs: Any, model: nn.Module, device: Optional[Union[str, torch.device]]) -> torch.Tensor:
    """``(B, C, H, W)`` numpy array or tensor → float tensor on the model's device."""
    if isinstance(inputs, np.ndarray):
        if not np.issubdtype(inputs.dtype, np.floating):
            raise TypeError(f"inputs must be a floating point array (B, C, H, W), got dtype {inputs.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(inputs))
    elif isinstance(inputs, torch.Tensor):
        images = inputs.detach()
    else:
        raise TypeError(f"inputs must be a numpy array or a torch.Tensor (B, C, H, W), got {type(inputs).__name__}")
    model_device = _model_device(model)
    if device is not None:
        want = torch.device(device)
        if want.type == "cuda" and want.index is None and model_device.type == "cuda":
            want = model_device
        if want != model_device:
            raise ValueError(f"device={str(device)!r} but the model is on {model_device}; move the model first")
    return images.to(model_device)


def as_target(targets: Any) -> Target:
    """Convert the target conventions of other libraries to ``explain``'s.

    Accepts None, an int (also numpy / 0-d tensor), a sequence or array of B
    class indices (numpy, list, tuple or tensor) or a score function.
    """
    if targets is None or (callable(targets) and not isinstance(targets, torch.Tensor)):
        return targets
    if isinstance(targets, (bool, np.bool_)):
        raise TypeError("targets must be class indices, got a bool")
    if isinstance(targets, (int, np.integer)):
        return int(targets)
    if isinstance(targets, (list, tuple)):
        targets = np.asarray(targets)
    if isinstance(targets, np.ndarray):
        if not np.issubdtype(targets.dtype, np.integer):
            raise TypeError(f"targets must be integer class indices, got an array of dtype {targets.dtype}")
        targets = torch.from_numpy(np.ascontiguousarray(targets))
    if isinstance(targets, torch.Tensor):
        if targets.dim() == 0:
            return int(targets) if not targets.is_floating_point() else targets
        if targets.dim() == 2 and targets.shape[1] != 1:
            raise ValueError(
                f"targets of shape {tuple(targets.shape)}: Captum and Quantus take one target per image; for "
                f"K targets per image call tokentm_fast.explain(model, images, target=<(B, K) tensor>), "
                f"which returns (B, K, ...) maps"
            )
        return targets.reshape(-1) if targets.dim() == 2 else targets
    raise TypeError(f"targets must be None, an int, B class indices or a score function, got {type(targets).__name__}")


def explain_func(model: nn.Module, inputs: ArrayLike, targets: Any = None, *, method: str = "tokentm",
                 backend: str = "auto", device: Optional[Union[str, torch.device]] = None,
                 normalize: bool = False, channel: bool = True, **options: Any) -> np.ndarray:
    """Quantus-compatible explanation function.

    Args:
        model: the model to explain (anything ``explain`` accepts); a Quantus
            model wrapper is unwrapped with ``get_model()``.
        inputs: ``(B, C, H, W)`` images, numpy array or tensor (any float dtype;
            cast to the model's dtype and moved to its device).
        targets: class indices ``(B,)`` (numpy / list / tensor), an int, None
            (the predicted class) or a score function.
        method, backend, **options: as for ``tokentm_fast.explain``.
        device: Quantus' device argument; must be where the model is.
        normalize: min–max normalise each map (Quantus normalises by itself by default).
        channel: return ``(B, 1, H, W)`` (Quantus' channel-first layout);
            ``False`` gives ``(B, H, W)``.

    Returns:
        float32 numpy attributions at the input resolution (bilinear).

    Example::

        metric = quantus.PointingGame()
        scores = metric(model=model, x_batch=x, y_batch=y, s_batch=masks, a_batch=None,
                        explain_func=tokentm_fast.interop.explain_func,
                        explain_func_kwargs={"method": "tokentm"}, device="cpu")
    """
    if not isinstance(model, nn.Module) and hasattr(model, "get_model"):
        model = model.get_model()
    images = _as_images(inputs, model, device)
    explainer = Explainer(model, method=method, backend=backend, upsample=True, normalize=normalize, **options)
    maps = explainer(images, as_target(targets))
    if channel:
        maps = maps[:, None]
    return maps.cpu().numpy().astype(np.float32, copy=False)


def _check_no_forward_args(args: Any, model: nn.Module) -> None:
    if args is None or (isinstance(args, (tuple, list)) and len(args) == 0):
        return
    n = len(args) if isinstance(args, (tuple, list)) else 1
    raise ValueError(
        f"additional_forward_args: {type(model).__name__} is explained through its forward called with the "
        f"images only (model(images)); {n} extra forward argument(s) cannot be passed through. Pass None, or "
        f"fix them in the model before explaining it (e.g. set the option on the model)"
    )


class TokenTMAttribution:
    """Captum-style attribution: ``TokenTMAttribution(model, method=...).attribute(inputs, target=...)``.

    Args:
        model: the model to explain (anything ``explain`` accepts).
        method, backend, **options: as for ``tokentm_fast.Explainer``.

    ``attribute`` returns a float32 ``(B, 1, H, W)`` tensor on the inputs'
    device: one relevance map per image at the input resolution (bilinear),
    broadcastable against the ``(B, C, H, W)`` inputs like Captum's layer
    attributions after ``LayerAttribution.interpolate``.
    """

    def __init__(self, model: nn.Module, method: str = "tokentm", backend: str = "auto", **options: Any) -> None:
        self.forward_func = model
        self.method = method
        self.explainer = Explainer(model, method=method, backend=backend, upsample=True, **options)

    def attribute(self, inputs: torch.Tensor, target: Any = None, additional_forward_args: Any = None,
                  normalize: bool = False) -> torch.Tensor:
        """Explain ``inputs (B, C, H, W)`` for ``target`` → ``(B, 1, H, W)``.

        ``target``: None (the predicted class), an int, ``B`` class indices
        (tensor, list or tuple) or a score function; ``normalize``: min–max
        normalise each map to [0, 1].

        ``additional_forward_args``: Captum's extra arguments of the model's forward. The supported
        ViTs are called as ``model(images)`` (timm, torchvision and open_clip forwards take only the
        images; Hugging Face models are called with ``pixel_values`` alone, since their other
        arguments change what the forward returns or which attention it runs), so only ``None`` or
        an empty tuple / list is accepted; anything else is refused with a ``ValueError`` rather
        than silently ignored.
        """
        _check_no_forward_args(additional_forward_args, self.forward_func)
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor (B, C, H, W), got {type(inputs).__name__}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        maps = self.explainer(inputs, as_target(target))
        return (minmax_normalize(maps) if normalize else maps)[:, None]

    def has_convergence_delta(self) -> bool:
        """Captum's API: this method has no convergence delta."""
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        """Captum's API: the attributions are not multiplied by the inputs."""
        return False

    def __repr__(self) -> str:
        return f"TokenTMAttribution({type(self.forward_func).__name__}, method={self.method!r})"
