"""Issue 16 on the CPU: the sm_90 compile audit of every kernel's selectable configurations, cached and
bucketed autotuning, the grid's second axis and int64 offsets. No GPU needed (Triton's bundled ptxas).

The full audit (``python benchmarks/compile_audit.py --jobs 2 --out benchmarks/results/compile-sm90``, 1,623
compiles: every configuration with every launch signature realistic calls give it, ~20 min on 2 idle cores; a part
of it, e.g. one kernel module's, re-run with ``--merge``) is committed; here (a few minutes) the committed table is checked against the current kernels and configuration
lists, a sample of it is recompiled live and must give the same numbers, and the failure criterion is shown to
catch a spilling configuration. Issue 25: the signature the audit compiles is the one Triton gives a real launch
(checked on recorded launches against Triton's own specialisation), and its reductions leave the code unchanged.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
AUDIT_JSON = ROOT / "benchmarks" / "results" / "compile-sm90" / "audit.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
import compile_audit as C  # noqa: E402

_SUITE_DEVICE = os.environ.get("TOKENTM_TEST_DEVICE", "cpu")  # set by tests/conftest.py


def _nvidia_backend():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")


def _compiler_env(tmp_path):
    # no interpreter; no TRITON_CACHE_AUTOTUNING, which would switch caching on for every autotuner and hide
    # a kernel whose own cache_results flag is missing
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_AUTOTUNING")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    return env


def _python(code, tmp_path, *args, timeout=600):
    """Run ``code`` in a compiler-mode process (no interpreter, a fresh Triton cache); its last stdout line."""
    proc = subprocess.run([sys.executable, "-c", code, *args], env=_compiler_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- the audit
_CURRENT = r"""
import json, compile_audit as C
print(json.dumps({"keys": sorted(C.job_key(j) for j in C.jobs()), "fingerprint": C.source_fingerprint(),
                  "modules": C.module_fingerprints(), "versions": C.versions()}))
