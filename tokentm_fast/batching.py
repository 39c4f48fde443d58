"""``explain(..., batch_size=k)``: chunks of ``k`` images, results concatenated (Captum's
``internal_batch_size``), with an optional tqdm progress bar."""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch

from .targets import check_targets, target_rows


def check_batch_size(batch_size: Any) -> Optional[int]:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (images per chunk) or None, got {batch_size!r}")
    return batch_size


def explain_in_chunks(explainer, images: torch.Tensor, target: Any, batch_size: Optional[int],
                      progress: Optional[bool]) -> torch.Tensor:
    """``explainer(images[i:i+k], target[i:i+k])`` for every chunk, concatenated along the batch."""
    batch_size = check_batch_size(batch_size)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        return explainer(images, target)            # the single call gives the usual message
    b = images.shape[0]
    k = b if batch_size is None else batch_size
    # the whole batch's target is checked once, before any work, then sliced per chunk
    checked = check_targets(target, b, explainer.vit.num_classes)
    starts = list(range(0, b, k)) or [0]
    show = (len(starts) > 1 and sys.stderr.isatty()) if progress is None else progress
    from tqdm.auto import tqdm

    outs = []
    with tqdm(total=b, disable=not show, desc=f"explain {explainer.method}", unit="img",
              file=sys.stderr) as bar:
        for i in starts:
            outs.append(explainer(images[i:i + k], target_rows(checked, i, i + k)))
            bar.update(min(k, b - i))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
