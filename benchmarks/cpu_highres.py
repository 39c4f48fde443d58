"""High-resolution explanations on the CPU against one training step: time and peak memory, one process per case.

    OMP_NUM_THREADS=2 python benchmarks/cpu_highres.py --img 1024 --methods tokentm rollout --out DIR

Each case (the training step, or ``explain`` of one method on ``backend="torch"`` with ``--attention``) runs
in a fresh process on a random-init timm ``vit_base_patch16_224`` at ``--img`` px (N = (img/16)² + 1),
batch ``--batch``, float32: one warm-up call at 64 px builds every lazy state, then one timed call at the
full size. Peak memory is the process's high-water mark (``ru_maxrss``) after that call minus its
resident memory just before it: what the call added above the model and its images. The training step is the protocol's
(``bench_models.training_step``: timm defaults, fused attention, parameter gradients). Writes
``cpu_highres.json`` and ``cpu_highres.md`` (with the command, date, versions and machine) to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, List


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> Dict:
    import torch
    from bench_models import random_images, random_vit, training_step

    import tokentm_fast as tf

    torch.set_num_threads(args.threads)
    small = random_vit(args.model, "cpu", img_size=64)
    model = random_vit(args.model, "cpu", img_size=args.img)
    images, target = random_images(model, args.batch, "cpu")
    x_small, t_small = random_images(small, 1, "cpu")

    def call(m, x, t):
        if args.case == "step":
            return training_step(m, x, t)()
        return tf.explain(m, x, method=args.case, target=t, backend="torch", attention=args.attention)

    call(small, x_small, t_small)        # lazy state (first-call paths) outside the measurement
    del small
    gc.collect()
    before = _rss_now()
    t0 = time.perf_counter()
    out = call(model, images, target)
    seconds = time.perf_counter() - t0
    # the high-water mark after the call minus the resident memory before it (an upper bound when the
    # model's creation left a higher mark than the call reaches)
    return {"seconds": seconds, "peak_added_bytes": _rss_peak() - before, "rss_before_bytes": before,
            "finite": bool(torch.isfinite(out).all())}


def run_case(args, case: str) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--case", case, "--img", str(args.img),
           "--batch", str(args.batch), "--model", args.model, "--attention", args.attention,
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return {"case": case, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["tokentm"])
    p.add_argument("--attention", default="auto", choices=["auto", "flash", "materialized"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-step", action="store_true", help="skip the training step")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", default="step", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import timm
    import torch

    cases = ([] if args.no_step else ["step"]) + list(args.methods)
    rows: List[Dict] = []
    for case in cases:
        rows.append(run_case(args, case))
        print(json.dumps(rows[-1]), flush=True)
    step = next((r for r in rows if r["case"] == "step" and "seconds" in r), None)
    n = (args.img // 16) ** 2 + 1
    meta = {"command": "python benchmarks/cpu_highres.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "model": args.model, "img": args.img, "N": n, "batch": args.batch, "attention": args.attention,
            "threads": args.threads}
    lines = [f"# CPU, {args.model} at {args.img} px (N = {n}), batch {args.batch}, float32, "
             f"{args.threads} threads, backend='torch', attention={args.attention!r}", "",
             f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, timm {meta['timm']}, {meta['machine']}",
             "", "| case | time | ÷ step | peak added | ÷ step |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} | | | |")
            continue
        tr = r["seconds"] / step["seconds"] if step else None
        mr = r["peak_added_bytes"] / max(step["peak_added_bytes"], 1) if step else None
        lines.append(f"| {r['case']} | {r['seconds']:.1f} s | {tr:.2f}× | {r['peak_added_bytes'] / 1e9:.2f} GB | "
                     f"{mr:.2f}× |" if step else f"| {r['case']} | {r['seconds']:.1f} s | | "
                     f"{r['peak_added_bytes'] / 1e9:.2f} GB | |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cpu_highres.json"), "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "cpu_highres.md"), "w", encoding="utf-8") as f:
            f.write(md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
