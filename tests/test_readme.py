"""The README's tables and counts against the registry and the family table, so they cannot go stale.

The method table (``## Methods``) and the "what works where" table list every registered method, in the
registry's order; the family table (``## Model families``) has one row per adapter family, naming each
class the family's error message names and the family's pip extra; every "all <number> methods" phrase
says the registry's count.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import tokentm_fast as tf
from tokentm_fast.models import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: the README without its fenced code blocks (a ``# comment`` in a code block is no heading)
PROSE = re.sub(r"^```.*?^```[^\n]*$", "", README, flags=re.M | re.S)
#: the family names as the README's tables write them
DISPLAY = {"timm": "timm", "hf": "Hugging Face", "torchvision": "torchvision", "open_clip": "open_clip",
           "hf_dinov2": "Hugging Face DINOv2", "timm_eva": "timm Eva", "hf_beit": "Hugging Face BEiT",
           "timm_beit": "timm BEiT"}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
           "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15}


def section(title: str) -> str:
    """The README's text from the heading ``title`` to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(title)}\s*$", PROSE, flags=re.M)
    assert m, f"README has no heading {title!r}"
    level = len(m.group(1))
    nxt = re.search(rf"^#{{1,{level}}} ", PROSE[m.end():], flags=re.M)
    return PROSE[m.end(): m.end() + nxt.start() if nxt else len(PROSE)]


def table_rows(text: str, header_start: str) -> List[List[str]]:
    """Cells of the markdown table whose header row starts with ``header_start`` (header and rule excluded)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def _names(rows: List[List[str]]) -> List[str]:
    return [r[0].strip("`") for r in rows]


def test_the_method_table_lists_the_registry():
    names = _names(table_rows(section("Methods (`method=`)"), "| method |"))
    assert sorted(names) == sorted(tf.METHODS) and len(set(names)) == len(names)


def test_the_what_works_where_table_has_every_method_and_family():
    text = section("Model families")
    header = next(ln for ln in text.splitlines() if ln.startswith("| method | timm"))
    assert [c.strip() for c in header.strip().strip("|").split("|")][1:] == [DISPLAY[f.name] for f in FAMILIES]
    rows = table_rows(text, "| method | timm")
    assert _names(rows) == list(tf.METHODS)
    assert all(len(r) == 1 + len(FAMILIES) and all(c for c in r[1:]) for r in rows)


def test_the_family_table_has_every_family_its_classes_and_extra():
    rows: Dict[str, List[str]] = {r[0]: r for r in table_rows(section("Model families"), "| family |")}
    assert set(rows) == {DISPLAY[f.name] for f in FAMILIES}
    for f in FAMILIES:
        row = " ".join(rows[DISPLAY[f.name]])
        for cls in re.findall(r"\b[A-Z][A-Za-z]+\b", f.classes):  # the classes the adapter's errors name
            assert cls in row, (f.name, cls)
        assert (f'tokentm_fast[{f.extra}]' in row) if f.extra else ("included" in row), f.name


def test_every_method_count_in_the_readme_is_the_registrys():
    counts = re.findall(r"\ball (\w+) methods\b", README) + re.findall(r"\bthe (\w+) methods\b", README)
    said = [NUMBERS.get(w.lower(), int(w) if w.isdigit() else None) for w in counts]
    said = [n for n in said if n is not None]
    assert said, "the README states the method count somewhere"
    assert all(n == len(tf.METHODS) for n in said), (counts, len(tf.METHODS))


def test_the_table_parser_is_not_vacuous():
    """A row dropped from a copy of the method table is noticed."""
    rows = table_rows(section("Methods (`method=`)"), "| method |")
    assert len(rows) == len(tf.METHODS) >= 11
    assert sorted(_names(rows[:-1])) != sorted(tf.METHODS)
    assert "# timm" not in section("Model families")  # code-block comments are not headings


def test_the_package_docstring_names_every_method_and_family():
    """``help(tokentm_fast)`` lists what the registry and the family table hold, and where the docs are."""
    import tokentm_fast.docs

    doc = tf.__doc__
    for m in tf.METHODS:
        assert f"``{m}``" in doc, m
    for f in FAMILIES:
        assert DISPLAY[f.name].split()[0] in doc, f.name
    assert 'tokentm_fast.docs.path("methods.md")' in doc and tokentm_fast.docs.path("methods.md").is_file()
