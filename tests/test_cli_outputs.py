"""Issue 15, items 1, 6, 7 end to end: every file the command line writes, the lock of ``evaluate``, a full disk.

* a symbolic link at any output path (overlay, grid, ``--save-maps``, results
  JSON, curves plot, partial state, the demo's files) leading to a victim file
  outside the output folder is refused with a message naming the file and the
  option, and the victim is unchanged;
* two ``evaluate`` runs on one ``--output``: the second stops at once naming the
  process that holds the lock; the first still finishes;
* a full disk (``ENOSPC`` injected into the writer) while the partial state or
  the results are written names the file and ``--output``, leaves no ``*.tmp``
  behind, keeps the previous state, and the same command then resumes.
"""
import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from helpers import subprocess_env
from PIL import Image

from tokentm_fast.evaluation import partial_path

EVAL = ["evaluate", "--model", "synthetic", "--data", "synthetic", "--size", "6", "--batch-size", "2",
        "--methods", "rollout", "--metrics", "segmentation", "--workers", "0", "--threads", "1", "--no-progress"]


@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "outside" / "victim.txt"
    v.parent.mkdir()
    v.write_text("precious")
    return v


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    p = tmp_path_factory.mktemp("pic") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
    return p


def _no_tmp(folder):
    return [p.name for p in folder.rglob("*.tmp")]


def _assert_refused(rc, err, link, option, victim):
    assert rc == 2, err
    assert "Traceback" not in err
    assert str(link) in err and option in err and "symbolic link" in err, err
    assert victim.read_text() == "precious"
    assert link.is_symlink()


# ----------------------------------------------------------------------------- links: explain
@pytest.mark.parametrize("which", ["overlay", "grid", "save-maps"])
def test_explain_refuses_a_link_at_each_output(which, tmp_path, picture, victim, run_main):
    out = tmp_path / "o"
    out.mkdir()
    maps = out / "maps.npz"
    link, option = {"overlay": (out / "a.png_rollout.png", "--out"), "grid": (out / "grid.png", "--grid-name"),
                    "save-maps": (maps, "--save-maps")}[which]
    link.symlink_to(victim)
    rc, _, err = run_main(["explain", picture, "--model", "synthetic", "--methods", "rollout", "--out", out,
                           "--save-maps", maps, "--threads", "1"])
    _assert_refused(rc, err, link, option, victim)
    assert sorted(p.name for p in out.iterdir()) == [link.name]  # refused before anything was written
    # without the link the same command writes every file (the refusal was the link's)
    link.unlink()
    rc, _, err = run_main(["explain", picture, "--model", "synthetic", "--methods", "rollout", "--out", out,
                           "--save-maps", maps, "--threads", "1"])
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.png_rollout.png", "grid.png", "maps.npz"]
    assert victim.read_text() == "precious" and _no_tmp(tmp_path) == []


def test_the_picture_writers_refuse_a_link_when_they_write(tmp_path, victim):
    """The library functions (what the command calls after its checks) refuse a link at write time too."""
    from tokentm_fast.evaluation.outputs import OutputError
    from tokentm_fast.visualize import plot_perturbation_curves, save_grid, save_overlay, save_overlay_figure

    g = torch.Generator().manual_seed(0)
    img, m = torch.rand(3, 16, 16, generator=g), torch.randn(4, 4, generator=g)
    curves = {"tokentm": {"positive_predicted": [1.0] + [0.5] * 9, "negative_predicted": [1.0] * 10}}
    writers = {
        "overlay": (lambda p: save_overlay(img, m, p, option="--out"), "--out"),
        "overlay_figure": (lambda p: save_overlay_figure(img, m, p, option="--out"), "--out"),
        "grid": (lambda p: save_grid(img[None], {"tokentm": m[None]}, p, option="--grid-name"), "--grid-name"),
        "curves": (lambda p: plot_perturbation_curves(curves, p, option="--curves"), "--curves"),
    }
    for name, (write, option) in writers.items():
        link = tmp_path / f"{name}.png"
        link.symlink_to(victim)
        with pytest.raises(OutputError, match="symbolic link") as e:
            write(link)
        assert str(link) in str(e.value) and option in str(e.value)
        assert victim.read_text() == "precious" and link.is_symlink()
        link.unlink()
        assert write(link) == link and link.is_file() and not link.is_symlink()  # a regular file is written
    assert _no_tmp(tmp_path) == []