"""


def test_committed_audit_is_current_and_passes(tmp_path):
    """The committed audit covers exactly the (kernel, specialisation, configuration) set the current code
    can launch (``compile_audit.jobs()``: every kernel in kernels/, every variant the wrappers pass, bf16 /
    fp16 / fp32 with IEEE and TF32 products, head widths 32–128, every configuration left after pruning),
    was made from the current kernel sources with this Triton, and nothing in it spills, exceeds 227 KB of
    shared memory or gives < 1 CTA per SM. A configuration added to a table, or a kernel changed, without
    re-running the audit fails here; so does a committed failure."""
    audit = json.loads(AUDIT_JSON.read_text())
    current = json.loads(_python(_CURRENT, tmp_path, timeout=300))
    have = {r["key"] for r in audit["rows"]}
    missing = sorted(set(current["keys"]) - have)
    stale = sorted(have - set(current["keys"]))
    hint = "re-run: python benchmarks/compile_audit.py --out benchmarks/results/compile-sm90"
    assert not missing, f"{len(missing)} launchable configurations not audited, e.g. {missing[:3]}; {hint}"
    assert not stale, f"{len(stale)} audited configurations no longer launchable, e.g. {stale[:3]}; {hint}"
    recorded = audit["meta"].get("module_fingerprints", {})
    changed = sorted(m for m in C.KERNEL_MODULES if recorded.get(m) != current["modules"][m])
    assert audit["meta"]["source_fingerprint"] == current["fingerprint"], (
        f"kernel sources changed since the audit (in {changed}); re-run those modules' kernels with --merge, or {hint}")
    assert not changed, changed
    assert audit["meta"]["triton"] == current["versions"]["triton"], f"another Triton; {hint}"
    assert C.failures(audit["rows"]) == [], C.failures(audit["rows"])[:5]
    # autotuned kernels: at most 4 configurations per (kernel, dtype class, head width class); the others
    # launch fixed sizes (the NECC block follows N, the finalize kernel's row block follows Q)
    for (kernel, dtype, block_d), s in C.summary(audit["rows"]).items():
        if isinstance(C.SPECS[kernel]["configs"], str) and C.SPECS[kernel]["configs"] != "delta":
            assert 1 <= len(s["configs"]) <= 4, (kernel, dtype, block_d, s["configs"])
    kernels = {r["kernel"] for r in audit["rows"]}
    assert kernels == set(C.SPECS), kernels ^ set(C.SPECS)


def test_merge_replaces_only_the_recompiled_part():
    """``compile_audit.merged`` (``--merge``): the rows of the re-run kernels are replaced, the others kept, in
    ``SPECS`` order, the meta gets the current fingerprints and the run in ``merges``; refused when a module whose
    rows it keeps changed since they were compiled, or with another Triton."""
    current, v = C.module_fingerprints(), C.versions()

    def row(kernel, key):
        return {"kernel": kernel, "dtype": "fp32", "key": key, "compile_s": 1.0}

    meta = {"source_fingerprint": "old", "module_fingerprints": dict(current), "triton": v["triton"],
            "torch": v["torch"], "wall_s": 9.0}
    old = {"meta": meta, "rows": [row("relevance q", "q-old"), row("forward", "f"), row("dq", "d")]}
    rows, new = C.merged(old, [row("relevance q", "q-new")], ["relevance q"], None, "cmd", 2.0)
    assert [r["key"] for r in rows] == ["f", "d", "q-new"]
    assert new["source_fingerprint"] == C.source_fingerprint() and new["module_fingerprints"] == current
    assert new["merges"] == [dict(new["merges"][0], command="cmd", kernels=["relevance q"], rows=1)]
    assert new["wall_s"] == 9.0  # the full run's
    stale = dict(old, meta=dict(meta, module_fingerprints=dict(current, attention="changed")))
    with pytest.raises(ValueError, match="attention"):
        C.merged(stale, [row("relevance q", "q-new")], ["relevance q"], None, "cmd", 2.0)
    rows, _ = C.merged(stale, [row("forward", "f2"), row("dq", "d2")], ["forward", "dq"], None, "cmd", 2.0)
    assert [r["key"] for r in rows] == ["f2", "d2", "q-old"]  # the changed module's kernels re-run: accepted
    with pytest.raises(ValueError, match="triton"):
        C.merged(dict(old, meta=dict(meta, triton="0.0")), [], ["relevance q"], None, "cmd", 2.0)


def _sample(rows):
    """The committed rows closest to the limits: per (kernel, dtype) the most registers, per kernel the most
    shared memory."""
    out = {}
    for kernel, dtype in {(r["kernel"], r["dtype"]) for r in rows}:
        r = max((r for r in rows if (r["kernel"], r["dtype"]) == (kernel, dtype)), key=lambda r: (r["regs"], r["smem"]))
        out[r["key"]] = r
    for kernel in {r["kernel"] for r in rows}:
        r = max((r for r in rows if r["kernel"] == kernel), key=lambda r: (r["smem"], r["regs"]))
        out[r["key"]] = r
    return sorted(out.values(), key=lambda r: r["key"])


_RECOMPILE = r"""
import json, sys, compile_audit as C
keys = set(json.loads(open(sys.argv[1]).read()))
rows = C.run([j for j in C.jobs() if C.job_key(j) in keys])
print(json.dumps(rows))
"""


def test_live_compile_reproduces_the_committed_audit(tmp_path):
    """A live sm_90 compile (Triton's ptxas) of the committed rows closest to the limits (most registers per
    kernel and dtype, most shared memory per kernel): the same registers, spills and shared memory as
    committed, and within the limits. (With the check above it replaces the former tests that every
    configuration compiles for sm_90.)"""
    _nvidia_backend()
    audit = json.loads(AUDIT_JSON.read_text())
    sample = _sample(audit["rows"])
    assert len(sample) >= len(C.SPECS)
    t0 = time.perf_counter()
    keys = tmp_path / "keys.json"     # a file: the keys outgrow one command-line argument (128 KB)
    keys.write_text(json.dumps([r["key"] for r in sample]))
    live = json.loads(_python(_RECOMPILE, tmp_path, str(keys)))
    assert len(live) == len(sample)
    committed = {r["key"]: r for r in sample}
    for r in live:
        c = committed[r["key"]]
        assert (r["regs"], r["spills"], r["smem"]) == (c["regs"], c["spills"], c["smem"]), (r, c)
    assert C.failures(live) == []
    print(f"{len(live)} live compiles in {time.perf_counter() - t0:.0f} s")


_INJECTED = r"""
import json, triton, compile_audit as C
from tokentm_fast.kernels import head_fusion
# a tile the first table had: 64×64 with 4 warps spills in the decoupled mode (two fp32 accumulators)
head_fusion.GPU_CONFIGS.append(triton.Config({"BLOCK_I": 64, "BLOCK_J": 64}, num_warps=4, num_stages=2))
jobs = [j for j in C.jobs(kernels=["fuse_heads"], dtypes=["fp32"])
        if j["consts"]["MODE"] == 1 and j["config"][1] == 4 and j["config"][0] == {"BLOCK_I": 64, "BLOCK_J": 64}]
