"""Point-group symmetry: the groups C<n> and D<n> about z, pose errors modulo them, and detection.

Two halves:

* Imposing a known symmetry, as cryo-EM tools name it: `group_rotations` gives the group's rotations,
  `expand` replicates an asymmetric unit into the whole structure (differentiably), and
  `symmetric_rotation_errors` scores poses predicted against a learned structure modulo the group.
* Detecting a symmetry without imposing it: `angular_power_spectrum` measures how much of the structure
  repeats n times about its symmetry axis, and `detect_symmetry` picks the fold and says how clearly.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import torch

from .geometry import DEPTH_MIRROR, geodesic_angle_deg

_NAME = re.compile(r"([CD])([0-9]+)")
RATIO_CAP = 1000.0  # ratio_to_next is reported up to this


def parse_symmetry(name: str) -> tuple[str, int]:
    """'none' | 'C<n>' | 'D<n>' (n ≥ 1, case-insensitive) -> (letter, n). 'none' is the same group as C1
    and parses to ('C', 1)."""
    if not isinstance(name, str):
        raise ValueError(f"symmetry must be a string such as 'none', 'C8' or 'D8', not {name!r}")
    text = name.strip().upper()
    if text == "NONE":
        return "C", 1
    match = _NAME.fullmatch(text)
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"unknown symmetry {name!r}: expected 'none', 'C<n>' or 'D<n>' with n ≥ 1 (e.g. 'C8', 'D8')")
    return match.group(1), int(match.group(2))


def group_rotations(name: str, dtype=torch.float32, device=None) -> torch.Tensor:
    """The group's rotations (G, 3, 3), the identity first.

    C<n>: the rotations by 2πk/n about z, k = 0..n-1 (G = n). D<n>: those, then the n two-fold rotations
    about the axes in the xy plane at angles πk/n from x, the first along x (G = 2n). none / C1: the identity.
    """
    letter, n = parse_symmetry(name)
    angles = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    c, s = torch.cos(angles), torch.sin(angles)
    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    spins = torch.stack((c, -s, zero, s, c, zero, zero, zero, one), -1).reshape(n, 3, 3)
    if letter == "D":
        # The half-turn about the unit axis u in the xy plane is 2uuᵀ - I; the axes are at πk/n.
        half = angles / 2
        u = torch.stack((torch.cos(half), torch.sin(half), zero), -1)
        flips = 2 * u[:, :, None] * u[:, None, :] - torch.eye(3, dtype=torch.float64)
        spins = torch.cat((spins, flips))
    return spins.to(dtype=dtype, device=device)


def expand(asymmetric_unit: torch.Tensor, name: str) -> torch.Tensor:
    """The asymmetric unit (K, 3) replicated by the group -> (G·K, 3), group element major: rows g·K..g·K+K-1
    are the unit turned by the g-th element of `group_rotations`. Differentiable in the points."""
    group = group_rotations(name, dtype=asymmetric_unit.dtype, device=asymmetric_unit.device)
    return (asymmetric_unit @ group.transpose(-1, -2)).reshape(-1, 3)


# --- pose errors modulo a group ------------------------------------------------------------------------


def _nearest_orthogonal(m: torch.Tensor, proper: bool) -> torch.Tensor:
    """The rotation (proper) or rotation-reflection (not proper) nearest to each 3×3 matrix of m (..., 3, 3).

    The batched form of metrics._project_orthogonal, with the same arithmetic."""
    u, _, vh = torch.linalg.svd(m)
    d = torch.ones((*m.shape[:-2], 3), dtype=m.dtype, device=m.device)
    d[..., 2] = torch.sign(torch.linalg.det(u @ vh)) * (1.0 if proper else -1.0)
    return u @ torch.diag_embed(d) @ vh


def _errors_modulo_group(
    r_pred: torch.Tensor,
    r_true: torch.Tensor,
    group: torch.Tensor,
    proper: bool,
    starts: int,
    iterations: int,
    mirror: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image errors (B,) for r_pred ≈ T_i·A with one global A (proper or not), T_i = r_true·g_i and g_i
    free per image; with `mirror` Q (an improper self-map of the truth) also T_i = M·r_true·Q·g_i, the pose
    whose image is the same (M the depth mirror: P·M = P), as metrics.aligned_rotation_fit allows.

    Alternates the closed-form A for the current choices (the orthogonal matrix nearest Σ E_iᵀ rel_i, E_i the
    chosen element, rel_i its relative rotation) with each image's best element for that A. Each start
    takes A from one image's relative rotation; the start with the smallest median error wins.
    """
    # Candidate c of image b scores trace((E_c A)ᵀ rel[v_c, b]): E_c = g with rel = r_trueᵀ r_pred, or
    # E_c = Q g with rel = r_trueᵀ M r_pred (since (M r_true Q g A)ᵀ r_pred = (Q g A)ᵀ r_trueᵀ M r_pred).
    rels = [r_true.transpose(1, 2) @ r_pred]
    elements, variant = [group], [torch.zeros(len(group), dtype=torch.long)]
    if mirror is not None:
        rels.append(r_true.transpose(1, 2) @ DEPTH_MIRROR.to(r_pred) @ r_pred)
        elements.append(mirror.to(group) @ group)
        variant.append(torch.ones(len(group), dtype=torch.long))
    rel_of = torch.stack(rels)[torch.cat(variant)]  # (C, B, 3, 3)
    elements = torch.cat(elements)  # (C, 3, 3)
    b = r_pred.shape[0]
    picks = torch.linspace(0, b - 1, min(starts, b), dtype=torch.float64).round().long().unique()
    a = _nearest_orthogonal(rels[0][picks], proper)  # (S, 3, 3)
    choice = None
    for _ in range(iterations):
        score = torch.einsum("scjk,cbjk->scb", elements @ a[:, None], rel_of)
        new_choice = score.argmax(1)  # (S, B)
        if choice is not None and torch.equal(new_choice, choice):
            break
        choice = new_choice
        picked = rel_of[choice, torch.arange(b)]  # (S, B, 3, 3)
        a = _nearest_orthogonal((elements[choice].transpose(-1, -2) @ picked).sum(1), proper)
    # The start whose final A gives the smallest median error (from the traces: cos = (trace - 1) / 2) ...
    best_trace = torch.einsum("scjk,cbjk->scb", elements @ a[:, None], rel_of).amax(1)  # (S, B)
    rough = torch.arccos(((best_trace - 1) / 2).clamp(-1, 1))
    a = a[rough.median(1).values.argmin()]
    # ... and per image the error to the best candidate for that A (the min over all of them), accurately.
    candidates = r_true[None] @ group[:, None] @ a  # (G, B, 3, 3)
    if mirror is not None:
        flipped = DEPTH_MIRROR.to(r_pred) @ r_true @ mirror.to(group)
        candidates = torch.cat((candidates, flipped[None] @ group[:, None] @ a))
    return geodesic_angle_deg(r_pred[None].expand_as(candidates), candidates).min(0).values


