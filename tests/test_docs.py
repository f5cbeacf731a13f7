"""The documentation cannot rot silently: docstrings on the public API, links that resolve, and an
API reference that builds with a page for every public module."""

import importlib
import inspect
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
api = runpy.run_path(str(ROOT / "docs" / "api.py"))  # docs/api.py is a script, not a package module


def test_public_api_has_docstrings():
    missing = []
    for name in api["public_modules"]():
        module = importlib.import_module(name)
        if not (module.__doc__ or "").strip():
            missing.append(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
    assert not missing, f"public modules / names without a docstring: {missing}"


def test_relative_links_in_docs_resolve():
    broken = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to missing files: {broken}"


def test_link_check_catches_a_missing_file(tmp_path):
    # the pattern above must see ordinary Markdown links, or the test before proves nothing
    assert re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", "see [x](docs/nope.md#a) and [y](img/p.png)") == [
        "docs/nope.md", "img/p.png"]


@pytest.mark.slow(seconds=16)
@pytest.mark.filterwarnings("ignore")
def test_api_reference_builds_a_page_per_public_module(tmp_path):
    names = api["build"](tmp_path)
    assert "mechgrok.sweeps" in names and "mechgrok.influence.ekfac" in names  # not in their packages' __all__
    assert not any("._" in n for n in names)
    for name in names:
        page = tmp_path / (name.replace(".", "/") + ".html")
        assert page.exists(), f"no API page for {name}"
    sweeps = (tmp_path / "mechgrok" / "sweeps.html").read_text()
    assert "def sweep" in sweeps or "sweep</span>" in sweeps
    assert (tmp_path / "index.html").exists()
