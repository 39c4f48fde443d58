"""The wheel holds the package the way users import it (issue: offline GPU install).

``kernels/`` and ``bindings/`` of the repository must be installed inside the
package (``tokentm_fast.kernels``, ``tokentm_fast.bindings``), never as
top-level modules, and the shipped model must travel with the wheel. The
wheel is built offline, without build isolation, exactly as on a cluster node.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "-w", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("tokentm_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel) -> list:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _source_packages() -> set:
    """Every package folder of the source tree, as the dotted name it is installed under."""
    found = set()
    for root, prefix in ((ROOT / "tokentm_fast", "tokentm_fast"), (ROOT / "kernels", "tokentm_fast.kernels"),
                         (ROOT / "bindings", "tokentm_fast.bindings"), (ROOT / "docs", "tokentm_fast.docs")):
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((prefix,) + rel))
    return found


def test_wheel_has_kernels_bindings_and_model_inside_the_package(wheel_names):
    names = set(wheel_names)
    for module in ("kernels/__init__.py", "kernels/row_update.py", "kernels/transform_weights.py",
                   "bindings/__init__.py", "bindings/library.py"):
        assert f"tokentm_fast/{module}" in names, module
    assert "tokentm_fast/assets/synthetic_vit.safetensors" in names
    assert "tokentm_fast/assets/synthetic_vit.json" in names
    # the docs the docstrings cite travel with the package (tokentm_fast.docs.path)
    assert {"tokentm_fast/docs/methods.md", "tokentm_fast/docs/evaluation.md", "tokentm_fast/docs/__init__.py"} <= names
    top_level = {n.split("/", 1)[0] for n in names}
    assert "kernels" not in top_level and "bindings" not in top_level, sorted(top_level)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_wheel_has_every_source_package(wheel_names):
    installed = {n.rsplit("/", 1)[0].replace("/", ".") for n in wheel_names if n.endswith("/__init__.py")}
    missing = _source_packages() - installed
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {sorted(missing)}"
    # every kernel file of the repository is shipped
    for path in (ROOT / "kernels").glob("*.py"):
        assert f"tokentm_fast/kernels/{path.name}" in wheel_names, path.name


def test_console_script_declared(wheel, wheel_names):
    entry = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
    assert len(entry) == 1, "no entry_points.txt in the wheel"
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(entry[0]).decode()
    assert "tokentm-fast = tokentm_fast.cli:main" in text, text


#: what an install reads: the build files and the three source folders (no git needed: an sdist or an
#: archive of the repository has them too)
INSTALL_SOURCES = ("pyproject.toml", "setup.py", "README.md", "tokentm_fast", "kernels", "bindings", "docs")


def _copy_install_sources(dst: Path) -> None:
    import shutil

    for name in INSTALL_SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / name)


def test_setup_py_defers_to_pyproject():
    """The top-level ``setup.py`` declares nothing itself: name, version and packages come from
    pyproject.toml (a second source of metadata would drift)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1 and not calls[0].args and not calls[0].keywords, "setup() must take no arguments"
    proc = subprocess.run([sys.executable, "setup.py", "--name", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    project = (ROOT / "pyproject.toml").read_text()
    declared = [re.search(rf'^{key} = "([^"]+)"', project, re.M).group(1) for key in ("name", "version")]
    assert proc.stdout.split()[-2:] == declared, proc.stdout


def test_offline_editable_install_in_a_fresh_venv(tmp_path):
    """`pip install --no-index --no-deps --no-build-isolation -e .` in a new venv that already has the
    dependencies (made visible through a .pth file, as on a cluster node) and no package index."""
    import site
    import venv

    src = tmp_path / "src"
    _copy_install_sources(src)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "deps.pth").write_text("\n".join(deps) + "\n")
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                           "-e", str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    code = ("import tokentm_fast, tokentm_fast.kernels, tokentm_fast.bindings, tokentm_fast.models; "
            "print(tokentm_fast.__file__); print(tokentm_fast.kernels.__file__)")
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    pkg, kern = out.stdout.split()
    assert Path(pkg).parent == src / "tokentm_fast" and Path(kern).parent == src / "kernels"
    # The repository's kernels/ folder is not importable as a top-level module. (A `kernels` distribution
    # of its own may be installed: Hugging Face's, which transformers pulls in; that one is not ours.)
    probe = ("import importlib.util as u; s = u.find_spec('kernels'); "
             "print(s.origin if s and s.origin else (list(s.submodule_search_locations) if s else None))")
    found = subprocess.run([str(py), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    assert str(src) not in found.stdout, f"the repository's kernels/ is importable as `kernels`: {found.stdout}"


def test_repository_folders_do_not_shadow_installed_modules():
    """Run from the repository root (`python -m pytest` puts it on sys.path), the repository's kernels/
    would be imported as a top-level `kernels` — the name of the Hugging Face distribution that
    transformers imports — and every HF model would fail to build. tests/conftest.py takes the root
    off the path; nothing of the repository is importable except through the installed package."""
    import importlib.util

    for name in ("kernels", "bindings"):
        spec = importlib.util.find_spec(name)
        where = [] if spec is None else [spec.origin or "", *(spec.submodule_search_locations or [])]
        assert not any(str(ROOT / name) in str(w) for w in where), f"`import {name}` finds the repository's {name}/"
