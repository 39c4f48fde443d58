"""Target classes: ``None`` (the predicted class), an int, or a ``(B,)`` tensor."""
from __future__ import annotations

from typing import Optional, Union

import torch

Target = Optional[Union[int, torch.Tensor]]


def check_target(target: Target, batch: int, num_classes: int) -> Optional[torch.Tensor]:
    """Validate a target before any work; ``None`` stays None (resolved after the forward)."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError("target must be None, an int or a (B,) integer tensor, got a bool")
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must have an integer dtype, got {target.dtype}")
        if target.dim() == 0:
            target = target.expand(batch)
        if tuple(target.shape) != (batch,):
            raise ValueError(f"target must have shape ({batch},) for a batch of {batch}, got {tuple(target.shape)}")
        t = target.to(torch.long)
    else:
        raise TypeError(f"target must be None, an int or a (B,) integer tensor, got {type(target).__name__}")
    bad = (t < 0) | (t >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"target {t[bad][0].item()} out of range for a model with {num_classes} classes")
    return t


def resolve_target(target: Optional[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """The checked target on the logits' device, or the argmax of the logits."""
    if target is None:
        return logits.argmax(dim=1)
    return target.to(logits.device)


def target_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each image's target logit (images are independent)."""
    return logits.gather(1, target[:, None]).sum()
