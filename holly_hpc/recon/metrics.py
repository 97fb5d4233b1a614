"""Quality of a fit: rotation-error summaries, and the structure error of a learned point cloud.

The structure error is the Chamfer distance between the learned and the true point clouds, normalised by
the true cloud's diameter, after the best similarity alignment (rotation, uniform scale, translation)
allowing the mirror image: an orthographic image cannot tell a structure from its mirror in depth, so a
reconstruction is only defined up to that, and the metric must not punish it.
"""

from __future__ import annotations

import itertools

import torch

from .geometry import (
    DEPTH_MIRROR,
    axial_error_deg,
    geodesic_angle_deg,
    random_rotations,
)


def rotation_error_summary(errors_deg: torch.Tensor) -> dict[str, float]:
    """Median, mean and 90th percentile of per-image rotation errors (degrees), and the share under 10°."""
    e = errors_deg.detach().double().cpu()
    return {
        "rot_err_median_deg": float(torch.quantile(e, 0.5)),  # interpolated, as numpy.median
        "rot_err_mean_deg": float(e.mean()),
        "rot_err_p90_deg": float(torch.quantile(e, 0.9)),
        "rot_within_10deg": float((e < 10).double().mean()),
    }


def chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance: the mean nearest-neighbour distance from a to b and from b to a,
    averaged. a (..., N, 3), b (..., M, 3) -> (...)."""
    # The exact form: cdist's matrix-product shortcut leaves ~1e-5 where points coincide in float32.
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return 0.5 * (d.min(dim=-1).values.mean(-1) + d.min(dim=-2).values.mean(-1))


def diameter(points: torch.Tensor) -> torch.Tensor:
    return torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist").max()


def _umeyama(
    src: torch.Tensor, dst: torch.Tensor, mirror: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best similarity dst ≈ s·R·src + t for paired points (K, N, 3); R proper, or improper where `mirror`."""
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.transpose(1, 2) @ xs / src.shape[1]
    u, sing, vh = torch.linalg.svd(cov)
    want = torch.where(mirror, -1.0, 1.0).to(src.dtype)
    d = torch.ones(src.shape[0], 3, dtype=src.dtype, device=src.device)
    d[:, 2] = torch.sign(torch.linalg.det(u @ vh)) * want
    rot = u @ torch.diag_embed(d) @ vh
    var = xs.pow(2).sum((1, 2)) / src.shape[1]
    scale = (sing * d).sum(-1) / var.clamp_min(1e-12)
    t = mu_d - scale[:, None, None] * (mu_s @ rot.transpose(1, 2))
    return rot, scale, t


