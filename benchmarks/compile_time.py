"""Cold compile time of what one flash-path ``explain(method="tokentm")`` needs (or, ``--set relevance``, the
relevance programs of the LRP family's flash path), and (``--gpu``) the first-call and second-process latency on
CUDA.

CPU mode (no GPU): for each (dtype, head width) of ``--case`` (default bf16/64, bf16/128, fp32/64, fp32/128)
compile for sm_90 with Triton's bundled ptxas, each compile from an empty TRITON_CACHE_DIR, every
configuration the pruned autotuners can choose for the kernels a flash-path TokenTM explanation launches
(``FLASH_TOKENTM``): the attention forward, dK/dV with the GAE accumulator with and without input
gradients, dQ, δ, the transformation weights and the NECC normalisation (N = 197). float32 is compiled
with IEEE products (torch's default). ``--jobs`` compiles run in parallel (default: every core); the
figures give the wall time and the sum of the single compile times (what one process compiling them
one after the other, as Triton's autotuner does on a GPU machine, would spend).

    python benchmarks/compile_time.py --out benchmarks/results/compile-time-cpu
    python benchmarks/compile_time.py --set relevance --jobs 1 --out benchmarks/results/compile-time-cpu
    python benchmarks/compile_time.py --gpu [--model vit_base_patch16_224] [--dtype bf16] [--out DIR]

GPU mode: runs one ``explain`` in a fresh process with an empty TRITON_CACHE_DIR (first call: compile and
tune) and then a second process with the same cache dir; each child counts the autotuner's benchmark
runs (``Autotuner._bench`` patched in the child). The second process must benchmark nothing (Triton's
``cache_results``): the script exits non-zero otherwise.
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
#: kernel -> constexprs of the launch one flash-path TokenTM explanation makes (None: every audited variant)
FLASH_TOKENTM = {"forward": None, "dkdv+gae": None, "dkdv gae-only": None, "dq": None, "delta": None,
                 "transform_weights": {"USE_LENGTH": True, "USE_NECC": True}, "necc_normalize": None}
#: kernel -> constexprs: every variant of the two relevance programs (``kernels/attention_relevance.py``): the
#: key program without t (lrp), with partial LRP's and with transformer attribution's row sums, the query program
#: (a process explaining with the three methods compiles all four; one method compiles two of them)
FLASH_RELEVANCE = {"relevance kv": None, "relevance kv+rows": None, "relevance kv+grad rows": None,
                   "relevance q": None}
#: ``--set`` -> (kernels, what the set is, its output file stem)
SETS = {"tokentm": (FLASH_TOKENTM, "one flash-path explain(method=\"tokentm\")", "compile_time"),
        "relevance": (FLASH_RELEVANCE, "the relevance programs of the flash path (lrp, partial_lrp, "
                      "transformer_attribution: every variant)", "compile_time_relevance")}
N_TOKENS = 197


def flash_jobs(dtype: str, width: int, n: int = N_TOKENS, kernels=None):
    """The compiles of one flash-path ``explain(method="tokentm")`` (or of ``kernels``: a ``SETS`` entry's dict)
    at (dtype, head width, N)."""
    kernels = FLASH_TOKENTM if kernels is None else kernels
    out = []
    for j in C.jobs(kernels=list(kernels), dtypes=[dtype], widths=(width,), tokens=(n,)):
        if j["dtype"] not in (dtype, "fp32 ieee") and C.SPECS[j["kernel"]]["model"]:
            continue  # float32: IEEE products (TF32 off, torch's default)
        want = kernels[j["kernel"]]
        if want and any(j["consts"].get(k) != v for k, v in want.items()):
            continue
        if j["kernel"] == "necc_normalize" and j["config"][0]["BLOCK"] != min(1024, max(16, C._next_pow2(n))):
            continue
        out.append(j)
    return out


def cold_compile(dtype: str, width: int, workers: int, kernels=None) -> dict:
    jobs = flash_jobs(dtype, width, kernels=kernels)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as ex:  # compile_one uses its own empty TRITON_CACHE_DIR
        rows = list(ex.map(C.compile_one, jobs, chunksize=1))
    wall = time.perf_counter() - t0
    per_kernel = {}
    for r in rows:
        per_kernel[r["kernel"]] = per_kernel.get(r["kernel"], 0) + 1
    return {"dtype": dtype + (" (IEEE)" if dtype == "fp32" else ""), "head_width": width, "compiles": len(rows),
            "per_kernel": per_kernel, "wall_s": round(wall, 1),
            "sum_compile_s": round(sum(r["compile_s"] for r in rows), 1), "workers": workers}


_GPU_CHILD = r"""
import json, sys, time
import torch, timm
from triton.runtime import autotuner
import tokentm_fast
benched = []
original = autotuner.Autotuner._bench
def counting(self, *a, **k):
    benched.append(self.base_fn.__name__)
    return original(self, *a, **k)
autotuner.Autotuner._bench = counting
name, dtype_name, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
torch.manual_seed(0)
model = timm.create_model(name, pretrained=False, img_size=size).cuda().to(dtype).eval()
x = torch.randn(1, 3, size, size, device="cuda", dtype=dtype)
torch.cuda.synchronize(); t0 = time.perf_counter()
tokentm_fast.explain(model, x, method="tokentm", backend="triton", attention="flash")
torch.cuda.synchronize(); first = time.perf_counter() - t0
n_first = len(benched)
t0 = time.perf_counter()
tokentm_fast.explain(model, x, method="tokentm", backend="triton", attention="flash")
torch.cuda.synchronize(); warm = time.perf_counter() - t0
print(json.dumps({"first_call_s": round(first, 3), "warm_call_s": round(warm, 4), "benchmarked": n_first,
                  "benchmarked_kernels": sorted(set(benched)), "benchmarked_after_first_call": len(benched) - n_first}))
"""


def gpu(model: str, dtype: str, size: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_AUTOTUNING")}
        env["TRITON_CACHE_DIR"] = cache
        out = []
        for _ in range(2):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", _GPU_CHILD, model, dtype, str(size)], env=env,
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-4000:])
            res = json.loads(p.stdout.strip().splitlines()[-1])
            res["process_s"] = round(time.perf_counter() - t0, 1)
            out.append(res)
    import torch
    return {"model": model, "dtype": dtype, "image_size": size, "device": torch.cuda.get_device_name(0),
            "first_process": out[0], "second_process": out[1]}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


def _meta(argv):
    return {"command": "python benchmarks/compile_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **C.versions(),
            "machine": _machine(), "load_average_1min_at_start": round(os.getloadavg()[0], 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--case", action="append", help="dtype/width, e.g. bf16/64 (repeatable)")
    p.add_argument("--set", choices=list(SETS), default="tokentm", help="which kernels (CPU mode)")
    p.add_argument("--out", default=None, help="write compile_time.md / .json (gpu_latency.json with --gpu)")
    p.add_argument("--gpu", action="store_true", help="first-call and second-process latency on CUDA")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--dtype", default="bf16", choices=list(C.DTYPES))
    p.add_argument("--image-size", type=int, default=224)
    a = p.parse_args(argv)
    if a.gpu:
        import torch

        if not torch.cuda.is_available():
            print("--gpu needs a CUDA device; without one: python benchmarks/compile_time.py (CPU mode)",
                  file=sys.stderr)
            return 2
        res = gpu(a.model, a.dtype, a.image_size)
        print(json.dumps(res))
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, f"gpu_latency_{a.model}_{a.dtype}.json"), "w") as f:
                json.dump({"meta": _meta(argv), **res}, f, indent=1)
        second = res["second_process"]["benchmarked"]
        if second:
            print(f"the second process benchmarked {second} configurations", file=sys.stderr)
            return 1
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    cases = [(c.split("/")[0], int(c.split("/")[1])) for c in a.case] if a.case else CASES
    kernels, what, stem = SETS[a.set]
    rows = []
    for dt, w in cases:
        rows.append(cold_compile(dt, w, a.jobs, kernels))
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        meta = _meta(argv)
        with open(os.path.join(a.out, stem + ".json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        lines = [f"# Cold compile time of {what}, sm_90 target, on the CPU\n",
                 f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ",
                 f"Versions: Triton {meta['triton']}, torch {meta['torch']}, Python {meta['python']}  ",
                 f"Machine: {meta['machine']}; 1-minute load average at the start: "
                 f"{meta['load_average_1min_at_start']} (the machine is shared: other jobs slow the compiles)\n",
                 "What: every configuration the pruned autotuners can choose for the kernels "
                 + ("the call launches (forward, dK/dV + GAE with and without input gradients, dQ, δ, transformation "
                    "weights, NECC normalisation" if a.set == "tokentm" else
                    "of " + ", ".join(kernels) + " (kernels/attention_relevance.py")
                 + f"; N = {N_TOKENS}), each compiled from an empty Triton cache for sm_90. "
                 "Target: ≤ 20 s wall per (dtype, head width).\n",
                 "| dtype | head width | compiles | wall (s) | sum of single compiles (s) | workers |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['head_width']} | {r['compiles']} | {r['wall_s']} | {r['sum_compile_s']} | "
                  f"{r['workers']} |" for r in rows]
        with open(os.path.join(a.out, stem + ".md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
