"""Atomic checkpoints that carry every RNG state, so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import sha256_of

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first; temp files of interrupted writes are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write step_<step>.pt atomically (temp file, fsync, rename) with its sha256 beside it, and keep only the
    newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    digest = sha256_of(tmp)
    os.replace(tmp, final)
    side_tmp = directory / f".{final.name}.sha256.tmp-{os.getpid()}"
    side_tmp.write_text(digest + "\n", encoding="ascii")
    os.replace(side_tmp, _digest_path(final))
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        _digest_path(old).unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only=False: our own files carry numpy/python RNG states, which are not plain tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be trusted: truncated, altered, unreadable or not ours."""


def verified_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of `path` once it is known intact: its sha256 matches the one written with it (when there
    is one: files from before it was written, or whose writer died between the two renames, have none),
    torch can read it, and it is a holly-hpc checkpoint of the step its name says."""
    path = Path(path)
    try:
        expected = _digest_path(path).read_text(encoding="ascii").strip() if _digest_path(path).exists() else None
        if expected is not None and sha256_of(path) != expected:
            raise CorruptCheckpoint("its sha256 differs from the one written with it")
        payload = load_checkpoint(path)
    except CorruptCheckpoint:
        raise
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot be read: {type(exc).__name__}: {exc}") from None
    match = _NAME.match(path.name)
    if (
        not isinstance(payload, dict)
        or not {"step", "kind", "rng"} <= payload.keys()
        or (match and payload["step"] != int(match.group(1)))
    ):
        raise CorruptCheckpoint("it is not a holly-hpc checkpoint of the step its name says")
    return payload


def set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint (and its digest) to *.corrupt, out of the way of every later resume."""
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    if _digest_path(path).exists():
        os.replace(_digest_path(path), aside.with_name(aside.name + ".sha256"))
    return aside


def newest_intact_checkpoint(
    directory: Path, on_corrupt: Callable[[Path, Path | None, str], None] | None = None, move_aside: bool = True
) -> tuple[Path, dict[str, Any]] | None:
    """(path, payload) of the newest checkpoint that verifies, or None. Each newer one that does not is moved
    aside (unless `move_aside` is False: another process owns the folder) and reported to
    on_corrupt(path, where it went or None, why)."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, verified_checkpoint(path)
        except CorruptCheckpoint as exc:
            aside = None
            if move_aside:
                with contextlib.suppress(FileNotFoundError):  # another rank moved it first
                    aside = set_aside(path)
            if on_corrupt is not None:
                on_corrupt(path, aside, str(exc))
    return None
