"""Timing explanations against a training step: what ``tokentm-fast bench`` measures.

``median_seconds`` times a call (median of repeated calls after one warm-up
call, the device synchronized around each); ``time_explain`` times one
forward+backward step with parameter gradients and then ``explain`` for every
(method, backend); ``format_timings`` prints the rows as a plain table, each
time also as a ratio to the forward+backward step. The benchmark suite with its
tables and targets is tooling and lives in the repository's ``benchmarks/``.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["random_batch", "median_seconds", "time_explain", "format_timings"]

#: One timed row: (what ran, backend or ``"-"``, median seconds).
Timing = Tuple[str, str, float]


def random_batch(model: nn.Module, batch: int, device: torch.device,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded random inputs: images ``(batch, 3, H, W)`` at the model's input size and targets ``(batch,)``."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *model.patch_embed.img_size, generator=gen).to(device=device, dtype=dtype)
    target = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    return images, target


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call (a CUDA device synchronized)."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_explain(model: nn.Module, images: torch.Tensor, target: torch.Tensor, methods: Sequence[str],
                 backends: Sequence[str], repeats: int, device: torch.device,
                 options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> List[Timing]:
    """The forward+backward row, then one row per (method, backend) of ``explain(model, images, ...)``.

    Args:
        model: the model, in eval mode, on ``device``.
        images: ``(B, 3, H, W)`` inputs; target: ``(B,)`` class indices.
        options: per-method options, e.g. ``{"legrad": {"start_layer": -3}}`` (the defaults otherwise).
    """
    from .. import explain

    per_method: Dict[str, Mapping[str, Any]] = {m: dict((options or {}).get(m, {})) for m in methods}

    def step() -> None:
        logits = model(images)
        logits.gather(1, target[:, None]).sum().backward()
        model.zero_grad(set_to_none=True)

    rows = [("forward+backward", "-", median_seconds(step, repeats, device))]
    for method in methods:
        for backend in backends:
            rows.append((method, backend, median_seconds(
                lambda m=method, b=backend: explain(model, images, method=m, target=target, backend=b,
                                                    **per_method[m]),
                repeats, device)))
    return rows


def format_timings(rows: Sequence[Timing]) -> List[str]:
    """The lines of the table of ``rows`` (milliseconds, and the ratio to the first row, the training step).

    Each column is as wide as its longest entry (``transformer_attribution``), so the columns line up
    whatever the method and backend names.
    """
    base = rows[0][2]
    head = ("run", "backend", "ms", "x fwd+bwd")
    body = [(what, backend, f"{t * 1e3:.1f}", f"{t / base:.2f}") for what, backend, t in rows]
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]),
                          cells[2].rjust(widths[2]), cells[3].rjust(widths[3])])

    return [line(head)] + [line(r) for r in body]
