"""The run registry: every task reports its state, attempts and metrics here."""

from __future__ import annotations

import os
from pathlib import Path

from .base import STATES, TERMINAL_STATES, ExperimentRow, Registry, RunRow

ENV_URL = "HOLLY_REGISTRY_URL"
DEFAULT_FILE = "registry.sqlite"

__all__ = ["STATES", "TERMINAL_STATES", "ExperimentRow", "Registry", "RunRow", "open_registry", "resolve_url"]


def resolve_url(spec_url: str | None, output_root: Path) -> str:
    """The spec's registry.url, then $HOLLY_REGISTRY_URL, then the SQLite file in the output root."""
    if spec_url:
        return spec_url
    if os.environ.get(ENV_URL):
        return os.environ[ENV_URL]
    return f"sqlite:///{(Path(output_root) / DEFAULT_FILE).resolve()}"


def open_registry(url: str) -> Registry:
    """A registry for `url` (sqlite:///absolute/or/relative/path)."""
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteRegistry

        return SQLiteRegistry(url[len("sqlite:///"):])
    scheme = url.split(":", 1)[0]
    raise ValueError(f"unsupported registry URL scheme {scheme!r}: expected sqlite:///path/to/registry.sqlite")
