"""The benchmark harness follows the performance protocol (benchmarks/README.md, issue 16 item 6).

- the training-step baseline is timm's default step: fused attention (SDPA) whatever the model's flag,
  parameter gradients computed, then ``zero_grad(set_to_none=True)``; the flags are restored;
- the perf suite runs every documented method by default, on both attention paths on CUDA (the LRP relevance
  pass included), and records the first call's time and peak besides a warm call's peak; the flash path's
  estimated peak bounds the relevance pass's measured one;
- the table reads medians and states issue 16's flash-vs-step targets (met or not) from the figures.
The suites themselves run at tiny sizes in ``tests/test_benchmarks_memory.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_models  # noqa: E402
import benchtable  # noqa: E402


@pytest.fixture(scope="module")
def vit():
    model = bench_models.random_vit("vit_tiny_patch16_224", "cpu", img_size=32, depth=2, fused_attn=False)
    images, target = bench_models.random_images(model, 2, "cpu")
    return model, images, target


def test_training_step_is_the_timm_default_step(vit, monkeypatch):
    model, images, target = vit
    calls, grads = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    weight = model.blocks[0].attn.qkv.weight
    handle = weight.register_hook(lambda g: grads.append(g.abs().sum().item()))
    try:
        score = bench_models.training_step(model, images, target)()
    finally:
        handle.remove()
    assert len(calls) == len(model.blocks), "every block's attention must be fused (SDPA)"
    assert grads and grads[0] > 0, "parameter gradients are part of the step"
    assert all(p.grad is None for p in model.parameters()), "zero_grad(set_to_none=True)"
    assert not any(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")), "flags restored"
    logits = model(images)
    torch.testing.assert_close(score, logits.gather(1, target[:, None]).sum().detach())


#: the methods docs/methods.md defines, written out (tests/test_methods.py checks ``tf.METHODS`` is this list)
DOCUMENTED_METHODS = ("tokentm", "gae", "rollout", "raw_attention", "attn_gradcam", "legrad", "conservative_lrp",
                      "attcat", "lrp", "partial_lrp", "transformer_attribution")
#: the methods of the LRP relevance pass, on the flash path since its relevance programs (issue 28 item 2)
RELEVANCE_PASS = ("lrp", "partial_lrp", "transformer_attribution")


class _AllFits:
    """A bench context without a method filter, on CUDA with Triton, where every case fits."""
    methods_filter = ()
    scale, cuda, triton = "small", True, True

    def methods(self, default):
        return list(default)

    def fits(self, need, what=None):
        return True


def test_perf_suite_runs_every_method():
    """The cases the perf suite builds by default (no ``--bench-methods``): every documented method on the
    torch backend and on Triton's flash and materialized paths (the relevance pass too), at every size."""
    import test_bench_perf

    params = test_bench_perf.build_cases(_AllFits())
    cases = [p.values[0] for p in params]
    explain = [c for c in cases if c.kind == "explain"]
    sizes = {c.size for c in cases}
    assert len(sizes) > 1
    for size in sizes:
        ran = {(c.method, c.backend, c.attention) for c in explain if c.size == size}
        want = {(m, "torch", "") for m in DOCUMENTED_METHODS}
        want |= {(m, "triton", "materialized") for m in DOCUMENTED_METHODS}
        want |= {(m, "triton", "flash") for m in DOCUMENTED_METHODS}
        assert ran == want, (size, ran ^ want)


