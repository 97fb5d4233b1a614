"""Where an experiment came from: who submitted it, which code, which software, which container."""

from __future__ import annotations

import getpass
import platform
import subprocess
from pathlib import Path

import holly_hpc

from .io import sha256_of


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def file_digest(path: Path) -> str | None:
    """sha256 of a file (a container image), read in 1 MiB blocks; None if it is not there."""
    return f"sha256:{sha256_of(path)}" if path.is_file() else None


def provenance(experiment) -> dict:
    """owner, git commit + dirty flag of the holly_hpc code, software versions, container image + digest."""
    import torch

    code = Path(holly_hpc.__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], code)
    status = _git(["status", "--porcelain", "--untracked-files=no"], code) if commit else None
    container = experiment.container or {}
    image = container.get("image")
    return {
        "owner": getpass.getuser(),
        "git_commit": commit,
        "git_dirty": bool(status) if commit else None,
        "holly_hpc_version": holly_hpc.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "container_image": image,
        "container_digest": file_digest(Path(image)) if image else None,
    }
