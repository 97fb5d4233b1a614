"""The end of a reconstruct run: quality that needs no ground truth, said plainly.

The gold-standard FSC of the two independently refined halves (final/fsc.png), the detected symmetry's
angular power spectrum (final/symmetry.png), and final/report.md: the particles used, the resolution, the
detected symmetry, the ring geometry, and a warning where the halves disagree. The Trainer prints the same
lines at the end of the task's log.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..runtime.outputs import save_png
from .fsc import fsc_plot, gold_standard_fsc
from .rings import ring_geometry
from .symmetry import RATIO_CAP, detect_symmetry, symmetry_plot


def _halves_problems(halves: list[torch.Tensor], resolution_nm: float, axis: torch.Tensor | None) -> list[str]:
    """Where the two halves tell different stories (each would need more particles, or the poses are poor)."""
    problems = []
    reports = [detect_symmetry(h.double(), axis=axis) for h in halves]
    rings = [ring_geometry(h.double(), r.axis) for h, r in zip(halves, reports, strict=True)]
    diameter = float(torch.cdist(halves[0], halves[0]).max())
    if not resolution_nm < 0.5 * diameter:
        problems.append(
            f"the halves share no detail finer than {resolution_nm:.0f} nm (the structure is {diameter:.0f} nm across)"
        )
    if reports[0].n != reports[1].n:
        problems.append(f"the halves show different symmetries ({reports[0].n}-fold and {reports[1].n}-fold)")
    r1, r2 = rings[0]["radius_nm"], rings[1]["radius_nm"]
    if abs(r1 - r2) > 0.1 * max(r1, r2):
        problems.append(f"the halves' radii differ by more than 10% ({r1:.1f} and {r2:.1f} nm)")
    return problems


def _times(ratio: float) -> str:
    return f">= {RATIO_CAP:.0f}x" if ratio >= RATIO_CAP else f"{ratio:.1f}x"


def write_final(final_dir: Path, task, metrics: dict, halves: list[torch.Tensor] | None, units: str) -> dict:
    """final/fsc.png, symmetry.png and report.md; returns the metrics to add (FSC) and keeps the pictures and
    the report's lines on the task, for TensorBoard and the task's log (task.final_pictures, final_lines)."""
    scale = task.source.nm_per_unit or 1.0
    unit = "nm" if task.source.nm_per_unit else "frame units"
    structure = task.structure().double().cpu() * scale
    detected = detect_symmetry(structure, axis=task.imposed_axis())
    pictures = {"quality/symmetry": symmetry_plot(detected)}
    added: dict[str, float] = {}
    warnings: list[str] = []
    lines = [f"# Reconstruction report: {final_dir.parent.name}", ""]
    particles = getattr(task.source, "particles", None)
    if particles is not None:
        counts = particles.counts()
        lines.append(
            f"- particles used: {len(counts)} (median {np.median(counts):.0f} localisations each, "
            f"{int(counts.sum())} in all)"
        )
    if halves is not None:
        fsc = gold_standard_fsc(halves[0], halves[1])
        added.update(fsc.summary())
        pictures["quality/fsc"] = fsc_plot(fsc)
        limit = {"nyquist": " (at the grid's Nyquist limit: at least this good)", "below_at_start": " (no better)"}
        lines.append(
            f"- resolution (gold-standard FSC 0.143 of two independent halves): {fsc.resolution_nm:.1f} nm"
            + limit.get(fsc.limited_by, "")
        )
        warnings += _halves_problems(halves, fsc.resolution_nm, task.imposed_axis())
    else:
        lines.append("- resolution: not measured (needs train.refine with fsc: true)")
    lines.append(
        f"- detected symmetry: {detected.n}-fold about the structure's axis (power at {detected.n} is "
        f"{detected.ratio:.1f}x the mean of n = 3..12, {_times(detected.ratio_to_next)} the next fold)"
        + ("" if task.symmetry == "none" else f"; imposed: {task.symmetry}")
    )
    rings = ring_geometry(structure, detected.axis, suffix="")
    if rings["rings"] == 2:
        lines.append(
            f"- geometry: two rings, radius {rings['radius']:.1f} {unit}, {rings['ring_spacing']:.1f} {unit} apart"
        )
    else:
        lines.append(f"- geometry: one ring (or no ring), radius {rings['radius']:.1f} {unit}")
    if "structure_error" in metrics:
        lines.append(f"- against the truth: structure error {metrics['structure_error']:.3f} of the diameter")
    if "rot_err_median_deg" in metrics:
        lines.append(
            f"- against the truth: median rotation error {metrics['rot_err_median_deg']:.1f} deg modulo the truth's "
            "symmetry"
            + (
                f", of the axis alone {metrics['axis_err_median_deg']:.1f} deg"
                if "axis_err_median_deg" in metrics
                else ""
            )
        )
    lines.append(f"- structure: structure.ply / structure.obj ({units})")
    for w in warnings:
        lines.append(f"- WARNING: {w}")
    added["halves_disagree"] = float(bool(warnings)) if halves is not None else 0.0
    text = "\n".join(lines) + "\n"
    tmp = final_dir / ".report.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(final_dir / "report.md")
    for tag, picture in pictures.items():
        save_png(final_dir / f"{tag.split('/')[-1]}.png", picture, scale=2)
    task.final_pictures, task.final_lines = pictures, lines[2:]
    return added
