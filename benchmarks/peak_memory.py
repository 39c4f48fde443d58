"""Peak memory of the first and of a warm explain call per backend, and of the training step.

The baseline is the training step of the performance protocol (``bench_models.training_step``: timm's
defaults, fused attention, parameter gradients, ``zero_grad(set_to_none=True)``). Every (method, backend)
runs in a fresh subprocess (a process's peak RSS only grows; on CUDA the first call compiles and autotunes
the Triton kernels), which calls it twice:

- first call: CPU ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the call minus the same after the
  model and images were created (the high-water mark the call added, one-time allocations included);
  CUDA ``torch.cuda.max_memory_allocated()`` during the call minus ``torch.cuda.memory_allocated()``
  before it. Its wall time (device synchronized) is the first-call latency.
- warm call (the second): CUDA as above; CPU the tensor storage the call allocates at its peak
  (``bench_memory.PeakTracker``, the counterpart of the CUDA allocator's statistics).

Usage::

    python benchmarks/peak_memory.py --model vit_base_patch16_224 --batch 8
    python benchmarks/peak_memory.py --model vit_base_patch16_224 --batch 64 --device cuda \
        --methods tokentm legrad --json peak.json

prints a markdown table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args) -> Dict[str, float]:
    import torch
    from bench_memory import measure_peak
    from bench_models import random_images, random_vit, training_step

    import tokentm_fast as tf

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_vit(args.model, device, dtype=getattr(torch, args.dtype))
    images, target = random_images(model, args.batch, device)
    if args.backend == "baseline":
        run = training_step(model, images, target)
    else:
        def run():
            return tf.explain(model, images, method=args.method, target=target, backend=args.backend)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out, extra = measure_peak(run, device)  # synchronizes
        first_s = time.perf_counter() - t0
        del out
        t0 = time.perf_counter()
        out, warm = measure_peak(run, device)
        warm_s = time.perf_counter() - t0
        del out
        return {"before": before, "peak": before + extra, "extra": extra, "warm": warm, "first_s": first_s,
                "warm_s": warm_s}
    before = _rss_peak_bytes()
    t0 = time.perf_counter()
    out = run()
    first_s = time.perf_counter() - t0
    peak = _rss_peak_bytes()
    del out
    gc.collect()
    out, warm = measure_peak(run, device)
    del out
    return {"before": before, "peak": peak, "extra": peak - before, "warm": warm, "first_s": first_s}


def measure(model: str, batch: int, device: str, method: str, backend: str, threads: Optional[int],
            dtype: str = "float32") -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--batch", str(batch),
           "--device", device, "--method", method, "--backend", backend, "--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0]}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": "no result"}


def _mib(v: float) -> str:
    return f"{v / 2**20:.0f}"


def table(model: str, batch: int, device: str, results: List[Dict], dtype: str = "float32") -> str:
    import torch
    from benchtable import device_name

    cuda = device.startswith("cuda")
    how = ("torch.cuda.max_memory_allocated − allocated before, both calls" if cuda
           else "first call: ru_maxrss after it − after model creation; warm call: tensor storage at its peak "
                "(PeakTracker)")
    lines = [f"Peak memory added by the first and by a warm call: {model}, batch {batch}, {dtype}, "
             f"{device_name(device)}, torch {torch.__version__} ({how}; one fresh process per row; "
             f"training step = timm defaults, fused attention)", "",
             "| run | backend | first call peak (MiB) | warm call peak (MiB) | first call (s) | first vs reference "
             "| first vs step | warm vs step |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    base = next((r for r in results if r["backend"] == "baseline" and "extra" in r), None)
    refs = {r["method"]: r["extra"] for r in results if r["backend"] == "reference" and "extra" in r}

    def ratio(a, b):
        return f"{a / b:.2f}×" if a is not None and b else "–"

    for r in results:
        what = "training step" if r["backend"] == "baseline" else r["method"]
        if "error" in r:
            lines.append(f"| {what} | {r['backend']} | failed: {r['error']} | – | – | – | – | – |")
            continue
        ref = refs.get(r["method"]) if r["backend"] not in ("reference", "baseline") else None
        warm = r.get("warm")
        lines.append(f"| {what} | {r['backend']} | {_mib(r['extra'])} | {_mib(warm) if warm is not None else '–'} "
                     f"| {r['first_s']:.2f} | {ratio(r['extra'], ref)} | {ratio(r['extra'], base and base['extra'])} "
                     f"| {ratio(warm, base and base.get('warm'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--methods", nargs="+", default=["tokentm"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: reference torch (+ triton on cuda)")
    p.add_argument("--no-baseline", action="store_true", help="skip the training step")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="tokentm", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(child(args)))
        return 0
    backends = args.backends or (["reference", "torch"] + (["triton"] if args.device.startswith("cuda") else []))
    runs = ([] if args.no_baseline else [("", "baseline")]) + [(m, b) for m in args.methods for b in backends]
    results = []
    for method, backend in runs:
        r = measure(args.model, args.batch, args.device, method or "tokentm", backend, args.threads, args.dtype)
        r.update(method=method, backend=backend)
        results.append(r)
    md = table(args.model, args.batch, args.device, results, args.dtype)
    print(md, end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "batch": args.batch, "device": args.device, "dtype": args.dtype,
                       "baseline": "training step (timm defaults, fused attention)", "results": results}, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