print(json.dumps([len(jobs), C.failures(C.run(jobs))]))
"""


def test_audit_fails_a_spilling_config(tmp_path):
    """The audit's failure criterion on real compiler output: a spilling configuration put back into a
    kernel's list (head fusion, 64×64 tiles with 4 warps) is enumerated by the audit with both launch signatures
    of the variant (N a multiple of 16 and not) and reported where it spills: N not a multiple of 16."""
    _nvidia_backend()
    compiled, failing = json.loads(_python(_INJECTED, tmp_path))
    assert compiled == 2 and [r["signature"] for r in failing] == ["N H"] and failing[0]["spills"] > 0, failing


def test_ctas_per_sm_h100_limits():
    assert C.ctas_per_sm(regs=128, num_warps=4, smem=0) == 4  # 65536 / (128 · 128)
    assert C.ctas_per_sm(regs=32, num_warps=4, smem=0) == 16  # 2048 threads / 128
    assert C.ctas_per_sm(regs=16, num_warps=1, smem=0) == 32  # the CTA limit
    assert C.ctas_per_sm(regs=64, num_warps=4, smem=100 * 1024) == 2  # 228 KB / 100 KB
    assert C.ctas_per_sm(regs=255, num_warps=8, smem=0) == 1
    assert C.ctas_per_sm(regs=64, num_warps=4, smem=240 * 1024) == 0
    assert C.ctas_per_sm(regs=100, num_warps=4, smem=0) == 4  # 100 → 104 registers per thread (warp units of 256)
    assert C.ctas_per_sm(regs=32, num_warps=4, smem=113 * 1024) == 2  # 1 KB reserved per CTA: 2 · 114 KB fit
    assert C.ctas_per_sm(regs=32, num_warps=4, smem=114 * 1024) == 1  # 2 · 115 KB do not
    assert C.failures([{"spills": 0, "smem": C.SMEM_PER_CTA + 1, "ctas_per_sm": 1}])
    assert C.failures([{"spills": 4, "smem": 0, "ctas_per_sm": 8}])
    assert not C.failures([{"spills": 0, "smem": C.SMEM_PER_CTA, "ctas_per_sm": 1}])


# --------------------------------------------------------------------------- what the wrappers launch
def _explain_calls(pools=("token", "avg")):
    import timm

    import tokentm_fast as tf

    for pool in pools:  # class token; mean pooling (LeGrad's reduction over all rows)
        extra = {} if pool == "token" else dict(class_token=False, global_pool="avg", fc_norm=True)
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=16,
                                  patch_size=8, embed_dim=64, num_heads=2, depth=2, **extra).eval()
        model = model.to(torch.bfloat16)
        x = torch.randn(1, 3, 16, 16, dtype=torch.bfloat16)
        for method in ("tokentm", "gae", "rollout", "raw_attention", "attn_gradcam", "legrad"):
            tf.explain(model, x, method, backend="triton", attention="flash")
            for full in ((False, True) if method in ("tokentm", "gae", "rollout") else (False,)):
                tf.explain(model, x, method, backend="triton", attention="materialized", full=full)
        if pool == "token":
            for opts in ({"use_length": False}, {"use_necc": False}, {"use_length": False, "use_necc": False}):
                tf.explain(model, x, "tokentm", backend="triton", attention="flash", **opts)
            tf.explain(model, x, "tokentm", backend="triton", attention="flash", layers=[0])  # block 1: row=None
            tf.explain(model, x, "tokentm", backend="triton", attention="materialized", head_fusion="decoupled")
            tf.explain(model, x, "tokentm", backend="triton", attention="materialized", full=True,
                       head_fusion="decoupled")
            tf.explain(model, x, "conservative_lrp", backend="triton", attention="flash")  # dV alone (P held)
    # BEiT's relative position bias read from its table (HAS_BIAS): every program that forms P on the flash path
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=3, img_size=16, patch_size=8,
                             embed_dim=64, num_heads=2, depth=2).eval().to(torch.bfloat16)
    x = torch.randn(1, 3, 16, 16, dtype=torch.bfloat16)
    for method in ("tokentm", "rollout", "raw_attention", "legrad", "conservative_lrp"):
        tf.explain(beit, x, method, backend="triton", attention="flash")
    tf.explain(beit, x, "tokentm", backend="triton", attention="flash", layers=[0])


def _relevance_calls():
    """The relevance programs' wrapper as the flash path calls it, on a bfloat16 and a float32 attention (N = 5,
    32-wide heads): q, k, v sliced from one qkv projection as timm does, O and dO per-head views of (B, N, C),
    R_O a float32 view; without t (lrp), with partial LRP's row sum and with transformer attribution's (dO); and
    through BEiT's bias (a 2 × 2 grid's table) with both rule sets ("ours" runs the per-image sums first).
    (Until the LRP family's flash path is in ``_explain_calls``, the wrapper is called directly.)"""
    from tokentm_fast.kernels.attention_relevance import attention_relevance
    from tokentm_fast.models.relative_bias import RelativePositionBias

    b, h, n, d = 1, 2, 5, 32
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(0)
        q, k, v = torch.randn(b, n, 3, h, d, generator=g).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
        o, do = (torch.randn(b, n, h * d, generator=g).to(dtype).view(b, n, h, d).transpose(1, 2) for _ in range(2))
        r_o = torch.randn(b, n, h * d, generator=g).view(b, n, h, d).transpose(1, 2)
        lse, row = torch.randn(b, h, n, generator=g).abs(), torch.rand(b, n, generator=g)
        bias = RelativePositionBias(torch.randn(3 * 3 + 3, h, generator=g), (2, 2), 1)
        for r, grad in ((None, None), (row, None), (row, do)):
            attention_relevance(q, k, v, o, lse, r_o, d ** -0.5, row=r, do=grad)
            for rules in ("ours", "classic"):
                attention_relevance(q, k, v, o, lse, r_o, d ** -0.5, row=r, do=grad, bias=bias, rules=rules)


@pytest.mark.skipif(_SUITE_DEVICE != "cpu", reason="records interpreted launches (the audit is the CPU's part)")
def test_audit_enumerates_the_relevance_launches():
    """The relevance programs' launches (``_relevance_calls``: every variant, bfloat16 and float32) are exactly
    the audited specialisations of those programs at that head width: each launch is audited, and each audited
    variant (key program without t, with partial LRP's and with transformer attribution's row sum; the query
    program; 16-bit and float32 with IEEE products) is launched; ``compile_time.py --set relevance`` compiles the
    16-bit ones."""
    from tokentm_fast.kernels._utils import kernels_interpreted

    if not kernels_interpreted():
        pytest.skip("needs the interpreter")
    seen = C.recorded_launches(_relevance_calls)
    assert {k for k, _, _ in seen} == {"_relevance_kv_kernel", "_relevance_q_kernel", "_relevance_sums_kernel"}, seen
    assert seen - C.launch_keys(C.jobs()) == set(), sorted(seen - C.launch_keys(C.jobs()))
    audited = C.launch_keys(C.jobs(kernels=list(C.RELEVANCE_KERNELS), dtypes=["bf16", "fp32"], widths=(32,)))
    assert audited == seen, sorted(audited ^ seen)
    # benchmarks/compile_time.py --set relevance times the compiles of exactly these programs and variants
    import compile_time as T

    assert C.launch_keys(T.flash_jobs("bf16", 32, kernels=T.FLASH_RELEVANCE)) == {
        k for k in seen if k[2] and dict(k[1]).get("HAS_BIAS") is False}       # the bias-free programs


@pytest.mark.skipif(_SUITE_DEVICE != "cpu", reason="records interpreted launches (the audit is the CPU's part)")
def test_audit_enumerates_what_the_wrappers_launch():
    """Every launch that the six methods make on both Triton paths (flash and materialized, full matrix
    too, the TokenTM ablations, a layer choice and decoupled fusion) and conservative LRP on the flash path
    (the attention held constant: dV alone), recorded under the interpreter with a bfloat16 model
    (its constexprs and which pointers carry the model's dtype), is one of the specialisations the audit
    compiles, and every audited attention variant is launched: the hand-written enumeration in
    ``compile_audit.SPECS`` follows the wrappers."""
    from tokentm_fast.kernels._utils import kernels_interpreted

    if not kernels_interpreted():
        pytest.skip("needs the interpreter")
    seen = C.recorded_launches(_explain_calls)
    audited = C.launch_keys(C.jobs())
    kernels = {k for k, _, _ in seen}
    assert {"_flash_fwd_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel", "_attention_rows_kernel",
            "_delta_kernel", "_transform_weights_kernel", "_necc_normalize_kernel", "_row_update_kernel",
            "_matrix_update_kernel", "_fuse_heads_kernel"} <= kernels, kernels
    assert seen - audited == set(), sorted(seen - audited)
    # and the other way for the attention kernels (head width 32 here): every audited variant is launched
    attention = {k for k in C.launch_keys(C.jobs(kernels=list(C.ATTENTION_KERNELS), dtypes=["bf16"], widths=(32,)))
                 if dict(k[1]).get("IEEE") is not True}
    assert attention - seen == set(), sorted(attention - seen)


@pytest.mark.skipif(_SUITE_DEVICE != "cpu", reason="records interpreted launches (the audit is the CPU's part)")
def test_compile_time_benchmark_compiles_what_a_tokentm_call_launches():
    """``benchmarks/compile_time.py`` times the compiles of exactly the kernels and variants one flash-path
    ``explain(method="tokentm")`` launches (recorded here on a bfloat16 model with 32-wide heads)."""
    import compile_time as T
    import timm

    import tokentm_fast as tf
    from tokentm_fast.kernels._utils import kernels_interpreted

    if not kernels_interpreted():
        pytest.skip("needs the interpreter")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=16, patch_size=8,
                              embed_dim=64, num_heads=2, depth=2).eval().to(torch.bfloat16)
    x = torch.randn(1, 3, 16, 16, dtype=torch.bfloat16)
    seen = C.recorded_launches(lambda: tf.explain(model, x, "tokentm", backend="triton", attention="flash"))
    assert C.launch_keys(T.flash_jobs("bf16", 32)) == seen