@pytest.mark.parametrize("method", RELEVANCE_PASS)
def test_flash_estimate_bounds_the_relevance_pass(method):
    """The size filter's estimate of a relevance-pass case on the flash path is above the peak it adds,
    measured with ``PeakTracker`` on the PyTorch flash twin (``backend="torch", attention="flash"``, float32)
    of a small ViT; the twin's (G, Q_t, N) tiles are the CPU's extra, the Triton programs write only R_Q, R_K,
    R_V. (The training step's estimate, which bounds the other methods' flash path, does not bound lrp's.)"""
    from bench_memory import measure_peak

    import tokentm_fast as tf

    L, D, H, img, B = 4, 256, 4, 224, 2
    model = bench_models.random_vit("vit_tiny_patch16_224", "cpu", img_size=img, depth=L, embed_dim=D, num_heads=H)
    images, target = bench_models.random_images(model, B, "cpu")
    n = (img // 16) ** 2 + 1
    shape = dict(L=L, H=H, D=D, N=n, B=B, params=sum(p.numel() for p in model.parameters()), image_pixels=img ** 2,
                 itemsize=4)
    out, peak = measure_peak(lambda: tf.explain(model, images, method=method, target=target, backend="torch",
                                                attention="flash"), "cpu")
    assert torch.isfinite(out).all() and bool((out.flatten(1).std(1) > 0).all())  # a real pass ran
    assert peak > 0
    assert peak <= benchtable.flash_explain_peak(method, shape), (method, peak)


def _bench(case, n, kind, median, peak, method="", backend="", attention="", first=None):
    info = dict(suite="perf", case=case, N=n, kind=kind, method=method, backend=backend or kind,
                attention=attention, variant=kind, peak_bytes=peak, first_call_s=first, first_peak_bytes=peak)
    return {"extra_info": info, "stats": {"mean": 10 * median, "median": median}}


def _flash(case, n, median, peak, first=3.0):
    return _bench(case, n, "explain", median, peak, "tokentm", "triton", "flash", first)


def test_perf_targets_from_medians():
    benches = [
        _bench("a", 197, "step", 0.010, 100), _flash("a", 197, 0.009, 80),       # 0.9× ≤ 1.0: met
        _bench("b", 577, "step", 0.010, 100), _flash("b", 577, 0.011, 80),       # 1.1× > 1.0: not met
        _bench("c", 4097, "step", 0.010, 100), _flash("c", 4097, 0.011, 130),    # time ok, peak 1.3×: not met
        _bench("d", 9217, "step", 0.010, 100), _flash("d", 9217, 0.012, 110),    # 1.2×, 1.1×: met
        _flash("e", 16385, 0.5, 100),                                             # runs: met
        _bench("f", 197, "step", 0.010, 100),                                     # no flash row: nothing
    ]
    lines = benchtable._perf_targets(benches)
    assert [ln.split(":")[0] for ln in lines] == ["- met", "- NOT met", "- NOT met", "- met", "- met"]
    assert "0.90× time" in lines[0] and "1.30× peak" in lines[2]
    assert all("NOT" not in ln for ln in benchtable._perf_targets(benches[:2] + benches[6:8] + benches[8:9]))


def test_perf_table_shows_the_first_call():
    benches = [_bench("a", 197, "step", 0.010, 2 << 20, first=0.5), _flash("a", 197, 0.020, 1 << 20, first=12.0)]
    table = benchtable._perf_table(benches)
    head = table.splitlines()[0]
    assert "first call (s)" in head and "first-call peak (MiB)" in head and "median (ms)" in head
    row = next(ln for ln in table.splitlines() if "tokentm" in ln)
    assert "| 12.0 |" in row and "| 20.0 |" in row and "2.00×" in row  # median, not the mean (200 ms)


def test_a_deadline_skips_the_cases_after_it_and_lists_them(tmp_path):
    """``--bench-deadline 0``: no case starts, every one is listed as left out for time (the guard that keeps
    a part within a machine's per-command limit)."""
    import subprocess

    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "benchmarks/test_bench_perf.py",
           "-k", "not tiny-hires", "--benchmark-only", "--bench-scale", "tiny", "--bench-device", "cpu",
           "--bench-methods", "tokentm", "--bench-deadline", "0", "--benchmark-json", str(out)]
    proc = subprocess.run(cmd, cwd=BENCH.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 skipped" in proc.stdout and "passed" not in proc.stdout, proc.stdout[-2000:]
    assert "3 case(s) left out for time (--bench-deadline 0 s)" in proc.stdout
    assert proc.stdout.count("  - benchmarks/test_bench_perf.py::test_perf[tiny-") == 3  # step, literal, torch
    assert not out.exists()  # nothing was timed (pytest-benchmark writes no JSON then)
