"""Point clouds as Wavefront OBJ (vertices only) and ASCII PLY, readable by MeshLab and Blender."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class MeshFormatError(ValueError):
    """A mesh file that cannot be read; the message names the file and line."""


def read_obj_vertices(path: str | Path) -> np.ndarray:
    """The `v x y z` vertices of an OBJ file as an (N, 3) float64 array; faces and the rest are ignored."""
    path = Path(path)
    vertices = []
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshFormatError(f"{path}: cannot read OBJ file: {exc}") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] != "v":
            continue
        try:
            xyz = [float(f) for f in fields[1:4]]
        except ValueError:
            xyz = []
        if len(xyz) != 3 or not np.all(np.isfinite(xyz)):
            raise MeshFormatError(
                f"{path}:{lineno}: expected 'v x y z' with three finite numbers, got {line.strip()!r}"
            )
        vertices.append(xyz)
    if not vertices:
        raise MeshFormatError(f"{path}: no vertices ('v x y z' lines) found")
    points = np.asarray(vertices, dtype=np.float64)
    if np.ptp(points, axis=0).max() == 0:  # a structure is scaled by its extent: a single point has none
        where = ", ".join(f"{v:g}" for v in points[0])
        raise MeshFormatError(
            f"{path}: expected a point cloud with an extent, but all {len(points)} vertices lie at ({where})"
        )
    return points


def write_obj(path: str | Path, points: np.ndarray, units: str | None = None) -> None:
    """`units` (e.g. "nm") goes into a comment line, as OBJ has no field for it."""
    points = np.asarray(points, dtype=np.float64)
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in points]
    head = "# holly-hpc point cloud\n" + (f"# units {units}\n" if units else "")
    _write_text_atomic(Path(path), head + "\n".join(lines) + "\n")


def write_ply(path: str | Path, points: np.ndarray, units: str | None = None) -> None:
    """`units` (e.g. "nm") goes into a `comment units ...` header line."""
    points = np.asarray(points, dtype=np.float64)
    header = (
        "ply\nformat ascii 1.0\ncomment holly-hpc point cloud\n"
        + (f"comment units {units}\n" if units else "")
        + f"element vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    )
    body = "".join(f"{x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in points)
    _write_text_atomic(Path(path), header + body)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
