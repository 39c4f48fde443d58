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

#: the methods docs/methods.md defines (tests/test_methods.py checks ``tf.METHODS`` is this list)
DOCUMENTED_METHODS = ("tokentm", "gae", "rollout", "raw_attention", "attn_gradcam", "legrad", "conservative_lrp",
                      "attcat", "lrp", "partial_lrp", "transformer_attribution")
#: the LRP relevance pass, measured first by the timing part (issue 28 item 4)
RELEVANCE_PASS = {"lrp", "partial_lrp", "transformer_attribution"}


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
    """benchmarks/gpu_report.py as a module; benchmarks/ stays on the path (its functions import their
    neighbours, bench_memory and bench_models, when called)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_report")


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
    """Each method on both paths (every method's defaults are served by the flash path, the LRP relevance
    pass's since its relevance programs), against the float64 reference within its own bound."""
    data, _ = smoke
    cases = data["parts"]["correctness"]["cases"]
    seen = {(c["method"], c["attention"]) for c in cases}
    assert seen == {(m, a) for m in DOCUMENTED_METHODS for a in ("flash", "materialized")}
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
    assert {c["method"] for c in timed if c["kind"] == "explain"} == set(DOCUMENTED_METHODS)
    assert {c["method"] for c in timed if c["kind"] == "explain" and c["attention"] == "flash"} == set(DOCUMENTED_METHODS)
    # the first pass: the training step and the relevance pass, before every other row of the part
    first = [c for c in cases if c.get("first_pass")]
    assert [c["kind"] for c in cases[:len(first)]] == ["step"] + ["explain"] * 3 and cases[:len(first)] == first
    assert {c["method"] for c in first if c["kind"] == "explain"} == RELEVANCE_PASS
    assert len({(c["size"], c["kind"], c["method"]) for c in cases}) == len(cases)  # nothing measured twice
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
            case(16385, 3.0, 3.0), case(197, 2.0, 2.0, "lrp", "materialized"), case(4097, 1.5, 1.1, "lrp")]
    data = {"meta": {"command": "x", "budget_s": 1},
            "parts": {p: {"status": "done", "cases": []} for p in gr.PARTS}}
    data["parts"]["timing"]["cases"] = rows
    lines = [ln for ln in gr.render_markdown(data).splitlines() if ln.startswith("| N=")]
    assert len(lines) == 7
    # grouped by size (N, then the order given)
    assert [ln.split(" | ")[0] for ln in lines] == ["| N=197", "| N=197", "| N=577", "| N=4097", "| N=4097",
                                                     "| N=9217", "| N=16385"]
    assert lines[0].endswith("≤ 1.0×: met |")              # memory does not count at N ≤ 577
    assert " lrp | materialized " in lines[1] and lines[1].endswith("|  |")  # the materialized path: no target
    assert lines[2].endswith("≤ 1.0×: NOT met |")
    assert lines[3].endswith("≤ 1.2× time and memory: met |")
    assert " lrp | flash " in lines[4] and lines[4].endswith("≤ 1.2× time and memory: NOT met |")  # time 1.5×
    assert lines[5].endswith("≤ 1.2× time and memory: NOT met |")  # memory 1.3×
    assert lines[6].endswith("runs: met |")


def test_the_timing_part_measures_the_relevance_pass_first():
    """On a GPU (not the smoke run): lrp, transformer_attribution and partial_lrp on the flash path at
    N = 4097 and 16385 (ViT-B/16, B = 1, bfloat16), each with its size's training step, before every other
    size; then the ten sizes, bfloat16 first; their calls are the first of the timing part's precompile."""
    gr = _module()
    args = gr.parse_args(["--out", "unused"])
    order = gr.timing_order(False, args.dtypes)
    first = [(s.model, s.N, s.B, s.dtype, set(only)) for s, only in order if only is not None]
    assert first == [("vit_base_patch16_224", n, 1, "bfloat16", RELEVANCE_PASS) for n in (4097, 16385)]
    rest = [s for s, only in order if only is None]
    assert order[:2] == [(s, only) for s, only in order if only is not None]
    assert [(s.N, s.dtype) for s in rest] == [(n, d) for d in ("bfloat16", "float32")
                                              for n in (197, 577, 4097, 9217, 16385)]
    # every relevance method on the flash path at every size, none left out for memory on an 80 GB GPU
    for size in rest:
        plan = {(m, a): why for kind, m, a, _, why in gr._size_plan(size, "cuda", int(80e9), args.mem_fraction)
                if kind == "explain"}
        assert {m for m, a in plan if a == "flash"} == set(DOCUMENTED_METHODS)
        assert all(why is None for (m, a), why in plan.items() if m in RELEVANCE_PASS), (size.label, plan)
    timing = [c for c in gr.precompile_calls(args, "cuda") if c.label.startswith("timing")]
    assert [(dict(c.kwargs)["img_size"], c.dtype, c.method, c.attention) for c in timing[:6]] == [
        (img, "bfloat16", m, "flash") for img in (1024, 2048) for m in gr.FIRST_METHODS]
    assert len({(c.model, c.kwargs, c.B, c.dtype, c.method) for c in timing}) == len(timing)


