"""A task's folder and the sinks that fill it: TensorBoard events, the zarr v3 store, PNG images.

<task dir>/checkpoints/  step_XXXXXXXX.pt (atomic, newest K kept)
           tb/           TensorBoard event files of this task's run (scalars, images, hparams); in a sweep,
                         in tb/<its overrides>/ so TensorBoard names the run after them
           outputs.zarr/ metrics/<key>[log index] and metrics/step, plus the kind's arrays
           final/        metrics.json and the kind's files (renders.png, structure.ply, ...)
           data/         what the task read, as it read it (summary.json; picked.csv and picked.png)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..experiment import inside


def tensorboard_run_name(overrides: dict) -> str:
    """The folder under tb/ that names a swept task's run in TensorBoard after its overrides ("lr=0.001
    sigma=2", the last part of each key unless two keys share it), so runs read as what differs between them,
    not as hashes; "" (events straight in tb/) for a task without overrides. Override values are user text:
    anything but letters, digits and ._=+-,[] becomes _, so the name stays one folder inside tb/."""
    last = [key.rsplit(".", 1)[-1] for key in overrides]
    words = []
    for key, short in zip(overrides, last, strict=True):
        value = overrides[key]
        text = value if isinstance(value, str) else json.dumps(value)
        words.append(f"{short if last.count(short) == 1 else key}={text}")
    name = re.sub(r"[^A-Za-z0-9._=+,\[\] -]", "_", " ".join(words)).strip()[:120].strip()
    return "" if set(name) <= {"."} else name


@dataclass(frozen=True)
class TaskPaths:
    root: Path
    run_name: str = ""  # tensorboard_run_name of the task's overrides

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tb(self) -> Path:
        return self.root / "tb" / self.run_name if self.run_name else self.root / "tb"

    @property
    def zarr(self) -> Path:
        return self.root / "outputs.zarr"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def make(self) -> TaskPaths:
        """Create the folders, refusing any that is a symbolic link out of the task folder."""
        for d in (self.checkpoints, self.tb, self.zarr, self.final, self.data):
            inside(self.root, d.relative_to(self.root))
        for d in (self.checkpoints, self.tb, self.final, self.data):
            d.mkdir(parents=True, exist_ok=True)
        return self


class MetricsStore:
    """Per-log-interval metrics in outputs.zarr: metrics/<key> has one slot per log interval.

    Slots are preallocated (NaN) and written by index, so a resumed run that logs step s again writes the
    same slot instead of appending a duplicate.
    """

    def __init__(self, path: Path, n_logs: int):
        import zarr

        self.group = zarr.open_group(str(path), mode="a", zarr_format=3)
        self.n_logs = n_logs

    def _array(self, key: str):
        return self.group.require_array(
            f"metrics/{key}", shape=(self.n_logs,), dtype="f8", fill_value=math.nan, chunks=(self.n_logs,)
        )

    def write(self, log_index: int, step: int, metrics: dict[str, float]) -> None:
        self._array("step")[log_index] = step
        for key, value in metrics.items():
            self._array(key)[log_index] = float(value)

    def write_slot(self, name: str, slot: int, slots: int, value) -> None:
        """Write one entry of an array with `slots` entries along its first axis (created on first use)."""
        value = np.asarray(value)
        array = self.group.require_array(
            name, shape=(slots, *value.shape), dtype=value.dtype, chunks=(1, *value.shape), fill_value=0
        )
        array[slot] = value

    def write_array(self, name: str, values: np.ndarray) -> None:
        """A whole array of the task's results, replacing any earlier version."""
        values = np.asarray(values)
        self.group.create_array(
            name, shape=values.shape, dtype=values.dtype, chunks=values.shape or None, overwrite=True
        )[...] = values


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Scale each image (B, H, W) to [0, 1] by its own maximum, for display."""
    images = images.detach().float().cpu()
    peak = images.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (images / peak[:, None, None]).clamp(0, 1)


def image_rows(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Stack rows of images (each (B, H, W) in [0, 1]) into one (3, H', W') grid with white gutters."""
    grey = torch.stack(rows)[:, :, None]  # (rows, B, 1, H, W)
    return rgb_grid(grey.expand(-1, -1, 3, -1, -1), pad)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 3, H, W) for display: grey for 1 channel, green + magenta for 2 (e.g.
    cell body + nucleus, the colour-blind-safe pair), the first three as RGB otherwise."""
    c = images.shape[1]
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    if c == 2:
        return torch.stack([images[:, 1], images[:, 0], images[:, 1]], 1)
    return images[:, :3]


def rgb_grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """(rows, cols, 3, H, W) in [0, 1] -> one (3, H', W') picture with white gutters."""
    rows, cols, _, h, w = images.shape
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[:, top : top + h, left : left + w] = images[r, c]
    return grid


def save_png(path: Path, image: torch.Tensor, scale: int = 4) -> None:
    """Save a (3, H, W) image in [0, 1] as PNG, upscaled by `scale` (nearest) so small renders are visible."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    picture.save(tmp)
    tmp.replace(path)


