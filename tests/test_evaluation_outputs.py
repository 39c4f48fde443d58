"""Issue 15, items 1, 6, 7: the safe writer and the output lock of ``tokentm_fast.evaluation.outputs``.

* a symbolic link at the target (even one leading outside the folder, even a
  dangling one) is refused with a message naming the file and the option, and
  the file it points to stays unchanged;
* a full disk (``ENOSPC`` injected in the middle of a write) names the file and
  the option, leaves no temporary file and keeps the previous content;
* a second process cannot take the lock of an output another holds, and the
  message names the holder's pid.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tokentm_fast.evaluation import outputs  # noqa: E402  (fails on a tree without the safe writer)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_link_at_the_target_is_refused_and_its_victim_unchanged(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = out / "results.json"
    link.symlink_to(victim)
    with pytest.raises(outputs.OutputError) as e:
        outputs.write_json(link, {"a": 1}, "--output", "results")
    msg = str(e.value)
    assert str(link) in msg and "--output" in msg and "symbolic link" in msg
    assert victim.read_text() == "precious"
    assert link.is_symlink() and _leftovers(out) == []


def test_a_dangling_link_is_refused_too(tmp_path):
    target = tmp_path / "elsewhere" / "new.png"  # does not exist: writing through would create it
    link = tmp_path / "a.png"
    link.symlink_to(target)
    with pytest.raises(outputs.OutputError, match="symbolic link"):
        outputs.write_bytes(link, b"x", "--out", "overlay")
    assert not target.exists()


def test_a_link_put_there_during_the_write_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "maps.npz"
    with pytest.raises(outputs.OutputError, match="--save-maps"):
        with outputs.open_output(target, "--save-maps", "maps file") as f:
            f.write(b"data")
            target.symlink_to(victim)
    assert victim.read_text() == "precious"
    assert _leftovers(tmp_path) == []


def test_a_regular_file_is_replaced_whole(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    outputs.write_json(target, {"x": [1, 2]}, "--output")
    assert json.loads(target.read_text()) == {"x": [1, 2]}
    assert _leftovers(tmp_path) == []


def test_a_full_disk_names_the_file_removes_the_temporary_and_keeps_the_last_state(tmp_path, monkeypatch):
    target = tmp_path / "r.json.partial"
    outputs.write_json(target, {"done": 3}, "--output", "resumable state")
    calls = []

    def full(f, data):  # half of the data goes out, then the disk is full
        calls.append(len(data))
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_write", full)
    with pytest.raises(outputs.OutputError) as e:
        outputs.write_json(target, {"done": 4, "pad": "x" * 1000}, "--output", "resumable state")
    assert calls, "the injected write was not reached"
    msg = str(e.value)
    assert str(target) in msg and "--output" in msg and "no space left" in msg.lower()
    assert e.value.errno == errno.ENOSPC
    assert _leftovers(tmp_path) == []
    assert json.loads(target.read_text()) == {"done": 3}
    monkeypatch.undo()  # the disk has room again: the next write goes through
    outputs.write_json(target, {"done": 4}, "--output", "resumable state")
    assert json.loads(target.read_text()) == {"done": 4}


def test_a_second_process_cannot_take_the_lock_and_is_told_who_holds_it(tmp_path):
    output = tmp_path / "results.json"
    lock = outputs.OutputLock(output).acquire()
    if not lock.acquired:
        pytest.skip(f"no file locks here: {lock.unsupported}")
    try:
        code = textwrap.dedent(f"""
            import sys
            from tokentm_fast.evaluation.outputs import OutputLock, OutputError
            try:
                OutputLock({str(output)!r}).acquire()
            except OutputError as e:
                print(e); sys.exit(3)
            sys.exit(0)
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 3, r.stdout + r.stderr
        assert f"process {os.getpid()}" in r.stdout and str(output) in r.stdout and "--output" in r.stdout
    finally:
        lock.release()
    # released: another process takes it
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_link_at_the_lock_file_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = tmp_path / "results.json"
    outputs.lock_path(output).symlink_to(victim)
    with pytest.raises(outputs.OutputError, match="symbolic link"):
        outputs.OutputLock(output).acquire()
    assert victim.read_text() == "precious"
