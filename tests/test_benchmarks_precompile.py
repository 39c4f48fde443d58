"""benchmarks/precompile.py (the untimed compile step before each timed ``run_all.sh`` part), on the CPU.

- Its plan is the parts' own calls: every (size, method, attention path) of ``test_bench_perf.sizes`` and
  of the explain sweep on CUDA, each once; the perf part covers all six methods and both attention paths.
- ``--dry-run`` lists the CUDA plan on a machine without a GPU.
- At the tiny scale under the interpreter it makes every call and records each one's seconds.
- Where Triton cannot run it makes no call and says so.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import precompile  # noqa: E402
import test_bench_explain  # noqa: E402
import test_bench_perf  # noqa: E402

import tokentm_fast as tf  # noqa: E402


def _key(c):
    return (c.part, c.model, c.img, c.B, c.dtype, c.method, c.attention)


@pytest.mark.parametrize("scale", ["tiny", "small", "full"])
def test_plan_is_the_parts_calls(scale):
    plan = precompile.calls(list(precompile.PARTS), scale, None, lambda need: True)
    keys = [_key(c) for c in plan]
    assert len(keys) == len(set(keys)), "a call is listed twice"
    want = set()
    for s in test_bench_perf.sizes(scale, True):
        part = "hires" if "hires" in s.tag else "perf"
        want |= {(part, s.model, s.img, s.B, s.dtype, m, a) for m in test_bench_perf.METHODS
                 for a in ("flash", "materialized")}
    img = test_bench_explain.TINY_IMG if scale == "tiny" else 224
    want |= {("explain", m, img, b, "float32", meth, "auto") for m, b in test_bench_explain._sweep(scale, True)
             for meth in test_bench_explain.METHODS}
    assert set(keys) == want
    assert {k[5] for k in keys if k[0] == "perf"} == set(tf.METHODS)  # all six methods


def test_plan_leaves_out_what_the_filter_leaves_out():
    everything = precompile.calls(["perf"], "full", None, lambda need: True)
    some = precompile.calls(["perf"], "full", None, lambda need: need <= 4 << 30)  # 4 GiB: fewer sizes
    assert set(map(_key, some)) < set(map(_key, everything))


def test_dry_run_lists_the_cuda_plan_without_a_gpu(tmp_path):
    out = tmp_path / "plan.json"
    assert precompile.main(["--device", "cuda", "--scale", "full", "--parts", "perf", "--dry-run",
                            "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["dry_run"] and len(data["calls"]) > 0
    assert {c["method"] for c in data["calls"]} == set(tf.METHODS)


def test_runs_every_call_at_the_tiny_scale(tmp_path, device, monkeypatch):
    from tokentm_fast.api import triton_usable

    if not triton_usable(device):
        pytest.skip(f"Triton cannot run on {device} in this process")
    monkeypatch.setenv("TOKENTM_BENCH_TRITON_INTERPRET", "1" if device.type == "cpu" else "0")
    out = tmp_path / "precompile.json"
    argv = ["--device", device.type, "--scale", "tiny", "--parts", "hires", "--methods", "tokentm,rollout",
            "--json", str(out)]
    assert precompile.main(argv) == 0
    data = json.loads(out.read_text())
    want = precompile.calls(["hires"], "tiny", ["tokentm", "rollout"], lambda need: True)
    assert [(c["method"], c["attention"]) for c in data["calls"]] == [(c.method, c.attention) for c in want]
    assert len(want) == 4  # two methods, both attention paths
    assert all(c["finite"] and c["seconds"] > 0 for c in data["calls"]), data["calls"]
    assert data["total_s"] >= sum(c["seconds"] for c in data["calls"])


def test_no_call_where_triton_does_not_run(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENTM_BENCH_TRITON_INTERPRET", raising=False)
    out = tmp_path / "none.json"
    assert precompile.main(["--device", "cpu", "--scale", "tiny", "--parts", "perf", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["calls"] == [] and "nothing to compile" in data["note"]
