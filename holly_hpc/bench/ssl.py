"""`holly-hpc bench ssl`: every embed family on real labelled nuclei, probed with a grouped split.

The data are the RPE-1 and U2OS nuclei crops cut from the images the mnfinder wheel ships (see
bench/nuclei.py; `pip install --no-deps mnfinder==1.2.3`), labelled by cell line and grouped by field:
the probes' folds never put crops of one field on both sides. Each family trains the same steps, batch
and ResNet width on the crops (per-image normalisation: with the absolute brightness kept, a raw-pixel
probe separates the two lines at 0.98 because the U2OS fields were imaged brighter, a confound of the
acquisition, not a phenotype); then its final evaluation probes every readout (logistic regression,
k-NN, random forest) against raw-pixel PCA of the same dimension fitted inside each fold. The table is
family x readout x probe, balanced accuracy mean ± std over the folds.

Reproduce: `holly-hpc bench ssl --out /tmp/bench-ssl` (defaults below; about 40 CPU minutes on 2 cores),
`--families simclr dino`, `--steps`, `--json`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import yaml

FAMILIES = ("ae", "vae", "vqvae", "simclr", "dino")
PROBES = ("logreg", "knn", "forest")
DEFAULTS = {"steps": 1500, "batch": 64, "width": 8, "size": 48, "seed": 0}


def spec_for(family: str, crops: Path, out: Path, steps: int, batch: int, width: int, size: int, seed: int) -> dict:
    model: dict = {"family": family, "width": width, "depth": 18, "latent_dim": 64}
    if family == "vqvae":
        model.update({"grid": 4, "code_dim": 8, "codebook_size": 128})
    if family == "dino":
        model["ssl"] = {"local_crops": 2}
    return {
        "experiment": f"bench-ssl-{family}",
        "kind": "embed",
        "seed": seed,
        "device": "auto",
        "output_root": str(out / "runs"),
        "data": {
            "source": "folder",
            "image_size": size,
            "folder": {"path": str(crops), "labels": "folders"},
            "split": {"val": 0.0, "test": 0.0},
            "cache_mb": 2048,
        },
        "model": model,
        "train": {
            "steps": steps,
            "batch_size": batch,
            "lr": 0.001,
            "log_every": max(steps // 10, 1),
            "checkpoint_every": steps,
            "projector_images": 0,
            "eval_folds": 5,
        },
        "eval": {"split": "grouped", "group_by": {"regex": "(?P<key>[^/]+)-n[0-9]+"}},
        "launch": {"cluster": "local", "threads": 0},
    }


def run_family(spec: dict, out: Path) -> dict:
    from ..experiment import freeze
    from ..runtime.task import run_task
    from ..spec import load_spec
    from ..sweep import expand

    path = out / f"{spec['experiment']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    loaded = load_spec(path)
    root = Path(spec["output_root"])
    experiment = freeze(loaded, expand(loaded), root, f"sqlite:///{root / 'registry.sqlite'}")
    started = time.process_time()
    result = run_task(experiment, 0, out=sys.stderr)
    if not result.completed:
        raise RuntimeError(f"{spec['experiment']} did not complete")
    report = json.loads((experiment.task_dir(0) / "final" / "eval.json").read_text())
    return {"report": report, "cpu_s": round(time.process_time() - started, 1)}


def rows_of(family: str, report: dict) -> list[dict]:
    rows = []
    for readout in ("embedding", "features"):
        entry = report.get(readout)
        if not entry:
            continue
        for probe in PROBES:
            rows.append(
                {
                    "family": family,
                    "readout": readout,
                    "dim": entry["dim"],
                    "probe": probe,
                    "balanced_accuracy": round(entry[f"{probe}_balanced_accuracy"], 3),
                    "std": round(entry[f"{probe}_balanced_accuracy_std"], 3),
                    "pca_balanced_accuracy": round(entry["baseline"][f"{probe}_balanced_accuracy"], 3),
                    "pca_std": round(entry["baseline"][f"{probe}_balanced_accuracy_std"], 3),
                    "macro_f1": round(entry[f"{probe}_macro_f1"], 3),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="holly-hpc bench ssl", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the crops, the runs and results.json")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key}", type=int, default=value)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    args = parser.parse_args(argv)
    from .nuclei import build_crops

    out = Path(args.out)
    crops = out / "crops"
    if not crops.exists():
        counts = build_crops(crops, args.size)
        print(f"[bench ssl] {sum(counts.values())} crops: {counts}", file=sys.stderr)
    rows, runs = [], {}
    for family in args.families:
        print(f"[bench ssl] {family}: {args.steps} steps …", file=sys.stderr, flush=True)
        spec = spec_for(family, crops, out, args.steps, args.batch, args.width, args.size, args.seed)
        runs[family] = run_family(spec, out)
        rows += rows_of(family, runs[family]["report"])
        (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "runs": runs}, indent=2))
    if args.json:
        print(json.dumps(rows))
        return 0
    buffer = io.StringIO()
    buffer.write(
        "| family | readout | dim | probe | bal. acc. | PCA same dim | macro F1 |\n|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        buffer.write(
            f"| {r['family']} | {r['readout']} | {r['dim']} | {r['probe']} | {r['balanced_accuracy']:.3f} ± {r['std']:.3f}"
            f" | {r['pca_balanced_accuracy']:.3f} ± {r['pca_std']:.3f} | {r['macro_f1']:.3f} |\n"
        )
    print(buffer.getvalue(), end="")
    print(f"(grouped by field, 5 folds; {args.steps} steps of {args.batch}, width {args.width}, {args.size}² crops)")
    return 0
