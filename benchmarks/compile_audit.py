"""Compile audit of every Triton kernel in ``kernels/`` for an H100 (sm_90), no GPU needed.

Every (kernel, constexpr variant the wrappers launch, dtype, head width) specialisation is compiled for
``GPUTarget("cuda", 90, 32)`` with each configuration its autotuner can choose *after pruning*, with
Triton's bundled ptxas. Registers and spilled bytes are read from ptxas' ``-v`` log (``n_spills`` /
``n_regs`` of the compiled kernel's metadata where the backend fills them), shared memory from the
compiled kernel's metadata; CTAs/SM follow from H100 limits (65,536 registers per SM allocated per warp
in units of 256, 228 KB shared memory per SM with 1 KB reserved per CTA, 227 KB = 232,448 B per CTA at
most, 2048 threads and 32 CTAs per SM).

    python benchmarks/compile_audit.py --out benchmarks/results/compile-sm90     # the full audit
    python benchmarks/compile_audit.py --kernel forward --dtype bf16               # a part of it

Run without TRITON_INTERPRET; each compile uses its own temporary TRITON_CACHE_DIR; the compiles run in
parallel over ``--jobs`` processes (default: every core).

What is compiled (``jobs()``), kernel by kernel, is the set the wrappers launch, written out by hand from
the wrapper code below (``SPECS``) and checked against recorded launches of every method on both Triton
paths by ``tests/test_compile_audit.py`` (``recorded_launches``):

* pointer dtypes: the tensors the model's dtype reaches (q/k/v/o/dO, the attention maps, the token
  tensors, LeGrad's gradient rows) in bf16 / fp16 / fp32, every other pointer float32;
* attention kernels (``kernels/attention.py``): BLOCK_D = 32, 64, 128 (head widths 32, 64 and
  80 / 96 / 128), IEEE = True (float32, torch's default) and False (16-bit; float32 with TF32 allowed),
  UPCAST = False (it is True only under the interpreter), the forward, dK/dV plain (``ACC_NONE``: the
  blocks between chosen TokenTM layers) and with the GAE accumulator with and without input gradients,
  dV alone (``GRADS_V``: conservative LRP's backward with the attention held constant), dQ, both
  ``attention_rows`` modes, the δ kernel;
* the other kernels: the head-fusion modes, weights as tensors or constants as the explain paths pass
  them, SPLIT_OUT both ways (chosen at run time from the device's SM count), LeGrad's accumulate flag,
  the NECC normalisation's block sizes and the finalize kernels' Q blocks.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
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
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED = 1024  # shared memory the system reserves per CTA (sm_80 and later)
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
DTYPES = ("bf16", "fp16", "fp32")
HEAD_WIDTHS = (32, 64, 80, 96, 128)
FLOAT_SCALARS = {"qk_scale", "scale", "eps", "inv_n", "w_attn_c", "w_mlp_c"}
KERNEL_MODULES = ("attention", "transform_weights", "row_update", "matrix_update", "head_fusion", "legrad_reduce")
_STRIDE = re.compile(r"^s[a-z]_[bhn]$")  # the attention kernels' stride arguments
#: default launch options of Triton's CUDA backend (kernels launched without a config)
DEFAULT_WARPS, DEFAULT_STAGES = 4, 3


def _bools(*names):
    """Every combination of the boolean constexprs ``names``."""
    out = [{}]
    for n in names:
        out = [{**d, n: v} for d in out for v in (False, True)]
    return out


#: weights of the row / matrix updates as the explain paths pass them: (mode code, W_ATTN_TENSOR, W_MLP_TENSOR)
#: tokentm (gae, tensors), tokentm head_fusion="decoupled" (tensors), gae (gae, constants), rollout (mean
#: fusion with constants). The row update always launches one row per program (BLOCK_Q = 1).
_UPDATE_MODES = [(0, True, True), (1, True, True), (0, False, False), (2, False, False)]

#: name -> what the wrappers launch. "model": pointers in the model's dtype (all others float32);
#: "variants": constexpr dicts; "configs": "table:<kind>" (attention table), "module:<ATTR>" (the module's GPU
#: configurations, pruned by its own hook at a large shape) or a fixed list of (constexprs, warps, stages).
SPECS = {
    "forward": dict(module="attention", attr="_flash_fwd_kernel", model={"q_ptr", "k_ptr", "v_ptr", "o_ptr"},
                    variants=[{}], configs="table:fwd"),
    "dkdv": dict(module="attention", attr="_flash_bwd_dkdv_kernel",
                 model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"},
                 variants=[{"ACC": 0, "GRADS": 2}], configs="table:bwd"),
    "dkdv+gae": dict(module="attention", attr="_flash_bwd_dkdv_kernel",
                     model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"},
                     variants=[{"ACC": 1, "GRADS": 2}], configs="table:bwd"),
    "dkdv gae-only": dict(module="attention", attr="_flash_bwd_dkdv_kernel",
                          model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"},
                          variants=[{"ACC": 1, "GRADS": 0}], configs="table:bwd"),
    "dkdv v-only": dict(module="attention", attr="_flash_bwd_dkdv_kernel",
                        model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"},
                        variants=[{"ACC": 0, "GRADS": 1}], configs="table:bwd"),
    "dq": dict(module="attention", attr="_flash_bwd_dq_kernel", model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr"},
               variants=[{}], configs="table:dq"),
    "rows probs": dict(module="attention", attr="_attention_rows_kernel",
                       model={"q_ptr", "k_ptr", "do_ptr", "v_ptr"}, variants=[{"MODE": 0}], configs="table:bwd"),
    "rows relu-grad": dict(module="attention", attr="_attention_rows_kernel",
                           model={"q_ptr", "k_ptr", "do_ptr", "v_ptr"}, variants=[{"MODE": 1}], configs="table:bwd"),
    "delta": dict(module="attention", attr="_delta_kernel", model={"o_ptr", "do_ptr"}, variants=[{}],
                  configs="delta"),
    "transform_weights": dict(module="transform_weights", attr="_transform_weights_kernel", model={"x_ptr", "t_ptr"},
                              variants=_bools("USE_LENGTH", "USE_NECC"), configs="module:GPU_CONFIGS"),
    "necc_normalize": dict(module="transform_weights", attr="_necc_normalize_kernel", model=set(), variants=[{}],
                           configs=[({"BLOCK": 1 << k}, 4, DEFAULT_STAGES) for k in range(4, 11)]),
    "fuse_heads": dict(module="head_fusion", attr="_fuse_heads_kernel", model={"attn_ptr", "grad_ptr"},
                       variants=[{"MODE": m} for m in range(4)], configs="module:GPU_CONFIGS"),
    "row_update": dict(module="row_update", attr="_row_update_kernel", model={"attn_ptr", "grad_ptr"},
                       variants=[{"MODE": m, "W_ATTN_TENSOR": a, "W_MLP_TENSOR": w, "SPLIT_OUT": s, "BLOCK_Q": 1}
                                 for m, a, w in _UPDATE_MODES for s in (False, True)],
                       configs="module:ROW_GPU_CONFIGS"),
    "matrix_update": dict(module="matrix_update", attr="_matrix_update_kernel", model={"attn_ptr", "grad_ptr"},
                          variants=[{"MODE": m, "W_ATTN_TENSOR": a, "W_MLP_TENSOR": w, "SPLIT_OUT": s,
                                     "ALLOW_TF32": t}
                                    for m, a, w in _UPDATE_MODES for s in (False, True) for t in (False, True)],
                          configs="module:GPU_CONFIGS"),
    "update_finalize": dict(module="row_update", attr="_update_finalize_kernel", model=set(),
                            variants=[{"MODE": m, "W_ATTN_TENSOR": a, "W_MLP_TENSOR": w} for m, a, w in _UPDATE_MODES],
                            configs=[({"BLOCK_Q": q, "BLOCK_J": 128}, 4, DEFAULT_STAGES) for q in (1, 2, 4, 8, 16)]),
    "legrad_reduce": dict(module="legrad_reduce", attr="_legrad_reduce_kernel", model={"g_ptr"},
                          variants=_bools("ACCUMULATE", "SPLIT_OUT"), configs="module:GPU_CONFIGS"),
    "legrad_finalize": dict(module="legrad_reduce", attr="_legrad_finalize_kernel", model=set(),
                            variants=_bools("ACCUMULATE"), configs=[({"BLOCK": 128}, 4, DEFAULT_STAGES)]),
}
ATTENTION_KERNELS = tuple(k for k, s in SPECS.items() if s["module"] == "attention")

#: a shape large enough that no pruning hook drops a configuration for its size
_LARGE = {"N": 1 << 16, "D": 1 << 16, "Q": 1 << 16, "R": 1 << 16, "H": 16, "B": 1, "L": 1}


def ctas_per_sm(regs: int, num_warps: int, smem: int) -> int:
    """Resident CTAs per H100 SM, as CUDA's occupancy calculator counts them: registers are allocated per
    warp in units of 256 (``REG_UNIT``), every CTA reserves 1 KB of shared memory for the system
    (``SMEM_RESERVED``), at most 2048 threads and 32 CTAs per SM."""
    threads = 32 * num_warps
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED) if smem else MAX_CTAS
    if smem > SMEM_PER_CTA:
        by_smem = 0
    return min(by_regs, by_smem, THREADS_PER_SM // threads, MAX_CTAS)


def _module(name):
    import importlib

    return importlib.import_module("tokentm_fast.kernels." + name)


def _dtype_classes(kernel: str):
    """(dtype, IEEE) the wrappers pass: 16-bit inputs use tensor cores, float32 IEEE products (torch's
    default) or TF32 (when torch's switch allows it). Kernels without ``tl.dot`` on model tensors: the dtype."""
    if kernel in ATTENTION_KERNELS and kernel != "delta":
        return [("bf16", False), ("fp16", False), ("fp32", True), ("fp32", False)]
    if not SPECS[kernel]["model"]:
        return [("fp32", None)]  # only float32 pointers: one specialisation
    return [(d, None) for d in DTYPES]


def _label(dt, ieee):
    return dt if ieee is None or dt != "fp32" else dt + (" ieee" if ieee else " tf32")


def kernel_configs(kernel: str, dt: str, block_d=None):
    """[(constexprs, num_warps, num_stages)] the kernel's autotuner can choose for this class after pruning."""
    spec = SPECS[kernel]
    cfg = spec["configs"]
    if isinstance(cfg, list):
        return cfg
    if cfg == "delta":
        return [({"BLOCK_M": 32}, DEFAULT_WARPS, DEFAULT_STAGES)]
    if cfg.startswith("table:"):
        A = _module("attention")
        return [({"BLOCK_M": m, "BLOCK_N": n}, w, s) for m, n, w, s in A.table_configs(cfg[6:], dt, block_d)]
    mod = _module(spec["module"])
    configs = getattr(mod, cfg[7:])
    prune = {"_row_update_kernel": "_prune_row_configs"}.get(spec["attr"], "_prune")  # the autotuner's hook
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs], prune


