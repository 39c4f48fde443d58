"""Shared machinery of the benchmark suite (see benchmarks/README.md).

Options (also settable through environment variables, handy for scripts):

--bench-scale tiny|small|full   (TOKENTM_BENCH_SCALE, default small)
    tiny: smoke test of every case kind in seconds; small: the issue-target
    sizes, minutes on CPU; full: the whole sweep (GPU).
--bench-device cpu|cuda          (TOKENTM_BENCH_DEVICE, default cuda if available)
--bench-tf32                     (TOKENTM_BENCH_TF32=1) allow TF32 in torch matmuls
    and cuDNN convolutions; tolerances of float32 GPU cases become 5e-3 (spec §7).
    Off by default: float32 means IEEE float32 (torch's matmul default, and cuDNN's
    conv TF32 switched off), so every float32 case is checked at 1e-5.
--bench-budget SECONDS           (TOKENTM_BENCH_BUDGET) target timed seconds per case.
--bench-no-assert                (TOKENTM_BENCH_NO_ASSERT=1) record the errors against the
    oracle (extra_info["max_rel_err"]) but warn instead of failing.
--bench-mem-fraction F           (TOKENTM_BENCH_MEM_FRACTION, default 0.8 on CUDA,
    0.5 on CPU) sizes whose estimated peak (``bench_memory``: formulas of what each
    path allocates, checked against measured peaks) exceeds F × the free memory
    (at start) are not generated at all.
--bench-methods M1,M2            (TOKENTM_BENCH_METHODS) explanation methods of the
    explain and perf suites (default: each suite's own list).
--bench-deadline SECONDS         (TOKENTM_BENCH_DEADLINE) cases that would start later than
    this after the session began are skipped (listed in the JSON's
    ``machine_info.tokentm_bench.left_out_for_time``): a guard that keeps a part within a
    machine's per-command limit (e.g. 540 for 10 minutes), not a substitute for sizing it.

Memory: every case frees what it made. Data shared by the cases of one size
(a model, synthetic layers) lives in one declared slot (``bench.cache``, one
entry at a time); after each case the exception pytest keeps for post-mortem
debugging (``sys.last_*``, which holds the failed case's frames and tensors) is
dropped, garbage cycles are collected and the CUDA cache is emptied
(``tests/test_benchmarks_memory.py`` checks that the memory held after each case
returns to the level before it).

Every case first runs the code under test once and checks it against a float64
oracle within spec §7 (per-image relative L2 error), then times it with
``benchmark.pedantic``: rounds are chosen from a probe call so that a case takes
about the budget; the device is synchronized after every call. On CUDA the
kernel-level cases also record the CUDA-event time of back-to-back calls
(``extra_info["device_time_s"]``), which the bandwidth figures use.

Backends are parametrized only where they can run: ``triton`` only on CUDA
(or, for development, on CPU under Triton's interpreter with
``TOKENTM_BENCH_TRITON_INTERPRET=1``). Sizes that do not fit are left out at
collection time (listed in the report header), never reported as skipped.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

if os.environ.get("TOKENTM_BENCH_TRITON_INTERPRET") == "1":  # development only; before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from bench_memory import release
from benchtable import copy_bandwidth, environment, rel_err, sync

from tokentm_fast.methods import get_method

SCALES = ("tiny", "small", "full")

# Seconds of timed calls per case: (kernel-level, explain-level) per (scale, device type).
BUDGETS = {
    ("tiny", "cpu"): (0.2, 0.3), ("tiny", "cuda"): (0.1, 0.2),
    ("small", "cpu"): (1.0, 2.0), ("small", "cuda"): (0.3, 1.0),
    ("full", "cpu"): (2.0, 4.0), ("full", "cuda"): (0.3, 1.0),
}

TOL_FP32 = 1e-5
TOL_TF32 = 5e-3
TOL_HALF = 2e-2


def pytest_addoption(parser):
    group = parser.getgroup("tokentm-bench", "tokentm_fast benchmark suite")
    group.addoption("--bench-scale", choices=SCALES, default=os.environ.get("TOKENTM_BENCH_SCALE", "small"),
                    help="size sweep: tiny (smoke), small (default; issue-target sizes), full (GPU sweep)")
    group.addoption("--bench-device", default=os.environ.get("TOKENTM_BENCH_DEVICE"),
                    help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-tf32", action="store_true", default=os.environ.get("TOKENTM_BENCH_TF32") == "1",
                    help="allow TF32 in torch matmuls/convolutions (tolerance 5e-3 for float32 GPU cases)")
    group.addoption("--bench-no-assert", action="store_true", default=os.environ.get("TOKENTM_BENCH_NO_ASSERT") == "1",
                    help="record the errors against the oracle but do not fail cases on them (timings only)")
    group.addoption("--bench-budget", type=float, default=_float_env("TOKENTM_BENCH_BUDGET"),
                    help="target timed seconds per case (default depends on scale and device)")
    group.addoption("--bench-mem-fraction", type=float, default=_float_env("TOKENTM_BENCH_MEM_FRACTION"),
                    help="largest fraction of the free memory a case may need (estimate); default 0.8 cuda, 0.5 cpu")
    group.addoption("--bench-deadline", type=float, default=_float_env("TOKENTM_BENCH_DEADLINE"),
                    help="skip the cases that would start more than this many seconds after the session began")
    group.addoption("--bench-methods", default=os.environ.get("TOKENTM_BENCH_METHODS"),
                    help="comma-separated explanation methods of the explain and perf suites "
                         "(default: tokentm,legrad,rollout for explain, every method for perf)")


def _float_env(name: str) -> Optional[float]:
    v = os.environ.get(name)
    return float(v) if v else None


def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _triton_runs_on(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from tokentm_fast.kernels import triton_available

    if device.type == "cuda":
        return triton_available(device)
    return os.environ.get("TOKENTM_BENCH_TRITON_INTERPRET") == "1" and triton_available(device)


class BenchContext:
    """Scale, device, memory budget, tolerances and the timing procedure of the suite."""

    def __init__(self, config) -> None:
        self.scale: str = config.getoption("--bench-scale")
        dev = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.tf32: bool = config.getoption("--bench-tf32")
        self.mem_fraction: float = config.getoption("--bench-mem-fraction") or (0.8 if self.cuda else 0.5)
        methods = config.getoption("--bench-methods")
        self.methods_filter: Optional[List[str]] = (
            [m.strip() for m in methods.split(",") if m.strip()] if methods else None)
        self.assert_errors: bool = not config.getoption("--bench-no-assert")
        budget = config.getoption("--bench-budget")
        k, e = BUDGETS[(self.scale, self.device.type)]
        self.budget_kernel = budget if budget else k
        self.budget_explain = budget if budget else e
        self.min_rounds = 2 if self.scale == "tiny" else (10 if self.cuda else 3)
        self.max_rounds = 1000
        self.triton = _triton_runs_on(self.device)
        self.interpreted = self.triton and not self.cuda
        self.free_bytes = torch.cuda.mem_get_info(self.device)[0] if self.cuda else _available_ram()
        self.left_out: List[str] = []
        self.deadline: Optional[float] = config.getoption("--bench-deadline")
        self.started = time.monotonic()
        self.left_out_for_time: List[str] = []
        self.cache = CaseCache(self.device)
        self._env: Optional[Dict[str, Any]] = None

    # ----------------------------------------------------------------- parametrization
    def backends(self, with_reference: bool = True) -> List[str]:
        return (["reference"] if with_reference else []) + ["torch"] + (["triton"] if self.triton else [])

    def methods(self, default: Tuple[str, ...]) -> List[str]:
        """Explanation methods to run: ``--bench-methods`` (any method of the library) or ``default``."""
        return list(self.methods_filter) if self.methods_filter else list(default)

    def dtypes(self) -> List[str]:
        """float32 everywhere; bfloat16 inputs too on CUDA (where the kernels read half the bytes)."""
        return ["float32", "bfloat16"] if self.cuda else ["float32"]

    def fits(self, need_bytes: float, what: Optional[str] = None) -> bool:
        """Whether a case needing about ``need_bytes`` may run; remembers ``what`` was left out."""
        ok = need_bytes <= self.mem_fraction * self.free_bytes
        if not ok and what is not None:
            self.left_out.append(f"{what} (needs ~{need_bytes / 2**30:.1f} GiB)")
        return ok

    # ----------------------------------------------------------------- environment
    @property
    def env(self) -> Dict[str, Any]:
        if self._env is None:
            env = environment(self.device)
            small = self.scale == "tiny" and not self.cuda  # a smoke test: 32 MiB are enough
            env["copy_bw_Bps"] = copy_bandwidth(self.device, nbytes=(32 << 20) if small else None)
            env["scale"] = self.scale
            env["triton_interpreted"] = self.interpreted
            self._env = env
        return self._env

    # ----------------------------------------------------------------- correctness
    def tolerance(self, dtype: str, tf32: bool = False, method: Optional[str] = None) -> float:
        """Spec §7: bf16/fp16 inputs 2e-2; TF32 products 5e-3; float32 1e-5, or the method's own float32
        bound where its arithmetic cancels (``MethodSpec.float32_tolerance``: the LRP family, 2e-2)."""
        own = get_method(method).float32_tolerance if method is not None else TOL_FP32
        if dtype in ("bfloat16", "float16"):
            return max(TOL_HALF, own)
        if tf32:
            return max(TOL_TF32, own)
        return max(TOL_FP32, own)

    def check(self, benchmark, out: torch.Tensor, ref: torch.Tensor, tol: Optional[float], what: str) -> float:
        """Assert finite output and per-image relative error ≤ ``tol`` (None: record only)."""
        assert torch.isfinite(out).all(), f"{what}: NaN or Inf in the output"
        err = rel_err(out, ref)
        max_err = float(err.max())
        benchmark.extra_info["max_rel_err"] = max_err
        benchmark.extra_info["tol"] = tol
        if tol is not None and not self.assert_errors and max_err > tol:
            warnings.warn(f"{what}: per-image relative L2 error {max_err:.2e} exceeds {tol} (spec §7)")
        elif tol is not None:
            assert max_err <= tol, f"{what}: per-image relative L2 error {err.tolist()} exceeds {tol} (spec §7)"
        return max_err

    # ----------------------------------------------------------------- timing
    def sync(self) -> None:
        sync(self.device)

    def measure(self, benchmark, fn: Callable[[], Any], extra: Dict[str, Any], *, explain: bool = False,
                first_call_s: Optional[float] = None, device_time: bool = False) -> None:
        """Time ``fn`` (already called once by the check) with ``benchmark.pedantic``.

        Rounds are chosen so that the timed calls take about the budget (at least
        ``min_rounds``; on the CPU 3 when one call takes more than 0.5 s, 2 above 5 s; on CUDA at
        least 7 up to 2 s per call — the protocol's median of ≥ 7 calls — and 3 above). Very short calls are
        repeated inside a round so that a round lasts ≥ 1 ms. ``device_time`` (CUDA)
        also records the CUDA-event time per call of back-to-back calls without
        host synchronization in ``extra_info["device_time_s"]``.
        """
        benchmark.extra_info.update(self.env)
        benchmark.extra_info.update(extra)
        benchmark.extra_info["torch_threads"] = torch.get_num_threads()

        def call():
            fn()
            self.sync()

        if benchmark.disabled:  # --benchmark-disable: run once (pedantic only calls it)
            benchmark.pedantic(call)
            return
        budget = self.budget_explain if explain else self.budget_kernel
        if first_call_s is not None and first_call_s > max(1.0, budget) and not self.cuda:
            t = first_call_s  # CPU: a probe would only add time (on CUDA the first call may include compilation)
        else:
            t0 = time.perf_counter()
            call()
            t = time.perf_counter() - t0
        t = max(t, 1e-7)
        iterations = 1 if t >= 1e-3 else int(min(1000, math.ceil(1e-3 / t)))
        if self.cuda and self.scale != "tiny":
            min_rounds = self.min_rounds if t <= 0.5 else (7 if t <= 2.0 else 3)
        else:
            min_rounds = 2 if t > 5.0 else (3 if t > 0.5 else self.min_rounds)
        rounds = int(min(self.max_rounds, max(min_rounds, math.ceil(budget / (t * iterations)))))
        benchmark.extra_info["probe_s"] = t
        benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)
        if device_time and self.cuda:
            k = int(min(50, max(3, rounds * iterations)))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(k):
                fn()
            end.record()
            end.synchronize()
            benchmark.extra_info["device_time_s"] = start.elapsed_time(end) / 1e3 / k

    def release(self) -> None:
        """Collect garbage cycles and empty the CUDA cache (what the cases dropped is freed now)."""
        release(self.device)


class CaseCache:
    """One slot for data shared by consecutive cases of one size (a model, synthetic layers).

    ``get(key, make)`` returns the cached value when ``key`` matches; otherwise it
    drops the old value, releases the memory, and stores ``make()``. The slot
    holds at most one value, so the suite never keeps two sizes alive; it is
    cleared at the end of every test module.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.key: Any = None
        self.value: Any = None

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if self.key != key or self.value is None:
            self.clear()
            self.value = make()
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None
        release(self.device)

    def nbytes(self) -> int:
        """Bytes of the distinct tensor storages in the slot (parameters and buffers of modules too)."""
        seen: Dict[int, int] = {}

        def visit(v: Any) -> None:
            if isinstance(v, torch.Tensor):
                st = v.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            elif isinstance(v, torch.nn.Module):
                for t in list(v.parameters()) + list(v.buffers()):
                    visit(t)
            elif isinstance(v, dict):
                for x in v.values():
                    visit(x)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    visit(x)

        visit(self.value)
        return sum(seen.values())


_CTX: Optional[BenchContext] = None


def pytest_configure(config):
    global _CTX
    _CTX = BenchContext(config)
    config.tokentm_bench = _CTX
    torch.backends.cuda.matmul.allow_tf32 = _CTX.tf32  # recorded in every case's extra_info
    torch.backends.cudnn.allow_tf32 = _CTX.tf32
    config.addinivalue_line("markers", "tokentm_bench: tokentm_fast benchmark case")
    config.addinivalue_line("markers", "bench_cuda: case generated only with --bench-device cuda "
                                       "(explain with attention='flash' | 'materialized')")


def pytest_ignore_collect(collection_path, config):
    """Collect the benchmarks only when asked for: ``pytest benchmarks/...`` or ``--benchmark-only``.

    A plain ``pytest`` from the repository root then runs the tests, not minutes of timings.
    """
    if not collection_path.name.startswith("test_bench_"):
        return None
    if config.getoption("benchmark_only", False):
        return None
    here = Path(__file__).resolve().parent
    for arg in config.args:
        target = Path(str(arg).split("::")[0]).resolve()
        if target == here or here in target.parents:
            return None
    return True


def pytest_report_header(config):
    ctx: BenchContext = config.tokentm_bench
    free = ctx.free_bytes / 2**30
    lines = [
        f"tokentm bench: scale={ctx.scale} device={ctx.device} backends={ctx.backends()} "
        f"tf32={ctx.tf32} free memory {free:.1f} GiB (cases limited to {ctx.mem_fraction:.0%})"
        + (" [triton interpreted]" if ctx.interpreted else "")
    ]
    return lines


def pytest_collection_finish(session):
    ctx: BenchContext = session.config.tokentm_bench
    if ctx.left_out:
        rep = session.config.pluginmanager.get_plugin("terminalreporter")
        if rep is not None:
            rep.write_line(f"tokentm bench: {len(ctx.left_out)} size(s) left out for memory:")
            for what in ctx.left_out:
                rep.write_line(f"  - {what}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ctx: BenchContext = config.tokentm_bench
    if ctx.left_out_for_time:
        terminalreporter.write_line(f"tokentm bench: {len(ctx.left_out_for_time)} case(s) left out for time "
                                    f"(--bench-deadline {ctx.deadline:g} s):")
        for nodeid in ctx.left_out_for_time:
            terminalreporter.write_line(f"  - {nodeid}")


def pytest_benchmark_update_machine_info(config, machine_info):
    ctx: BenchContext = config.tokentm_bench
    info = dict(ctx.env)
    info["left_out_for_memory"] = list(ctx.left_out)
    info["left_out_for_time"] = list(ctx.left_out_for_time)
    info["deadline_s"] = ctx.deadline
    info["tf32"] = ctx.tf32
    machine_info["tokentm_bench"] = info


def pytest_runtest_setup(item):
    """``--bench-deadline``: a case that would start after the deadline is skipped and listed."""
    ctx: BenchContext = item.config.tokentm_bench
    if ctx.deadline is not None and time.monotonic() - ctx.started > ctx.deadline:
        ctx.left_out_for_time.append(item.nodeid)
        pytest.skip(f"the part's time budget is spent (--bench-deadline {ctx.deadline:g} s)")


@pytest.fixture(scope="session")
def bench(request) -> BenchContext:
    """The suite's ``BenchContext``."""
    return request.config.tokentm_bench


def _drop_last_exception() -> None:
    """Forget the exception pytest keeps for post-mortem debugging (it holds the failed case's frames)."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            try:
                delattr(sys, name)
            except AttributeError:
                pass


@pytest.fixture(autouse=True)
def _free_after_case(request):
    """After every case: drop ``sys.last_*``, collect garbage cycles, empty the CUDA cache."""
    yield
    _drop_last_exception()
    request.config.tokentm_bench.release()


@pytest.fixture(scope="module", autouse=True)
def _clear_cache_after_module(request):
    """The shared slot never outlives a test module."""
    yield
    _drop_last_exception()
    request.config.tokentm_bench.cache.clear()