def symmetric_rotation_errors(
    r_pred: torch.Tensor,
    r_true: torch.Tensor,
    name: str,
    starts: int = 8,
    iterations: int = 20,
    mirror: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image rotation errors (degrees) of poses predicted against a *learned* structure with symmetry `name`.

    The learned structure sits in a frame of its own, possibly mirrored in depth, and a symmetric truth looks
    the same turned by any group element, so r_pred ≈ r_true·g_i·A, or r_pred ≈ M·r_true·g_i·A' with M the
    depth mirror and A' improper, with one global A (A') and a group element g_i per image. Both cases are
    fitted (see _errors_modulo_group, from `starts` starts) and the one with the smaller median error is kept,
    as metrics.aligned_rotation_errors does; for 'none' / 'C1' the result equals its 'none' errors.
    `mirror`: an improper self-map Q of the truth (metrics.self_mirror; a nuclear pore whose rings are in
    register has one, the plane between the rings): each image may then sit at its image-equivalent pose.
    """
    rp, rt = r_pred.detach().double().cpu(), r_true.detach().double().cpu()
    group = group_rotations(name, dtype=torch.float64)
    q = None if mirror is None else mirror.detach().double().cpu()
    direct = _errors_modulo_group(rp, rt, group, True, starts, iterations, q)
    mirrored = _errors_modulo_group(rp, DEPTH_MIRROR.double() @ rt, group, False, starts, iterations, q)
    best = direct if direct.median() <= mirrored.median() else mirrored
    return best.float()


# --- detection: the angular power spectrum --------------------------------------------------------------


def _isolated_eigenvector(cov: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The eigenvector of the symmetric 3×3 cov whose eigenvalue is the most different from the other two,
    compared by ratio (scale free): the smallest if λ2/λ1 > λ3/λ2, else the largest; and that ratio."""
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values = values.clamp_min(1e-12 * float(values[-1].clamp_min(1e-300)))
    low, high = float(values[1] / values[0]), float(values[2] / values[1])
    return (vectors[:, 0], low) if low > high else (vectors[:, 2], high)


