"""The documentation points only at things that exist in the repository.

- every relative link of README.md and docs/*.md leads to a file of the
  repository, and its ``#anchor`` (if any) to a heading or ``id`` of that file;
- every repository path the README and the docs mention (``tokentm_fast/…``,
  ``tests/…``, ``docs/…``, …) exists;
- every "docs/<page>.md §N" cited in the code names a section of that page;
- no file cites the project's private spec folder or the old spec file names.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_DIRS = ("tokentm_fast", "tests", "kernels", "bindings", "benchmarks", "docs", ".ci")
# The private spec folder, and the spec files whose content docs/methods.md and
# docs/evaluation.md now give (built by concatenation: this file must not match itself).
FORBIDDEN = ("shared" + "/spec", ".." + "/shared", "METHODS" + ".md", "EVALUATION" + ".md")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./<-])((?:%s)/[\w./-]*)" % "|".join(re.escape(d) for d in TOP_DIRS))
SECTION_CITE = re.compile(r"docs/(\w+)\.md\s*§\s*(\d+(?:\.\d+)?)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> '-'."""
    s = re.sub(r"<[^>]+>", "", heading).strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(md: Path) -> Set[str]:
    text = md.read_text(encoding="utf-8")
    out = {m.group(1) for m in re.finditer(r"""id=["']([^"']+)["']""", text)}
    out |= {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}
    return out


def section_numbers(md: Path) -> Set[str]:
    """Numbers of the numbered headings (``## 3. …``, ``### 3.1 …``)."""
    text = md.read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", text, flags=re.M)}


def repo_files() -> List[Path]:
    """Tracked and untracked-but-not-ignored files (git), else every file outside build folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
        files = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", "build", "dist", "__pycache__", ".pytest_cache"}
        files = [p for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
                 and not any(part.endswith(".egg-info") for part in p.parts)]
    return [f for f in files if f.is_file()]


def links(md: Path) -> Iterator[Tuple[str, str]]:
    """``(target, anchor)`` of every relative link of ``md`` (outside code blocks)."""
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    for m in LINK.finditer(text):
        url = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", url):  # http:, https:, mailto:
            continue
        target, _, anchor = url.partition("#")
        yield target, anchor


def test_the_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "methods.md", "evaluation.md"} <= names
    # each page defines what it is cited for
    methods = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    for needle in ("NECC", "row algorithm", "LeGrad", "Grad-CAM", "rollout", "1e-5", "5e-3", "2e-2", "NaN"):
        assert needle in methods, needle
    evaluation = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    for needle in ("mIoU", "mAP", "AOPC", "LOdds", "Spearman", "synthetic"):
        assert needle in evaluation, needle


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(md):
    found = list(links(md))
    if md.name in ("README.md", "methods.md", "evaluation.md"):
        assert found, f"{md.name} has no links: the link parser is broken"
    for target, anchor in found:
        dest = (md.parent / target).resolve() if target else md
        assert dest.exists(), f"{md.relative_to(ROOT)} links to {target!r}, which does not exist"
        assert ROOT in dest.parents or dest == ROOT, f"{md.relative_to(ROOT)} links outside the repository: {target!r}"
        if anchor:
            assert dest.suffix == ".md", f"anchor #{anchor} on a non-markdown target {target!r}"
            assert anchor in anchors(dest), f"{md.relative_to(ROOT)}: {target}#{anchor}: no such heading or id"


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_mentioned_paths_exist(md):
    text = md.read_text(encoding="utf-8")
    paths = {m.group(1).rstrip(".,;:") for m in PATH.finditer(text)}
    if md.name in ("README.md", "methods.md"):
        assert paths, f"no repository path found in {md.name}: the path parser is broken"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{md.relative_to(ROOT)} mentions paths that are not in the repository: {missing}"


def test_section_citations_in_the_code_exist():
    pages = {p.stem: section_numbers(p) for p in (ROOT / "docs").glob("*.md")}
    assert {"1", "2", "3", "3.1", "7", "8"} <= pages["methods"]
    cited = 0
    for f in repo_files():
        if f.suffix not in (".py", ".md"):
            continue
        for m in SECTION_CITE.finditer(f.read_text(encoding="utf-8", errors="replace")):
            page, sec = m.groups()
            cited += 1
            assert page in pages, f"{f.relative_to(ROOT)} cites docs/{page}.md, which does not exist"
            assert sec in pages[page], f"{f.relative_to(ROOT)} cites docs/{page}.md §{sec}: no such section"
    assert cited > 10  # the package's docstrings do cite the docs


def test_no_file_cites_the_private_spec():
    offenders = []
    for f in repo_files():
        if f == Path(__file__).resolve():
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for needle in FORBIDDEN:
            if needle in text:
                offenders.append(f"{f.relative_to(ROOT)}: {needle}")
    assert not offenders, "files cite documents that are not in the repository:\n" + "\n".join(offenders)


def test_the_checks_catch_what_they_should(tmp_path):
    """The parsers are not vacuous: a broken link, a missing path and a bad anchor are found."""
    md = tmp_path / "x.md"
    md.write_text("# Title\n\nSee [m](methods.md#nope), `tokentm_fast/nothing_here.py`, [ok](#title).\n",
                  encoding="utf-8")
    assert list(links(md)) == [("methods.md", "nope"), ("", "title")]
    assert "title" in anchors(md)
    assert {m.group(1).rstrip(".,") for m in PATH.finditer(md.read_text())} == {"tokentm_fast/nothing_here.py"}
    assert "tolerances" in anchors(ROOT / "docs" / "methods.md")
    assert "nope" not in anchors(ROOT / "docs" / "methods.md")


# --------------------------------------------------------------------------- the README's code


def readme_scripts(text: str) -> List[str]:
    """The README's Python blocks as a user runs them: a block with an import starts a new script; a
    block without one continues the script before it (it uses that block's names)."""
    scripts: List[str] = []
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        if re.search(r"^(import|from) \w", block, re.M) or not scripts:
            scripts.append(block)
        else:
            scripts[-1] += "\n" + block
    return scripts


README_SCRIPTS = readme_scripts((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_scripts_are_split_as_a_user_reads_them():
    text = "```python\nimport torch\nx = torch.ones(1)\n```\n```python\ny = x\n```\n```python\nfrom a import b\n```\n"
    assert readme_scripts(text) == ["import torch\nx = torch.ones(1)\n\ny = x\n", "from a import b\n"]
    assert len(README_SCRIPTS) >= 4


@pytest.mark.parametrize("index", range(len(README_SCRIPTS)))
def test_readme_python_runs_as_written(index, tmp_path):
    """Each README script runs on its own, in a fresh interpreter (a name it forgets to import fails)."""
    import sys

    script = tmp_path / "readme_snippet.py"
    script.write_text(README_SCRIPTS[index], encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README script {index}:\n{README_SCRIPTS[index]}\n{proc.stderr[-3000:]}"