class TensorBoardSink:
    """Scalars, images and hparams into the task's own tb/ run."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def text(self, tag: str, step: int, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, step: int, image: torch.Tensor) -> None:
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def point_cloud(self, tag: str, step: int, points: torch.Tensor) -> None:
        """A point cloud for TensorBoard's mesh dashboard, coloured by depth so its shape reads at a glance."""
        z = points[:, 2]
        depth = ((z - z.min()) / (z.max() - z.min()).clamp_min(1e-9) * 200 + 55).to(torch.uint8)
        colors = torch.stack((depth, 255 - depth, torch.full_like(depth, 128)), -1)
        self.writer.add_mesh(tag, vertices=points[None].float(), colors=colors[None], global_step=step)

    def histogram(self, tag: str, step: int, values: torch.Tensor) -> None:
        self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def embedding(
        self, tag: str, step: int, embeddings: torch.Tensor, labels: list[str] | None, thumbnails: torch.Tensor | None
    ) -> None:
        """Embeddings for the projector, with their labels and thumbnails (sprites)."""
        self.writer.add_embedding(
            embeddings.detach().float().cpu(), metadata=labels, label_img=thumbnails, global_step=step, tag=tag
        )

    def hparams(self, hparams: dict, final_metrics: dict[str, float], step: int) -> None:
        """Write hparams into this run itself: SummaryWriter.add_hparams would open a stray subfolder."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        tagged = {f"hparams/{k}": float(v) for k, v in final_metrics.items()}
        exp, ssi, sei = hparams_summary(hparams, tagged)
        _booleans_as_booleans(exp, ssi, [k for k, v in hparams.items() if isinstance(v, bool)])
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        self.scalars(step, tagged)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _booleans_as_booleans(exp, ssi, keys: list[str]) -> None:
    """torch's hparams() tests isinstance(v, int) before bool, so True arrives in TensorBoard as the number 1;
    rewrite those values and their declared types as booleans."""
    if not keys:
        return
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    for summary, edit in ((ssi, "session"), (exp, "experiment")):
        content = summary.value[0].metadata.plugin_data
        data = plugin_data_pb2.HParamsPluginData.FromString(content.content)
        if edit == "session":
            for key in keys:
                value = data.session_start_info.hparams[key].number_value
                data.session_start_info.hparams[key].bool_value = bool(value)
        else:
            for info in data.experiment.hparam_infos:
                if info.name in keys:
                    info.type = api_pb2.DATA_TYPE_BOOL
        content.content = data.SerializeToString()


# Besides the keys a sweep varies, the hparams of a run show these, the ones its kind is compared by.
COMMON_HPARAMS = ("kind", "seed", "train.lr", "train.batch_size", "train.steps")
MAIN_HPARAMS = {
    "pose": ("data.structure", "data.sigma", "data.num_points", "model.hypotheses"),
    "reconstruct": ("data.source", "data.sigma", "model.num_points", "model.symmetry"),
    "embed": ("model.family", "model.latent_dim", "model.width", "model.depth"),
    "generate": ("model.noise_dim", "model.categorical", "model.continuous"),
}


def chosen_hparams(config: dict, varying: list[str] | None) -> dict:
    """The hparams TensorBoard shows for a run: the keys its sweep varies plus its kind's main ones (all keys
    when `varying` is None), booleans kept as booleans."""
    flat = flat_hparams(config)
    if varying is None:
        return flat
    wanted = [*COMMON_HPARAMS, *MAIN_HPARAMS.get(config.get("kind", ""), ()), *varying]
    return {key: flat[key] for key in dict.fromkeys(wanted) if key in flat}


def scalar_tags(train: dict[str, float], evaluation: dict[str, float]) -> dict[str, float]:
    """TensorBoard tags grouped by where they come from: train/loss, train/lr ... and eval/loss,
    eval/rot_err_median_deg ... (a kind's eval_ or train_ prefix is dropped); a key with its own group keeps it."""

    def tag(group: str, key: str) -> str:
        return key if "/" in key else f"{group}/{key.removeprefix(group + '_')}"

    return {**{tag("train", k): v for k, v in train.items()}, **{tag("eval", k): v for k, v in evaluation.items()}}


def flat_hparams(config: dict) -> dict:
    """Flatten a task config into TensorBoard-friendly hparams (dotted keys; lists as text)."""
    out: dict = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, (bool, int, float, str)):
                out[name] = value
            else:
                out[name] = json.dumps(value)

    walk(config, "")
    return out