def _slabs(height: torch.Tensor, slabs: int) -> list[torch.Tensor]:
    """Indices of the points in (at most) `slabs` groups by height: 1-D k-means from equal-count groups.

    For a continuous spread (a cylinder) the groups stay near equal-count; for separate layers (the two rings
    of a nuclear pore) they become the layers even where the layers hold unequal numbers of points, as when
    sites are missing, where equal-count groups would put points of both rings into one slab."""
    order = height.argsort()
    h = height[order]
    n = h.numel()
    k = min(slabs, n)
    cuts = [round(n * i / k) for i in range(1, k)]  # each group's first index in height order
    for _ in range(50):
        centres = [h[a:b].mean() for a, b in itertools.pairwise([0, *cuts, n])]
        new, low = [], 1
        for i, (c0, c1) in enumerate(itertools.pairwise(centres)):
            cut = int(torch.searchsorted(h, (c0 + c1) / 2))
            cut = min(max(cut, low), n - (k - 1 - i))  # every group keeps a point
            new.append(cut)
            low = cut + 1
        if new == cuts:
            break
        cuts = new
    return [order[a:b] for a, b in itertools.pairwise([0, *cuts, n])]


def _within_slab_covariance(p: torch.Tensor, w: torch.Tensor, axis: torch.Tensor, slabs: int) -> torch.Tensor:
    """The pooled covariance of the points about their own slab's centroid, slabs cut along `axis`."""
    cov = torch.zeros(3, 3, dtype=p.dtype)
    for slab in _slabs(p @ axis, slabs):
        ws = w[slab]
        x = p[slab] - (ws[:, None] * p[slab]).sum(0) / ws.sum()
        cov += (ws[:, None] * x).T @ x
    return cov / w.sum()


def symmetry_axis(points: torch.Tensor, weights: torch.Tensor | None = None, slabs: int = 2) -> torch.Tensor:
    """The symmetry axis (3,) of a ring-like or cylindrical cloud (N, 3), a unit vector (largest component > 0).

    A structure with an n-fold axis (n ≥ 3) has an isotropic covariance in the plane across the axis: two
    equal eigenvalues, and the axis is the eigenvector of the third. That one is the smallest for a flat
    structure (a ring, the double ring of a nuclear pore, a short wide cylinder such as a centriole) and the
    largest for a long one (a rod, a long cylinder). So the axis is the eigenvector whose eigenvalue is the most
    different from the other two, compared by ratio (_isolated_eigenvector).

    The plain covariance is not enough for a double ring: its axial spread (half the ring spacing, squared) is
    close to its spread across (radius²/2), and with sites missing at random each ring's centroid moves off the
    axis, which tilts the eigenvectors by tens of degrees. So an axis is refined by the eigen-decomposition of
    the within-slab covariance (the points about their own slab's centroid, `slabs` slabs cut along the current
    axis, see _slabs: that removes the rings' spacing and their offsets, and the flat rings then give a very
    small axial eigenvalue) until it settles. The refinement starts from the three principal axes and from 24
    directions spread over the hemisphere in the principal frame (with few sites left every principal axis
    can be far from the true one), and the settled axis whose eigenvalue is the most isolated wins. For a
    cloud with no axis (a blob) the result is arbitrary.
    """
    p = points.detach().double().cpu()
    w = torch.ones(p.shape[0], dtype=torch.float64) if weights is None else weights.detach().double().cpu()
    centred = p - (w[:, None] * p).sum(0) / w.sum()
    principal = torch.linalg.eigh((w[:, None] * centred).T @ centred / w.sum()).eigenvectors.T
    best, best_score = principal[0], -1.0
    for start in torch.cat((principal, _hemisphere(24) @ principal)):
        axis = start
        for _ in range(8):
            new, _ = _isolated_eigenvector(_within_slab_covariance(p, w, axis, slabs))
            settled = float((new @ axis).abs()) > 1 - 1e-9
            axis = new
            if settled:
                break
        new, score = _isolated_eigenvector(_within_slab_covariance(p, w, axis, slabs))
        if float((new @ axis).abs()) > 0.99 and score > best_score:  # a fixed point of the refinement
            best, best_score = axis, score
    if best[best.abs().argmax()] < 0:
        best = -best
    return best.to(points.dtype)


