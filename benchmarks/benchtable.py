"""Benchmark tables: pytest-benchmark JSON → markdown, results-folder README, environment.

Tooling of the benchmark suite (not part of the library):

- ``table_from_json(path)``: the markdown table of a ``pytest benchmarks/
  --benchmark-json=...`` run: mean time of every case per backend
  (reference / torch / triton, plus the training-step baseline (timm defaults) of the
  explain cases), the speedups, on CUDA the achieved memory bandwidth of the
  kernels (the bytes a kernel must move at least, divided by its time) as a
  percentage of the device's measured copy bandwidth, the performance-protocol
  cases (``perf`` suite: explain ÷ training step, literal ÷ explain, peak
  memory), and the issue targets that the run covers (met / not met).
- ``readme(folder)``: the README.md of a ``run_all.sh`` results folder.
- ``python benchmarks/benchtable.py results.json [more.json ...]`` prints the
  table; ``--readme DIR``, ``--env [--device cuda]``, ``--slug DEVICE``.

The helpers ``environment``, ``copy_bandwidth``, ``rel_err`` and ``sync`` are
shared with the suite's ``conftest.py``; ``flash_explain_peak`` (the flash path's estimated peak) with
``test_bench_perf.py`` and ``gpu_report.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "table_from_json",
    "main",
    "environment",
    "copy_bandwidth",
    "rel_err",
    "flash_explain_peak",
    "TARGETS",
    "readme",
]

BACKEND_ORDER = ("baseline", "reference", "torch", "triton")
FAST_BACKENDS = ("torch", "triton")
SUITE_TITLES = {
    "aggregation": "Aggregation, row algorithm over all L layers (spec §3.1); reference = full N×N matrices (float64 as backend='reference', or as TOKENTM_BENCH_REF_DTYPE says)",
    "aggregation_full": "Aggregation, full matrix Cᴸ (spec §3); triton = matrix_update (tf32 tl.dot)",
    "head_fusion": "Head fusion Ā = mean_h max(A⊙G, 0), one layer",
    "transform_weights": "Transformation weights (spec §2), one sub-layer",
    "legrad_reduce": "LeGrad reduction (spec §6), one layer",
    "explain": "Whole explain() on a random-init timm model (baseline `fwd+bwd` = the training step, timm defaults: fused attention)",
    "perf": "Sizes that matter to users: explain against the training step and the literal implementation (time and peak memory)",
}


# --------------------------------------------------------------------------- the flash path's peak

#: the methods of the LRP relevance pass (docs/methods.md §6.3): on the flash path they keep, per recorded
#: block, the linear maps' inputs and outputs besides what the training step keeps
RELEVANCE_PASS = ("lrp", "partial_lrp", "transformer_attribution")
#: their flash peak over the materialized estimate without its N×N terms, as a bound: measured 0.92–1.31
#: (``bench_memory.PeakTracker``, ``backend="torch", attention="flash"``, float32: L 2–4, D 192–384,
#: N 101–401, B 1–4; ``tests/test_benchmarks_protocol.py`` checks one)
RELEVANCE_FLASH_FACTOR = 1.5


def flash_explain_peak(method: str, shape: Dict[str, int]) -> int:
    """Estimated peak bytes one explain call adds on the flash path (no N×N tensor; the model not counted).

    ``shape``: ``bench_memory``'s keywords (L, H, N, D, B, params, image_pixels, itemsize). Every method is
    bounded by the training step's estimate (its graph keeps about as many stream tensors per block). The
    relevance pass keeps more per block (the linear maps' inputs and outputs, q, k, v, the attention output;
    transformer attribution also dO): ``RELEVANCE_FLASH_FACTOR`` × the fast path's estimate with its N×N
    terms dropped (``H = 0`` zeroes every (B, H, N, N) term; these methods have no (B, N, N) term), where
    that is larger."""
    from bench_memory import explain_peak, step_peak

    step = step_peak(**shape, fused=True)
    if method not in RELEVANCE_PASS:
        return step
    return max(step, int(RELEVANCE_FLASH_FACTOR * explain_peak(method, "torch", **{**shape, "H": 0})))


# --------------------------------------------------------------------------- environment


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: Union[str, torch.device] = "cpu") -> str:
    """Human-readable name of ``device`` (the GPU's name, or the CPU model and core count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cores)"


def device_slug(device: Union[str, torch.device] = "cpu") -> str:
    """``device_name`` as a folder name: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2c``."""
    device = torch.device(device)
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = f"cpu {_cpu_name()} {os.cpu_count()}c"
    out = "".join(c.lower() if c.isalnum() else "-" for c in raw)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # pragma: no cover - depends on the environment
        return None
    return getattr(mod, "__version__", "unknown")


def environment(device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Device and library versions, as stored in every benchmark's ``extra_info``."""
    device = torch.device(device)
    from tokentm_fast import __version__

    env = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "tokentm_fast": __version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["sm_count"] = int(props.multi_processor_count)
    return env


def sync(device: Union[str, torch.device]) -> None:
    """Wait for the device (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_COPY_BW: Dict[str, float] = {}


def copy_bandwidth(device: Union[str, torch.device] = "cpu", nbytes: Optional[int] = None, repeats: int = 10) -> float:
    """Measured copy bandwidth of ``device`` in bytes/s: ``(bytes read + written) / time``.

    Times ``y.copy_(x)`` of a large buffer (1 GiB on CUDA, at most a tenth of the
    free memory; 256 MiB on CPU) and keeps the best of ``repeats``. Measured once
    per device and process.
    """
    device = torch.device(device)
    key = str(device)
    if key in _COPY_BW:
        return _COPY_BW[key]
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = int(min(1 << 30, free // 10))
        else:
            nbytes = 256 << 20
    n = max(1, nbytes // 4)
    x = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    best = math.inf
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            start.record()
            y.copy_(x)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            y.copy_(x)
            best = min(best, time.perf_counter() - t0)
    del x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _COPY_BW[key] = 2.0 * n * 4 / best
    return _COPY_BW[key]


def rel_err(e: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image relative L2 error of spec §7: ``‖e − ref‖₂ / ‖ref‖₂`` (float64, shape ``(B,)``).

    Where ``ref`` is exactly zero the absolute error ``‖e‖₂`` is returned.
    """
    e = e.detach().to(torch.float64).reshape(e.shape[0], -1)
    ref = ref.detach().to(device=e.device, dtype=torch.float64).reshape(ref.shape[0], -1)
    diff = (e - ref).norm(dim=1)
    norm = ref.norm(dim=1)
    return torch.where(norm > 0, diff / torch.where(norm > 0, norm, torch.ones_like(norm)), diff)


# --------------------------------------------------------------------------- table from JSON


def _load(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> Tuple[List[dict], dict]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    benches: List[dict] = []
    machine: dict = {}
    for p in paths:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
        benches.extend(data.get("benchmarks", []))
        if not machine:
            machine = data.get("machine_info", {}) or {}
    return benches, machine


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _x(ratio: Optional[float]) -> str:
    return "–" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}×"


def _err(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.1e}"


def _bench_time(b: dict, stat: str = "mean") -> float:
    return float(b["stats"][stat])


def _kernel_time(b: dict) -> float:
    """Time used for bandwidth: the CUDA-event time of back-to-back calls if measured, else the mean."""
    info = b.get("extra_info", {})
    t = info.get("device_time_s")
    return float(t) if t else _bench_time(b)


def _env_of(benches: List[dict], machine: dict) -> Dict[str, Any]:
    env = dict(machine.get("tokentm_bench", {}) or {})
    for b in benches:
        info = b.get("extra_info", {})
        for k in ("device", "device_name", "torch", "triton", "timm", "torch_threads", "copy_bw_Bps", "scale", "tf32_matmul"):
            if k in info and k not in env:
                env[k] = info[k]
    return env


def _groups(benches: List[dict]) -> Dict[str, Dict[Tuple[str, str], Dict[str, dict]]]:
    """suite -> (case, method) -> backend -> benchmark (the last one wins for duplicates)."""
    out: Dict[str, Dict[Tuple[str, str], Dict[str, dict]]] = {}
    for b in benches:
        info = b.get("extra_info", {})
        suite = info.get("suite")
        if suite is None or "stats" not in b or not b["stats"]:
            continue
        key = (info.get("case", b.get("name", "?")), info.get("method", "") or "")
        out.setdefault(suite, {}).setdefault(key, {})[info.get("backend", "?")] = b
    return out


def _suite_table(suite: str, rows: Dict[Tuple[str, str], Dict[str, dict]], bandwidth: bool, copy_bw: Optional[float]) -> str:
    present = [bk for bk in BACKEND_ORDER if any(bk in r for r in rows.values())]
    is_explain = suite == "explain"
    baselines: Dict[str, dict] = {}
    if is_explain:  # the baseline is per case, not per method
        for (case, _), r in rows.items():
            if "baseline" in r:
                baselines[case] = r["baseline"]
        rows = {k: v for k, v in rows.items() if k[1]}
    fast = [bk for bk in FAST_BACKENDS if bk in present]
    header = ["case"] + (["method"] if is_explain else [])
    header += [("fwd+bwd" if bk == "baseline" else bk) + " (ms)" for bk in present]
    if "reference" in present:
        header += [f"ref/{bk}" for bk in fast]
    elif set(FAST_BACKENDS) <= set(present):
        header += ["torch/triton"]
    if is_explain and baselines:
        header += [f"{bk}/fwd+bwd" for bk in ["reference"] * ("reference" in present) + fast]
    bw_backends = [bk for bk in fast if bandwidth and any("bytes" in r.get(bk, {}).get("extra_info", {}) for r in rows.values())]
    for bk in bw_backends:
        header += [f"{bk} GB/s"] + ([f"{bk} % copy"] if copy_bw else [])
    header += [f"err {bk}" for bk in fast]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]

    def order(key):
        case, method = key
        r = rows[key]
        any_b = next(iter(r.values()))
        i = any_b.get("extra_info", {})
        return (i.get("D", 0), i.get("L", 0), i.get("N", 0), i.get("dtype", ""), i.get("Q", 0), i.get("B", 0),
                case, method)

    for key in sorted(rows, key=order):
        case, method = key
        r = rows[key]
        t = {bk: _bench_time(r[bk]) for bk in present if bk in r}
        if is_explain and case in baselines:
            t["baseline"] = _bench_time(baselines[case])
        cells = [case] + ([method] if is_explain else [])
        cells += [_ms(t.get(bk)) for bk in present]
        if "reference" in present:
            cells += [_x(t["reference"] / t[bk]) if "reference" in t and bk in t else "–" for bk in fast]
        elif set(FAST_BACKENDS) <= set(present):
            cells += [_x(t["torch"] / t["triton"]) if "torch" in t and "triton" in t else "–"]
        if is_explain and baselines:
            for bk in ["reference"] * ("reference" in present) + fast:
                cells += [_x(t[bk] / t["baseline"]) if bk in t and "baseline" in t else "–"]
        for bk in bw_backends:
            b = r.get(bk)
            nbytes = b.get("extra_info", {}).get("bytes") if b else None
            if nbytes:
                bw = nbytes / _kernel_time(b)
                pct = 100 * bw / copy_bw if copy_bw else None
                cells += [f"{bw / 1e9:.0f}" if bw >= 1e11 else f"{bw / 1e9:.3g}"]
                cells += ([f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"] if copy_bw else [])
            else:
                cells += ["–"] + (["–"] if copy_bw else [])
        for bk in fast:
            b = r.get(bk)
            cells += [_err(b.get("extra_info", {}).get("max_rel_err")) if b else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mib(nbytes: Optional[float]) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _s(seconds: Optional[float]) -> str:
    return "–" if seconds is None else (f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.3f}")


def _perf_table(benches: List[dict]) -> str:
    """One row per (size, method, variant) of the ``perf`` suite, with the protocol's ratios.

    ``÷ step`` = time (peak memory) over the training step of the same size and
    dtype; ``literal ÷`` = the literal implementation's time over this row's. Times are medians
    (the protocol: the median of ≥ 7 synchronized calls on CUDA).
    """
    by_case: Dict[str, List[dict]] = {}
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("suite") == "perf" and b.get("stats"):
            by_case.setdefault(info["case"], []).append(b)
    header = ["case", "method", "variant", "median (ms)", "peak (MiB)", "÷ step time", "÷ step peak", "literal ÷ this",
              "first call (s)", "first-call peak (MiB)", "err"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    kind_order = {"step": 0, "literal": 1, "reference": 2, "explain": 3}
    for case in sorted(by_case, key=lambda c: (by_case[c][0]["extra_info"].get("N", 0), c)):
        rows = by_case[case]
        step = next((b for b in rows if b["extra_info"].get("kind") == "step"), None)
        st = _bench_time(step, "median") if step else None
        sp = step["extra_info"].get("peak_bytes") if step else None
        literal = {b["extra_info"].get("method"): b for b in rows if b["extra_info"].get("kind") == "literal"}
        for b in sorted(rows, key=lambda b: (b["extra_info"].get("method", ""), kind_order.get(b["extra_info"].get("kind"), 9),
                                              b["extra_info"].get("variant", ""))):
            info = b["extra_info"]
            t, peak = _bench_time(b, "median"), info.get("peak_bytes")
            lit = literal.get(info.get("method"))
            cells = [case, info.get("method") or "–", info.get("variant", info.get("kind", "?")), _ms(t), _mib(peak),
                     _x(t / st) if st else "–", _x(peak / sp) if peak and sp else "–",
                     _x(_bench_time(lit, "median") / t) if lit is not None and info.get("kind") == "explain" else "–",
                     _s(info.get("first_call_s")), _mib(info.get("first_peak_bytes")), _err(info.get("max_rel_err"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Issue targets: (description, suite, selector on extra_info, kind, threshold).
TARGETS = [
    ("CPU: aggregation ViT-B/16 (L=12,H=12,N=197) batch 8, torch ≥ 3× faster than reference",
     "cpu", "aggregation", {"config": "vit_b16", "N": 197, "B": 8, "dtype": "float32"}, ("speedup", "torch"), 3.0),
    ("CPU: explain TokenTM vit_base_patch16_224 batch 8, torch ≤ 1.3× the training step (timm defaults)",
     "cpu", "explain", {"model": "vit_base_patch16_224", "B": 8, "method": "tokentm"}, ("vs_baseline", "torch"), 1.3),
    ("GPU: row update ViT-B/16 batch 64 (fp32) ≥ 70% of copy bandwidth",
     "cuda", "aggregation", {"config": "vit_b16", "N": 197, "B": 64, "dtype": "float32"}, ("bandwidth", "triton"), 0.70),
    ("GPU: head fusion ViT-B/16 batch 64 (fp32) ≥ 70% of copy bandwidth",
     "cuda", "head_fusion", {"config": "vit_b16", "N": 197, "B": 64, "dtype": "float32"}, ("bandwidth", "triton"), 0.70),
    ("GPU: explain TokenTM vit_base_patch16_224 batch 64, triton ≥ 5× faster than reference",
     "cuda", "explain", {"model": "vit_base_patch16_224", "B": 64, "method": "tokentm"}, ("speedup", "triton"), 5.0),
    ("GPU: explain TokenTM vit_base_patch16_224 batch 64, triton ≤ 1.15× the training step (timm defaults)",
     "cuda", "explain", {"model": "vit_base_patch16_224", "B": 64, "method": "tokentm"}, ("vs_baseline", "triton"), 1.15),
]


def _find(benches: List[dict], suite: str, select: Dict[str, Any], backend: str) -> Optional[dict]:
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("suite") != suite or info.get("backend") != backend or not b.get("stats"):
            continue
        if all(info.get(k) == v for k, v in select.items() if not (backend == "baseline" and k == "method")):
            return b
    return None


def _perf_targets(benches: List[dict]) -> List[str]:
    """Issue 16's targets on the perf suite (CUDA, ``backend="triton", attention="flash"``, TokenTM) against
    the training step of the same size: time ≤ 1.0× at N ≤ 577; time and warm peak ≤ 1.2× at N = 4097 and
    9217; N = 16385 runs."""
    rows: Dict[str, Dict[str, dict]] = {}
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("suite") != "perf" or not b.get("stats"):
            continue
        if info.get("kind") == "step":
            rows.setdefault(info["case"], {})["step"] = b
        elif (info.get("method"), info.get("backend"), info.get("attention")) == ("tokentm", "triton", "flash"):
            rows.setdefault(info["case"], {})["flash"] = b
    out = []
    for case, r in sorted(rows.items(), key=lambda kv: (next(iter(kv[1].values()))["extra_info"]["N"], kv[0])):
        flash, step = r.get("flash"), r.get("step")
        if flash is None:
            continue
        n = flash["extra_info"]["N"]
        if n >= 16385:
            out.append(f"- met: explain TokenTM (triton, flash) runs at {case}")
            continue
        if step is None:
            continue
        t = _bench_time(flash, "median") / _bench_time(step, "median")
        fp, sp = flash["extra_info"].get("peak_bytes"), step["extra_info"].get("peak_bytes")
        m = fp / sp if fp and sp else None
        if n <= 577:
            ok, want = t <= 1.0, "time ≤ 1.0×"
        elif n in (4097, 9217):
            ok, want = t <= 1.2 and m is not None and m <= 1.2, "time and peak memory ≤ 1.2×"
        else:
            continue
        out.append(f"- {'met' if ok else 'NOT met'}: explain TokenTM (triton, flash) {want} the training step "
                   f"at {case} — measured {t:.2f}× time, {_x(m)} peak")
    return out


def _targets(benches: List[dict], device: Optional[str], copy_bw: Optional[float]) -> List[str]:
    out = _perf_targets(benches) if device in (None, "cuda") else []
    for desc, dev, suite, select, (kind, backend), thr in TARGETS:
        if device is not None and dev != device:
            continue
        b = _find(benches, suite, select, backend)
        if b is None:
            continue
        value, shown = None, ""
        if kind == "speedup":
            ref = _find(benches, suite, select, "reference")
            if ref is not None:
                value = _bench_time(ref) / _bench_time(b)
                shown = f"{value:.2f}×"
            ok = value is not None and value >= thr
        elif kind == "vs_baseline":
            base = _find(benches, suite, select, "baseline")
            if base is not None:
                value = _bench_time(b) / _bench_time(base)
                shown = f"{value:.2f}×"
            ok = value is not None and value <= thr
        else:  # bandwidth
            nbytes = b.get("extra_info", {}).get("bytes")
            if nbytes and copy_bw:
                value = nbytes / _kernel_time(b) / copy_bw
                shown = f"{100 * value:.0f}%"
            ok = value is not None and value >= thr
        if value is None:
            continue
        out.append(f"- {'met' if ok else 'NOT met'}: {desc} — measured {shown}")
    return out


def table_from_json(path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], bandwidth: str = "auto") -> str:
    """Markdown table of one pytest-benchmark JSON file (or several, merged).

    Args:
        path: a ``--benchmark-json`` file written by ``pytest benchmarks/``, or a list of them.
        bandwidth: ``"auto"`` shows the achieved bandwidth of the kernels on CUDA
            only; ``"always"`` / ``"never"``.

    Returns:
        markdown: a header with device, versions and the measured copy bandwidth,
        one table per suite (mean time per backend in ms, speedups, bandwidth as
        GB/s and % of copy bandwidth, the max per-image relative error of each
        fast path against its float64 oracle), and the issue targets covered.
    """
    benches, machine = _load(path)
    env = _env_of(benches, machine)
    device = env.get("device")
    copy_bw = env.get("copy_bw_Bps")
    show_bw = bandwidth == "always" or (bandwidth == "auto" and device == "cuda")
    out = []
    bits = [f"**{env.get('device_name', '?')}**"]
    for k in ("torch", "triton", "timm"):
        if env.get(k):
            bits.append(f"{k} {env[k]}")
    if env.get("torch_threads") and device == "cpu":
        bits.append(f"{env['torch_threads']} threads")
    if env.get("scale"):
        bits.append(f"scale {env['scale']}")
    if device == "cuda" and "tf32_matmul" in env:
        bits.append("TF32 " + ("on" if env["tf32_matmul"] else "off"))
    if copy_bw:
        bits.append(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    out.append(", ".join(bits))
    out.append("")
    out.append("Mean wall time per call in ms (the device synchronized after every call). "
               "`ref/x` = speedup of backend x over the reference; `x/fwd+bwd` = explain time over the training "
               "step (timm defaults: fused attention, parameter gradients, zero_grad(set_to_none=True)); GB/s = minimum bytes moved / time (CUDA-event time of back-to-back calls); "
               "err = max per-image relative L2 error against the float64 oracle (checked before timing).")
    groups = _groups(benches)
    for suite in list(SUITE_TITLES) + sorted(set(groups) - set(SUITE_TITLES)):
        if suite not in groups:
            continue
        out.append("")
        out.append(f"### {SUITE_TITLES.get(suite, suite)}")
        out.append("")
        if suite == "perf":
            out.append(_perf_table(benches))
        else:
            out.append(_suite_table(suite, groups[suite], show_bw, copy_bw if show_bw else None))
    targets = _targets(benches, device, copy_bw)
    if targets:
        out += ["", "### Issue targets", ""] + targets
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- results folder README


def _git_commit() -> str:
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "diff", "--quiet"], capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def readme(folder: Union[str, os.PathLike]) -> str:
    """README.md of a results folder written by ``benchmarks/run_all.sh``.

    Built only from the folder's files (``bench_*.json``, ``peak_memory.md``,
    ``commands*.txt``), so it can be assembled on another machine than the one
    that ran the benchmarks.
    """
    import glob

    folder = os.fspath(folder)
    jsons = sorted(glob.glob(os.path.join(folder, "bench_*.json")))
    benches, machine = _load(jsons) if jsons else ([], {})
    env = _env_of(benches, machine)
    keys = ("device", "device_name", "torch", "triton", "timm", "tokentm_fast", "python", "cuda", "torch_threads",
            "gpu_memory_bytes", "sm_count", "tf32_matmul", "tf32_cudnn", "scale")
    out = [f"# Benchmark results: {env.get('device_name', os.path.basename(folder.rstrip(os.sep)))}", ""]
    stamp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    out.append(f"Assembled {stamp} from commit `{_git_commit()}` by `benchmarks/run_all.sh`.")
    out += ["", "## Environment", ""]
    for k in keys:
        if env.get(k) is not None:
            out.append(f"- {k}: {env[k]}")
    if env.get("copy_bw_Bps"):
        out.append(f"- measured copy bandwidth: {env['copy_bw_Bps'] / 1e9:.1f} GB/s (read + write bytes / time)")
    left = (machine.get("tokentm_bench") or {}).get("left_out_for_memory")
    if left:
        out.append(f"- sizes left out for memory: {', '.join(left)}")
    cmds = []
    for f in sorted(glob.glob(os.path.join(folder, "commands*.txt"))):
        with open(f, encoding="utf-8") as fh:
            cmds += [line.rstrip() for line in fh if line.strip()]
    if cmds:
        out += ["", "## Commands", "", "```"] + cmds + ["```"]
    times = os.path.join(folder, "part_times.txt")
    if os.path.exists(times):
        with open(times, encoding="utf-8") as fh:
            out += ["", "## Wall time of each part", "", "```"] + [line.rstrip() for line in fh if line.strip()] + ["```"]
    out += ["", "Files: `bench_*.json` (pytest-benchmark; every case's `extra_info` holds the device, versions, "
            "shapes, bytes moved and the error against the oracle), `pytest_*.log`, `table.md`, `peak_memory.md`."]
    if jsons:
        out += ["", "## Timings", "", table_from_json(jsons).rstrip()]
    pm = os.path.join(folder, "peak_memory.md")
    if os.path.exists(pm):
        with open(pm, encoding="utf-8") as fh:
            out += ["", "## Peak memory", "", fh.read().rstrip()]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/benchtable.py",
        description="Markdown table of pytest-benchmark JSON results of benchmarks/, a results README, "
                    "or the environment.",
    )
    parser.add_argument("json", nargs="*", help="--benchmark-json files (merged into one table)")
    parser.add_argument("--bandwidth", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--env", action="store_true", help="print device and versions as markdown")
    parser.add_argument("--readme", metavar="DIR", help="print the README.md of a run_all.sh results folder")
    parser.add_argument("--slug", metavar="DEVICE", help="print the results folder name of DEVICE (cpu, cuda)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.slug:
        print(device_slug(args.slug))
        return 0
    if args.env:
        env = {k: v for k, v in environment(args.device).items() if not k.startswith("tf32")}
        env["copy_bw_GBps"] = round(copy_bandwidth(args.device) / 1e9, 1)
        print("\n".join(f"- {k}: {v}" for k, v in env.items()))
        return 0
    if args.readme:
        print(readme(args.readme), end="")
        return 0
    if not args.json:
        parser.error("give one or more --benchmark-json files, or --readme DIR, --env, --slug DEVICE")
    print(table_from_json(args.json, bandwidth=args.bandwidth), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
