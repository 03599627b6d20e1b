"""The Model Zoo's pre-commit hooks on this repository: JSON at 4-space indent (key order kept), every text file
ending in one newline without trailing whitespace, a module's docstring first (ruff covers the Python style)."""

from __future__ import annotations

import ast
import json
import subprocess

import pytest

from tests.test_bundle import ROOT

TEXT = (".py", ".json", ".yaml", ".yml", ".md", ".sh", ".txt", ".toml", ".cfg", ".ini", ".conf")


def _tracked(*suffixes: str) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if f.endswith(suffixes) and (ROOT / f).is_file()]


def test_json_files_are_indented_by_four():
    for name in _tracked(".json"):
        text = (ROOT / name).read_text()
        assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n", name


def test_text_files_end_in_one_newline_without_trailing_whitespace():
    for name in _tracked(*TEXT):
        text = (ROOT / name).read_text()
        if not text:
            continue  # an empty file (a package's __init__.py) is fine
        assert text.endswith("\n") and not text.endswith("\n\n"), f"{name}: must end in exactly one newline"
        bad = [n for n, line in enumerate(text.splitlines(), 1) if line != line.rstrip()]
        assert not bad, f"{name}: trailing whitespace on lines {bad[:5]}"


def test_a_module_docstring_comes_first():
    for name in _tracked(".py"):
        tree = ast.parse((ROOT / name).read_text())
        strings = [
            n
            for n in tree.body
            if isinstance(n, ast.Expr)
            and isinstance(getattr(n, "value", None), ast.Constant)
            and isinstance(n.value.value, str)
        ]
        assert all(n is tree.body[0] for n in strings), (
            f"{name}: a string statement after the first one (a second docstring?)"
        )
