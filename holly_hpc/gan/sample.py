"""`holly-hpc sample RUN --n 64 --code cat0=3 --code cont1=0.5`: draw images from a trained generator.

Noise and unset codes are drawn from --seed; --code fixes a code for every image (a category index, or a
continuous value, which may lie outside the training range [-1, 1]). The output is a PNG grid or a zarr
store (images, noise, cat, cont), written beside its final name and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..experiment import Experiment
from ..runtime.evaluate import newest_task_checkpoint
from .models import CodeSpec
from .task import build_generator
from .traversal import sample_grid


def parse_codes(pairs: list[str], spec: CodeSpec) -> dict[str, float]:
    """["cat0=3", "cont1=-0.5"] -> {"cat0": 3, "cont1": -0.5}, checked against the generator's codes."""
    out: dict[str, float] = {}
    names = spec.names()
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in names:
            raise ValueError(
                f"--code {pair!r}: expected NAME=VALUE with NAME one of {', '.join(names) or '(no codes)'}"
            )
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--code {pair!r}: {value!r} is not a number") from None
        if name.startswith("cat"):
            size = spec.categorical[int(name[3:])]
            if number != int(number) or not 0 <= number < size:
                raise ValueError(f"--code {pair!r}: {name} takes an integer 0..{size - 1}")
            number = int(number)
        out[name] = number
    return out


def sample_from_run(
    experiment: Experiment,
    index: int,
    n: int,
    code_pairs: list[str],
    seed: int,
    output: Path,
    overwrite: bool = False,
    device: str | None = None,
) -> dict:
    from ..runtime.task import select_device

    config = experiment.task(index).config
    if output.suffix not in (".png", ".zarr"):
        raise ValueError(f"--output {output}: expected a .png grid or a .zarr store")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; give --overwrite to replace it")
    payload = newest_task_checkpoint(experiment, index, kind="generate")
    generator, spec = build_generator(config, payload["kind"]["channels"])
    generator.load_state_dict(payload["kind"]["generator"])
    dev = select_device(device or config["device"])
    generator.to(dev).eval()
    fixed = parse_codes(code_pairs, spec)
    codes = spec.sample(n, torch.Generator().manual_seed(seed))
    for name, value in fixed.items():
        key, column = ("cat", int(name[3:])) if name.startswith("cat") else ("cont", int(name[4:]))
        codes[key][:, column] = value
    with torch.no_grad():
        images = generator(spec.latent({k: v.to(dev) for k, v in codes.items()})).cpu()

    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}{output.suffix}")
    try:
        if output.suffix == ".png":
            from ..runtime.outputs import save_png

            grid = sample_grid(images, columns=8)
            names = payload["kind"].get("channel_names")  # checkpoints from before channel names have none
            if names:
                from ..runtime.captions import caption_grid, channel_legend

                grid = caption_grid(grid, title=channel_legend(names))
            save_png(tmp, grid, scale=2)
        else:
            import zarr

            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            group.create_array("images", data=images.numpy(), chunks=(1, *images.shape[1:]))
            for key, value in codes.items():
                group.create_array(key, data=value.numpy())
            group.attrs.update(
                {
                    "experiment": experiment.name,
                    "task": index,
                    "checkpoint_step": int(payload["step"]),
                    "seed": seed,
                    "fixed_codes": fixed,
                    "code_names": spec.names(),
                }
            )
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return {"images": n, "step": int(payload["step"]), "fixed": fixed, "output": str(output)}
