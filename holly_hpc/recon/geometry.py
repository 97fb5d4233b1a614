"""Rotations: the continuous 6D parameterisation, uniform sampling on SO(3), angular errors.

All functions are batched over a leading dimension and work on any device and float dtype.
"""

from __future__ import annotations

import math

import torch

# Orthographic projection along z cannot tell a structure from its mirror in depth (z -> -z).
DEPTH_MIRROR = torch.diag(torch.tensor([1.0, 1.0, -1.0]))


def rotation_from_6d(x: torch.Tensor) -> torch.Tensor:
    """Map (B, 6) to rotation matrices (B, 3, 3) by Gram-Schmidt (Zhou et al. 2019).

    The two 3-vectors become the first two columns; the third is their cross product. The map is
    continuous, unlike Euler angles or axis-angle, which is what lets a network regress it.
    """
    a1, a2 = x[..., 0:3], x[..., 3:6]
    b1 = torch.nn.functional.normalize(a1, dim=-1, eps=1e-8)
    a2_orth = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = torch.nn.functional.normalize(a2_orth, dim=-1, eps=1e-8)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (B, 4) as (w, x, y, z) to rotation matrices (B, 3, 3)."""
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        (
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ),
        dim=-1,
    ).reshape((*q.shape[:-1], 3, 3))


def random_rotations(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """n rotations uniform on SO(3) (Haar measure): normalised 4D Gaussians are uniform quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return quaternion_to_matrix(q).to(dtype)


def geodesic_angle_deg(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Angle (degrees) of the relative rotation r1^T r2, per batch element."""
    rel = r1.transpose(-1, -2) @ r2
    cos = (rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    # sin from the antisymmetric part; atan2 stays accurate near 0° and 180°, where arccos does not.
    skew = torch.stack(
        (rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]), -1
    )
    sin = skew.norm(dim=-1) / 2
    return torch.rad2deg(torch.atan2(sin, cos))


def axial_error_deg(
    r_pred: torch.Tensor, r_true: torch.Tensor, axis: torch.Tensor | None = None, pred_axis: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotation error for a structure with a continuous symmetry about `axis` (default z).

    Such a structure (a torus, a ring) looks the same after any spin about its axis, after flipping the
    axis (it is mirror symmetric through its equator) and, in an orthographic image, after mirroring the
    depth. So only the axis line matters, up to the depth mirror: the error is the smallest angle between
    the predicted axis line and the true axis line or its depth mirror. pred_axis: the symmetry axis in the
    predicted structure's own frame when it differs from `axis` (a learned structure).
    """
    if axis is None:
        axis = torch.tensor([0.0, 0.0, 1.0], dtype=r_pred.dtype, device=r_pred.device)
    a_pred = r_pred @ (axis if pred_axis is None else pred_axis)
    a_true = r_true @ axis
    mirrored = a_true @ DEPTH_MIRROR.to(device=a_true.device, dtype=a_true.dtype)
    return torch.minimum(_line_angle_deg(a_pred, a_true), _line_angle_deg(a_pred, mirrored))


def _line_angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in [0°, 90°] between the lines along vectors a and b (sign ignored)."""
    return torch.rad2deg(torch.atan2(torch.linalg.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1).abs()))


def rotation_error_deg(r_pred: torch.Tensor, r_true: torch.Tensor, symmetry: str) -> torch.Tensor:
    """Rotation error in degrees modulo the symmetries that leave the image unchanged.

    symmetry: "axial" for structures symmetric about their z axis (see axial_error_deg), "none" for an
    asymmetric structure, whose image fixes the rotation completely.
    """
    if symmetry == "axial":
        return axial_error_deg(r_pred, r_true)
    if symmetry == "none":
        return geodesic_angle_deg(r_pred, r_true)
    raise ValueError(f"unknown symmetry {symmetry!r}: expected 'axial' or 'none'")


def rotate_points(points: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate a point cloud (N, 3) or a batch of them (B, N, 3) by rotations (B, 3, 3) -> (B, N, 3)."""
    return points @ rotations.transpose(-1, -2)


def principal_axes(points: torch.Tensor) -> torch.Tensor:
    """(3, 3) rows: the unit principal axes of (N, 3) points, most spread first, signs fixed (each axis's
    largest-magnitude component positive, the last axis completing a right-handed frame) so that the same
    cloud always gives the same axes."""
    centred = points.detach().double() - points.detach().double().mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    axes = vectors.flip(1).T.clone()
    for i in range(2):
        if axes[i, axes[i].abs().argmax()] < 0:
            axes[i] = -axes[i]
    axes[2] = torch.linalg.cross(axes[0], axes[1])
    return axes.to(points.dtype)


def so3_grid(n: int, dtype=torch.float32) -> torch.Tensor:
    """n rotations spread evenly over SO(3), deterministic: the super-Fibonacci spiral of unit quaternions
    (Alexa, CVPR 2022), for coarse pose searches; spacing about (8π²/n)^(1/3) radians."""
    phi, psi = 2**0.5, 1.533751168755204288118041
    s = torch.arange(n, dtype=torch.float64) + 0.5
    r, big_r = (s / n).sqrt(), (1 - s / n).sqrt()
    alpha, beta = 2 * torch.pi * s / phi, 2 * torch.pi * s / psi
    q = torch.stack((r * alpha.sin(), r * alpha.cos(), big_r * beta.sin(), big_r * beta.cos()), dim=-1)
    return quaternion_to_matrix(q).to(dtype)


def in_plane(angles: torch.Tensor) -> torch.Tensor:
    """Rotations about the view axis z by `angles` (A,) radians -> (A, 3, 3)."""
    c, s = angles.cos(), angles.sin()
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack((c, -s, zero, s, c, zero, zero, zero, one), -1).reshape(-1, 3, 3)


def factored_so3_grid(n: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """About n rotations evenly over SO(3), as (views (V, 3, 3), in-plane angles (A,)): rotation a·V + v is
    in_plane(angles[a]) @ views[v]. A view's third row is its viewing direction in the structure's frame
    (a Fibonacci sphere of V directions); the spin about the view axis comes from the angles, so one
    projection per view serves every angle (the particles are turned instead: likelihood.spun_counts)."""
    spacing = (8 * math.pi**2 / n) ** (1 / 3)  # radians between neighbours in SO(3)
    a = max(4, round(2 * math.pi / spacing))
    v = max(2, math.ceil(n / a))
    i = torch.arange(v, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / v
    ring = (1 - z**2).clamp_min(0).sqrt()
    turn = math.pi * (3 - math.sqrt(5)) * i
    d = torch.stack((ring * turn.cos(), ring * turn.sin(), z), 1)  # viewing directions, unit
    helper = torch.where((d[:, 2].abs() < 0.9)[:, None], torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0, 0]))
    e1 = torch.nn.functional.normalize(torch.linalg.cross(helper.to(d), d), dim=1)
    e2 = torch.linalg.cross(d, e1)
    views = torch.stack((e1, e2, d), dim=1)  # rows: screen right, screen up, viewing direction (det +1)
    angles = 2 * math.pi * torch.arange(a, dtype=torch.float64) / a
    return views.to(dtype), angles.to(dtype)


def factored_rotations(views: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The rotations of a factored grid, in its order (angle major) -> (A·V, 3, 3)."""
    return (in_plane(angles)[:, None] @ views[None]).reshape(-1, 3, 3)
