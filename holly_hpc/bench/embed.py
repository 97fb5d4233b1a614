"""`holly-hpc bench embed`: training images/s of the embed kind's families against a plain PyTorch loop.

What is measured, per image size (default 64² and 128²):
- framework: `EmbedTask.train_step(step)`, the step a user's run takes: the step's indices from the
  seeded epoch permutation, the prepared images from the dataset's cache, the copy to the device, the
  augmentations (flips, quarter turns, intensity jitter, from the step's own generator), forward, the
  family's loss, backward, AdamW, the LR scheduler, and the metrics as tensors (no device sync).
- plain: the same model (built by `build_model` from the same config and seed, started from the
  framework model's initial weights) trained by the minimal loop someone would write by hand, in the
  same process: every normalised training image stacked once into one tensor on the device, a seeded
  randperm slice per batch, the same `augment` function (one torch.Generator for the whole run; simclr
  and dino: the same `make_views`), then `out = model(x); loss = model.loss(x, out); zero_grad; backward;
  AdamW step` (`plain_step`; dino: then its teacher's EMA update).

Both sides do the same work per image; the ratio framework / plain is the framework's tax (target:
≥ 0.9). The data are synthetic cells (4 × batch of them), all cached before timing, so nothing is read
from disk in either loop. After warm-up steps on both sides, the timed steps run in chunks that
alternate, framework chunk then plain chunk, so a drift in machine load hits both alike; each rate is
the median of its chunks (images per second; CUDA is synchronised around every chunk).

Reproduce: `holly-hpc bench embed` (cuda when available, else cpu), e.g.
`holly-hpc bench embed --device cpu --steps 10 --families vqvae simclr dino`, or `--json` for the rows
`{model, size, batch, images_per_s, plain_images_per_s, ratio_vs_plain, ...}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..spec import apply_defaults

TARGET_RATIO = 0.9  # from the issue: no framework tax
DEFAULTS = {"sizes": (64, 128), "batch": 32, "width": 16, "steps": 20, "warmup": 3}
FAMILIES = ("vqvae", "simclr", "dino")
MODELS = {
    "vqvae": {"family": "vqvae", "depth": 18, "grid": 4, "code_dim": 8, "codebook_size": 128},
    "simclr": {"family": "simclr", "depth": 18, "latent_dim": 64},
    "dino": {"family": "dino", "depth": 18, "latent_dim": 64, "ssl": {"local_crops": 2}},
}


def config(size: int, batch: int, width: int, device: str, augment: bool = True, family: str = "vqvae") -> dict:
    """The embed config a user would run: synthetic cells, every image cached, the family at `width`.
    augment=False switches the augmentations off (used by the tests to compare one step exactly)."""
    spec = {
        "experiment": "bench",
        "kind": "embed",
        "seed": 0,
        "device": device,
        "data": {
            "source": "synthetic",
            "image_size": size,
            "cache_mb": 1 << 20,
            "eval_size": batch,
            "synthetic": {"count": 4 * batch, "classes": 4},
        },
        "model": {**MODELS[family], "width": width},
        "train": {"steps": 10_000, "batch_size": batch},
    }
    if not augment:
        spec["data"]["augment"] = {"flips": False, "rot90": False, "intensity_jitter": 0.0}
    return {
        k: v
        for k, v in apply_defaults(spec).items()
        if k not in ("experiment", "output_root", "sweep", "launch", "registry")
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the reference
# The plain loop is the reference the framework is measured against: keep it the minimal hand-written
# PyTorch training loop, with nothing of the framework in it but the model and the augment function.
def plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x) -> torch.Tensor:
    """One step of the hand-written loop on the batch x (already on the device and augmented; a list of
    views for simclr and dino)."""
    out = model(x)
    loss = model.loss(x, out)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def plain_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    batch: int,
    aug: dict,
    seed: int = 0,
    data: dict | None = None,
    total_steps: int = 10_000,
) -> Callable[[], torch.Tensor]:
    """The hand-written loop over `images` (N, C, S, S) already on the device, as a function that runs
    its next step: epochs of a seeded randperm, sliced into batches, augmented (self-supervised models:
    the views of the data section `data`), then plain_step (and DINO's teacher update)."""
    from ..embed.data import augment
    from ..embed.task import make_views

    views_of = getattr(model, "self_supervised", False)

    if len(images) < batch:
        raise ValueError(f"{len(images)} training images, fewer than a batch of {batch}")
    generator = torch.Generator().manual_seed(seed)
    state = {"order": torch.empty(0, dtype=torch.long), "at": 0, "step": 0}
    model.train()

    def step() -> torch.Tensor:
        if state["at"] + batch > len(state["order"]):  # a new epoch
            state["order"], state["at"] = torch.randperm(len(images), generator=generator).to(images.device), 0
        x = images[state["order"][state["at"] : state["at"] + batch]]
        state["at"] += batch
        if views_of:
            loss = plain_step(model, optimizer, make_views(model, x, data, generator))
            if hasattr(model, "after_step"):
                model.after_step(state["step"], total_steps)
        else:
            x = augment(x, generator, aug["flips"], aug["rot90"], aug["intensity_jitter"])
            loss = plain_step(model, optimizer, x)
        state["step"] += 1
        return loss

    return step


# ------------------------------------------------------------------------------------ the measurement
def measure(device: str, size: int, batch: int, width: int, steps: int, warmup: int, family: str = "vqvae") -> dict:
    from ..embed.task import EmbedTask, build_model

    dev = torch.device(device)
    cfg = config(size, batch, width, device, family=family)
    torch.manual_seed(0)
    task = EmbedTask(cfg, dev, base_dir=Path("."))
    # The plain side: the same architecture, seed and initial weights, its own AdamW of the same settings.
    model = build_model(cfg["model"], task.channels, size, cfg["seed"]).to(dev)
    model.load_state_dict(task.model.state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["train"]["lr"], weight_decay=cfg["train"]["weight_decay"])
    # Every training image prepared once: this fills the framework's cache and gives the plain stack.
    images, _ = task.dataset.load(task.dataset.splits["train"])
    images = images.to(dev)
    plain = plain_loop(
        model, optimizer, images, batch, cfg["data"]["augment"], cfg["seed"], cfg["data"], cfg["train"]["steps"]
    )

    _log(f"[bench embed] {family} {device} {size}²: {len(images)} cached images, {warmup} warm-up steps each …")
    step = 0
    for _ in range(warmup):
        task.train_step(step)
        step += 1
        plain()
    _sync(dev)

    chunk = max(1, steps // 5)
    rates: dict[str, list[float]] = {"framework": [], "plain": []}
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        for side in ("framework", "plain"):  # alternate, so load drift hits both alike
            _sync(dev)
            t0 = time.perf_counter()
            for i in range(n):
                if side == "framework":
                    task.train_step(step + i)
                else:
                    plain()
            _sync(dev)
            rates[side].append(n * batch / (time.perf_counter() - t0))
        step += n
        done += n
        _log(
            f"[bench embed]   {done}/{steps} steps: {rates['framework'][-1]:.1f} images/s, "
            f"plain {rates['plain'][-1]:.1f} images/s"
        )
    framework, reference = statistics.median(rates["framework"]), statistics.median(rates["plain"])
    return {
        "model": family,
        "size": size,
        "batch": batch,
        "images_per_s": round(framework, 2),
        "plain_images_per_s": round(reference, 2),
        "ratio_vs_plain": round(framework / reference, 3),
        "device": device,
        "width": width,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="holly-hpc bench embed", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="default auto: cuda when available, else cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULTS["sizes"]))
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--width", type=int, default=DEFAULTS["width"], help="the ResNet's base width")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="timed steps per side and size")
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="untimed steps per side first")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    args = parser.parse_args(argv)
    if min(args.sizes) < 16 or args.batch < 1 or args.width < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("need sizes >= 16, batch, width and steps >= 1, warmup >= 0")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"device {device!r} requested but torch.cuda.is_available() is False")
    rows = [
        measure(device, size, args.batch, args.width, args.steps, args.warmup, family)
        for family in args.families
        for size in args.sizes
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'model':6} {'size':>5} {'batch':>5} {'images/s':>9} {'plain images/s':>15} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['model']:6} {r['size']:>5} {r['batch']:>5} {r['images_per_s']:>9.1f} "
            f"{r['plain_images_per_s']:>15.1f} {r['ratio_vs_plain']:>6.3f}"
        )
    print(
        f"(device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; width {args.width}, "
        f"{args.steps} timed steps per side; target ratio >= {TARGET_RATIO})"
    )
    return 0
