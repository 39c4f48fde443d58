"""benchmarks/gpu_report.py: the one-command GPU report, checked on the CPU by its ``--smoke`` mode.

The smoke run is the GPU run's code path (every part, the precompile workers, the report files) on tiny
sizes under ``TRITON_INTERPRET=1``, so that a GPU session never loses its few minutes to a typo. Its
correctness part is a real check: the interpreted Triton kernels against the float64 reference.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tokentm_fast as tf

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_report.py"


def _run(out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--smoke", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run with a budget large enough for every part on a loaded 2-core CI machine."""
    out = tmp_path_factory.mktemp("gpu_report")
    proc = _run(out, "--budget-s", "500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_report.json").read_text()), (out / "gpu_report.md").read_text()


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("gpu_report")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_smoke_runs_every_part(smoke):
    """Every part ran to its end (none failed, none skipped for the budget) and the report names them all."""
    data, md = smoke
    parts = data["parts"]
    assert list(parts) == ["environment", "precompile", "correctness", "timing", "attention_layer", "evaluation"]
    for name, part in parts.items():
        assert part["status"] == "done", (name, part.get("reason"), part.get("traceback", "")[-1500:])
    env = data["meta"]["environment"]
    for key in ("device_name", "torch", "triton", "timm", "commit", "date"):
        assert env.get(key), key
    for heading in ("## Precompile", "## Correctness", "## Timing", "## One attention layer", "## Evaluation runner"):
        assert heading in md, heading


def test_smoke_correctness_covers_every_method_and_path_and_passes(smoke):
    """Each method on each path it serves, against the float64 reference within its own bound."""
    data, _ = smoke
    cases = data["parts"]["correctness"]["cases"]
    seen = {(c["method"], c["attention"]) for c in cases}
    want = set()
    for m in tf.METHODS:
        spec = tf.methods.get_method(m)
        paths = ["materialized"] if spec.flash_refusal(spec.defaults) else ["flash", "materialized"]
        want |= {(m, a) for a in paths}
    assert seen == want
    assert ("lrp", "flash") not in seen and ("tokentm", "flash") in seen
    failed = [c for c in cases if not c.get("passed")]
    assert not failed, failed
    for c in cases:
        assert 0.0 <= c["error"] <= c["bound"]
        assert c["bound"] == max(1e-5, tf.methods.get_method(c["method"]).float32_tolerance)  # §7, float32
    # the maps compared are informative for most methods (a constant map would make the check empty)
    assert sum(c["informative"] for c in cases) >= len(cases) - 2


def test_smoke_timing_has_the_baselines_and_every_method(smoke):
    data, md = smoke
    cases = data["parts"]["timing"]["cases"]
    kinds = {c["kind"] for c in cases}
    assert {"step", "forward", "floor", "literal", "explain"} <= kinds
    timed = [c for c in cases if "median_s" in c]
    assert {c["method"] for c in timed if c["kind"] == "explain"} == set(tf.METHODS)
    step = next(c for c in timed if c["kind"] == "step")
    assert step["time_ratio"] == pytest.approx(1.0)
    for c in timed:
        assert c["median_s"] > 0 and c["first_call_s"] > 0 and c["peak_bytes"] >= 0 and c["finite"]
        assert c["time_ratio"] == pytest.approx(c["median_s"] / step["median_s"])
        if c["kind"] == "explain":
            assert c["dispatcher_path"] in ("flash", "materialized")
    assert "| step |" in md


def test_smoke_attention_layer_and_evaluation(smoke):
    data, md = smoke
    att = data["parts"]["attention_layer"]["cases"]
    assert att and all(c["sdpa_s"] > 0 and c["ours_s"] > 0 and c["ours_acc_s"] > 0 for c in att)
    ev = data["parts"]["evaluation"]["cases"]
    assert len(ev) == 1 and ev[0]["loop_images_per_s"] > 0 and ev[0]["explain_s"] > 0
    assert "images/s" in md


def test_a_small_budget_skips_parts_and_says_why(tmp_path):
    """Parts that would not fit are listed as skipped with the reason; the files exist all the same."""
    proc = _run(tmp_path, "--budget-s", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    assert data["parts"]["environment"]["status"] == "done"
    for name in ("precompile", "correctness", "timing", "attention_layer", "evaluation"):
        part = data["parts"][name]
        assert part["status"] == "skipped" and "budget" in part["reason"], (name, part)
    assert "skipped" in (tmp_path / "gpu_report.md").read_text()


def test_targets_in_the_markdown_follow_the_issue():
    """≤ 1.0× the step's time at N ≤ 577; ≤ 1.2× time and memory at N = 4097 / 9217; N = 16385 runs."""
    gr = _module()

    def case(n, t, m, method="tokentm", attention="flash"):
        return dict(size=f"N={n}", N=n, kind="explain", method=method, attention=attention, median_s=t,
                    time_ratio=t, peak_bytes=1, memory_ratio=m, first_call_s=1.0, finite=True,
                    dispatcher_path=attention)

    rows = [case(197, 0.9, 5.0), case(577, 1.1, 0.5), case(4097, 1.1, 1.1), case(9217, 1.1, 1.3),
            case(16385, 3.0, 3.0), case(197, 2.0, 2.0, "lrp", "materialized")]
    data = {"meta": {"command": "x", "budget_s": 1},
            "parts": {p: {"status": "done", "cases": []} for p in gr.PARTS}}
    data["parts"]["timing"]["cases"] = rows
    lines = [ln for ln in gr.render_markdown(data).splitlines() if ln.startswith("| N=")]
    assert len(lines) == 6
    assert lines[0].endswith("≤ 1.0×: met |")              # memory does not count at N ≤ 577
    assert lines[1].endswith("≤ 1.0×: NOT met |")
    assert lines[2].endswith("≤ 1.2× time and memory: met |")
    assert lines[3].endswith("≤ 1.2× time and memory: NOT met |")  # memory 1.3×
    assert lines[4].endswith("runs: met |")
    assert lines[5].endswith("|  |")                        # the materialized path has no target