# --------------------------------------------------------------------------- the signature a real launch gets
def _native(value):
    """Triton's own specialisation of one launch argument: the binder's ``native_specialize_impl`` call for a
    parameter that is neither ``const`` nor excluded by ``do_not_specialize`` (no kernel in kernels/ uses either:
    checked below), with the CUDA backend's rules."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    return native_specialize_impl(CUDABackend, value, False, True, True)


def test_specialise_is_tritons_rule():
    """``compile_audit.specialise`` (the audit's statement of Triton's rule) gives what Triton's launcher gives,
    on the integers around every boundary (1, multiples of 16, 2³¹, 2⁶³), floats, bools, None and tensors with
    aligned and unaligned data."""
    _nvidia_backend()
    ints = [0, 1, 2, 15, 16, 17, 32, 196, 197, 256, 257, 3 * 12 * 72, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31,
            2 ** 31 + 16, -1, -16, -2 ** 31, -2 ** 31 - 1, -2 ** 31 - 16, 2 ** 63 - 1, 2 ** 63 - 16, 2 ** 63]
    base = torch.empty(64, dtype=torch.float32)
    tensors = [base, base[4:], base[1:], base.to(torch.bfloat16)[8:], base.to(torch.bfloat16)[3:],
               base.to(torch.float16)]
    for value in ints + [0.5, 1.0, 1e300, True, False, None] + tensors:
        assert C.specialise(value) == _native(value), value
    assert {C.specialise(t)[1] for t in tensors} == {"D", ""}  # both alignments were tried


def test_no_kernel_opts_out_of_specialisation():
    """The audit specialises every argument as an unannotated ``@triton.jit`` parameter: no kernel in kernels/
    annotates one or excludes it with ``do_not_specialize`` (which would change Triton's rule for it)."""
    import inspect

    for name in C.KERNEL_MODULES:
        src = (ROOT / "kernels" / f"{name}.py").read_text()
        assert "do_not_specialize" not in src, name
    for spec in C.SPECS.values():
        fn = C._jit_fn(getattr(C._module(spec["module"]), spec["attr"]))
        params = inspect.signature(fn.fn).parameters.values()
        assert all(p.annotation is inspect.Parameter.empty or "constexpr" in str(p.annotation) for p in params), fn


def _record_with_args(run_calls):
    """Under the interpreter: call ``run_calls()``; every kernel launch it made as ``(fn, module, args by name,
    constexprs)``."""
    import importlib

    seen = []

    def record(fn, args, kw):
        consts = {k: v for k, v in kw.items() if k in fn.arg_names}
        seen.append((fn, importlib.import_module(fn.fn.__module__), dict(zip(fn.arg_names, args)), consts))

    with C.intercepted_launches(record):
        run_calls()
    return seen


@pytest.mark.skipif(_SUITE_DEVICE != "cpu", reason="records interpreted launches (the audit is the CPU's part)")
def test_audit_compiles_the_signature_of_every_real_launch():
    """Every launch the explain paths make (both Triton paths, the six methods, conservative LRP; a bfloat16
    class-token ViT with 32-wide heads: N = 5, not a multiple of 16, like 197) and the relevance programs'
    (``_relevance_calls``), recorded with its arguments
    under the interpreter, is specialised by Triton (``native_specialize_impl``) as the audit reads it
    (``launch_spec``: the same type and divisibility for every argument, save the documented reductions), and
    that signature is among those the audit compiles for the launch's kernel and constexprs. Among them: the
    attention kernels with HEAD_D = 32 divisible by 16 and N_CTX = 5 not (the signature that spilled while the
    audit typed every integer i32 with divisibility 16 on the strides only), B = 1 and Q = 1 as constexprs."""
    from tokentm_fast.kernels._utils import kernels_interpreted

    _nvidia_backend()
    if not kernels_interpreted():
        pytest.skip("needs the interpreter")
    launches = _record_with_args(lambda: (_explain_calls(pools=("token",)), _relevance_calls()))
    skip = {"UPCAST", "IEEE"}
    audited = {}
    for j in C.jobs():
        key = (j["attr"], tuple(sorted((k, v) for k, v in j["consts"].items() if k not in skip)))
        audited.setdefault(key, set()).add(j["spec"])
    kernels, saw = set(), set()
    for fn, module, args, consts in launches:
        name = fn.fn.__name__
        spec = C.launch_spec(fn, module, args, consts)
        live = C.live_names(fn, consts, module)
        for arg, ty, attr in spec:
            want = _native(args[arg])
            if ty == "*":
                assert want[0].startswith("*") and want[1] == attr, (name, arg, want, attr)
            elif arg not in live and want[0] in ("constexpr", "i32", "i64", "u64"):  # an integer never read
                assert (ty, attr) == ("i32", ""), (name, arg)
            elif arg in C.DIVISIBILITY_INERT and want[0] != "constexpr":
                assert (ty, attr) == (want[0], ""), (name, arg)
            else:
                assert (ty, attr) == want, (name, arg, want, (ty, attr))
        variants = [dict(k[1]) for k in audited if k[0] == name
                    and all(consts.get(c) == v for c, v in k[1])]
        assert variants, (name, consts)
        key = (name, tuple(sorted(max(variants, key=len).items())))
        assert spec in audited[key], (name, C.spec_label(spec), [C.spec_label(s) for s in audited[key]])
        kernels.add(name)
        sig = {a: (t, at) for a, t, at in spec}
        if "HEAD_D" in sig:
            saw.add(("HEAD_D|16, N_CTX∤16", sig["HEAD_D"] == ("i32", "D") and sig["N_CTX"] == ("i32", "")))
        for one in ("B", "Q"):
            if one in sig and one in live:
                saw.add((one + "=1", sig[one] == ("constexpr", 1)))
    assert {"_flash_fwd_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel", "_attention_rows_kernel",
            "_transform_weights_kernel", "_row_update_kernel", "_matrix_update_kernel",
            "_legrad_reduce_kernel", "_relevance_kv_kernel", "_relevance_q_kernel"} <= kernels, kernels
    assert {("HEAD_D|16, N_CTX∤16", True), ("B=1", True), ("Q=1", True)} <= saw, saw


_INERT = r"""
import json, hashlib, compile_audit as C
from concurrent.futures import ProcessPoolExecutor

def body(job):
    import os, tempfile
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn, sig, consts, attrs = C.signature(job)
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": job["config"][1], "num_stages": job["config"][2]})
    ptx = k.asm["ptx"]
    ptx = ptx[ptx.index("{", ptx.index(".entry")):]
    return hashlib.sha256("\n".join(l for l in ptx.splitlines() if "param" not in l).encode()).hexdigest()

def variant(job, arg, ty, attr):
    return dict(job, spec=tuple((a, ty, attr) if a == arg else (a, t, at) for a, t, at in job["spec"]))

cases = []
for kernel, spec in C.SPECS.items():  # every argument whose divisibility the audit drops, in every kernel
    if kernel in ("dkdv", "dkdv v-only", "rows relu-grad", "relevance kv", "relevance kv+rows"):
        continue  # the same kernel as dkdv+gae / rows probs / relevance kv+grad rows
    for arg in sorted(C.DIVISIBILITY_INERT & set(C._jit_fn(getattr(C._module(spec["module"]), spec["attr"])).arg_names)):
        cases.append((kernel, {}, arg, "i32", "D"))
cases += [("row_update", {"MODE": 0, "SPLIT_OUT": False}, "B", "constexpr", 1),  # integers the body does not read
          ("matrix_update", {"MODE": 0, "SPLIT_OUT": False}, "B", "constexpr", 1),
          ("dkdv gae-only", {}, "sg_n", "i32", "D"), ("forward", {}, "N_BUCKET", "constexpr", 1)]
pairs = []
for kernel, consts, arg, ty, attr in cases:
    job = next(j for j in C.jobs(kernels=[kernel], widths=(72,)) if j["dtype"] in ("bf16", "fp32", "fp32 ieee")
               and all(j["consts"].get(k) == v for k, v in consts.items()) and (arg, "i32", "") in j["spec"])
    pairs.append((kernel, arg, job, variant(job, arg, ty, attr)))
with ProcessPoolExecutor() as ex:
    a = list(ex.map(body, [p[2] for p in pairs]))
    b = list(ex.map(body, [p[3] for p in pairs]))
print(json.dumps([[p[0], p[1], x == y] for p, x, y in zip(pairs, a, b)]))
"""


def test_reduced_signatures_compile_to_the_same_code(tmp_path):
    """The audit's two reductions of a launch signature change nothing in the compiled program: every argument of
    ``DIVISIBILITY_INERT`` (the head count H) with or without divisibility 16, in every kernel that takes it, and
    an integer the body does not read with the variant's constexprs (B without SPLIT_OUT, dK/dV's strides without
    input gradients, the autotune keys) as the constexpr 1 or multiple of 16 Triton makes of it or as plain i32
    give the same PTX (the parameter list aside). Checked at head width 72, where the strides carry no
    divisibility of their own."""
    _nvidia_backend()
    got = json.loads(_python(_INERT, tmp_path))
    assert {k for k, _, _ in got} >= {"forward", "dkdv+gae", "dq", "fuse_heads", "row_update", "matrix_update",
                                      "relevance kv+grad rows", "relevance q"}, got
    assert all(same for _, _, same in got), got


# --------------------------------------------------------------------------- cached, bucketed autotuning
_CACHING = r"""
import importlib, json
from triton.runtime.autotuner import Autotuner
out = {}
for name in ("attention", "transform_weights", "row_update", "matrix_update", "head_fusion", "legrad_reduce",
             "attention_relevance"):
    mod = importlib.import_module("tokentm_fast.kernels." + name)
    for attr, obj in vars(mod).items():
        if isinstance(obj, Autotuner):
            out[name + "." + attr] = {"cache_results": obj.cache_results, "keys": obj.keys, "configs": len(obj.configs)}
print(json.dumps(out))
"""


def test_every_autotuner_caches_its_results_on_coarse_keys(tmp_path):
    """Every ``triton.autotune`` in kernels/ stores the chosen configuration on disk (Triton's
    ``cache_results``: a second process benchmarks nothing) and is keyed on N rounded up to a power of two
    (``N_BUCKET``), never on N itself, so a new sequence length in the bucket does not benchmark again.
    Checked in a compiler-mode process: the interpreter switches caching off."""
    tuners = json.loads(_python(_CACHING, tmp_path, timeout=300))
    assert len(tuners) == 12, sorted(tuners)
    for name, t in tuners.items():
        assert t["cache_results"] is True, name
        assert "N_BUCKET" in t["keys"] and not {"N", "N_CTX"} & set(t["keys"]), (name, t["keys"])
        if name.split(".")[0] not in ("attention", "attention_relevance"):  # ≤ 4 per class after pruning (above)
            assert 1 <= t["configs"] <= 4, (name, t["configs"])


def test_attention_autotune_key_buckets_n(tmp_path):
    """The attention wrappers pass N's power-of-two bucket, and the pruning hook keeps exactly the table's
    entries of the call's (dtype class, BLOCK_D)."""
    code = r"""
import torch
from tokentm_fast.kernels import attention as A, attention_relevance as R
assert A._shape_args(torch.empty(2, 3, 197, 64, device="meta"))[5] == (8, 256)
assert A._shape_args(torch.empty(1, 12, 257, 80, device="meta"))[4:] == (128, (16, 512))
for kind, configs in (("fwd", A._FWD_CONFIGS), ("bwd", A._BWD_CONFIGS), ("dq", A._DQ_CONFIGS),
                      ("rel_kv", R._relevance_kv_kernel.configs), ("rel_q", R._relevance_q_kernel.configs)):
    prune = A._pruner(kind)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for bd in (32, 64, 128):
            kept = prune(configs, {"q_ptr": torch.empty(0, dtype=dt, device="meta")}, BLOCK_D=bd)
            got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
            assert sorted(got) == sorted(A.table_configs(kind, dt, bd)), (kind, dt, bd, got)
print("ok")
"""
    assert _python(code, tmp_path, timeout=300) == "ok"


def test_transform_weights_key_is_the_n_bucket(monkeypatch):
    """The non-attention wrappers pass ``next_power_of_2(N)`` as the autotune key (checked on the
    transform-weights launch, which the flash path makes twice per layer)."""
    import importlib

    tw = importlib.import_module("tokentm_fast.kernels.transform_weights")
    launches = []

    class Stand:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(args)

    monkeypatch.setattr(tw, "_transform_weights_kernel", Stand())
    monkeypatch.setattr(tw, "_necc_normalize_kernel", Stand())
    tw.transform_weights(torch.zeros(1, 197, 8), torch.zeros(1, 197, 8))
    assert launches and launches[0][4] == 197 and launches[0][9] == 256, launches[0][4:10]


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
    """B·H > 65535 (e.g. ViT-L at B = 4100 > 65535 / 16, or mean-pooled LeGrad's L'·B·H rows): every
    launch's second grid axis stays ≤ 65535 and together the launches cover every (image, head)."""
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
    dq, dk, dv, t = A.flash_backward(x, x, x, x, lse, x, 0.25, input_grads="v")
    assert dq is None and dk is None and t is None and dv.shape == (b, h, n, d)
    assert A.attention_rows(row, 0.25, q=x, k=x, lse=lse).shape == (b, h, n)
    assert A.attention_rows(row, 0.25, do=x, v=x).shape == (b, h, n)
    assert grids
    for name, grid in grids:
        assert len(grid) <= 3 and all(1 <= g <= 65535 for g in grid[1:]), (name, grid)
    for name in ("_flash_fwd_kernel", "_flash_bwd_dq_kernel", "_delta_kernel"):
        assert sum(g[1] for k, g in grids if k == name) == b * h, name
    for name in ("_flash_bwd_dkdv_kernel", "_attention_rows_kernel"):  # two calls each
        assert sum(g[1] for k, g in grids if k == name) == 2 * b * h, name


def test_legrad_reduce_offsets_are_int64(tmp_path):
    """H·Q·N > 2³¹ elements per (layer, image) must not wrap: the row offsets of the LeGrad reduction are
    int64 in the compiled kernel (Triton IR of an sm_90 compile, no GPU and no 8 GB tensor needed)."""
    _nvidia_backend()
    code = r"""
import re, triton, importlib
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
M = importlib.import_module("tokentm_fast.kernels.legrad_reduce")
fn = M._legrad_reduce_kernel.fn
c = {"ACCUMULATE": False, "SPLIT_OUT": False, "BLOCK_R": 16, "BLOCK_J": 128}
sig = {a: "constexpr" if a in c else ("*fp32" if a.endswith("_ptr") else "fp32" if a == "scale" else "i32")
       for a in fn.arg_names}
k = triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
# the row offsets offs_r · N (a (BLOCK_R, 1) tensor) are added to the (layer, image) base pointer
offsets = re.findall(r"tt\.addptr [^:]*: tensor<16x1x!tt\.ptr<f32>>, tensor<16x1x(i\d+)>", k.asm["ttir"])
print(sorted(set(offsets)))
"""
    assert _python(code, tmp_path, timeout=300) == "['i64']"
