"""Issue 16 on the CPU: the sm_90 compile audit of the attention kernels' selectable configurations,
cached autotuning, the grid's second axis and int64 offsets. No GPU needed (Triton's bundled ptxas)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")


def _compiler_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    return env


def _python(code, tmp_path, timeout=600):
    proc = subprocess.run([sys.executable, "-c", code], env=_compiler_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


# --------------------------------------------------------------------------- the audit
_AUDIT = r"""
import json, sys
import compile_audit as C
from tokentm_fast.kernels import attention as A

# the table: at most 4 configurations per (kernel kind, dtype class, BLOCK_D), every class present
for kind in ("fwd", "bwd", "dq"):
    for cls in ("16", "32"):
        for bd in (32, 64, 128):
            entries = A.CONFIG_TABLE[(kind, cls, bd)]
            assert 1 <= len(entries) <= 4 and len(set(entries)) == len(entries), (kind, cls, bd)
jobs = C.jobs(variants=sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else None,
              dtypes=sys.argv[2].split(",") if len(sys.argv) > 2 else None,
              widths=tuple(int(w) for w in sys.argv[3].split(",")) if len(sys.argv) > 3 else C.HEAD_WIDTHS)
rows = C.run(jobs)
print(json.dumps({"n": len(rows), "failures": C.failures(rows), "rows": rows}))
"""


def _audit(tmp_path, variants, dtypes, widths):
    import json

    args = [variants, dtypes, widths]
    proc = subprocess.run([sys.executable, "-c", _AUDIT, *args], env=_compiler_env(tmp_path), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _committed_audit():
    import json

    path = ROOT / "benchmarks" / "results" / "compile-sm90" / "audit.json"
    return json.loads(path.read_text())


def test_committed_audit_covers_the_table_and_passes():
    """The committed full audit (``python benchmarks/compile_audit.py --out benchmarks/results/compile-sm90``)
    covers every configuration the autotuners can choose for every kernel variant the wrappers launch
    (forward; dK/dV plain, with the GAE accumulator, accumulator only; dQ; attention_rows in both modes),
    bf16 / fp16 / fp32 (IEEE and TF32 products), head widths 32–128, and none spills, exceeds 227 KB of shared
    memory or gives < 1 CTA per SM. Changing the table without re-running the audit fails here."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compile_audit as C

    audit = _committed_audit()
    seen = {(r["kernel"], r["dtype"], r["BLOCK_D"], r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"])
            for r in audit["rows"]}
    expected = set()
    for name, _, kind, _ in C.VARIANTS:
        for dt, ieee in C._dtype_classes():
            label = dt + ("" if dt != "fp32" else (" ieee" if ieee else " tf32"))
            for bd in (32, 64, 128):
                for cfg in _table(kind, dt, bd):
                    expected.add((name, label, bd, *cfg))
    assert expected <= seen, sorted(expected - seen)[:10]
    assert C.failures(audit["rows"]) == []
    assert len({(k, d, b) for k, d, b, *_ in expected}) == 7 * 4 * 3
    # the bf16 main tiles at ViT-B's head width keep ≥ 2 CTAs per SM for at least one configuration each
    for kernel in ("forward", "dkdv+gae", "dq"):
        assert max(r["ctas_per_sm"] for r in audit["rows"]
                   if r["kernel"] == kernel and r["dtype"] == "bf16" and r["BLOCK_D"] == 64) >= 2, kernel


def _table(kind, dt, bd):
    """The attention table without importing the kernels in this (interpreter) process's compiled form."""
    import ast

    src = (ROOT / "kernels" / "attention.py").read_text()
    start = src.index("CONFIG_TABLE = {")
    table = ast.literal_eval(src[start + len("CONFIG_TABLE = "):src.index("}\n", start) + 1])
    return table[(kind, "32" if dt == "fp32" else "16", bd)]


def test_compile_audit_sm90_live(tmp_path):
    """A live sm_90 compile (Triton's ptxas; the former compile tests' check that the kernels build for an
    H100) of the widest class, head width 128 (BLOCK_D = 128), for the forward, dK/dV + accumulator and dQ
    kernels in bf16 and float32 (IEEE and TF32): no spills, ≤ 227 KB shared memory, ≥ 1 CTA per SM; the table
    has ≤ 4 entries per class. The full audit is the benchmark script (its result is checked above)."""
    _nvidia_backend()
    t0 = time.perf_counter()
    out = _audit(tmp_path, "forward,dkdv+gae,dq", "bf16,fp32", "128")
    assert out["n"] >= 3 * 3, out["n"]
    assert out["failures"] == [], out["failures"]
    print(f"audit: {out['n']} compiles in {time.perf_counter() - t0:.0f} s")


def test_compile_audit_catches_a_spilling_config(tmp_path):
    """The audit's failure criterion on real compiler output: a configuration from the old list that spilled
    (bf16 dK/dV with the GAE accumulator, 32×64 tiles, 4 warps, 2 stages, BLOCK_D = 128: 252 B of spills
    in the audit run) is reported as failing."""
    _nvidia_backend()
    code = r"""
import json
import compile_audit as C
job = dict(kernel="dkdv+gae", attr="_flash_bwd_dkdv_kernel", dtype="bf16", ptr="*bf16", BLOCK_D=128,
           widths=[128], consts={"ACC": 1, "INPUT_GRADS": True, "IEEE": False, "UPCAST": False, "BLOCK_D": 128},
           config=(32, 64, 4, 2))
print(json.dumps(C.failures([C.compile_one(job)])))
"""
    import json

    failing = json.loads(_python(code, tmp_path).strip().splitlines()[-1])
    assert len(failing) == 1 and (failing[0]["spills"] > 0 or failing[0]["smem"] > 232448), failing


def test_ctas_per_sm_h100_limits():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compile_audit as C

    assert C.ctas_per_sm(regs=128, num_warps=4, smem=0) == 4  # 65536 / (128 · 128)
    assert C.ctas_per_sm(regs=32, num_warps=4, smem=0) == 16  # 2048 threads / 128
    assert C.ctas_per_sm(regs=16, num_warps=1, smem=0) == 32  # the CTA limit
    assert C.ctas_per_sm(regs=64, num_warps=4, smem=100 * 1024) == 2  # 228 KB / 100 KB
    assert C.ctas_per_sm(regs=255, num_warps=8, smem=0) == 1
    assert C.ctas_per_sm(regs=64, num_warps=4, smem=240 * 1024) == 0


# --------------------------------------------------------------------------- cached autotuning
_CACHING = r"""
import importlib, triton
from triton.runtime.autotuner import Autotuner
n = 0
for name in ("attention", "transform_weights", "row_update", "matrix_update", "head_fusion", "legrad_reduce"):
    mod = importlib.import_module("tokentm_fast.kernels." + name)
    for attr, obj in vars(mod).items():
        if isinstance(obj, Autotuner):
            assert obj.cache_results, (name, attr)
            assert len(obj.configs) >= 1
            n += 1
print("autotuners", n)
"""


def test_every_autotuner_caches_its_results(tmp_path):
    """Every ``triton.autotune`` in kernels/ stores the chosen configuration on disk (a second process
    benchmarks nothing). Checked in a compiler-mode process: the interpreter switches caching off."""
    out = _python(_CACHING, tmp_path, timeout=300)
    assert int(out.strip().split()[-1]) >= 9, out


def test_attention_autotune_key_buckets_n(tmp_path):
    """The attention autotuners are keyed on N rounded up to a power of two, not on N itself, and prune to
    the table's entries of the call's (dtype class, BLOCK_D)."""
    code = r"""
import torch, triton
from tokentm_fast.kernels import attention as A
for kern in (A._flash_fwd_kernel, A._flash_bwd_dkdv_kernel, A._flash_bwd_dq_kernel, A._attention_rows_kernel):
    assert "N_CTX" not in kern.keys and "N_BUCKET" in kern.keys, kern.keys
    assert len({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kern.configs}) == len(kern.configs)
assert A._shape_args(torch.empty(2, 3, 197, 64, device="meta"))[5] == (8, 256)
assert A._shape_args(torch.empty(1, 12, 257, 80, device="meta"))[4:] == (128, (16, 512))
prune = A._pruner("bwd")
for dt, bd in ((torch.float32, 128), (torch.bfloat16, 64), (torch.float16, 32)):
    kept = prune(A._BWD_CONFIGS, {"q_ptr": torch.empty(0, dtype=dt, device="meta")}, BLOCK_D=bd)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == set(A.table_configs("bwd", dt, bd))
print("ok")
"""
    assert "ok" in _python(code, tmp_path, timeout=300)


# --------------------------------------------------------------------------- grid and offsets
class _Recorder:
    """Stand-in for an autotuned kernel: records the launch grid, runs nothing."""

    def __init__(self, grids, name):
        self.grids, self.name = grids, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {"BLOCK_M": 64, "BLOCK_N": 64, **kwargs}
            self.grids.append((self.name, grid(meta) if callable(grid) else tuple(grid)))
        return launch


def test_attention_grid_second_axis_stays_within_cuda_limit(monkeypatch):
    """B·H > 65535 (e.g. ViT-L at B = 171, or mean-pooled LeGrad's L'·B·H rows): every launch's second grid
    axis stays ≤ 65535 and together the launches cover every (image, head)."""
    from tokentm_fast.kernels import attention as A

    grids = []
    for name in ("_flash_fwd_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel", "_attention_rows_kernel",
                 "_delta_kernel"):
        monkeypatch.setattr(A, name, _Recorder(grids, name))
    b, h, n, d = 4100, 16, 5, 16  # B·H = 65600
    x = torch.zeros(1, 1, n, d).expand(b, h, n, d)  # zero strides: no memory
    lse = torch.zeros(1, 1, n).expand(b, h, n)
    row = torch.zeros(1, n).expand(b, n)
    o, ell = A.flash_forward(x, x, x, 0.25)
    assert o.shape == (b, h, n, d) and ell.shape == (b, h, n)
    dq, dk, dv, t = A.flash_backward(x, x, x, x, lse, x, 0.25, row=row)
    assert dq.shape == dk.shape == dv.shape == (b, h, n, d) and t.shape == (b, h, n)
    assert A.attention_rows(row, 0.25, q=x, k=x, lse=lse).shape == (b, h, n)
    assert A.attention_rows(row, 0.25, do=x, v=x).shape == (b, h, n)
    assert grids
    for name, grid in grids:
        assert len(grid) <= 3 and all(1 <= g <= 65535 for g in grid[1:]), (name, grid)
    for name in ("_flash_fwd_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel", "_delta_kernel"):
        assert sum(g[1] for k, g in grids if k == name) == b * h, name
    assert sum(g[1] for k, g in grids if k == "_attention_rows_kernel") == 2 * b * h


def test_legrad_reduce_offsets_are_int64(tmp_path):
    """H·Q·N > 2³¹ elements per (layer, image) must not wrap: the row offsets of the LeGrad reduction are
    int64 in the compiled kernel (Triton IR of an sm_90 compile, no GPU and no 8 GB tensor needed)."""
    _nvidia_backend()
    code = r"""
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
M = importlib.import_module("tokentm_fast.kernels.legrad_reduce")
fn = M._legrad_reduce_kernel.fn
c = {"ACCUMULATE": False, "SPLIT_OUT": False, "BLOCK_R": 16, "BLOCK_J": 128}
sig = {a: "constexpr" if a in c else ("*fp32" if a.endswith("_ptr") else "fp32" if a == "scale" else "i32")
       for a in fn.arg_names}
k = triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
ttir = k.asm["ttir"]
# the row offsets offs_r · N (a (BLOCK_R, 1) tensor) are added to the (layer, image) base pointer
offsets = re.findall(r"tt\.addptr [^:]*: tensor<16x1x!tt\.ptr<f32>>, tensor<16x1x(i\d+)>", ttir)
print(offsets)
assert offsets and set(offsets) == {"i64"}, offsets
"""
    _python(code, tmp_path, timeout=300)
