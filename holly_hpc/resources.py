"""Files under the repository's schemas/ folder, found in a checkout or inside an installed wheel."""

from __future__ import annotations

from pathlib import Path


def schema_file(name: str) -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas" / name, here.parent / "schemas" / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"schemas/{name} not found beside holly_hpc (is the package installed completely?)")
