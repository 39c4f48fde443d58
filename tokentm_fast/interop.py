"""Entry points in the conventions of other explainability libraries.

- :func:`explain_func`: Quantus' ``explain_func(model, inputs, targets, **kwargs)``
  — numpy arrays or tensors in, a numpy ``(B, 1, H, W)`` attribution out, at
  the input resolution; Quantus' ``device=`` is accepted.
- :class:`TokenTMAttribution`: a Captum-style attribution object (any method),
  ``TokenTMAttribution(model, method=...).attribute(inputs, target=...)``: a
  tensor or a tuple in, the same kind out, attributions shaped like the inputs
  ``(B, C, H, W)`` (each map repeated over the channels), so that Captum's
  metrics (``sensitivity_max``, ``infidelity``) take it.

Both are thin wrappers over :class:`tokentm_fast.Explainer` with
``upsample=True``; the maps are those of ``explain`` (raw values unless
``normalize=True``).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .api import Explainer
from .maps import minmax_normalize
from .models.protocol import PatchedForward
from .targets import Target

__all__ = ["explain_func", "TokenTMAttribution", "as_target"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _as_images(inputs: Any, model: nn.Module, device: Optional[Union[str, torch.device]]) -> torch.Tensor:
    """``(B, C, H, W)`` numpy array or tensor → float tensor on the model's device, in its dtype."""
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
    # Quantus hands float64 arrays to a float32 model: the documented cast, done here without a warning
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), images.dtype)
    return images.to(device=model_device, dtype=dtype)


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


def _captum_images(inputs: Any) -> Tuple[torch.Tensor, bool]:
    """Captum's ``inputs``: a tensor or a tuple of tensors, one per forward input → ``(images, is_tuple)``.

    The explained models take one input, the images ``(B, C, H, W)``: a tuple must hold exactly that
    one tensor (the model's other forward arguments go through ``additional_forward_args``)."""
    if isinstance(inputs, torch.Tensor):
        return inputs, False
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise ValueError(
                f"inputs is a tuple of {len(inputs)} items: the model is explained for one input, the images "
                f"(B, C, H, W); pass (images,) or images, and the forward's other arguments through "
                f"additional_forward_args"
            )
        if not isinstance(inputs[0], torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor (B, C, H, W) or a tuple holding one, got a tuple "
                            f"holding a {type(inputs[0]).__name__}")
        return inputs[0], True
    raise TypeError(f"inputs must be a torch.Tensor (B, C, H, W) or a tuple holding one (Captum's "
                    f"convention), got {type(inputs).__name__}")


def _captum_target(target: Any) -> Target:
    """Captum's ``target`` → ``explain``'s: Captum reads a one-element tensor and a one-element tuple
    ``(c,)`` (an index into the output after the batch dimension) as class ``c`` of every image; its
    perturbation loops (``sensitivity_max``, ``infidelity``) repeat a list or a longer tensor with the
    images and leave those as they are. Everything else as :func:`as_target`."""
    if isinstance(target, torch.Tensor) and target.numel() == 1 and target.dim() <= 1 \
            and not target.is_floating_point() and target.dtype != torch.bool:
        return int(target.reshape(()))
    if isinstance(target, tuple) and len(target) == 1 and isinstance(target[0], (int, np.integer)):
        return as_target(target[0])
    return as_target(target)


def _forward_args(args: Any) -> Tuple[Any, ...]:
    """Captum's ``additional_forward_args``: None → none, a tuple → its items, anything else → one argument."""
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


@contextmanager
def _forward_args_bound(model: nn.Module, args: Tuple[Any, ...]) -> Iterator[None]:
    """While open, every call of ``model`` appends ``args`` to the images, positionally, as Captum's
    ``forward_func(*inputs, *additional_forward_args)``; also when the adapter passes the images by
    keyword (Hugging Face: ``pixel_values=images``)."""
    if not args:
        yield
        return
    original = model.forward
    try:
        first = next(iter(inspect.signature(original).parameters), None)
    except (TypeError, ValueError):          # no signature to read: the images come positionally
        first = None

    def forward(self: nn.Module, *inputs: Any, **kwargs: Any) -> Any:
        if not inputs and first in kwargs:
            inputs = (kwargs.pop(first),)
        return original(*inputs[:1], *args, *inputs[1:], **kwargs)

    handle = PatchedForward(model, forward)
    try:
        yield
    finally:
        handle.remove()


class TokenTMAttribution:
    """Captum-style attribution: ``TokenTMAttribution(model, method=...).attribute(inputs, target=...)``.

    Args:
        model: the model to explain (anything ``explain`` accepts).
        method, backend, **options: as for ``tokentm_fast.Explainer``: every method, not only TokenTM.

    ``attribute`` follows Captum's conventions, so Captum's metrics (``sensitivity_max``,
    ``infidelity``) take it as they take Captum's own methods: a tensor or a tuple in, the same kind
    out; attributions shaped like the inputs ``(B, C, H, W)``: each image's map at the input resolution
    (bilinear), repeated over the C channels, as Captum's layer methods are after
    ``LayerAttribution.interpolate`` and a repeat over the channels.
    """

    def __init__(self, model: nn.Module, method: str = "tokentm", backend: str = "auto", **options: Any) -> None:
        self.forward_func = model
        self.method = method
        self.explainer = Explainer(model, method=method, backend=backend, upsample=True, **options)

    def attribute(self, inputs: Union[torch.Tensor, Tuple[torch.Tensor]], target: Any = None,
                  additional_forward_args: Any = None,
                  normalize: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor]]:
        """Explain ``inputs`` — images ``(B, C, H, W)``, or Captum's tuple ``(images,)``.

        Args:
            inputs: a tensor, or a tuple holding the one images tensor (on the model's device).
            target: None (the predicted class), an int, a one-element tensor or tuple (that class for
                every image), ``B`` class indices (tensor or list; also a tuple of ``B > 1``) or a score
                function. Inside Captum's perturbation loops the images are repeated; Captum repeats a
                list or tensor target with them (an int or a score function is used as it is).
            additional_forward_args: the model's forward arguments after the images, as Captum passes
                them: a tuple of arguments, any other value as one argument, None for none. Every
                forward the explanation runs is ``model(images, *additional_forward_args)``. What they
                change before the model's head (its input, the tokens of the blocks) is explained, and
                with ``target=None`` so is the class they make the model predict; LeGrad, attention
                Grad-CAM and the methods at an attention pool read their scores through the model's
                head module on each layer's tokens, so an argument acting after the head reaches them
                through ``target=None`` only. The explanations take unmasked attention: an attention
                mask (timm's ``attn_mask``) is refused with a ``ValueError``.
            normalize: min–max normalise each map to [0, 1] (per image, before the channel repeat).

        Returns:
            float32 attributions shaped like the images ``(B, C, H, W)`` on their device (a tuple of one
            such tensor for a tuple in): the map of each image repeated over its C channels.
        """
        images, is_tuple = _captum_images(inputs)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        args = _forward_args(additional_forward_args)
        target = _captum_target(target)
        with _forward_args_bound(self.explainer.vit.model, args):
            maps = self.explainer(images.detach(), target)
        if normalize:
            maps = minmax_normalize(maps)
        attributions = maps[:, None].expand(-1, images.shape[1], -1, -1).contiguous()
        return (attributions,) if is_tuple else attributions

    def has_convergence_delta(self) -> bool:
        """Captum's API: this method has no convergence delta."""
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        """Captum's API: the attributions are not multiplied by the inputs."""
        return False

    def __repr__(self) -> str:
        return f"TokenTMAttribution({type(self.forward_func).__name__}, method={self.method!r})"
