"""Cold compile time of what one flash-path ``explain(method="tokentm")`` needs, and (``--gpu``) first-call
and second-process latency on CUDA.

CPU mode (no GPU): for each (dtype, head width) of ``--case`` (default bf16/64, bf16/128, fp32/64, fp32/128),
compile for sm_90 with Triton's bundled ptxas, from an empty TRITON_CACHE_DIR, every configuration the
pruned autotuners can choose for the attention kernels the flash path launches: the forward, the dK/dV
program with the GAE accumulator (with and without input gradients) and dQ. Float32 is compiled with IEEE
products (torch's default). The compiles run in parallel (``--jobs``, default ``os.cpu_count()``), as
Triton's autotuner would compile them one by one on a GPU machine, the wall time here is a lower bound for
one worker per core.

    python benchmarks/compile_time.py [--out benchmarks/results/compile-time-cpu]
    python benchmarks/compile_time.py --gpu [--model vit_base_patch16_224] [--dtype bf16]

GPU mode: runs ``explain`` in a fresh process with an empty TRITON_CACHE_DIR (first call: compile + tune),
then a second process with the same cache dir, and asserts that the second process benchmarks no
configuration (Triton's ``cache_results``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_audit as C  # noqa: E402

CASES = [("bf16", 64), ("bf16", 128), ("fp32", 64), ("fp32", 128)]
FLASH_VARIANTS = ("forward", "dkdv+gae", "dkdv gae-only", "dq")


def cold_compile(dtype: str, width: int, workers: int) -> dict:
    jobs = [j for j in C.jobs(variants=FLASH_VARIANTS, dtypes=[dtype], widths=(width,))
            if j["dtype"] in (dtype, "fp32 ieee")]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as ex:  # compile_one uses its own empty TRITON_CACHE_DIR
        rows = list(ex.map(C.compile_one, jobs))
    wall = time.perf_counter() - t0
    return {"dtype": dtype, "head_width": width, "compiles": len(rows), "wall_s": round(wall, 1),
            "sum_compile_s": round(sum(r["compile_s"] for r in rows), 1), "workers": workers}


_GPU_CHILD = r"""
import json, sys, time, torch, timm
from triton.runtime import autotuner
import tokentm_fast
benched = []
orig = autotuner.Autotuner._bench
def counting(self, *a, **k):
    benched.append(1)
    return orig(self, *a, **k)
autotuner.Autotuner._bench = counting
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[sys.argv[2]]
model = timm.create_model(sys.argv[1], pretrained=False).cuda().to(dtype).eval()
x = torch.randn(1, 3, 224, 224, device="cuda", dtype=dtype)
torch.cuda.synchronize(); t0 = time.perf_counter()
tokentm_fast.explain(model, x, method="tokentm", backend="triton")
torch.cuda.synchronize(); first = time.perf_counter() - t0
t0 = time.perf_counter()
tokentm_fast.explain(model, x, method="tokentm", backend="triton")
torch.cuda.synchronize(); warm = time.perf_counter() - t0
print(json.dumps({"first_s": first, "warm_s": warm, "benchmarked": len(benched)}))
"""


def gpu(model: str, dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        out = []
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", _GPU_CHILD, model, dtype], env=env, capture_output=True,
                               text=True, check=True)
            out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    res = {"model": model, "dtype": dtype, "first_process": out[0], "second_process": out[1]}
    assert out[1]["benchmarked"] == 0, f"the second process benchmarked {out[1]['benchmarked']} configurations"
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--case", action="append", help="dtype/width, e.g. bf16/64 (repeatable)")
    p.add_argument("--out", default=None)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--dtype", default="bf16")
    a = p.parse_args(argv)
    if a.gpu:
        print(json.dumps(gpu(a.model, a.dtype)))
        return 0
    cases = [(c.split("/")[0], int(c.split("/")[1])) for c in a.case] if a.case else CASES
    rows = []
    for dt, w in cases:
        rows.append(cold_compile(dt, w, a.jobs))
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        meta = {"command": "python benchmarks/compile_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **C.versions(),
                "cpu": platform.processor() or platform.machine()}
        with open(os.path.join(a.out, "compile_time.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        lines = ["# Cold compile time, sm_90 target, on the CPU\n", f"Command: `{meta['command']}`  ",
                 f"Date: {meta['date']}  ", f"Versions: Triton {meta['triton']}, torch {meta['torch']}, "
                 f"Python {meta['python']}; machine: {meta['machine']}\n", "Target: ≤ 20 s per (dtype, head width).\n",
                 "| dtype | head width | compiles | wall (s) | sum of compile times (s) | workers |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['head_width']} | {r['compiles']} | {r['wall_s']} | {r['sum_compile_s']} | "
                  f"{r['workers']} |" for r in rows]
        with open(os.path.join(a.out, "compile_time.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
