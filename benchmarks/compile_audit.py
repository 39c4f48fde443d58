"""Compile audit of the attention kernels for an H100 (sm_90), no GPU needed.

Every (kernel, constexpr variant the wrappers pass, dtype, head width) specialisation is compiled
for ``GPUTarget("cuda", 90, 32)`` with each configuration its autotuner can choose *after pruning*
(``kernels.attention.table_configs``), with Triton's bundled ptxas. Registers and spilled bytes are
read from ptxas' ``-v`` log, shared memory from the compiled kernel's metadata; CTAs/SM follow from
H100 limits (65,536 registers, 228 KB shared memory, 2048 threads, 32 CTAs per SM; 227 KB per CTA).

    python benchmarks/compile_audit.py [--jobs N] [--out benchmarks/results/compile-sm90]

Run without TRITON_INTERPRET; each compile uses a temporary TRITON_CACHE_DIR.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA = 232448
THREADS_PER_SM = 2048
MAX_CTAS = 32
PTR_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
FP32_PTRS = ("lse_ptr", "delta_ptr", "row_ptr", "t_ptr")
HEAD_WIDTHS = (32, 64, 80, 96, 128)

#: kernel variants the wrappers launch: (name, kernel attribute, table kind, constexprs)
VARIANTS = [
    ("forward", "_flash_fwd_kernel", "fwd", {}),
    ("dkdv", "_flash_bwd_dkdv_kernel", "bwd", {"ACC": 0, "INPUT_GRADS": True}),
    ("dkdv+gae", "_flash_bwd_dkdv_kernel", "bwd", {"ACC": 1, "INPUT_GRADS": True}),
    ("dkdv gae-only", "_flash_bwd_dkdv_kernel", "bwd", {"ACC": 1, "INPUT_GRADS": False}),
    ("dq", "_flash_bwd_dq_kernel", "dq", {}),
    ("rows probs", "_attention_rows_kernel", "bwd", {"MODE": 0}),
    ("rows relu-grad", "_attention_rows_kernel", "bwd", {"MODE": 1}),
]


def ctas_per_sm(regs: int, num_warps: int, smem: int) -> int:
    threads = 32 * num_warps
    regs_cta = max(regs, 1) * threads
    by_regs = REGS_PER_SM // regs_cta
    by_smem = SMEM_PER_SM // smem if smem else MAX_CTAS
    return min(by_regs, by_smem, THREADS_PER_SM // threads, MAX_CTAS)


def _dtype_classes():
    """(dtype, IEEE) pairs the wrappers pass: 16-bit inputs use tensor cores; float32 uses IEEE
    products (torch's default) or TF32 (when ``torch.backends.cuda.matmul.allow_tf32``)."""
    return [("bf16", False), ("fp16", False), ("fp32", True), ("fp32", False)]


def jobs(variants=None, dtypes=None, widths=HEAD_WIDTHS):
    import triton
    from tokentm_fast.kernels import attention as A

    out = []
    blocks = sorted({max(16, triton.next_power_of_2(d)) for d in widths})
    for name, attr, kind, consts in VARIANTS:
        if variants and name not in variants:
            continue
        for dt, ieee in _dtype_classes():
            if dtypes and dt not in dtypes:
                continue
            for bd in blocks:
                for cfg in A.table_configs(kind, dt, bd):
                    out.append(dict(kernel=name, attr=attr, dtype=dt + ("" if not (dt == "fp32") else
                                    (" ieee" if ieee else " tf32")), ptr=PTR_TYPES[dt], BLOCK_D=bd,
                                    widths=[d for d in widths if max(16, triton.next_power_of_2(d)) == bd],
                                    consts={**consts, "IEEE": ieee, "UPCAST": False, "BLOCK_D": bd},
                                    config=cfg))
    return out


def compile_one(job: dict) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from tokentm_fast.kernels import attention as A

        knobs.nvidia.dump_ptxas_log = True
        fn = getattr(A, job["attr"]).fn
        bm, bn, w, s = job["config"]
        c = {**job["consts"], "BLOCK_M": bm, "BLOCK_N": bn}
        sig = {a: "constexpr" if a in c else (("*fp32" if a in FP32_PTRS else job["ptr"]) if a.endswith("_ptr") else
               "fp32" if a in ("qk_scale", "scale") else "i32") for a in fn.arg_names}
        t0 = time.perf_counter()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": w, "num_stages": s})
        log = buf.getvalue()
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
        spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
        smem = int(k.metadata.shared)
        res = {key: job[key] for key in ("kernel", "dtype", "BLOCK_D", "widths")}
        res.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, regs=regs,
                   spills=max(spill_st, spill_ld), smem=smem, ctas_per_sm=ctas_per_sm(regs, w, smem),
                   compile_s=round(time.perf_counter() - t0, 2))
        return res


def failures(rows):
    return [r for r in rows if r["spills"] > 0 or r["smem"] > SMEM_PER_CTA or r["ctas_per_sm"] < 1]


def run(jobs_list, workers=None):
    with ProcessPoolExecutor(workers or os.cpu_count()) as ex:
        return list(ex.map(compile_one, jobs_list))


def versions():
    import torch
    import triton
    return {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def write(rows, out_dir, command, seconds):
    os.makedirs(out_dir, exist_ok=True)
    meta = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": "cuda sm_90 (H100), warp 32", "wall_s": round(seconds, 1), **versions()}
    with open(os.path.join(out_dir, "audit.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Compile audit, sm_90\n", f"Command: `{command}`  ", f"Date: {meta['date']}  ",
             f"Versions: Triton {meta['triton']}, torch {meta['torch']}, Python {meta['python']}; {meta['machine']}; "
             f"wall {meta['wall_s']} s  ",
             f"Failures (spills > 0, smem > 227 KB or < 1 CTA/SM): {len(failures(rows))} of {len(rows)}\n",
             "| kernel | dtype | head widths (BLOCK_D) | BLOCK_M×BLOCK_N, warps, stages | regs | spills (B) | smem (B) | CTAs/SM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {','.join(map(str, r['widths']))} ({r['BLOCK_D']}) | "
                     f"{r['BLOCK_M']}×{r['BLOCK_N']}, {r['num_warps']}, {r['num_stages']} | {r['regs']} | "
                     f"{r['spills']} | {r['smem']} | {r['ctas_per_sm']} |")
    with open(os.path.join(out_dir, "audit.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None, help="write audit.md / audit.json here")
    p.add_argument("--kernel", action="append", help="only these variants (names as in the table)")
    p.add_argument("--dtype", action="append", choices=list(PTR_TYPES))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(jobs(a.kernel, a.dtype), a.jobs)
    dt = time.perf_counter() - t0
    for r in rows:
        print(json.dumps(r))
    bad = failures(rows)
    print(f"{len(rows)} compiles in {dt:.0f} s; {len(bad)} failing", file=sys.stderr)
    if a.out:
        write(rows, a.out, "python benchmarks/compile_audit.py " + " ".join(argv if argv is not None else sys.argv[1:]), dt)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
