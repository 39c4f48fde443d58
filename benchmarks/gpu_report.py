"""The GPU figures in one command: correctness, timing, the attention layer and the evaluation throughput.

    python benchmarks/gpu_report.py --out DIR [--budget-s 420]        # on a CUDA machine
    python benchmarks/gpu_report.py --out DIR --smoke                  # the same code path on the CPU

One process (plus compile workers) writes ``DIR/gpu_report.json`` and ``DIR/gpu_report.md`` and rewrites
both after every case, so whatever finished survives a timeout. Parts, in this order; a part (or a case of
it) that would not fit in what is left of ``--budget-s`` is listed as skipped, with the reason:

1. ``environment``: device, driver, torch / triton / timm versions, commit, TF32 switches.
2. ``precompile``: every Triton explain call of the parts below is made once in ``--workers`` parallel
   processes that share Triton's on-disk cache, so the timed process finds the kernels compiled; each
   worker call's seconds (cold cache) are recorded, and one more worker with an empty cache of its own
   times a cold ``explain(tokentm)`` per dtype: what a cold user pays, serially.
3. ``correctness``: every method on each attention path it serves (flash, materialized; Triton backend),
   float32 (TF32 off) and bfloat16, head widths 64 and 128 (one small timm ViT each, N = 50), against the
   float64 reference on the same weights, each against its own bound (docs/methods.md §7 and
   ``MethodSpec.float32_tolerance``).
4. ``timing``: bfloat16 first, then float32 as time allows, at the protocol's sizes
   (benchmarks/README.md, "the performance protocol"): the training step (timm defaults: fused
   attention, parameter gradients), the forward, the floor (forward + input-only backward), ``explain``
   for every method (flash where it serves — every method with its default options, the LRP relevance
   pass included —, materialized where it does not and its estimated peak fits), the literal TokenTM in
   the model's dtype where it fits; median of warm calls, peak memory, each as a ratio to the training
   step; the first call of each method in this process (Triton's compiled kernels read from the cache,
   autotuning done here) and the path the dispatcher (``attention="auto"``) chose. A first pass measures
   the relevance pass (``FIRST_METHODS``: lrp, transformer_attribution, partial_lrp) on the flash path at
   N = 4097 and 16385 (ViT-B/16, B = 1, the first dtype) with the training step of their size, before
   anything else of the part, so that a budget cut takes the other rows; then every size in order, the
   first pass's rows not measured again (their size's ratios use the first pass's step). The markdown
   groups the rows by size.
5. ``attention_layer``: one attention layer, SDPA forward + backward against ours (``flash_forward`` +
   ``flash_backward``), without and with the explanation accumulator (the TokenTM column sums).
6. ``evaluation``: images per second of the evaluation runner (segmentation + perturbation, tokentm,
   ViT-B/16, batch 64, synthetic data at 224 px), the 50 000-image ImageNet evaluation time that implies,
   and where the time goes (explain, perturbation forwards, data and the rest).

``--smoke`` runs every part on the CPU under ``TRITON_INTERPRET=1`` at tiny sizes (within about a minute;
``tests/test_gpu_report.py`` runs it in CI), so that a GPU run never fails on a typo. The Triton cases of
the smoke run go through the interpreter; their timings mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

if "--smoke" in sys.argv:  # before torch / triton are imported, here and in the spawned workers
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TOKENTM_GPU_REPORT_SMOKE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

PARTS = ("environment", "precompile", "correctness", "timing", "attention_layer", "evaluation")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

#: the bounds of docs/methods.md §7 (the same values as benchmarks/conftest.py)
TOL_FP32, TOL_HALF = 1e-5, 2e-2

#: targets of issue 25 (ratios to the training step)
TARGET_SHORT, TARGET_LONG, TARGET_SDPA = 1.0, 1.2, 1.2

#: the timing part's first pass (issue 28: the relevance pass on the flash path at high resolution): these
#: methods at these N, in the first dtype, with their size's training step, before any other timing row
FIRST_METHODS = ("lrp", "transformer_attribution", "partial_lrp")
FIRST_N = (4097, 16385)


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Size:
    """One timing size: a timm model at an input size, batch and dtype."""

    model: str
    img: int
    B: int
    dtype: str
    kwargs: Tuple[Tuple[str, Any], ...] = ()  # extra timm.create_model arguments (the smoke model)

    @property
    def N(self) -> int:
        return (self.img // 16) ** 2 + 1

    @property
    def label(self) -> str:
        return f"{self.model} {self.img}px N={self.N} B={self.B} {self.dtype}"


def timing_sizes(smoke: bool) -> List[Size]:
    """bfloat16 first at every size, then float32 (the order the budget is spent in)."""
    if smoke:
        tiny = (("depth", 2), ("embed_dim", 64), ("num_heads", 2))
        return [Size("vit_tiny_patch16_224", 64, 2, "bfloat16", tiny), Size("vit_tiny_patch16_224", 64, 2, "float32", tiny)]
    out = []
    for dt in ("bfloat16", "float32"):
        out += [Size("vit_base_patch16_224", 224, 64, dt), Size("vit_large_patch16_384", 384, 16, dt),
                Size("vit_base_patch16_224", 1024, 1, dt), Size("vit_base_patch16_224", 1536, 1, dt),
                Size("vit_base_patch16_224", 2048, 1, dt)]
    return out


def timing_order(smoke: bool, dtypes: List[str]) -> List[Tuple[Size, Optional[Tuple[str, ...]]]]:
    """``(size, methods)`` in the order the timing part measures them (``methods`` None: the size's whole
    plan; else the training step and these methods only): first ``FIRST_METHODS`` at ``FIRST_N`` in the
    first of ``dtypes`` (the smoke run: at its first size), then every size of ``dtypes``, dtype by dtype in
    their order."""
    sizes = sorted((s for s in timing_sizes(smoke) if s.dtype in dtypes), key=lambda s: dtypes.index(s.dtype))
    if not sizes:
        return []
    first = sizes[:1] if smoke else [s for s in sizes if s.dtype == dtypes[0] and s.N in FIRST_N]
    return [(s, FIRST_METHODS) for s in first] + [(s, None) for s in sizes]


def correctness_models(smoke: bool) -> List[Tuple[int, Dict[str, Any]]]:
    """(head width, timm kwargs): one small ViT per head width, N = 50 (7×7 patches + class token)."""
    if smoke:
        return [(32, dict(img_size=64, depth=2, embed_dim=64, num_heads=2))]
    return [(64, dict(img_size=112, depth=4, embed_dim=256, num_heads=4)),
            (128, dict(img_size=112, depth=4, embed_dim=256, num_heads=2))]


# --------------------------------------------------------------------------- report
class Budget:
    """Seconds left of ``--budget-s``, counted from the start of the process."""

    def __init__(self, seconds: float) -> None:
        self.total = float(seconds)
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


class Report:
    """The report's JSON and markdown, rewritten after every case (``write``)."""

    def __init__(self, out_dir: str, meta: Dict[str, Any]) -> None:
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.data: Dict[str, Any] = {"meta": meta, "parts": {p: {"status": "pending", "cases": []} for p in PARTS}}

    def part(self, name: str) -> Dict[str, Any]:
        return self.data["parts"][name]

    def start(self, name: str) -> None:
        self.part(name)["status"] = "running"
        self.part(name)["started_s"] = round(time.monotonic() - _T0, 1)
        self.write()

    def finish(self, name: str, status: str = "done", reason: Optional[str] = None) -> None:
        p = self.part(name)
        p["status"] = status
        if reason:
            p["reason"] = reason
        p["wall_s"] = round(time.monotonic() - _T0 - p.get("started_s", 0.0), 1)
        self.write()

    def skip(self, name: str, reason: str) -> None:
        self.part(name).update(status="skipped", reason=reason)
        self.write()

    def add(self, name: str, case: Dict[str, Any]) -> None:
        self.part(name)["cases"].append(case)
        self.write()

    def write(self) -> None:
        self.data["meta"]["written_at_s"] = round(time.monotonic() - _T0, 1)
        tmp = os.path.join(self.out_dir, ".gpu_report.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, os.path.join(self.out_dir, "gpu_report.json"))
        with open(os.path.join(self.out_dir, "gpu_report.md"), "w", encoding="utf-8") as f:
            f.write(render_markdown(self.data))
        with open(os.path.join(self.out_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(render_readme(self.data))


_T0 = time.monotonic()


# --------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    from conftest import _available_ram

    return int(_available_ram())


def timed(fn: Callable[[], Any], device: torch.device) -> Tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def warm_median(fn: Callable[[], Any], device: torch.device, repeats: int) -> Tuple[float, List[float]]:
    """Median seconds of ``repeats`` calls (the caller made the warm-up call), each bracketed by a sync."""
    times = []
    for _ in range(repeats):
        out, t = timed(fn, device)
        del out
        times.append(t)
    return statistics.median(times), times


def repeats_for(seconds: float, left: float, smoke: bool) -> int:
    """≥ 7 calls (the protocol) where they fit in a tenth of what is left, never fewer than 3."""
    if smoke:
        return 1
    fit = int(0.1 * left / max(seconds, 1e-6))
    return max(3, min(15, fit)) if fit < 7 else min(15, max(7, fit // 4))


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def method_paths(method: str) -> List[str]:
    """The attention paths the Triton backend serves ``method`` on, with its default options."""
    from tokentm_fast.methods import get_method

    return ["materialized"] if get_method(method).flash_refusal(get_method(method).defaults) else ["flash", "materialized"]


def method_tolerance(method: str, dtype: str) -> float:
    """docs/methods.md §7: float32 1e-5, or the method's own float32 bound; 16-bit inputs 2e-2 at least."""
    from tokentm_fast.methods import get_method

    own = get_method(method).float32_tolerance
    return max(TOL_HALF, own) if dtype != "float32" else max(TOL_FP32, own)


def _model(name: str, dtype: torch.dtype, device: torch.device, **kwargs) -> torch.nn.Module:
    from bench_models import random_vit

    return random_vit(name, device, dtype=dtype, fused_attn=True, **kwargs)


# --------------------------------------------------------------------------- environment
def environment(device: torch.device, args) -> Dict[str, Any]:
    from benchtable import environment as bench_env

    env = bench_env(device)
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["commit"] = args.commit or _git_commit()
    env["command"] = "python benchmarks/gpu_report.py " + " ".join(args.argv)
    env["smoke"] = args.smoke
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    env["cpu_count"] = os.cpu_count()
    env["platform"] = platform.platform()
    if device.type == "cuda":
        env["driver"] = _driver_version()
        cap = torch.cuda.get_device_capability(device)
        env["compute_capability"] = f"{cap[0]}.{cap[1]}"
    return env


def _git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=HERE)
        return r.stdout.strip() or "unknown (git gave nothing)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here: pass --commit)"


def _driver_version() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi not found)"


# --------------------------------------------------------------------------- precompile (workers)
@dataclass(frozen=True)
class Call:
    """One explain call a worker makes to fill Triton's cache."""

    model: str
    kwargs: Tuple[Tuple[str, Any], ...]
    B: int
    dtype: str
    method: str
    attention: str
    label: str


_WORKER_MODELS: Dict[Any, torch.nn.Module] = {}


def _worker_call(call: Call, device: str, own_cache: bool) -> Dict[str, Any]:
    """In a worker process: one explain call (cold: Triton compiles what the cache lacks)."""
    from bench_models import random_images

    import tokentm_fast as tf

    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    key = (call.model, call.kwargs, call.dtype)
    try:
        if key not in _WORKER_MODELS:
            _WORKER_MODELS.clear()
            release(dev)
            _WORKER_MODELS[key] = _model(call.model, DTYPES[call.dtype], dev, **dict(call.kwargs))
        model = _WORKER_MODELS[key]
        images, target = random_images(model, call.B, dev)
        _, seconds = timed(lambda: tf.explain(model, images, method=call.method, target=target, backend="triton",
                                              attention=call.attention), dev)
        return {**asdict(call), "seconds": round(seconds, 3), "own_cache": own_cache, "pid": os.getpid()}
    except Exception as e:  # noqa: BLE001 - recorded; the timed part meets (and reports) it again
        return {**asdict(call), "error": error_text(e), "own_cache": own_cache, "pid": os.getpid()}


def _worker_init(cache_dir: Optional[str]) -> None:
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)


def precompile_calls(args, device: torch.device) -> List[Call]:
    """The Triton explain calls of correctness and timing (every method, path and dtype), unique."""
    import tokentm_fast as tf

    calls: List[Call] = []
    for width, kw in correctness_models(args.smoke):
        for dt in args.dtypes:
            for m in tf.METHODS:
                for a in method_paths(m):
                    calls.append(Call("vit_small_patch16_224", tuple(sorted(kw.items())), 2, dt, m, a,
                                      f"correctness d={width} {dt} {m} {a}"))
    if "timing" in args.parts:
        for size, only in timing_order(args.smoke, args.dtypes):  # the first pass's calls first
            for m in only or tf.METHODS:
                a = method_paths(m)[0]
                if a != "flash" and size.N > 1000:
                    continue  # materialized at high resolution: compiled on the timed call if it fits there
                calls.append(Call(size.model, tuple(sorted((("img_size", size.img),) + size.kwargs)), size.B,
                                  size.dtype, m, a, f"timing {size.label} {m} {a}"))
    unique: Dict[Tuple[Any, ...], Call] = {}
    for c in calls:
        unique.setdefault((c.model, c.kwargs, c.B, c.dtype, c.method, c.attention), c)
    return list(unique.values())


def run_precompile(args, device: torch.device, report: Report, budget: Budget) -> None:
    """Fill Triton's on-disk cache from ``--workers`` processes; time a cold explain(tokentm) per dtype."""
    import multiprocessing as mp

    calls = precompile_calls(args, device)[: args.precompile_max_calls]
    after = MIN_PART_S["correctness"][1 if args.smoke else 0] + MIN_PART_S["timing"][1 if args.smoke else 0]
    deadline = min(args.precompile_s, max(0.0, budget.left() - after))
    report.part("precompile").update(workers=args.workers, calls_planned=len(calls), deadline_s=round(deadline, 1))
    ctx = mp.get_context("spawn")
    t0 = time.monotonic()
    pools: List[ProcessPoolExecutor] = []
    cold_dirs: List[str] = []
    futures = []
    try:
        # a cold first call per dtype, each in a process with an empty cache of its own (what a new user pays)
        size = timing_sizes(args.smoke)[0]
        for dt in args.dtypes:
            d = tempfile.mkdtemp(prefix="tokentm-cold-")
            cold_dirs.append(d)
            pools.append(ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init, initargs=(d,)))
            call = Call(size.model, tuple(sorted((("img_size", size.img),) + size.kwargs)), min(size.B, 8), dt,
                        "tokentm", "flash", f"cold first call, empty cache: {size.model} {size.img}px {dt} tokentm flash")
            futures.append(pools[-1].submit(_worker_call, call, str(device), True))
        shared = ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_worker_init, initargs=(None,))
        pools.append(shared)
        futures += [shared.submit(_worker_call, c, str(device), False) for c in calls]
        for fut in as_completed(futures, timeout=max(1.0, deadline)):
            report.add("precompile", fut.result())
    except TimeoutError:
        report.part("precompile")["reason"] = f"stopped after {deadline:.0f} s (--precompile-s / budget)"
    finally:
        for pool in pools:  # nothing may go on compiling (or holding the GPU) while the timed parts run
            procs = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                proc.join(timeout=10)
        for d in cold_dirs:
            shutil.rmtree(d, ignore_errors=True)
    cases = report.part("precompile")["cases"]
    done = [c for c in cases if "seconds" in c and not c["own_cache"]]
    report.part("precompile").update(
        wall_parallel_s=round(time.monotonic() - t0, 1), calls_done=len(done),
        serial_sum_s=round(sum(c["seconds"] for c in done), 1),
        errors=sum("error" in c for c in cases))


