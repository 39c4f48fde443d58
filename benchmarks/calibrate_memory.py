"""Check the memory estimates of ``bench_memory`` against measured peaks.

For small random-init timm ViTs (and synthetic aggregation layers) it measures
the peak memory of each path with ``bench_memory.measure_peak`` (CPU: the
``PeakTracker`` dispatch mode; CUDA: the allocator's peak) and prints the
estimate ÷ measured ratio: the size filter needs every ratio ≥ 1 (it must never
let a size through that does not fit) and not far above it (it must not leave
out sizes that fit). ``tests/test_benchmarks_memory.py`` runs a few of these.

    python benchmarks/calibrate_memory.py [--device cuda] [--methods tokentm gae]
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Tuple

import torch
from bench_memory import explain_peak, measure_peak, step_peak
from bench_models import literal_explain, model_shape, random_images, random_vit, training_step

# (img_size, patch, depth, batch, width, heads)
CONFIGS: List[Tuple[int, int, int, int, int, int]] = [
    (64, 8, 2, 2, 64, 4), (128, 8, 4, 1, 64, 4), (96, 8, 5, 2, 96, 3), (64, 16, 6, 3, 192, 3),
    (128, 8, 3, 1, 32, 2), (64, 8, 2, 4, 384, 6), (160, 8, 2, 1, 96, 6), (48, 16, 3, 4, 384, 2),
]


def tiny_vit(img: int, patch: int, depth: int, width: int, heads: int, device="cpu",
             dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return random_vit("vit_tiny_patch16_224", device, dtype=dtype, img_size=img, patch_size=patch, depth=depth,
                      embed_dim=width, num_heads=heads, num_classes=10, fused_attn=True)


def explain_ratios(model: torch.nn.Module, batch: int, methods, backends, device="cpu") -> Dict[str, Tuple[int, int]]:
    """``{"method/backend": (estimate, measured)}`` for one model and batch (``backend`` may be
    ``"literal"`` or ``"step"``, the baselines)."""
    import tokentm_fast as tf

    images, target = random_images(model, batch, device)
    shape = model_shape(model)
    shape["B"] = batch
    out = {}
    for backend in backends:
        if backend == "step":
            _, peak = measure_peak(training_step(model, images, target), device)
            out["step"] = (step_peak(**shape, fused=True), peak)  # parameter gradients included
            continue
        for method in methods:
            if backend == "literal":
                if method not in ("tokentm", "gae"):
                    continue
                fn = lambda: literal_explain(model, images, target, method)  # noqa: E731
                extra = shape["params"] * shape["itemsize"]  # the parameter gradients of the backward
            else:
                fn = lambda: tf.explain(model, images, method=method, target=target, backend=backend)  # noqa: E731
                extra = 0
            _, peak = measure_peak(fn, device)
            out[f"{method}/{backend}"] = (explain_peak(method, backend, **shape) + extra, peak)
    return out


def aggregation_ratio(L: int, H: int, N: int, B: int, backend: str, suite: str = "aggregation",
                      device="cpu") -> Tuple[int, int]:
    """(estimate, measured) of one aggregation case: making its data, then the timed call."""
    import test_bench_aggregation as agg

    agg.CONFIGS["probe"] = dict(L=L, H=H, D=384)
    try:
        case = agg.Case(suite, "probe", N, B, "float32", backend)

        def run():
            d = agg.make_layers(case, device)
            if backend == "reference":
                d = agg._as_reference_inputs(d)
            return agg.IMPLS[backend](d["attns"], d["grads"], d["w_attn"], d["w_mlp"], d["query"], d["c0"],
                                      suite == "aggregation_full")

        with torch.no_grad():
            _, peak = measure_peak(run, device)
        return case.memory(), peak
    finally:
        agg.CONFIGS.pop("probe", None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=["tokentm", "gae", "rollout", "legrad"])
    args = p.parse_args(argv)
    worst = (float("inf"), 0.0)
    print("| config | path | estimate (MiB) | measured (MiB) | estimate ÷ measured |")
    print("|---|---|---:|---:|---:|")
    for img, patch, depth, batch, width, heads in CONFIGS:
        model = tiny_vit(img, patch, depth, width, heads, args.device)
        res = explain_ratios(model, batch, args.methods, ("reference", "torch", "literal", "step"), args.device)
        n = (img // patch) ** 2 + 1
        for what, (est, peak) in res.items():
            r = est / max(peak, 1)
            worst = (min(worst[0], r), max(worst[1], r))
            print(f"| L={depth} N={n} D={width} H={heads} B={batch} | {what} | {est / 2**20:.1f} | "
                  f"{peak / 2**20:.1f} | {r:.2f} |")
    for L, H, N, B in ((4, 6, 197, 1), (2, 4, 257, 2)):
        for backend in ("reference", "torch"):
            est, peak = aggregation_ratio(L, H, N, B, backend, device=args.device)
            r = est / max(peak, 1)
            worst = (min(worst[0], r), max(worst[1], r))
            print(f"| aggregation L={L} H={H} N={N} B={B} | {backend} | {est / 2**20:.1f} | {peak / 2**20:.1f} | {r:.2f} |")
    print(f"\nestimate ÷ measured: {worst[0]:.2f} … {worst[1]:.2f}")
    return 0 if worst[0] >= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
