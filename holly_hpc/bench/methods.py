"""`holly-hpc bench methods`: what each reconstruct method option gives on realistic simulated particles.

Runs jobspecs/reconstruct-npc-realistic.yaml (the Nup107-like preset, ~300 picked particles, 2D) once per
method and data setting (DNA-PAINT-like, STORM-like), each as a real task (the same code path as `submit`),
and tabulates the measures that need no truth (FSC resolution, detected symmetry, ring geometry) beside the
errors against the simulation's truth, with the CPU and wall time of each run.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
from pathlib import Path

import yaml

SPEC = Path(__file__).resolve().parents[2] / "jobspecs" / "reconstruct-npc-realistic.yaml"

# Each method: overrides of the spec (dotted keys).
METHODS = {
    "cnn-image": {"train.loss": "l2", "train.refine.start": "off"},  # HOLLy as it was: the CNN, the image loss
    "cnn-likelihood": {"train.refine.start": "off"},
    "cnn+refine": {"train.refine.start": 0.5, "train.refine.init": "cnn"},
    "refine-image": {"train.loss": "l2"},  # grid search, then per-particle poses on the image loss
    "refine": {},  # the spec as shipped: grid search, per-particle poses, the likelihood
    "refine-C8": {"model.symmetry": "C8"},
}
SETTINGS = {"dnapaint": "data/nup107/dnapaint", "storm": "data/nup107/storm"}
COLUMNS = [
    ("structure_error", "struct err", ".3f"),
    ("symmetry_n", "n", ".0f"),
    ("symmetry_power_ratio", "P(n)/mean", ".1f"),
    ("radius_nm", "radius nm", ".1f"),
    ("ring_spacing_nm", "spacing nm", ".1f"),
    ("fsc_resolution_nm", "FSC nm", ".1f"),
    ("axis_err_median_deg", "axis err", ".1f"),
    ("rot_err_median_deg", "rot err", ".1f"),
    ("cpu_s", "CPU s", ".0f"),
    ("wall_s", "wall s", ".0f"),
]


def _set(doc: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        doc = doc.setdefault(part, {})
    doc[last] = value


def spec_for(method: str, setting: str, steps: int | None, out: Path, seed: int | None = None) -> Path:
    """The shipped spec with the method's and the setting's changes, written next to the outputs."""
    doc = yaml.safe_load(SPEC.read_text())
    folder = SPEC.parent / SETTINGS[setting]
    loc = doc["data"]["localisations"]
    loc["path"] = str(folder / "particles.csv")
    loc["truth"].update(sites=str(folder / "truth_sites.csv"), poses=str(folder / "truth_poses.csv"))
    for key, value in METHODS[method].items():
        _set(doc, key, copy.deepcopy(value))
    if steps:
        doc["train"]["steps"] = steps
        doc["train"]["checkpoint_every"] = steps
        doc["train"]["log_every"] = min(doc["train"]["log_every"], steps)
    if seed is not None:
        doc["seed"] = seed
    doc["experiment"] = f"bench-{setting}-{method}".replace("+", "-")
    doc["output_root"] = str(out)
    doc["device"] = "cpu"
    path = out / f"{doc['experiment']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_one(method: str, setting: str, steps: int | None, out: Path, seed: int | None = None) -> dict:
    from ..experiment import freeze
    from ..runtime.task import run_task
    from ..spec import load_spec
    from ..sweep import expand

    spec = load_spec(spec_for(method, setting, steps, out, seed))
    experiment = freeze(spec, expand(spec), out, f"sqlite:///{out / 'registry.sqlite'}")
    cpu, wall = time.process_time(), time.perf_counter()
    result = run_task(experiment, 0, out=io.StringIO())
    row = {"method": method, "setting": setting, "completed": bool(result.completed)}
    metrics = json.loads((experiment.task_dir(0) / "final" / "metrics.json").read_text())
    row.update({key: metrics.get(key) for key, _, _ in COLUMNS if key in metrics})
    row["cpu_s"], row["wall_s"] = time.process_time() - cpu, time.perf_counter() - wall
    return row


def table(rows: list[dict]) -> str:
    head = ["setting", "method"] + [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["setting"], row["method"]]
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="holly-hpc bench methods", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=None, help="train.steps of every run (default: the spec's)")
    parser.add_argument("--seed", type=int, default=None, help="the spec's seed for every run (default: the spec's)")
    parser.add_argument("--out", type=Path, default=Path("bench-methods"), help="folder for the runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting in args.settings:
        for method in args.methods:
            print(f"running {setting} / {method} ...", file=sys.stderr, flush=True)
            rows.append(run_one(method, setting, args.steps, args.out.resolve(), args.seed))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