def _hemisphere(n: int) -> torch.Tensor:
    """n unit vectors spread evenly over the upper hemisphere (a Fibonacci lattice), (n, 3)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - i / n
    ring = (1 - z**2).sqrt()
    turn = math.pi * (3 - math.sqrt(5)) * i
    return torch.stack((ring * torch.cos(turn), ring * torch.sin(turn), z), 1)


def _perpendicular_basis(axis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors e1, e2 with (e1, e2, axis) a right-handed orthonormal frame."""
    helper = torch.zeros(3, dtype=axis.dtype)
    helper[axis.abs().argmin()] = 1.0
    e1 = torch.nn.functional.normalize(torch.linalg.cross(axis, helper), dim=0)
    return e1, torch.linalg.cross(axis, e1)


def _circle_centre(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Centre of the circle best fitting the planar points (a, b) (Kåsa's algebraic fit: weighted least squares
    of a² + b² = 2·ca·a + 2·cb·b + c), or their centroid where that is no ring (collinear points, a centre
    further than half the rms radius from the centroid, or distances from the centre that spread by more than
    0.3 × their mean, as for a filled disc or a blob)."""
    ma, mb = float((w * a).sum() / w.sum()), float((w * b).sum() / w.sum())
    da, db = a - ma, b - mb
    rms = float(((w * (da**2 + db**2)).sum() / w.sum()).sqrt())
    if a.numel() < 3 or not rms > 0:
        return ma, mb
    design = torch.stack((2 * da, 2 * db, torch.ones_like(da)), 1) * w.sqrt()[:, None]
    target = (da**2 + db**2) * w.sqrt()
    solution = torch.linalg.lstsq(design, target[:, None], driver="gelsd").solution[:, 0]
    ca, cb = float(solution[0]), float(solution[1])
    if not (math.isfinite(ca) and math.isfinite(cb)) or math.hypot(ca, cb) > 0.5 * rms:
        return ma, mb
    distance = torch.hypot(da - ca, db - cb)
    mean = float((w * distance).sum() / w.sum())
    spread = float(((w * (distance - mean) ** 2).sum() / w.sum()).sqrt())
    if not spread < 0.3 * mean:  # not a ring: a filled disc's distances spread by half their mean
        return ma, mb
    return ma + ca, mb + cb


def angular_power_spectrum(
    points: torch.Tensor,
    axis: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    n_max: int = 16,
    slabs: int = 2,
    centre: str = "circle",
) -> torch.Tensor:
    """How strongly the cloud (N, 3) repeats n times about `axis`, n = 0..n_max.

    With φ each point's azimuth about the axis, power(n) = |Σ w·exp(i n φ)|² / (Σ w)²: 1 for points all at
    angles that are multiples of 2π/n, about Σw²/(Σw)² (1/N) for points at random angles: a noise floor. It is
    computed per slab along the axis (the points split into `slabs` groups by their height, see _slabs) and
    summed incoherently, each slab weighted by its share of the weight: the two rings of a nuclear pore may be
    turned against each other (by π/8 their n = 8 terms would cancel in a coherent sum). Points nearer the
    axis than 0.25 × the slab's median radius carry no angle and are dropped. Returns float64 (n_max + 1,),
    power[0] = 1. axis: default `symmetry_axis(points)`.

    centre: where the axis crosses each slab. "centroid": the slab's (weighted) centroid. "circle" (default):
    the centre of the circle fitted to the slab's points across the axis, falling back to the centroid where
    that fit is unusable (see _circle_centre). The circle is what matters for incomplete labelling: a ring with
    half its sites missing at random has its centroid some 0.2 × radius off the axis, which smears φ enough to
    lose about half of the n = 8 power, while its points still lie on the circle. The per-slab centre also
    absorbs a small tilt of the axis.
    """
    if centre not in ("circle", "centroid"):
        raise ValueError(f"unknown centre {centre!r}: expected 'circle' or 'centroid'")
    p = points.detach().double().cpu()
    w = torch.ones(p.shape[0], dtype=torch.float64) if weights is None else weights.detach().double().cpu()
    if p.ndim != 2 or p.shape[1] != 3 or w.shape != (p.shape[0],):
        raise ValueError(f"expected points (N, 3) and weights (N,), got {tuple(p.shape)} and {tuple(w.shape)}")
    if slabs < 1 or n_max < 0:
        raise ValueError(f"need slabs ≥ 1 and n_max ≥ 0, got slabs={slabs}, n_max={n_max}")
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError("angular_power_spectrum needs non-negative weights with a positive sum")
    p, w = p[w > 0], w[w > 0]
    u = symmetry_axis(p, w) if axis is None else torch.nn.functional.normalize(axis.detach().double().cpu(), dim=0)
    e1, e2 = _perpendicular_basis(u)
    across1, across2, height = p @ e1, p @ e2, p @ u
    orders = torch.arange(n_max + 1, dtype=torch.float64)
    terms, shares = [], []
    for slab in _slabs(height, slabs):
        a, b, ws = across1[slab], across2[slab], w[slab]
        if centre == "circle":
            ca, cb = _circle_centre(a, b, ws)
        else:
            ca, cb = float((ws * a).sum() / ws.sum()), float((ws * b).sum() / ws.sum())
        a, b = a - ca, b - cb
        radius = torch.hypot(a, b)
        keep = (radius >= 0.25 * radius.median()) & (radius > 0)
        if not keep.any():
            continue
        angle = orders[None, :] * torch.atan2(b[keep], a[keep])[:, None]  # (n, n_max + 1)
        ws = ws[keep]
        terms.append(((ws @ torch.cos(angle)) ** 2 + (ws @ torch.sin(angle)) ** 2) / ws.sum() ** 2)
        shares.append(ws.sum())
    if not terms:
        raise ValueError("angular_power_spectrum: no points away from the axis")
    shares = torch.stack(shares)
    return (torch.stack(terms) * (shares / shares.sum())[:, None]).sum(0)


@dataclass
class SymmetryReport:
    """What detect_symmetry found. spectrum: power for n = 0..n_max; n: the detected fold; ratio: power(n) over
    the mean power for n in `compare` (inclusive); ratio_to_next: power(n) over the strongest n in n_range that
    is not a multiple of n; axis: the symmetry axis used (unit, in the cloud's frame)."""

    spectrum: torch.Tensor
    n: int
    ratio: float
    ratio_to_next: float
    axis: torch.Tensor
    n_range: tuple[int, int] = (2, 16)
    compare: tuple[int, int] = (3, 12)
    power: float = field(default=float("nan"))

    def as_metrics(self) -> dict[str, float | int]:
        return {
            "symmetry_n": int(self.n),
            "symmetry_power_ratio": float(self.ratio),
            "symmetry_ratio_to_next": float(self.ratio_to_next),
        }


def _choose_fold(spectrum: torch.Tensor, lo: int, hi: int) -> int:
    """The fold n in lo..hi that explains the spectrum's peaks.

    A C_n structure has power at n and its multiples only (C8: 8, 16; C4: 4, 8, 12, 16), and localisation
    noise makes the higher multiples weaker, though not always monotonically. So the peaks are the n with at
    least half the maximum power, and the fold is the smallest candidate with half the maximum of which every
    peak is a multiple; where no candidate explains all the peaks (noise), the strongest n.
    """
    ns = list(range(lo, hi + 1))
    values = spectrum[lo : hi + 1]
    top = float(values.max())
    peaks = [n for n in ns if float(spectrum[n]) >= 0.5 * top]
    for n in peaks:  # ascending
        if all(m % n == 0 for m in peaks):
            return n
    return ns[int(values.argmax())]


def detect_symmetry(
    points: torch.Tensor,
    n_range: tuple[int, int] = (2, 16),
    compare: tuple[int, int] = (3, 12),
    weights: torch.Tensor | None = None,
    slabs: int = 2,
    axis: torch.Tensor | None = None,
    centre: str = "circle",
) -> SymmetryReport:
    """The rotational symmetry of a cloud (N, 3) about its symmetry axis, found without imposing any.

    The fold is chosen from the angular power spectrum (see _choose_fold); `ratio` = power(n) / mean power over
    compare[0]..compare[1] (e.g. "power at n = 8 over the mean of n = 3..12 above 3"), and ratio_to_next =
    power(n) / the strongest power in n_range at an n that is not a multiple of n. Both are well above 1
    for a clear symmetry and near 1-2 for noise (a maximum over noisy values is above their mean).
    """
    lo, hi = n_range
    if not 1 <= lo <= hi or not 0 <= compare[0] <= compare[1]:
        raise ValueError(f"bad n_range {n_range} or compare {compare}")
    u = symmetry_axis(points, weights) if axis is None else axis.detach().double().cpu()
    spectrum = angular_power_spectrum(points, u, weights, n_max=max(hi, compare[1]), slabs=slabs, centre=centre)
    n = _choose_fold(spectrum, lo, hi)
    power = float(spectrum[n])
    tiny = 1e-300
    ratio = power / max(float(spectrum[compare[0] : compare[1] + 1].mean()), tiny)
    others = [float(spectrum[m]) for m in range(lo, hi + 1) if m % n != 0]
    # Capped: an imposed symmetry leaves the other folds at rounding level, and a ratio of 1e14 says no more.
    ratio_to_next = min(power / max(*others, tiny), RATIO_CAP) if others else RATIO_CAP
    return SymmetryReport(spectrum, n, ratio, ratio_to_next, u.double(), (lo, hi), tuple(compare), power)


def symmetry_plot(report: SymmetryReport) -> torch.Tensor:
    """A bar chart (3, H, W) of power against n over report.n_range, the detected fold highlighted."""
    from holly_hpc.runtime.plots import bar_plot  # the plotting stack, only when drawing

    lo, hi = report.n_range
    return bar_plot(
        [str(n) for n in range(lo, hi + 1)],
        [float(v) for v in report.spectrum[lo : hi + 1]],
        title=f"angular power: n = {report.n}, {report.ratio:.1f}x the mean of n = {report.compare[0]}..{report.compare[1]}",
        y_label="power",
        highlight=report.n - lo,
        size=(360, 240),
    )


# --- from a free structure to an asymmetric unit ---------------------------------------------------------


def frame_of_axis(axis: torch.Tensor) -> torch.Tensor:
    """A rotation A (3, 3) taking `axis` to z: A @ axis = (0, 0, 1)."""
    e1, e2 = _perpendicular_basis(axis.double() / axis.double().norm())
    return torch.stack((e1, e2, axis.double() / axis.double().norm())).to(axis.dtype)


def symmetrise(points: torch.Tensor, name: str, unit_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A structure learned without symmetry (N, 3) -> (asymmetric unit (unit_size, 3), rotation A (3, 3)).

    What cryo-EM tools do after an ab-initio run in C1: find the symmetry axis (symmetry_axis), turn it onto z
    (A: points @ A.T), fold every point into one wedge of the group (its azimuth modulo 2π/n, the wedge centred
    on the n-fold phase so that a corner is not cut in two; for D<n> the lower half is flipped onto the upper)
    and summarise the folded points by unit_size k-means centres. expand(unit, name) is then close to the
    turned structure; poses R fitted to the free structure become R @ A.T.
    """
    letter, n = parse_symmetry(name)
    p = points.detach().double().cpu()
    p = p - p.mean(0)
    a = torch.eye(3, dtype=torch.float64) if n == 1 and letter == "C" else frame_of_axis(symmetry_axis(p))
    q = p @ a.T
    if letter == "D":  # the two-fold flip about x: (x, y, z) -> (x, -y, -z) brings the lower half up
        lower = q[:, 2] < 0
        q[lower] = q[lower] * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    if n > 1:
        phi = torch.atan2(q[:, 1], q[:, 0])
        radius = torch.hypot(q[:, 0], q[:, 1])
        phase = torch.angle((radius * torch.exp(1j * n * phi)).sum()) / n
        wedge = 2 * math.pi / n
        folded = torch.remainder(phi - phase + wedge / 2, wedge) - wedge / 2 + phase
        q = torch.stack((radius * torch.cos(folded), radius * torch.sin(folded), q[:, 2]), dim=1)
    unit = _kmeans(q, unit_size, seed)
    return unit.to(points.dtype), a.to(points.dtype)


def _kmeans(x: torch.Tensor, k: int, seed: int, iterations: int = 50) -> torch.Tensor:
    """k centres of x (N, 3) by Lloyd's algorithm from a k-means++ start (deterministic for a seed); with
    k ≥ N the points themselves (repeated as needed)."""
    if k >= len(x):
        return x[torch.arange(k) % len(x)].clone()
    g = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(dim=1).values.pow(2)
        centres.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
    c = torch.stack(centres)
    for _ in range(iterations):
        label = torch.cdist(x, c).argmin(dim=1)
        new = torch.stack([x[label == j].mean(0) if (label == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return c