# ----------------------------------------------------------------------------- links: evaluate and demo
def test_evaluate_refuses_a_link_at_the_results_curves_and_partial_state(tmp_path, victim, run_main):
    out = tmp_path / "r.json"
    curves = tmp_path / "c.png"
    for link, extra, option in ((out, [], "--output"), (curves, ["--curves", curves], "--curves"),
                                (partial_path(out), [], "--output")):
        link.symlink_to(victim)
        rc, _, err = run_main([*EVAL, "--output", out, *extra])
        _assert_refused(rc, err, link, option, victim)
        link.unlink()
    assert not out.exists() and not list(tmp_path.glob("r.json*"))


def test_demo_refuses_a_link_at_its_files_before_any_work(tmp_path, victim, run_main, monkeypatch):
    import tokentm_fast.evaluation.runner as runner

    def boom(*a, **k):
        raise AssertionError("the demo computed before checking its outputs")

    monkeypatch.setattr(runner, "load_model", boom)
    out = tmp_path / "demo"
    out.mkdir()
    for name in ("demo_grid.png", "demo_results.json", "demo_table.md", "demo_curves.png"):
        link = out / name
        link.symlink_to(victim)
        rc, _, err = run_main(["demo", "--out", out])
        _assert_refused(rc, err, link, "--out", victim)
        link.unlink()


# ----------------------------------------------------------------------------- the lock (item 6)
_SLOW_FIRST = textwrap.dedent("""
    import os, sys, time
    import tokentm_fast.evaluation.loop as loop
    from tokentm_fast.cli import main

    go = sys.argv[1]
    real = loop._process_batch

    def held(*a, **k):  # the first run holds on at its first batch until the test says go
        deadline = time.time() + 240
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.05)
        return real(*a, **k)

    loop._process_batch = held
    sys.exit(main(sys.argv[2:]))
""")