def _selectable(kernel, dt, variant, block_d=None):
    res = kernel_configs(kernel, dt, block_d)
    if isinstance(res, tuple):  # module configs: prune as the autotuner does, at a large shape
        import triton

        configs, prune_name = res
        mod = _module(SPECS[kernel]["module"])
        objs = [triton.Config(dict(k), num_warps=w, num_stages=s) for k, w, s in configs]
        kept = getattr(mod, prune_name)(objs, dict(_LARGE), **variant)
        return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kept]
    return res


def job_key(job) -> str:
    k, w, s = job["config"]
    return json.dumps([job["kernel"], job["dtype"], job.get("BLOCK_D"), sorted(job["consts"].items()),
                       sorted(k.items()), w, s])


def jobs(kernels=None, dtypes=None, widths=HEAD_WIDTHS):
    """Every (kernel, specialisation, configuration) to compile."""
    out = []
    for name, spec in SPECS.items():
        if kernels and name not in kernels:
            continue
        blocks = sorted({max(16, _next_pow2(d)) for d in widths}) if spec["module"] == "attention" else [None]
        for dt, ieee in _dtype_classes(name):
            if dtypes and dt not in dtypes and SPECS[name]["model"]:
                continue
            for bd in blocks:
                for variant in spec["variants"]:
                    consts = dict(variant)
                    if bd is not None:
                        consts["BLOCK_D"] = bd
                    if ieee is not None:
                        consts.update(IEEE=ieee, UPCAST=False)
                    for cfg in _selectable(name, dt, variant, bd):
                        job = dict(kernel=name, module=spec["module"], attr=spec["attr"], dtype=_label(dt, ieee),
                                   ptr=PTR[dt], model=sorted(spec["model"]), consts=consts, config=cfg)
                        if bd is not None:
                            job.update(BLOCK_D=bd, widths=[d for d in widths if max(16, _next_pow2(d)) == bd])
                        out.append(job)
    return out


