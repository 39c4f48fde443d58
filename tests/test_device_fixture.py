"""The suite's device comes from one place (tests/conftest.py), and no test module goes around it.

CPU tests of the fixture logic (``choose_device``, ``configure_device`` and their wiring into pytest), a
check of the running process against the device it was given, and a scan of ``tests/*.py`` for the two
ways a module can leave the GPU untested: a module-level ``pytestmark`` skip tied to a device, and
``torch.cuda.is_available()`` deciding the device instead of the ``device`` fixture /
``TOKENTM_TEST_DEVICE``.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE_ENV, choose_device, configure_device

TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- choose_device
def test_the_option_beats_the_environment():
    assert choose_device("cuda", {DEVICE_ENV: "cpu"}) == "cuda"
    assert choose_device("cpu", {DEVICE_ENV: "cuda"}) == "cpu"


def test_the_environment_then_the_cpu():
    assert choose_device(None, {DEVICE_ENV: "cuda"}) == "cuda"
    assert choose_device(None, {DEVICE_ENV: "cpu"}) == "cpu"
    assert choose_device(None, {}) == "cpu"
    assert choose_device(None, {DEVICE_ENV: ""}) == "cpu"


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:0", "mps", "tpu"])
def test_an_unknown_name_is_refused(name):
    with pytest.raises(pytest.UsageError, match=re.escape(repr(name))):
        choose_device(None, {DEVICE_ENV: name})
    with pytest.raises(pytest.UsageError):
        choose_device(name, {})


# --------------------------------------------------------------------------- configure_device
def test_cpu_switches_the_interpreter_on():
    env = {}
    configure_device("cpu", env, cuda_available=True)
    assert env == {"TRITON_INTERPRET": "1", DEVICE_ENV: "cpu"}


def test_cuda_without_cuda_is_refused():
    env = {}
    with pytest.raises(pytest.UsageError, match="no CUDA device"):
        configure_device("cuda", env, cuda_available=False)
    assert DEVICE_ENV not in env


def test_cuda_with_the_interpreter_is_refused():
    with pytest.raises(pytest.UsageError, match="TRITON_INTERPRET"):
        configure_device("cuda", {"TRITON_INTERPRET": "1"}, cuda_available=True)


def test_cuda_leaves_the_interpreter_off():
    env = {}
    configure_device("cuda", env, cuda_available=True)
    assert env == {DEVICE_ENV: "cuda"}


def _pytest(args, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in (DEVICE_ENV, "TRITON_INTERPRET")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                           str(Path(__file__)), *args], capture_output=True, text=True, env=env,
                          cwd=TESTS.parent, timeout=300)


def test_pytest_refuses_a_device_it_cannot_serve():
    """The wiring: ``--device cuda`` where torch sees no GPU, and an unknown name in the environment."""
    no_gpu = _pytest(["--device", "cuda"], CUDA_VISIBLE_DEVICES="")
    assert no_gpu.returncode != 0 and "torch sees no CUDA device" in no_gpu.stdout + no_gpu.stderr
    unknown = _pytest([], **{DEVICE_ENV: "gpu"})
    assert unknown.returncode != 0 and "'gpu'" in unknown.stdout + unknown.stderr
    ok = _pytest(["--device", "cpu"], **{DEVICE_ENV: "gpu"})  # the option wins over a bad environment
    assert ok.returncode == 0, ok.stdout + ok.stderr


# --------------------------------------------------------------------------- the running process
def test_the_process_runs_on_the_device_it_was_given(device):
    from tokentm_fast.kernels._utils import kernels_interpreted

    assert os.environ[DEVICE_ENV] == device.type
    if device.type == "cuda":
        assert torch.cuda.is_initialized() or torch.cuda.device_count() > 0
        assert not kernels_interpreted(), "the interpreter would run on CUDA tensors"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    else:
        assert "TRITON_INTERPRET" in os.environ
        assert kernels_interpreted() == (os.environ["TRITON_INTERPRET"] == "1")


# --------------------------------------------------------------------------- no module goes around it
def device_findings(source: str) -> list:
    """Where a test module picks or excludes a device itself (empty: it follows the suite's device)."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("cuda.is_available"):
            found.append(f"line {node.lineno}: torch.cuda.is_available() picks the device "
                         f"(take the `device` fixture or os.environ['{DEVICE_ENV}'])")
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        if not any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
            continue
        text = ast.unparse(node.value)
        if "skip" in text and (re.search(r"cuda", text, re.I) or re.search(r"""['"]cpu['"]""", text)):
            found.append(f"line {node.lineno}: the whole module is skipped on one device: {text}")
    return found


#: kernel test modules whose owner converts them to the device fixture (issue 16 item 5); strict: once
#: converted, the xfail turns into a failure until the entry is removed here.
PENDING: set = set()


def _modules():
    for path in sorted(TESTS.glob("*.py")):
        if path.name == "conftest.py":
            continue
        marks = [pytest.mark.xfail(strict=True, reason="not converted yet")] if path.name in PENDING else []
        yield pytest.param(path, id=path.name, marks=marks)


@pytest.mark.parametrize("path", list(_modules()))
def test_no_module_picks_its_own_device(path):
    findings = device_findings(path.read_text())
    assert not findings, f"{path.name}:\n  " + "\n  ".join(findings)


@pytest.mark.parametrize("source,flagged", [
    ('pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="cpu only")', True),
    ('pytestmark = pytest.mark.skipif(not triton_available("cpu"), reason="needs the interpreter")', True),
    ('pytestmark = [pytest.mark.skipif(DEVICE.type == "cuda", reason="x")]', True),
    ('DEVICE = "cuda" if torch.cuda.is_available() else "cpu"', True),
    ('def f():\n    return torch.device("cuda" if torch.cuda.is_available() else "cpu")', True),
    ('pytestmark = pytest.mark.skipif(not triton_available(os.environ["TOKENTM_TEST_DEVICE"]), reason="")', False),
    ('pytestmark = pytest.mark.slow', False),
    ('x = torch.zeros(3, device="cpu")', False),
])
def test_the_scan_sees_what_it_looks_for(source, flagged):
    assert bool(device_findings(source)) == flagged
