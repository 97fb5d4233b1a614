"""Readers and writers for the file formats researchers bring and take away."""

from pathlib import Path


def resolve_path(path: str | Path, base_dir: Path) -> Path:
    """A path from a spec: `~` expanded, relative paths taken from base_dir (the spec's folder)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path
