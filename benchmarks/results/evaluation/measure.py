"""Throughput of the evaluation protocol against its floor, and bfloat16 against float32.

1. ``protocol``: ``tokentm-fast evaluate --metrics perturbation --methods tokentm``
   on the synthetic set (a subprocess, the command is recorded); images/s of
   the loop (``run.images_per_s``: data loading, explanation, 19 forward
   passes, metric bookkeeping) and of the whole command (start-up included).
2. ``floor``: in this process, on the same batches already in memory: the
   TokenTM explanations alone plus the protocol's own forward passes alone
   (the clean batch and its 18 perturbed copies, built beforehand, packed in
   passes of ``--max-forward-batch`` images). ``protocol / floor`` is the
   overhead of everything else (target: within 1.25x).
3. ``dtype``: the same evaluation (segmentation + perturbation, three methods)
   with ``--dtype float32`` and ``--dtype bfloat16``: the differences of every
   reported number.

Usage (what produced the files next to this script)::

    OMP_NUM_THREADS=1 python benchmarks/results/evaluation/measure.py --out benchmarks/results/evaluation
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def protocol(args, out: Path, repeat: int) -> dict:
    res = out / f"protocol_{repeat}.json"
    cmd = ["tokentm-fast", "evaluate", "--model", "synthetic", "--data", "synthetic", "--size", str(args.size),
           "--methods", "tokentm", "--metrics", "perturbation", "--batch-size", str(args.batch_size),
           "--max-forward-batch", str(args.max_forward_batch), "--workers", str(args.workers),
           "--threads", str(args.threads), "--device", args.device, "--no-progress", "--restart",
           "--output", str(res)]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tokentm_fast", *cmd[1:]], check=True, capture_output=True)
    wall = time.perf_counter() - t
    r = json.loads(res.read_text())
    res.unlink()
    return {"command": " ".join(cmd[:-1] + ["protocol.json"]), "loop_images_per_s": r["run"]["images_per_s"],
            "command_wall_s": wall, "command_images_per_s": args.size / wall}


def floor(args) -> dict:
    from tokentm_fast import Explainer
    from tokentm_fast.evaluation import EvalDataset, Preprocess, SyntheticSource, collate, model_data_config
    from tokentm_fast.metrics.perturbation import DEFAULT_FRACTIONS, num_removed, relevance_ranks
    from tokentm_fast.metrics.segmentation import upsample_maps
    from tokentm_fast.synthetic import create_synthetic_vit

    dev = torch.device(args.device)
    model = create_synthetic_vit(pretrained=True).eval().to(dev)
    pre = Preprocess(model_data_config(model))
    ds = EvalDataset(SyntheticSource("test", size=args.size), pre)
    batches = [collate([ds[i] for i in range(s, min(s + args.batch_size, args.size))])
               for s in range(0, args.size, args.batch_size)]
    explainer = Explainer(model, method="tokentm")
    t_explain = t_forward = 0.0
    for b in batches:
        x, x01 = b["images"].to(dev), b["images01"].to(dev)
        sync()
        t = time.perf_counter()
        maps = explainer(x)
        sync()
        t_explain += time.perf_counter() - t
        # the protocol's own forward passes, inputs built beforehand (not timed)
        n, _, h, w = x01.shape
        ranks = relevance_ranks(upsample_maps(maps, (h, w)).reshape(n, -1)).reshape(n, 1, h, w)
        variants = [x01]
        for f in DEFAULT_FRACTIONS:
            k = num_removed(f, h * w)
            variants += [x01 * (ranks >= k), x01 * (ranks < h * w - k)]
        rows = pre.normalize(torch.cat(variants))
        passes = rows.split(args.max_forward_batch)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            for p in passes:
                model(p)
        sync()
        t_forward += time.perf_counter() - t
    return {"explain_s": t_explain, "forward_s": t_forward, "floor_images_per_s": args.size / (t_explain + t_forward)}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dtype_comparison(args, out: Path) -> dict:
    from tokentm_fast.evaluation import evaluate

    common = dict(methods=args.dtype_methods.split(","), metrics=("segmentation", "perturbation"),
                  size=args.dtype_size, batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                  progress=False, restart=True)
    res = {}
    for dt in ("float32", "bfloat16"):
        res[dt] = evaluate("synthetic", "synthetic", dtype=dt, output=out / f"dtype_{dt}.json", **common)
    rows = []
    for a, b in zip(res["float32"]["records"], res["bfloat16"]["records"]):
        for key, va in a["values"].items():
            vb = b["values"][key]
            if isinstance(va, float) and isinstance(vb, float):
                rows.append({"method": a["method"], "metric": key, "float32": va, "bfloat16": vb, "diff": vb - va})
    return {"images": args.dtype_size, "command": (
        f"tokentm-fast evaluate --model synthetic --data synthetic --size {args.dtype_size} --methods "
        f"{args.dtype_methods} --metrics segmentation,perturbation --batch-size {args.batch_size} --dtype DTYPE"),
        "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/evaluation")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-forward-batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype-size", type=int, default=128)
    p.add_argument("--dtype-methods", default="tokentm,legrad,rollout")
    p.add_argument("--skip-dtype", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for r in range(args.repeats):  # interleaved: the machine's load drifts
        runs.append({"protocol": protocol(args, out, r), "floor": floor(args)})
    best_p = max(x["protocol"]["loop_images_per_s"] for x in runs)
    best_f = max(x["floor"]["floor_images_per_s"] for x in runs)
    summary = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_available": len(os.sched_getaffinity(0)),
                    "load_average": os.getloadavg(), "torch": torch.__version__, "device": args.device},
        "settings": vars(args),
        "runs": runs,
        "best_protocol_images_per_s": best_p,
        "best_floor_images_per_s": best_f,
        "protocol_over_floor": best_f / best_p,
    }
    if not args.skip_dtype:
        summary["dtype"] = dtype_comparison(args, out)
    (out / "measurements.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("runs", "dtype")}, indent=1))
    for x in runs:
        print(x)
    for row in summary.get("dtype", {}).get("rows", []):
        print(f"{row['method']:10s} {row['metric']:20s} {row['float32']:.6f} {row['bfloat16']:.6f} {row['diff']:+.2e}")


if __name__ == "__main__":
    main()