def _initial_rotations(n_random: int, generator: torch.Generator, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting orientations for the alignment: the 4 proper and 4 improper sign flips of the principal
    axes (relative), plus random rotations and their mirrors for shapes whose axes are ambiguous."""
    flips = [torch.diag(torch.tensor(s, dtype=dtype)) for s in itertools.product((1.0, -1.0), repeat=3)]
    rand = list(random_rotations(n_random, generator, dtype=dtype))
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=dtype))
    rand += [r @ mirror for r in rand]
    inits = torch.stack(flips + rand)
    return inits, torch.linalg.det(inits) < 0


def _icp(
    src: torch.Tensor, dst: torch.Tensor, inits: torch.Tensor, improper: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ICP from every start (K, 3, 3) at once: nearest-neighbour matching and Umeyama's closed form.
    Returns the moved sources (K, N, 3) and each start's final rotation part (K, 3, 3)."""
    src_c, dst_c = src - src.mean(0), dst - dst.mean(0)
    scale0 = dst_c.norm(dim=1).pow(2).mean().sqrt() / src_c.norm(dim=1).pow(2).mean().sqrt().clamp_min(1e-12)
    k = inits.shape[0]
    moved = scale0 * src_c.expand(k, -1, -1) @ inits.transpose(1, 2) + dst.mean(0)
    targets = dst.expand(k, -1, -1)
    rot = inits
    for _ in range(iterations):
        nearest = torch.cdist(moved, targets).argmin(dim=-1)  # (K, N)
        matched = torch.gather(targets, 1, nearest[..., None].expand(-1, -1, 3))
        rot, scale, t = _umeyama(src.expand(k, -1, -1), matched, improper)
        moved = scale[:, None, None] * (src.expand(k, -1, -1) @ rot.transpose(1, 2)) + t
    return moved, rot


def _starts(src: torch.Tensor, dst: torch.Tensor, n_random: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Principal axes of each cloud, so the sign-flip starts are relative to the shapes' own frames.
    _, _, v_src = torch.linalg.svd(src - src.mean(0), full_matrices=False)
    _, _, v_dst = torch.linalg.svd(dst - dst.mean(0), full_matrices=False)
    inits, improper = _initial_rotations(n_random, torch.Generator().manual_seed(seed), src.dtype)
    return torch.cat([v_dst.T @ inits[:8] @ v_src, inits[8:]]), improper


def align_similarity(
    source: torch.Tensor,
    target: torch.Tensor,
    allow_mirror: bool = True,
    iterations: int = 40,
    n_random: int = 24,
    seed: int = 0,
) -> torch.Tensor:
    """`source` moved onto `target` by the best similarity transform found (ICP from many starts).

    No correspondences are assumed; each start is refined by nearest-neighbour matching and Umeyama's
    closed form, and the start with the smallest Chamfer distance wins.
    """
    src = source.detach().double().cpu()
    dst = target.detach().double().cpu()
    inits, improper = _starts(src, dst, n_random, seed)
    if not allow_mirror:
        inits, improper = inits[~improper], improper[~improper]
    moved, _ = _icp(src, dst, inits, improper, iterations)
    best = chamfer(moved, dst.expand(len(moved), -1, -1)).argmin()
    return moved[best].to(source.dtype)


def self_mirror(points: torch.Tensor, tolerance: float = 0.25, n_random: int = 24) -> torch.Tensor | None:
    """The improper orthogonal map Q (a mirror plane, an inversion or a rotoreflection, about the centroid)
    that takes the cloud onto itself, or None: Q is accepted where the Chamfer distance of Q·S to S is under
    `tolerance` of the mean nearest-neighbour spacing, i.e. the points pair up (a mesh's vertices, a shape
    built symmetric); a random sample of a symmetric surface does not, and is not claimed.

    A structure with one has two poses for every image: at rotation R and at M·R·Q (M the depth mirror)
    it projects to the same picture, since P·M = P for the orthographic projection P and Q·S = S. A
    teapot (a mirror plane through spout and handle) is such a shape; no method can tell those poses apart.
    """
    pts = points.detach().double().cpu()
    pts = pts - pts.mean(0)
    inits, improper = _starts(pts, pts, n_random, seed=1)
    inits, improper = inits[improper], improper[improper]
    moved, rot = _icp(pts, pts, inits, improper, iterations=30)
    errors = chamfer(moved, pts.expand(len(moved), -1, -1))
    gaps = torch.cdist(pts, pts).fill_diagonal_(float("inf")).min(dim=1).values.mean()
    best = errors.argmin()
    return rot[best] if float(errors[best]) <= tolerance * float(gaps) else None


def structure_error(learned: torch.Tensor, truth: torch.Tensor, allow_mirror: bool = True) -> float:
    """Chamfer distance / diameter of the truth, after the best similarity alignment (mirror allowed)."""
    aligned = align_similarity(learned, truth, allow_mirror=allow_mirror)
    truth = truth.detach().double().cpu()
    return float(chamfer(aligned.double(), truth) / diameter(truth))


def _project_orthogonal(m: torch.Tensor, proper: bool) -> torch.Tensor:
    """The rotation (proper) or rotation-reflection (not proper) nearest to the 3×3 matrix m."""
    u, _, vh = torch.linalg.svd(m)
    d = torch.ones(3, dtype=m.dtype)
    d[2] = torch.sign(torch.linalg.det(u @ vh)) * (1.0 if proper else -1.0)
    return u @ torch.diag(d) @ vh


def aligned_rotation_errors(
    r_pred: torch.Tensor, r_true: torch.Tensor, symmetry: str, mirror_of_truth: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image rotation errors (degrees) of poses predicted against a *learned* structure.

    The learned structure sits in a frame of its own, possibly mirrored, so the predictions equal the truth
    only up to one global transform G: r_pred ≈ r_true·G, or r_pred ≈ M·r_true·G' with M the depth mirror
    and G' improper (the mirrored reconstruction). Both are fitted in closed form and the better one is kept.
    For an axially symmetric truth only the axis is defined: its direction in the learned frame is fitted.
    `mirror_of_truth` (self_mirror of the true structure): each image is also allowed the pose that gives
    the same picture (aligned_rotation_fit).
    """
    return aligned_rotation_fit(r_pred, r_true, symmetry, mirror_of_truth)[0]


def aligned_rotation_fit(
    r_pred: torch.Tensor, r_true: torch.Tensor, symmetry: str, mirror_of_truth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(errors in degrees, flipped) per image: see aligned_rotation_errors. Where the truth has a mirror Q,
    each image's true pose is R or its image-equivalent M·R·Q (flipped: True), whichever the global fit
    matches better; G is refitted to the chosen poses until the choice settles."""
    rp, rt = r_pred.detach().double().cpu(), r_true.detach().double().cpu()
    mirror = DEPTH_MIRROR.double()
    none = torch.zeros(len(rp), dtype=torch.bool)
    if symmetry == "axial":
        z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        targets = rt @ z  # true axes in the camera frame
        axis = None
        for _ in range(8):  # choose per image the axis or its depth mirror, refit the learned axis
            if axis is not None:
                a = rp @ axis
                use_mirror = (a * (targets @ mirror)).sum(-1).abs() > (a * targets).sum(-1).abs()
                targets = torch.where(use_mirror[:, None], (rt @ z) @ mirror, rt @ z)
            local = (rp.transpose(1, 2) @ targets[..., None])[..., 0]  # true axis in the learned frame
            axis = torch.linalg.eigh(local.T @ local).eigenvectors[:, -1]
        return axial_error_deg(rp, rt, pred_axis=axis).float(), none
    if symmetry != "none":
        raise ValueError(f"unknown symmetry {symmetry!r}")
    q = None if mirror_of_truth is None else mirror_of_truth.detach().double().cpu()
    best = None
    # The direct branch (G proper) and the mirrored reconstruction (M·R, G' improper); the flipped pose of
    # each is M·R·Q and R·Q.
    for base, proper in ((rt, True), (mirror @ rt, False)):
        alt = None if q is None else (mirror @ base) @ q
        flipped = none
        for _ in range(10):
            chosen = base if alt is None else torch.where(flipped[:, None, None], alt, base)
            g = _project_orthogonal((chosen.transpose(1, 2) @ rp).sum(0), proper=proper)
            errors = geodesic_angle_deg(rp, base @ g)
            if alt is None:
                break
            errors_alt = geodesic_angle_deg(rp, alt @ g)
            now = errors_alt < errors
            errors = torch.minimum(errors, errors_alt)
            if torch.equal(now, flipped):
                break
            flipped = now
        if best is None or errors.median() < best[0].median():
            best = (errors, flipped)
    return best[0].float(), best[1]