def _next_pow2(n):
    return 1 << (max(n, 1) - 1).bit_length()


def _jit_fn(obj):
    while not type(obj).__name__ == "JITFunction":
        obj = obj.fn
    return obj


def signature(job):
    fn = _jit_fn(getattr(_module(job["module"]), job["attr"]))
    consts = {**job["consts"], **job["config"][0]}
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = job["ptr"] if a in job["model"] else "*fp32"
        else:
            sig[a] = "fp32" if a in FLOAT_SCALARS else "i32"
    return fn, sig, consts


def compile_one(job: dict) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        knobs.nvidia.dump_ptxas_log = True
        fn, sig, consts = signature(job)
        _, w, s = job["config"]
        # as Triton specialises real launches: pointers 16-byte aligned (the caching allocator's tensors, and
        # timm's q/k/v views at multiples of the head width), the attention kernels' strides multiples of
        # 16 (3·H·d, d, N·d, … for head widths that are multiples of 16), the token width D of the
        # transformation weights (ViT widths 192, 384, 768, 1024, …); N stays unspecialised (197, 577, …)
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig[a].startswith("*") or (job["module"] == "attention" and _STRIDE.match(a))
                 or (job["attr"] == "_transform_weights_kernel" and a == "D")}
        t0 = time.perf_counter()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": w, "num_stages": s})
        log = buf.getvalue()
        m = re.search(r"Used (\d+) registers", log)
        regs = int(m.group(1)) if m else int(getattr(k, "n_regs", 0) or 0)
        spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
        spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
        spills = max(spill_st, spill_ld, int(getattr(k, "n_spills", 0) or 0))
        smem = int(k.metadata.shared)
        res = {key: job[key] for key in ("kernel", "dtype", "BLOCK_D", "widths") if key in job}
        res.update(consts={k2: v for k2, v in job["consts"].items() if k2 not in ("BLOCK_D", "IEEE", "UPCAST")},
                   config=job["config"][0], num_warps=w, num_stages=s, regs=regs, spills=spills, smem=smem,
                   ctas_per_sm=ctas_per_sm(regs, w, smem), compile_s=round(time.perf_counter() - t0, 2),
                   key=job_key(job))
        return res