# --------------------------------------------------------------------------- correctness
def run_correctness(args, device: torch.device, report: Report, budget: Budget) -> None:
    from bench_models import random_images
    from benchtable import rel_err

    import tokentm_fast as tf

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # what the timing part needs to start (its first pass: the relevance pass at high resolution) stays left
    keep = args.reserve_s + (MIN_PART_S["timing"][1 if args.smoke else 0] if "timing" in args.parts else 0)
    for width, kw in correctness_models(args.smoke):
        for dt in args.dtypes:
            model = _model("vit_small_patch16_224", DTYPES[dt], device, **kw)
            images, target = random_images(model, 2, device)
            refs: Dict[str, torch.Tensor] = {}
            for m in tf.METHODS:
                for a in method_paths(m):
                    case = dict(head_width=width, dtype=dt, method=m, attention=a, N=(kw["img_size"] // 16) ** 2 + 1,
                                bound=method_tolerance(m, dt))
                    if budget.left() < keep:
                        report.add("correctness", {**case, "skipped": "budget"})
                        continue
                    try:
                        if m not in refs:
                            refs[m] = tf.explain(model, images, method=m, target=target, backend="reference")
                        out = tf.explain(model, images, method=m, target=target, backend="triton", attention=a)
                        err = float(rel_err(out, refs[m]).max())
                        informative = bool((refs[m].flatten(1).std(1) > 0).all())
                        case.update(error=err, passed=bool(err <= case["bound"] and math.isfinite(err)),
                                    informative=informative)
                    except Exception as e:  # noqa: BLE001 - one case's failure is a result, not the end
                        case.update(passed=False, exception=error_text(e))
                    report.add("correctness", case)
            del model, images, target, refs
            release(device)
    cases = report.part("correctness")["cases"]
    ran = [c for c in cases if "passed" in c]
    report.part("correctness").update(passed=sum(c["passed"] for c in ran), failed=sum(not c["passed"] for c in ran),
                                      skipped=len(cases) - len(ran))


# --------------------------------------------------------------------------- timing
def _floor_step(model, images, target):
    """Forward + input-only backward (no parameter gradients): the floor of a gradient method."""
    from bench_models import _fused, _score

    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.requires_grad_(False)
        try:
            x = images.detach().requires_grad_(True)
            with _fused(model, True):
                g, = torch.autograd.grad(_score(model(x), target), x)
            return g
        finally:
            for p in params:
                p.requires_grad_(True)

    return step


def _forward(model, images):
    from bench_models import _fused

    def fwd():
        with torch.no_grad(), _fused(model, True):
            return model(images)

    return fwd


def _size_plan(size: Size, device: torch.device, free: int, mem_fraction: float):
    """[(kind, method, attention, estimated peak bytes or None, why skipped or None)] for one size."""
    from bench_memory import explain_peak, step_peak
    from benchtable import flash_explain_peak

    import tokentm_fast as tf

    L, H, D, params = {"vit_base_patch16_224": (12, 12, 768, 86.6e6), "vit_large_patch16_384": (24, 16, 1024, 304.7e6),
                       "vit_tiny_patch16_224": (2, 2, 64, 1e5)}[size.model]
    s = 2 if size.dtype == "bfloat16" else 4
    shape = dict(L=L, H=H, D=D, N=size.N, B=size.B, params=int(params + size.N * D), image_pixels=size.img ** 2,
                 itemsize=s)
    model_bytes = shape["params"] * s
    step = model_bytes + step_peak(**shape, fused=True)
    limit = mem_fraction * free
    plan = [("step", "", "", step, None), ("forward", "", "", step, None), ("floor", "", "", step, None)]
    literal = 2 * model_bytes + explain_peak("tokentm", "literal", **shape)
    plan.append(("literal", "tokentm", "", literal,
                 None if literal <= limit else f"needs ~{literal / 1e9:.0f} GB (every layer's N×N A and G in the "
                                               f"model's dtype), {limit / 1e9:.0f} GB usable"))
    for m in tf.METHODS:
        a = method_paths(m)[0]
        if a == "flash":
            need = model_bytes + flash_explain_peak(m, shape)
            why = None if need <= limit else f"needs ~{need / 1e9:.0f} GB on the flash path, {limit / 1e9:.0f} GB usable"
        else:
            need = model_bytes + explain_peak(m, "torch", **shape)
            why = None if need <= limit else (f"materialized path (the flash path does not serve it) needs "
                                              f"~{need / 1e9:.0f} GB, {limit / 1e9:.0f} GB usable")
        plan.append(("explain", m, a, need, why))
    return plan


def _timing_fn(kind: str, m: str, a: str, model, images, target, case: Dict[str, Any]) -> Callable[[], Any]:
    """The call one timing row measures (an explain row records the dispatcher's path in ``case``)."""
    from bench_models import literal_explain, training_step

    import tokentm_fast as tf

    if kind == "step":
        return training_step(model, images, target)
    if kind == "forward":
        return _forward(model, images)
    if kind == "floor":
        return _floor_step(model, images, target)
    if kind == "literal":
        return lambda: literal_explain(model, images, target, m)
    chooser = tf.Explainer(model, method=m, backend="triton")
    case["dispatcher_path"] = chooser.attention_for(images, chooser.backend_for(images))
    return lambda: tf.explain(model, images, method=m, target=target, backend="triton", attention=a)


def _time_row(make: Callable[[], Callable[[], Any]], case: Dict[str, Any], step: Optional[Tuple[float, int]],
              device: torch.device, repeats_left: float, smoke: bool) -> None:
    """First call of ``make()``, the peak of a warm call and the median of warm calls into ``case``, with the
    ratios to ``step`` (median, peak) where given; out of memory or an exception is recorded, not raised."""
    from bench_memory import measure_peak

    try:
        fn = make()
        out, first = timed(fn, device)
        finite = bool(torch.isfinite(out).all()) if isinstance(out, torch.Tensor) else True
        del out
        out, peak = measure_peak(fn, device)
        del out
        seconds, times = warm_median(fn, device, repeats_for(first, repeats_left, smoke))
        case.update(first_call_s=round(first, 4), median_s=seconds, calls=len(times), peak_bytes=peak, finite=finite)
        if case["kind"] == "step":
            step = (seconds, peak)
        if step is not None:
            case["time_ratio"] = seconds / step[0]
            case["memory_ratio"] = peak / max(step[1], 1)
    except _OOM as e:
        case["skipped"] = f"out of memory: {error_text(e)}"
    except Exception as e:  # noqa: BLE001
        case["exception"] = error_text(e)
        case["traceback"] = traceback.format_exc(limit=3)[-1500:]


def run_timing(args, device: torch.device, report: Report, budget: Budget) -> None:
    """Every size of ``timing_order``: the first pass (the relevance pass at high resolution), then every
    size's plan less the rows already reported; each row's ratios against its size's training step."""
    from bench_models import random_images

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reserve = args.reserve_s + (0 if "attention_layer" not in args.parts else args.attention_layer_s)
    steps: Dict[str, Tuple[float, int]] = {}  # size label -> the training step's (median, peak)
    reported: Set[Tuple[str, str, str]] = set()  # (size label, kind, method): reported once, whatever the outcome
    for size, only in timing_order(args.smoke, args.dtypes):
        whole = _size_plan(size, device, free_bytes(device), args.mem_fraction)
        plan = [(i, row) for i, row in enumerate(whole)
                if (size.label, row[0], row[1]) not in reported and (only is None or row[0] == "step" or row[1] in only)]
        if not plan:
            continue
        first_pass = only is not None
        if first_pass:  # the step, then the methods in the order ``only`` names them
            plan.sort(key=lambda ir: -1 if ir[1][0] == "step" else only.index(ir[1][1]))
        head = dict(size=size.label, model=size.model, N=size.N, B=size.B, dtype=size.dtype)

        def report_row(case: Dict[str, Any]) -> None:
            reported.add((size.label, case["kind"], case["method"]))
            report.add("timing", case)

        if budget.left() < reserve + 10:
            for i, (kind, m, a, _, _) in plan:
                report_row({**head, "kind": kind, "method": m, "attention": a, "plan_index": i, "skipped": "budget"})
            continue
        try:
            model = _model(size.model, DTYPES[size.dtype], device, img_size=size.img, **dict(size.kwargs))
            images, target = random_images(model, size.B, device)
        except _OOM as e:
            report.add("timing", {**head, "kind": "model", "method": "", "plan_index": -1,
                                  "skipped": f"out of memory building the model: {error_text(e)}"})
            reported.update((size.label, row[0], row[1]) for row in whole)  # none of them can run
            release(device)
            continue
        for i, (kind, m, a, need, why) in plan:
            case = {**head, "kind": kind, "method": m, "attention": a, "estimated_peak_bytes": need, "plan_index": i,
                    "first_pass": first_pass}
            if why is not None:
                report_row({**case, "skipped": why})
                continue
            if budget.left() < reserve:
                report_row({**case, "skipped": "budget"})
                continue
            try:
                _time_row(lambda: _timing_fn(kind, m, a, model, images, target, case), case, steps.get(size.label),
                          device, budget.left() - reserve, args.smoke)
                if kind == "step" and "median_s" in case:
                    steps[size.label] = (case["median_s"], case["peak_bytes"])
            finally:
                model.zero_grad(set_to_none=True)
            report_row(case)
            release(device)
        model = images = target = None  # freed before the next size (closures hold cells, not values)
        release(device)


# --------------------------------------------------------------------------- attention layer
def run_attention_layer(args, device: torch.device, report: Report, budget: Budget) -> None:
    import torch.nn.functional as F

    from tokentm_fast.kernels.attention import flash_backward, flash_forward

    torch.backends.cuda.matmul.allow_tf32 = False
    d = 64
    shapes = [(2, 2, 17)] if args.smoke else [(64, 12, 197), (16, 16, 577), (1, 12, 4097), (1, 12, 9217),
                                             (1, 12, 16385)]
    for dt in args.dtypes:
        for b, h, n in shapes:
            case = dict(dtype=dt, B=b, H=h, N=n, d=d)
            if budget.left() < args.reserve_s:
                report.add("attention_layer", {**case, "skipped": "budget"})
                continue
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v, do = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=DTYPES[dt]) for _ in range(4))
            row = torch.rand(b, n, generator=g).to(device)
            scale = d ** -0.5
            qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))

            def sdpa():
                o = F.scaled_dot_product_attention(qs, ks, vs)
                return torch.autograd.grad(o, (qs, ks, vs), do)

            def ours(acc: bool):
                def call():
                    o, lse = flash_forward(q, k, v, scale)
                    return flash_backward(q, k, v, o, lse, do, scale, row=row if acc else None)
                return call

            try:
                for name, fn in (("sdpa_s", sdpa), ("ours_s", ours(False)), ("ours_acc_s", ours(True))):
                    timed(fn, device)  # warm-up (compiles or tunes on the first shape)
                    case[name], _ = warm_median(fn, device, 2 if args.smoke else 10)
                case["ours_over_sdpa"] = case["ours_s"] / case["sdpa_s"]
                case["ours_acc_over_sdpa"] = case["ours_acc_s"] / case["sdpa_s"]
            except _OOM as e:
                case["skipped"] = f"out of memory: {error_text(e)}"
            except Exception as e:  # noqa: BLE001
                case["exception"] = error_text(e)
            report.add("attention_layer", case)
            q = k = v = do = row = qs = ks = vs = None
            release(device)


