"""Distributed evaluation: ``torchrun --nproc_per_node=2`` (gloo, CPU) against one process.

The shipped synthetic model on 14 synthetic images in batches of 2 (7 global
batches: rank 0 takes 4, rank 1 takes 3), two methods, every metric. The
merged results of the two ranks must be exactly those of one process: the
ranks explain and perturb every image in the batch it has in a one-process
run, and the metric states are integers and exact sums.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import subprocess_env

from tokentm_fast.cli import main
from tokentm_fast.evaluation import partial_path

ARGS = ["evaluate", "--model", "synthetic", "--data", "synthetic", "--size", "14", "--batch-size", "2",
        "--methods", "tokentm,rollout", "--metrics", "segmentation,perturbation,sanity", "--sanity-images", "3",
        "--workers", "0", "--threads", "1", "--no-progress"]


def _torchrun(output):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "tokentm_fast", *ARGS, "--output", str(output)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process results (in this process, one thread as the ranks)."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("single") / "single.json"
    try:
        assert main([*ARGS, "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads(out.read_text())
    assert res["world_size"] == 1
    return res


def _assert_same_results(dist, single):
    assert dist["records"] == single["records"]  # exactly: counts, sums and averages
    assert dist["counts"] == single["counts"]
    assert dist["skipped"] == single["skipped"]
    assert dist["fingerprint"] == single["fingerprint"]
    # not vacuous: real, varied numbers for both methods and every metric
    recs = {(r["method"], r["metric"]): r["values"] for r in dist["records"]}
    assert set(recs) == {(m, k) for m in ("tokentm", "rollout") for k in ("segmentation", "perturbation", "sanity")}
    assert recs[("tokentm", "perturbation")]["aopc"] != recs[("rollout", "perturbation")]["aopc"]
    assert 0 < recs[("tokentm", "segmentation")]["map"] < 1
    assert dist["counts"]["images_evaluated"] == 14 and dist["counts"]["sanity_images"] == 3


def test_torchrun_two_ranks_equal_one_process(single, tmp_path):
    out = tmp_path / "dist.json"
    r = subprocess.run(_torchrun(out), cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    dist = json.loads(out.read_text())
    _assert_same_results(dist, single)
    assert dist["world_size"] == 2
    assert [(x["rank"], x["samples"], x["images"]) for x in dist["ranks"]] == [(0, 8, 8), (1, 6, 6)]
    assert "14 images evaluated by 2 processes (8, 6 images)" in r.stdout  # printed once, by rank 0
    assert r.stdout.count("images evaluated") == 1
    assert not list(tmp_path.glob("dist.json.partial*"))


def test_sigkilled_rank_resumes_and_equals_one_process(single, tmp_path, capsys):
    out = tmp_path / "dist.json"
    rank1 = partial_path(out, rank=1, world_size=2)
    proc = subprocess.Popen(_torchrun(out), cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        state = None
        while time.time() < deadline and proc.poll() is None:
            if rank1.exists():
                state = json.loads(rank1.read_text())
                if state["done"] >= 2:
                    break
            time.sleep(0.02)
        assert proc.poll() is None and state is not None, "the run ended before rank 1 could be killed"
        os.kill(state["pid"], signal.SIGKILL)  # rank 1 only; torchrun then stops the group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert not out.exists()
    kept = json.loads(rank1.read_text())
    assert kept["rank"] == 1 and kept["world_size"] == 2 and 2 <= kept["done"] < 6

    # another number of processes is refused, with the reason and the way out
    n = torch.get_num_threads()
    try:
        assert main([*ARGS, "--output", str(out)]) == 2
    finally:
        torch.set_num_threads(n)
    err = capsys.readouterr().err
    assert "2 processes" in err and "1 process" in err and "--restart" in err and "Traceback" not in err
    assert json.loads(rank1.read_text())["done"] == kept["done"]  # untouched

    # the same command again: every rank resumes its shard; merged = one process
    r = subprocess.run(_torchrun(out), cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    dist = json.loads(out.read_text())
    assert dist["run"]["resumed_from"] >= kept["done"]
    assert dist["run"]["images_this_run"] == 14 - dist["run"]["resumed_from"]
    _assert_same_results(dist, single)
    assert not list(tmp_path.glob("dist.json.partial*"))


def test_shards_cover_the_batches_of_one_process_once():
    from tokentm_fast.evaluation.loop import Schedule

    one = Schedule(23, 4)
    assert [one.bounds(j) for j in one.batches()] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 23)]
    for world in (2, 3, 7):
        shards = [Schedule(23, 4, r, world) for r in range(world)]
        got = sorted(j for s in shards for j in s.batches())
        assert got == one.batches()  # every global batch exactly once, with the one-process bounds
        assert sum(s.samples() for s in shards) == 23
    assert Schedule(23, 4, 1, 2).batches() == [1, 3, 5] and Schedule(23, 4, 1, 2).samples(2) == 8


def test_default_workers_divide_the_cores_among_local_ranks(monkeypatch):
    from tokentm_fast.evaluation.distributed import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_workers(1) == 16 and default_workers(8) == 2 and default_workers(32) == 1


def test_restart_discards_the_states_of_another_world_size(tmp_path):
    from tokentm_fast.evaluation import evaluate
    from tokentm_fast.evaluation.state import check_world_size, find_partials

    out = tmp_path / "r.json"
    for r in range(2):
        partial_path(out, r, 2).write_text(json.dumps({"fingerprint": "x", "rank": r, "world_size": 2}))
    (tmp_path / "r.json.partial.rank0-of-2.bak").write_text("not a state of this output")
    assert [(p.name, r, w) for p, r, w in find_partials(out)] == [
        ("r.json.partial.rank0-of-2", 0, 2), ("r.json.partial.rank1-of-2", 1, 2)]
    assert check_world_size(out, 2) is None
    msg = check_world_size(out, 1)
    assert "2 processes" in msg and "this run has 1 process" in msg and "--restart" in msg
    common = dict(methods=["raw_attention"], metrics="perturbation", size=2, batch_size=2, output=out,
                  progress=False, num_workers=0)
    with pytest.raises(ValueError, match="written by a run of 2 processes"):
        evaluate("synthetic", "synthetic", **common)
    res = evaluate("synthetic", "synthetic", restart=True, **common)
    assert res["counts"]["images_evaluated"] == 2 and res["world_size"] == 1
    assert find_partials(out) == [] and (tmp_path / "r.json.partial.rank0-of-2.bak").exists()
