"""Peak memory of one explain call per backend (and of the plain forward+backward).

Every measurement runs in a fresh subprocess (a process's peak RSS only grows):

- CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the call minus the same
  after the model and images were created (the high-water mark the call added).
- CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus
  ``torch.cuda.memory_allocated()`` before it (peak tensor memory the call added).

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
from typing import Dict, List, Optional


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args) -> Dict[str, float]:
    import torch

    import tokentm_fast as tf
    from bench_memory import measure_peak
    from bench_models import explicit_step, random_images, random_vit

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_vit(args.model, device)
    images, target = random_images(model, args.batch, device)
    if args.backend == "baseline":
        run = explicit_step(model, images, target)
    else:
        def run():
            return tf.explain(model, images, method=args.method, target=target, backend=args.backend)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        out, extra = measure_peak(run, device)
        del out
        return {"before": before, "peak": before + extra, "extra": extra}
    before = _rss_peak_bytes()
    out = run()
    peak = _rss_peak_bytes()
    del out
    return {"before": before, "peak": peak, "extra": peak - before}


def measure(model: str, batch: int, device: str, method: str, backend: str, threads: Optional[int]) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--batch", str(batch),
           "--device", device, "--method", method, "--backend", backend]
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


def table(model: str, batch: int, device: str, results: List[Dict]) -> str:
    import torch

    from benchtable import device_name

    how = ("torch.cuda.max_memory_allocated − allocated before" if device.startswith("cuda")
           else "ru_maxrss after the call − after model creation")
    lines = [f"Peak memory added by one call: {model}, batch {batch}, {device_name(device)}, "
             f"torch {torch.__version__} ({how}; one fresh process each)", "",
             "| run | backend | peak (MiB) | vs reference | vs fwd+bwd |", "|---|---|---:|---:|---:|"]
    base = next((r["extra"] for r in results if r["backend"] == "baseline" and "extra" in r), None)
    refs = {r["method"]: r["extra"] for r in results if r["backend"] == "reference" and "extra" in r}
    for r in results:
        what = "forward+backward" if r["backend"] == "baseline" else r["method"]
        if "error" in r:
            lines.append(f"| {what} | {r['backend']} | failed: {r['error']} | – | – |")
            continue
        ref = refs.get(r["method"])
        vs_ref = f"{r['extra'] / ref:.2f}×" if ref and r["backend"] not in ("reference", "baseline") else "–"
        vs_base = f"{r['extra'] / base:.2f}×" if base else "–"
        lines.append(f"| {what} | {r['backend']} | {_mib(r['extra'])} | {vs_ref} | {vs_base} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--methods", nargs="+", default=["tokentm"])
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: reference torch (+ triton on cuda)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain forward+backward")
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
        r = measure(args.model, args.batch, args.device, method or "tokentm", backend, args.threads)
        r.update(method=method, backend=backend)
        results.append(r)
    md = table(args.model, args.batch, args.device, results)
    print(md, end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "batch": args.batch, "device": args.device, "results": results}, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