# --------------------------------------------------------------------------- evaluation
def run_evaluation(args, device: torch.device, report: Report, budget: Budget) -> None:
    from bench_models import random_vit

    from tokentm_fast import Explainer
    from tokentm_fast.evaluation import EvalDataset, Preprocess, SyntheticSource, collate, evaluate, model_data_config
    from tokentm_fast.metrics.perturbation import DEFAULT_FRACTIONS, num_removed, relevance_ranks
    from tokentm_fast.metrics.segmentation import upsample_maps

    if args.smoke:
        name, kw, batch, n_img, img = "vit_tiny_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=2), 4, 8, 32
    else:
        name, kw, batch, n_img, img = "vit_base_patch16_224", {}, 64, 512, 224
    dtype = DTYPES[args.dtypes[0]]
    model = random_vit(name, device, dtype=dtype, fused_attn=True, **kw)
    source = SyntheticSource("test", size=n_img, image_size=img)
    workers = 0 if args.smoke else min(8, max(1, (os.cpu_count() or 2) - 2))
    # where the time goes: the same batches in memory, explain alone and the protocol's forwards alone (first,
    # so that the runner's loop finds the kernels tuned, as a long evaluation does after its first batch)
    pre = Preprocess(model_data_config(model))
    ds = EvalDataset(source, pre)
    batches = [collate([ds[i] for i in range(s, min(s + batch, n_img))]) for s in range(0, n_img, batch)]
    explainer = Explainer(model, method="tokentm")
    timed(lambda: explainer(batches[0]["images"].to(device, dtype)), device)  # warm-up (tuning) outside the figures
    t_explain = t_forward = 0.0
    for bt in batches:
        x, x01 = bt["images"].to(device, dtype), bt["images01"].to(device)
        maps, t = timed(lambda: explainer(x), device)
        t_explain += t
        nb, _, hh, ww = x01.shape
        ranks = relevance_ranks(upsample_maps(maps, (hh, ww)).reshape(nb, -1)).reshape(nb, 1, hh, ww)
        variants = [x01]
        for f in DEFAULT_FRACTIONS:
            kk = num_removed(f, hh * ww)
            variants += [x01 * (ranks >= kk), x01 * (ranks < hh * ww - kk)]
        rows = pre.normalize(torch.cat(variants)).to(dtype)

        def forwards(rows=rows):
            with torch.no_grad():
                return [model(r) for r in rows.split(256)]
        _, t = timed(forwards, device)
        t_forward += t
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = evaluate(model, source, methods=["tokentm"], metrics=("segmentation", "perturbation"), batch_size=batch,
                       device=device, output=os.path.join(tmp, "r.json"), progress=False, num_workers=workers,
                       sanity_images=None, log=lambda s: None)
        wall = time.perf_counter() - t0
    ips = res["run"]["images_per_s"]
    case = dict(model=name, dtype=args.dtypes[0], batch=batch, images=n_img, image_size=img, workers=workers,
                loop_images_per_s=ips, command_wall_s=wall,
                imagenet_50k_hours=(50000 / ips / 3600) if ips else None)
    loop_s = n_img / ips if ips else None
    case.update(explain_s=t_explain, perturbation_forwards_s=t_forward, loop_s=loop_s,
                data_and_rest_s=(loop_s - t_explain - t_forward) if loop_s else None)
    report.add("evaluation", case)
    model = None
    release(device)