class _Clock:
    """A budget whose seconds pass only when a row is timed (``tick``)."""

    def __init__(self, total: float) -> None:
        self.total, self.t = total, 0.0

    def left(self) -> float:
        return self.total - self.t

    def elapsed(self) -> float:
        return self.t


def _fake_timing(monkeypatch, tmp_path, budget_s: float, row_s: float):
    """``run_timing`` at the GPU run's sizes without a GPU: no model is built, each row 'takes' ``row_s`` of
    the budget and reports a median that names it; returns (rows measured in order, the report)."""
    import torch

    gr = _module()
    import bench_models

    clock, measured = _Clock(budget_s), []

    def fake_row(make, case, step, device, left, smoke):
        measured.append((case["N"], case["dtype"], case["kind"], case["method"]))
        clock.t += row_s
        median = 1.0 + len(measured)  # distinct per row
        case.update(median_s=median, peak_bytes=10 * len(measured), first_call_s=median, finite=True)
        step = (median, case["peak_bytes"]) if case["kind"] == "step" else step
        if step is not None:
            case.update(time_ratio=median / step[0], memory_ratio=case["peak_bytes"] / step[1])

    monkeypatch.setattr(gr, "_time_row", fake_row)
    monkeypatch.setattr(gr, "_model", lambda *a, **k: torch.nn.Linear(1, 1))
    monkeypatch.setattr(gr, "free_bytes", lambda device: int(80e9))
    monkeypatch.setattr(gr, "release", lambda device: None)  # nothing was allocated (gc.collect costs seconds)
    monkeypatch.setattr(bench_models, "random_images", lambda model, b, device: (None, None))
    args = gr.parse_args(["--out", str(tmp_path), "--budget-s", str(budget_s)])
    report = gr.Report(str(tmp_path), {"command": "x", "budget_s": budget_s, "dtypes": args.dtypes})
    gr.run_timing(args, torch.device("cpu"), report, clock)
    return measured, report


def test_a_short_budget_still_measures_the_relevance_pass_at_high_resolution(monkeypatch, tmp_path):
    """200 s, 20 s a row, 45 s kept for what follows (reserve + attention layer): eight rows fit, and they
    are the two sizes' training steps and the relevance pass on the flash path; every other row of the plan
    is listed once, skipped for the budget."""
    measured, report = _fake_timing(monkeypatch, tmp_path, budget_s=200.0, row_s=20.0)
    assert measured == [(n, "bfloat16", k, m) for n in (4097, 16385)
                        for k, m in [("step", ""), ("explain", "lrp"), ("explain", "transformer_attribution"),
                                     ("explain", "partial_lrp")]]
    cases = report.part("timing")["cases"]
    done = [c for c in cases if "median_s" in c]
    for c in done:
        if c["kind"] == "explain":
            step = next(s for s in done if s["kind"] == "step" and s["N"] == c["N"])
            assert c["time_ratio"] == pytest.approx(c["median_s"] / step["median_s"])
    skipped = [c for c in cases if "median_s" not in c]
    assert skipped and all(c["skipped"] == "budget" for c in skipped)
    assert len({(c["size"], c["kind"], c["method"]) for c in cases}) == len(cases) == 10 * 15  # each row once
    md = (tmp_path / "gpu_report.md").read_text()
    assert "Measured first: lrp, transformer_attribution, partial_lrp on the flash path at N = 4097 and N = 16385" in md


def test_with_time_for_everything_each_row_is_measured_once_and_the_step_is_reused(monkeypatch, tmp_path):
    measured, report = _fake_timing(monkeypatch, tmp_path, budget_s=1e6, row_s=1.0)
    assert len(measured) == len(set(measured))
    cases = report.part("timing")["cases"]
    assert len(cases) == 10 * 15
    # every row measured but the literal TokenTM where its N×N tensors do not fit in 80 GB (N ≥ 9217)
    left_out = [c for c in cases if "median_s" not in c]
    assert {(c["kind"], c["N"]) for c in left_out} == {("literal", 9217), ("literal", 16385)}
    assert all("N×N" in c["skipped"] for c in left_out)
    step = next(c for c in cases if c["kind"] == "step" and c["N"] == 4097 and c["dtype"] == "bfloat16")
    later = next(c for c in cases if c["method"] == "tokentm" and c["N"] == 4097 and c["dtype"] == "bfloat16")
    assert step["first_pass"] and not later["first_pass"]
    assert later["time_ratio"] == pytest.approx(later["median_s"] / step["median_s"])
    # the markdown groups each size's rows: the 4097 bfloat16 step first among them, the rest in plan order
    rows = [ln for ln in gr_markdown_rows(tmp_path) if "N=4097 B=1 bfloat16" in ln]
    assert [r.split(" | ")[1] for r in rows] == ["step", "forward", "floor", "literal tokentm", *DOCUMENTED_METHODS]


def gr_markdown_rows(folder: Path):
    return [ln for ln in (folder / "gpu_report.md").read_text().splitlines() if ln.startswith("| vit_")]