def failures(rows):
    return [r for r in rows if r["spills"] > 0 or r["smem"] > SMEM_PER_CTA or r["ctas_per_sm"] < 1]


def run(jobs_list, workers=None):
    with ProcessPoolExecutor(workers or os.cpu_count()) as ex:
        return list(ex.map(compile_one, jobs_list, chunksize=1))


def source_fingerprint() -> str:
    """sha256 of the source of every ``@triton.jit`` function in kernels/ (not the line numbers, not the
    wrappers): the committed audit is current when this matches."""
    h = hashlib.sha256()
    for name in KERNEL_MODULES:
        mod = _module(name)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            try:
                fn = _jit_fn(obj)
            except AttributeError:
                continue
            h.update(f"{name}.{attr}\n{fn.src}\n".encode())
    return h.hexdigest()


def versions():
    import torch
    import triton
    return {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def summary(rows):
    """Per (kernel, dtype, BLOCK_D) class: configs, max regs, max spills, max smem, min / max CTAs per SM."""
    out = {}
    for r in rows:
        key = (r["kernel"], r["dtype"], r.get("BLOCK_D"))
        s = out.setdefault(key, {"compiles": 0, "configs": set(), "regs": 0, "spills": 0, "smem": 0,
                                 "ctas_min": 99, "ctas_max": 0})
        s["compiles"] += 1
        s["configs"].add(json.dumps([r["config"], r["num_warps"], r["num_stages"]], sort_keys=True))
        s["regs"] = max(s["regs"], r["regs"])
        s["spills"] = max(s["spills"], r["spills"])
        s["smem"] = max(s["smem"], r["smem"])
        s["ctas_min"] = min(s["ctas_min"], r["ctas_per_sm"])
        s["ctas_max"] = max(s["ctas_max"], r["ctas_per_sm"])
    return out


def write(rows, out_dir, command, seconds):
    os.makedirs(out_dir, exist_ok=True)
    meta = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": "cuda sm_90 (H100), warp 32", "wall_s": round(seconds, 1),
            "source_fingerprint": source_fingerprint(), **versions()}
    with open(os.path.join(out_dir, "audit.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=0)
    bad = failures(rows)
    lines = ["# Compile audit, sm_90 (H100), every kernel in kernels/\n",
             f"Regenerate: `{command}` (no GPU; Triton's bundled ptxas)  ", f"Date: {meta['date']}  ",
             f"Versions: Triton {meta['triton']}, torch {meta['torch']}, Python {meta['python']}; {meta['machine']}; "
             f"wall {meta['wall_s']} s  ",
             f"Compiles: {len(rows)}; failing (spills > 0, smem > 227 KB or < 1 CTA/SM): {len(bad)}\n",
             "## Per class\n",
             "| kernel | dtype | BLOCK_D | compiles (variants x configs) | configs | max regs | max spills (B) | "
             "max smem (B) | CTAs/SM min-max |", "|---|---|---|---|---|---|---|---|---|"]
    for (kern, dt, bd), s in summary(rows).items():
        lines.append(f"| {kern} | {dt} | {bd if bd else '-'} | {s['compiles']} | {len(s['configs'])} | {s['regs']} | "
                     f"{s['spills']} | {s['smem']} | {s['ctas_min']}-{s['ctas_max']} |")
    lines += ["\n## Every compile\n", "| kernel | dtype | head widths (BLOCK_D) | variant | config, warps, stages | regs | "
              "spills (B) | smem (B) | CTAs/SM |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        widths = f"{','.join(map(str, r['widths']))} ({r['BLOCK_D']})" if r.get("BLOCK_D") else "-"
        variant = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(r["consts"].items())) or "-"
        cfg = "×".join(str(v) for v in r["config"].values())
        lines.append(f"| {r['kernel']} | {r['dtype']} | {widths} | {variant} | {cfg}, {r['num_warps']}, "
                     f"{r['num_stages']} | {r['regs']} | {r['spills']} | {r['smem']} | {r['ctas_per_sm']} |")
    with open(os.path.join(out_dir, "audit.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- recorded launches
def recorded_launches(run_calls):
    """Under the interpreter (TRITON_INTERPRET=1 at import): call ``run_calls()`` and return the launches it
    made as ``{(kernel, constexprs, model pointers)}``, comparable with ``launch_keys(jobs(), dtype)``:
    constexprs without the autotuned ones, the fixed launch sizes and the interpreter-only UPCAST; model
    pointers: the pointer arguments whose tensors are not float32."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    drop = {"_delta_kernel": {"BLOCK_M"}, "_necc_normalize_kernel": {"BLOCK"},
            "_update_finalize_kernel": {"BLOCK_Q", "BLOCK_J"}, "_legrad_finalize_kernel": {"BLOCK"}}
    for name in KERNEL_MODULES:
        for obj in vars(_module(name)).values():
            if type(obj).__name__ == "Autotuner":
                drop[obj.fn.__name__] = set().union(*(c.kwargs for c in obj.configs))
    always = {"UPCAST", "num_warps", "num_stages", "grid", "warmup", "num_ctas", "maxnreg"}
    seen = set()
    original = InterpretedFunction.run

    def run(self, *args, **kw):
        name = self.fn.__name__
        model = tuple(sorted(n for n, a in zip(self.arg_names, args)
                             if n.endswith("_ptr") and isinstance(a, torch.Tensor) and a.dtype != torch.float32))
        consts = tuple(sorted((k, v) for k, v in kw.items() if k not in always | drop.get(name, set())))
        seen.add((name, consts, model))
        return original(self, *args, **kw)

    InterpretedFunction.run = run
    try:
        run_calls()
    finally:
        InterpretedFunction.run = original
    return seen


def launch_keys(job_list):
    """The jobs as ``recorded_launches`` writes launches: model pointers named for 16-bit jobs (float32
    jobs have none: every pointer is float32)."""
    out = set()
    for j in job_list:
        consts = {k: v for k, v in j["consts"].items() if k != "UPCAST"}
        out.add((j["attr"], tuple(sorted(consts.items())), tuple(j["model"]) if j["ptr"] != PTR["fp32"] else ()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None, help="write audit.md / audit.json here")
    p.add_argument("--kernel", action="append", choices=list(SPECS), help="only these kernels (repeatable)")
    p.add_argument("--dtype", action="append", choices=list(DTYPES))
    a = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    todo = jobs(a.kernel, a.dtype)
    print(f"{len(todo)} compiles on {a.jobs} processes", file=sys.stderr, flush=True)
    rows = run(todo, a.jobs)
    dt = time.perf_counter() - t0
    bad = failures(rows)
    for r in bad:
        print("FAIL", json.dumps(r), file=sys.stderr)
    print(f"{len(rows)} compiles in {dt:.0f} s; {len(bad)} failing", file=sys.stderr)
    if a.out:
        write(rows, a.out, "python benchmarks/compile_audit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              dt)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
