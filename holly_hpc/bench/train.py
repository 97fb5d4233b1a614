"""`holly-hpc bench train`: training throughput of the reconstruct kind at HOLLy's paper sizes.

One step = simulate a batch on the device, predict poses, render the learned cloud, backward, AdamW.
Reported as images per second (median over timed chunks, after warm-up steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..spec import apply_defaults

PAPER = {"image_size": 128, "batch": 20, "points": 230}


def _config(image_size: int, batch: int, points: int, device: str) -> dict:
    spec = {
        "experiment": "bench",
        "kind": "reconstruct",
        "seed": 0,
        "device": device,
        "data": {
            "source": "simulate",
            "image_size": image_size,
            "sigma": [10.0, 1.4],
            "simulate": {"structure": "asymmetric", "num_points": points},
        },
        "model": {"num_points": points},
        "train": {"steps": 10_000, "batch_size": batch},
    }
    return {
        k: v
        for k, v in apply_defaults(spec).items()
        if k not in ("experiment", "output_root", "sweep", "launch", "registry")
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: str, image_size: int, batch: int, points: int, steps: int, warmup: int) -> dict:
    from ..recon.reconstruct import ReconstructTask

    dev = torch.device(device)
    torch.manual_seed(0)
    kind = ReconstructTask(_config(image_size, batch, points, device), dev, base_dir=Path("."))
    for step in range(warmup):
        kind.train_step(step)
    chunk = max(1, steps // 5)
    rates = []
    for start in range(warmup, warmup + steps, chunk):
        _sync(dev)
        t0 = time.perf_counter()
        for step in range(start, start + chunk):
            kind.train_step(step)
        _sync(dev)
        rates.append(chunk * batch / (time.perf_counter() - t0))
        print(f"  {device}: {len(rates) * chunk}/{steps} steps, {rates[-1]:.1f} images/s", file=sys.stderr, flush=True)
    return {
        "device": device,
        "image_size": image_size,
        "batch": batch,
        "points": points,
        "steps": steps,
        "images_per_s": round(statistics.median(rates), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="holly-hpc bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--image-size", type=int, default=PAPER["image_size"])
    parser.add_argument("--batch", type=int, default=PAPER["batch"])
    parser.add_argument("--points", type=int, default=PAPER["points"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = [measure(d, args.image_size, args.batch, args.points, args.steps, args.warmup) for d in devices]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'device':8} {'size':>5} {'batch':>5} {'points':>6} {'steps':>5} {'images/s':>9}")
    for r in rows:
        print(
            f"{r['device']:8} {r['image_size']:>5} {r['batch']:>5} {r['points']:>6} {r['steps']:>5} {r['images_per_s']:>9}"
        )
    print(
        f"(torch {torch.__version__}, {torch.get_num_threads()} CPU threads; reconstruct kind, simulated data, "
        "sigma curriculum 10 -> 1.4 px)"
    )
    return 0
