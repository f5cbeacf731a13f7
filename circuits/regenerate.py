"""Regenerate the circuits of the shipped presets (this folder's *.json).

For each preset: train it (or, with ``--from-weights``, load the weights saved here by an earlier
run), then find its generalizing circuit and, when the preset has corrupted labels, its
memorizing circuit (``mechgrok.circuits.generalizing_vs_memorizing``: EAP-IG, neuron level,
resample ablation, smallest top-k circuit with faithfulness >= 0.8), and write

    circuits/<preset>/model/               the trained weights (safetensors + JSON)
    circuits/<preset>/generalizing.json    the circuits (networkx node-link JSON with scores and provenance)
    circuits/<preset>/memorizing.json

Usage::

    python circuits/regenerate.py                          # train every preset, then find circuits
    python circuits/regenerate.py --preset test --from-weights --out /tmp/check   # what the test runs
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import mechgrok as mg

HERE = Path(__file__).resolve().parent
PRESETS = ("test", "demo", "doshi-mlp")

log = logging.getLogger("circuits.regenerate")


def regenerate(preset: str, out: Path, from_weights: Path | None = None, progress: bool = False) -> dict[str, Path]:
    """Write the circuits (and, when training, the weights) of ``preset`` under ``out/preset``."""
    folder = out / preset
    task, model, cfg = mg.presets.build(preset)
    if from_weights is not None:
        model = mg.models.load(from_weights / preset / "model")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            mg.train(model, task, cfg, out=Path(tmp) / preset, progress=progress)
        mg.models.save(model, folder / "model")
    written = {}
    gen, mem = mg.circuits.task_circuits(model, task, progress=progress)
    for role, circ in (("generalizing", gen), ("memorizing", mem)):
        if circ is not None:
            circ = circ.with_provenance(preset=preset)
            written[role] = circ.save(folder / f"{role}.json")
            log.info("%s %s: %d components, faithfulness %.3f", preset, role, len(circ),
                     circ.provenance["faithfulness"])
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", choices=PRESETS, help="only this preset (repeatable)")
    ap.add_argument("--out", default=str(HERE), help="where to write (default: this folder)")
    ap.add_argument("--from-weights", action="store_true", help="reuse the weights in circuits/<preset>/model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for preset in args.preset or PRESETS:
        regenerate(preset, Path(args.out), HERE if args.from_weights else None)


if __name__ == "__main__":
    main()
