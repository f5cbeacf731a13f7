"""Build the API reference (HTML, from the docstrings) with pdoc: ``python docs/api.py [OUT]``.

``make docs`` runs it into ``docs/api/`` (git-ignored; open ``docs/api/index.html``). Every public
module of the package gets a page, including those a package's ``__all__`` leaves out (pdoc
alone would skip them); modules whose name starts with ``_`` are private and left out.
"""

from __future__ import annotations

import pkgutil
import sys
import warnings
from pathlib import Path


def public_modules() -> list[str]:
    """Names of the public modules of mechgrok (``mechgrok`` first), sorted."""
    import mechgrok

    found = [m.name for m in pkgutil.walk_packages(mechgrok.__path__, "mechgrok.")
             if not any(part.startswith("_") for part in m.name.split("."))]
    return ["mechgrok", *sorted(found)]


def build(out: str | Path) -> list[str]:
    """Write the reference to ``out``; returns the documented module names."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google", footer_text="mechgrok API reference", show_source=True)
    modules = public_modules()
    with warnings.catch_warnings():  # pdoc also reaches most of them through their package: harmless
        warnings.filterwarnings("ignore", message="The module specification", category=UserWarning)
        pdoc.pdoc(*modules, output_directory=Path(out))
    return modules


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "api"
    names = build(target)
    print(f"{len(names)} modules documented in {target / 'index.html'}")
