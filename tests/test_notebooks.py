"""Every tutorial notebook executes top to bottom (small configurations), so none can rot."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


# seconds each took in `make test` on a 2-core machine (for conftest's spreading over workers)
SECONDS = {"01_grokking_tour": 26, "02_memorizing_neurons": 17, "03_circuits": 21, "04_circuit_overlap": 35,
           "05_sae_features": 20, "06_influence": 14, "07_ablation_study": 20,
           "08_your_own_model": 45}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow(seconds=SECONDS.get(p.stem, 20)))
                                  for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHGROK_NOTEBOOK_SCALE", "small")
    monkeypatch.setenv("MECHGROK_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
