"""The run registry: every task reports its state, attempts and metrics here."""

from __future__ import annotations

import os
from pathlib import Path

from .base import STATES, TERMINAL_STATES, ExperimentRow, MissingRows, Registry, RunRow
from .urls import has_password, is_postgres, redact

ENV_URL = "HOLLY_REGISTRY_URL"
DEFAULT_FILE = "registry.sqlite"

__all__ = [
    "STATES",
    "TERMINAL_STATES",
    "ExperimentRow",
    "MissingRows",
    "Registry",
    "RunRow",
    "has_password",
    "open_registry",
    "redact",
    "resolve_url",
    "runtime_url",
]


def resolve_url(spec_url: str | None, output_root: Path) -> str:
    """The spec's registry.url, then $HOLLY_REGISTRY_URL, then the SQLite file in the output root."""
    if spec_url:
        return spec_url
    if os.environ.get(ENV_URL):
        return os.environ[ENV_URL]
    return f"sqlite:///{(Path(output_root) / DEFAULT_FILE).resolve()}"


def open_registry(url: str) -> Registry:
    """A registry for `url`: sqlite:///path/to/file.sqlite or postgresql://user@host[:port]/database."""
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteRegistry

        return SQLiteRegistry(url[len("sqlite:///") :])
    if is_postgres(url):
        from .postgres import PostgresRegistry

        return PostgresRegistry(url)
    scheme = url.split(":", 1)[0]
    raise ValueError(
        f"unsupported registry URL scheme {scheme!r}: expected sqlite:///path/to/registry.sqlite "
        "or postgresql://user@host/database"
    )


def runtime_url(stored: str) -> str:
    """The URL a job connects with: the stored (password-free) one, or $HOLLY_REGISTRY_URL when that is the
    same database with a password the stored copy had removed."""
    env = os.environ.get(ENV_URL)
    return env if env and redact(env) != env and redact(env).replace(":***@", "@") == stored else stored


def storable_url(url: str) -> str:
    """The URL without its password, as plan.json and logs keep it (libpq then takes PGPASSWORD/.pgpass)."""
    return redact(url).replace(":***@", "@")