def test_a_second_evaluate_on_the_same_output_stops_at_once(tmp_path):
    import socket

    out = tmp_path / "r.json"
    go = tmp_path / "go"
    lock = tmp_path / "r.json.lock"
    first = subprocess.Popen([sys.executable, "-c", _SLOW_FIRST, str(go), *EVAL, "--output", str(out)],
                             cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        holder = None
        while time.time() < deadline and first.poll() is None:
            try:
                holder = json.loads(lock.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        assert holder is not None and first.poll() is None, "the first run never took the lock"
        assert holder["pid"] == first.pid
        t0 = time.time()
        second = subprocess.run([sys.executable, "-m", "tokentm_fast", *EVAL, "--output", str(out)], cwd=tmp_path,
                                env=subprocess_env(), capture_output=True, text=True, timeout=240)
        second_s = time.time() - t0
        assert second.returncode == 2, second.stderr
        err = second.stderr
        assert "Traceback" not in err
        assert f"process {first.pid} on host {socket.gethostname()}" in err and str(out) in err, err
        assert "--output" in err and str(lock) in err
        assert first.poll() is None  # the first one is still held at its first batch: it was really running
        assert not out.exists() and not partial_path(out).exists()  # the second one wrote nothing
        go.write_text("go")
        stdout, stderr = first.communicate(timeout=240)
    finally:
        go.write_text("go")
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    res = json.loads(out.read_text())
    assert res["counts"]["images_evaluated"] == 6
    assert not lock.exists() and not partial_path(out).exists()
    # fail fast: the second run stopped before loading a model or reading data (start-up dominates its time)
    assert "resuming" not in err, (second_s, err)
    # and once the first is done, the same command runs (the lock went with the first process)
    r = subprocess.run([sys.executable, "-m", "tokentm_fast", *EVAL, "--output", str(out), "--overwrite"],
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- a full disk (item 7)
def _fail_when_writing(monkeypatch, matches, after_good_writes):
    """Make the safe writer fail with ENOSPC (half the bytes written) for the temporary files whose name
    ``matches``, after ``after_good_writes`` good writes of such files."""
    from tokentm_fast.evaluation import outputs

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file is written")
    real = outputs._write
    seen = {"good": 0, "failed": 0}

    def write(f, data):
        if matches(os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}"))):
            if seen["good"] >= after_good_writes:
                f.write(data[: len(data) // 2])
                f.flush()
                seen["failed"] += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            seen["good"] += 1
        return real(f, data)

    monkeypatch.setattr(outputs, "_write", write)
    return seen


def test_a_full_disk_while_saving_the_state_keeps_the_last_state_and_resumes(tmp_path, monkeypatch, run_main):
    out = tmp_path / "r.json"
    pp = partial_path(out)
    seen = _fail_when_writing(monkeypatch, lambda name: name.startswith(".r.json.partial."), after_good_writes=1)
    rc, _, err = run_main([*EVAL, "--output", out])
    assert seen["failed"] >= 1 and seen["good"] == 1
    assert rc == 2 and "Traceback" not in err
    assert str(pp) in err and "--output" in err and "no space left on device" in err.lower(), err
    assert _no_tmp(tmp_path) == []
    state = json.loads(pp.read_text())  # the last good state: the first batch of 2
    assert state["done"] == 2 and state["batches"] == 1
    assert not out.exists() and not (tmp_path / "r.json.lock").exists()
    monkeypatch.undo()
    rc, stdout, err = run_main([*EVAL, "--output", out])
    assert rc == 0, err
    assert "resuming from" in err and "2 of 6 samples already done" in err
    res = json.loads(out.read_text())
    assert res["run"]["resumed_from"] == 2 and res["counts"]["images_evaluated"] == 6
    assert not pp.exists() and _no_tmp(tmp_path) == []


def test_a_full_disk_while_writing_the_results_keeps_the_state(tmp_path, monkeypatch, run_main):
    out = tmp_path / "r.json"
    pp = partial_path(out)
    out.write_text('{"earlier": "results"}')
    seen = _fail_when_writing(monkeypatch, lambda name: name.startswith(".r.json.") and ".partial." not in name,
                              after_good_writes=0)  # the temporary of r.json only
    rc, _, err = run_main([*EVAL, "--output", out, "--restart", "--overwrite"])
    assert seen["failed"] >= 1
    assert rc == 2 and str(out) in err and "--output" in err and "no space left on device" in err.lower(), err
    assert json.loads(out.read_text()) == {"earlier": "results"}  # the previous file is intact
    assert json.loads(pp.read_text())["done"] == 6  # every batch is in the state: nothing to redo
    assert _no_tmp(tmp_path) == []
    monkeypatch.undo()
    rc, _, err = run_main([*EVAL, "--output", out])  # no --overwrite: resuming an interrupted run is not refused
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["run"]["resumed_from"] == 6 and res["counts"]["images_evaluated"] == 6
    assert not pp.exists()


# ----------------------------------------------------------------------------- an existing results JSON (issue 26)
def test_evaluate_does_not_overwrite_its_results_without_overwrite(tmp_path, monkeypatch, run_main):
    import tokentm_fast.evaluation.runner as runner

    out = tmp_path / "r.json"
    rc, _, err = run_main([*EVAL, "--output", out])
    assert rc == 0, err
    before = out.read_bytes()
    assert json.loads(before)["counts"]["images_evaluated"] == 6

    def boom(*a, **k):
        raise AssertionError("evaluate loaded a model before refusing to overwrite its results")

    monkeypatch.setattr(runner, "load_model", boom)
    rc, _, err = run_main([*EVAL, "--output", out])
    assert rc == 2 and "Traceback" not in err
    assert f"--output {out} already exists" in err and "--overwrite" in err, err
    assert str(partial_path(out)) in err and "no interrupted run" in err  # points to the resume machinery
    rc, _, err = run_main([*EVAL, "--output", out, "--restart"])          # --restart is not --overwrite
    assert rc == 2 and "--overwrite" in err and "--restart discards the partial state" not in err, err
    assert out.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
    # a stray partial state with --restart: still refused (starting over would replace the results)
    partial_path(out).write_text("{}")
    rc, _, err = run_main([*EVAL, "--output", out, "--restart"])
    assert rc == 2 and "--restart discards the partial state" in err, err
    partial_path(out).unlink()
    monkeypatch.undo()
    rc, _, err = run_main([*EVAL, "--output", out, "--overwrite", "--limit", "4"])
    assert rc == 0, err
    assert json.loads(out.read_text())["counts"]["images_evaluated"] == 4   # replaced