# --------------------------------------------------------------------------- markdown
def _ms(s: Optional[float]) -> str:
    return "-" if s is None else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def _gb(b: Optional[float]) -> str:
    return "-" if b is None else (f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB")


def _x(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}×"


def target_for(case: Dict[str, Any]) -> Optional[Tuple[float, bool]]:
    """(time target, whether memory counts) of an explain case against the training step (issue 25)."""
    if case.get("kind") != "explain" or case.get("attention") != "flash":
        return None
    if case["N"] <= 577:
        return TARGET_SHORT, False
    if case["N"] <= 9217:
        return TARGET_LONG, True
    return None


def timing_rows(cases: List[Dict[str, Any]], dtypes: List[str]) -> List[Dict[str, Any]]:
    """The timing rows grouped by size (dtype in the order of ``dtypes``, then N and B) and in their size's
    plan order within it (the timing part measures the first pass's rows before the others)."""
    seen = list(dict.fromkeys([*dtypes, *(c.get("dtype", "") for c in cases)]))
    return sorted(cases, key=lambda c: (seen.index(c.get("dtype", "")), c.get("N", 0), c.get("B", 0),
                                        c.get("plan_index", 0)))


def render_markdown(data: Dict[str, Any]) -> str:
    meta = data["meta"]
    env = meta.get("environment", {})
    lines = ["# GPU report" + (" (smoke run on the CPU: timings mean nothing)" if meta.get("smoke") else ""), "",
             f"Command: `{meta.get('command', '')}`  ",
             f"Date: {env.get('date', meta.get('date', '?'))}; device: {env.get('device_name', '?')}; "
             f"driver {env.get('driver', '-')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"timm {env.get('timm', '?')}; commit {env.get('commit', '?')}  ",
             f"Budget {meta.get('budget_s')} s; written {meta.get('written_at_s')} s after the start.", "",
             "| part | status | wall | note |", "|---|---|---:|---|"]
    for name in PARTS:
        p = data["parts"][name]
        lines.append(f"| {name} | {p['status']} | {p.get('wall_s', '-')} s | {p.get('reason', '')} |")
    parts = data["parts"]

    pre = parts["precompile"]
    if pre["cases"]:
        lines += ["", "## Precompile (parallel workers, shared Triton cache)", "",
                  f"{pre.get('calls_done', 0)} of {pre.get('calls_planned', 0)} calls in {pre.get('wall_parallel_s', '-')} s "
                  f"on {pre.get('workers')} workers; their seconds add up to {pre.get('serial_sum_s', '-')} s "
                  f"(each worker's first calls compile, later ones find the cache warm); errors: {pre.get('errors', 0)}.",
                  "", "| cold first call (empty cache of its own) | seconds |", "|---|---:|"]
        for c in pre["cases"]:
            if c.get("own_cache"):
                lines.append(f"| {c['label']} | {c.get('seconds', c.get('error'))} |")
        errs = [c for c in pre["cases"] if "error" in c]
        for c in errs[:20]:
            lines.append(f"\nerror: {c['label']}: {c['error']}")

    corr = parts["correctness"]
    if corr["cases"]:
        lines += ["", "## Correctness against the float64 reference (Triton backend, TF32 off)", "",
                  f"passed {corr.get('passed', '-')}, failed {corr.get('failed', '-')}, skipped {corr.get('skipped', '-')}",
                  "", "| head width | dtype | method | path | rel. L2 error | bound | result |", "|---:|---|---|---|---:|---:|---|"]
        for c in corr["cases"]:
            res = ("skipped: " + c["skipped"]) if "skipped" in c else (
                ("pass" if c["passed"] else "FAIL") + (f" ({c['exception']})" if "exception" in c else "")
                + ("" if c.get("informative", True) else " (constant reference map)"))
            err = f"{c['error']:.1e}" if "error" in c else "-"
            lines.append(f"| {c['head_width']} | {c['dtype']} | {c['method']} | {c['attention']} | {err} | "
                         f"{c['bound']:.0e} | {res} |")

    tim = parts["timing"]
    if tim["cases"]:
        first = sorted({f"N = {c['N']}" for c in tim["cases"] if c.get("first_pass")}, key=lambda t: int(t[4:]))
        lines += ["", "## Timing against the training step (median of warm calls; peak above the model)", ""]
        if first:
            lines += [f"Measured first: {', '.join(FIRST_METHODS)} on the flash path at {' and '.join(first)} "
                      "(with the training step of their size); rows grouped by size here.", ""]
        lines += ["| size | what | path (auto chose) | median | ×step | peak | ×step | first call | target |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for c in timing_rows(tim["cases"], meta.get("dtypes") or []):
            what = c["kind"] if c["kind"] != "explain" else c["method"]
            if c["kind"] == "literal":
                what = f"literal {c['method']}"
            path = c.get("attention", "") + (f" ({c['dispatcher_path']})" if c.get("dispatcher_path") else "")
            if "skipped" in c or "exception" in c:
                lines.append(f"| {c['size']} | {what} | {path} | {c.get('skipped', c.get('exception'))} | | | | | |")
                continue
            tgt = target_for(c)
            verdict = ""
            if tgt is not None and c.get("time_ratio") is not None:
                ok = c["time_ratio"] <= tgt[0] and (not tgt[1] or c.get("memory_ratio", 0) <= tgt[0])
                verdict = f"≤ {tgt[0]}×{' time and memory' if tgt[1] else ''}: {'met' if ok else 'NOT met'}"
            elif c["kind"] == "explain" and c["N"] > 9217:
                verdict = "runs: met" if c.get("finite") else "runs: NOT met (non-finite)"
            lines.append(f"| {c['size']} | {what} | {path} | {_ms(c.get('median_s'))} | {_x(c.get('time_ratio'))} | "
                         f"{_gb(c.get('peak_bytes'))} | {_x(c.get('memory_ratio'))} | {_ms(c.get('first_call_s'))} | "
                         f"{verdict} |")

    att = parts["attention_layer"]
    if att["cases"]:
        lines += ["", "## One attention layer: SDPA forward + backward against ours (d = 64)", "",
                  "| dtype | B × H × N | SDPA | ours | ours ÷ SDPA | with accumulator | ÷ SDPA | target ≤ 1.2× |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for c in att["cases"]:
            shape = f"{c['B']} × {c['H']} × {c['N']}"
            if "sdpa_s" not in c or "ours_acc_over_sdpa" not in c:
                lines.append(f"| {c['dtype']} | {shape} | {c.get('skipped', c.get('exception', '-'))} | | | | | |")
                continue
            met = "met" if c["ours_over_sdpa"] <= TARGET_SDPA else "NOT met"
            lines.append(f"| {c['dtype']} | {shape} | {_ms(c['sdpa_s'])} | {_ms(c['ours_s'])} | {_x(c['ours_over_sdpa'])} | "
                         f"{_ms(c['ours_acc_s'])} | {_x(c['ours_acc_over_sdpa'])} | {met} |")

    ev = parts["evaluation"]
    if ev["cases"]:
        c = ev["cases"][0]
        lines += ["", "## Evaluation runner (segmentation + perturbation, tokentm, synthetic data)", "",
                  f"{c['model']} {c['dtype']}, batch {c['batch']}, {c['images']} images at {c['image_size']} px, "
                  f"{c['workers']} data workers: **{c['loop_images_per_s']:.1f} images/s** in the loop "
                  f"(a 50 000-image ImageNet evaluation: {c['imagenet_50k_hours'] * 60:.1f} min per method); "
                  f"command wall {c['command_wall_s']:.1f} s.", "",
                  f"Where the loop's {_ms(c['loop_s'])} go: explain {_ms(c['explain_s'])}, the perturbation forward "
                  f"passes {_ms(c['perturbation_forwards_s'])}, data loading and the rest {_ms(c['data_and_rest_s'])}."]
    return "\n".join(lines) + "\n"


def render_readme(data: Dict[str, Any]) -> str:
    """README.md of a results folder (``benchmarks/results/<device>/``): what ran, where, when, how."""
    meta = data["meta"]
    env = meta.get("environment", {})
    status = ", ".join(f"{n} {p['status']}" for n, p in data["parts"].items())
    return "\n".join([
        f"# GPU report: {env.get('device_name', '?')}" + (" (smoke run: timings mean nothing)" if meta.get("smoke") else ""),
        "",
        f"- Command: `{meta.get('command', '')}` (from the repository root; `pip install --no-deps "
        f"--no-build-isolation -e .` first)",
        f"- Date: {env.get('date', '?')}",
        f"- Device: {env.get('device_name', '?')}, compute capability {env.get('compute_capability', '-')}, "
        f"driver {env.get('driver', '-')}, CUDA {env.get('cuda', '-')}, {env.get('cpu_count', '?')} CPUs",
        f"- Versions: torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, timm {env.get('timm', '?')}, "
        f"tokentm_fast {env.get('tokentm_fast', '?')}, Python {env.get('python', '?')}",
        f"- Commit: {env.get('commit', '?')}",
        f"- Budget: {meta.get('budget_s')} s; parts: {status}",
        "",
        "The figures: [gpu_report.md](gpu_report.md) (tables) and gpu_report.json (every case, raw).",
        "",
    ])


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_report.json and gpu_report.md")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (default 420; smoke 60)")
    p.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes: the code path only")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="parts to run (default: all)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated, in the order they are spent")
    p.add_argument("--workers", type=int, default=None, help="precompile processes (default: min(8, CPUs / 2))")
    p.add_argument("--precompile-s", type=float, default=None, help="most seconds the precompile may take")
    p.add_argument("--precompile-max-calls", type=int, default=None, help="at most this many calls (smoke: 4)")
    p.add_argument("--reserve-s", type=float, default=None,
                   help="seconds each part leaves for writing and the parts after it (default 15; smoke 1)")
    p.add_argument("--attention-layer-s", type=float, default=None, help="seconds timing leaves for attention_layer")
    p.add_argument("--mem-fraction", type=float, default=0.8, help="of free device memory a case may plan to use")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse HEAD)")
    a = p.parse_args(argv)
    a.argv = list(argv if argv is not None else sys.argv[1:])
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = [d for d in a.dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad}; choose from {sorted(DTYPES)}")
    if a.smoke:
        a.dtypes = [d for d in a.dtypes if d == "float32"] or ["float32"]  # bfloat16 under the interpreter is slow
    a.budget_s = a.budget_s if a.budget_s is not None else (60.0 if a.smoke else 420.0)
    a.workers = a.workers or (2 if a.smoke else max(1, min(8, (os.cpu_count() or 2) // 2)))
    a.precompile_s = a.precompile_s if a.precompile_s is not None else (0.3 * a.budget_s)
    a.precompile_max_calls = a.precompile_max_calls or (4 if a.smoke else None)
    a.reserve_s = a.reserve_s if a.reserve_s is not None else (1.0 if a.smoke else 15.0)
    a.attention_layer_s = a.attention_layer_s if a.attention_layer_s is not None else (2.0 if a.smoke else 30.0)
    return a


#: seconds a part needs at least to start (GPU, smoke)
MIN_PART_S = {"precompile": (60, 5), "correctness": (30, 3), "timing": (30, 3), "attention_layer": (15, 1),
              "evaluation": (45, 3)}

RUNNERS = {"precompile": run_precompile, "correctness": run_correctness, "timing": run_timing,
           "attention_layer": run_attention_layer, "evaluation": run_evaluation}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("gpu_report: no CUDA device here; run with --smoke to check the code path on the CPU", file=sys.stderr)
        return 2
    report = Report(args.out, {"command": "python benchmarks/gpu_report.py " + " ".join(args.argv),
                               "budget_s": args.budget_s, "smoke": args.smoke, "parts_asked": args.parts,
                               "dtypes": args.dtypes})
    report.start("environment")
    report.data["meta"]["environment"] = environment(device, args)
    report.finish("environment")
    for name in PARTS[1:]:
        if name not in args.parts:
            report.skip(name, "not asked for (--parts)")
            continue
        if name == "precompile" and device.type != "cuda" and not args.smoke:
            report.skip(name, "no CUDA device: nothing to compile")
            continue
        need = MIN_PART_S[name][1 if args.smoke else 0]
        if budget.left() < need:
            report.skip(name, f"budget: {budget.left():.0f} s left of {args.budget_s:.0f} s, the part needs ~{need} s")
            continue
        report.start(name)
        print(f"[{budget.elapsed():6.1f} s] {name}", file=sys.stderr, flush=True)
        try:
            RUNNERS[name](args, device, report, budget)
            report.finish(name)
        except Exception as e:  # noqa: BLE001 - a part's failure is reported; the next part still runs
            report.finish(name, "failed", error_text(e))
            report.part(name)["traceback"] = traceback.format_exc()[-3000:]
            report.write()
            release(device)
    print(f"[{budget.elapsed():6.1f} s] wrote {os.path.join(args.out, 'gpu_report.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
