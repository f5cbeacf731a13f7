"""The circuits shipped in circuits/ are what circuits/regenerate.py produces from the shipped weights."""

import importlib.util
from pathlib import Path

import pytest

from mechgrok.circuits import Circuit

ROOT = Path(__file__).resolve().parents[1] / "circuits"


def _regenerate_module():
    spec = importlib.util.spec_from_file_location("circuits_regenerate", ROOT / "regenerate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("preset", ["test", "demo", "doshi-mlp"])
def test_regenerate_reproduces_shipped_circuits(tmp_path, preset):
    written = _regenerate_module().regenerate(preset, tmp_path, from_weights=ROOT)
    shipped = sorted(p.stem for p in (ROOT / preset).glob("*.json"))
    assert sorted(written) == shipped and shipped
    for role in shipped:
        new, old = Circuit.load(written[role]), Circuit.load(ROOT / preset / f"{role}.json")
        assert new.components == old.components, f"{preset} {role}: the circuit changed"
        for k, v in old.scores.items():
            assert new.scores[k] == pytest.approx(v, rel=1e-4, abs=1e-6)
        for key in ("method", "metric", "corruption", "level", "inputs_sha256", "role", "preset"):
            assert new.provenance[key] == old.provenance[key]
        assert new.provenance["faithfulness"] == pytest.approx(old.provenance["faithfulness"], abs=1e-5)
