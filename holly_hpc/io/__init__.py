"""Readers and writers for the file formats researchers bring and take away."""

import hashlib
from pathlib import Path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints, container images of gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_path(path: str | Path, base_dir: Path) -> Path:
    """A path from a spec: `~` expanded, relative paths taken from base_dir (the spec's folder)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def missing(path: Path, expected: str) -> str | None:
    """None if `path` exists, else a spec problem saying what was `expected`: the path does not exist, or
    the system refuses to look (a name longer than the file system allows, a folder without permission)."""
    try:
        if path.exists():
            return None
    except OSError as exc:
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        return f"expected {expected}, but {shown} cannot be checked: {exc.strerror or exc}"
    return f"expected {expected}, but {path} does not exist"
