"""Rotations: the 6D map, uniform sampling, and errors modulo the image's symmetries."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.recon.geometry import (
    DEPTH_MIRROR,
    geodesic_angle_deg,
    quaternion_to_matrix,
    random_rotations,
    rotation_error_deg,
    rotation_from_6d,
)

vec = st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), min_size=3, max_size=3)


def _rot_z(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _rot_x(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)


@settings(max_examples=200, deadline=None)
@given(a=vec, b=vec)
def test_6d_gives_proper_rotations(a, b):
    x = torch.tensor([a + b], dtype=torch.float64)
    a_t, b_t = x[0, :3], x[0, 3:]
    if a_t.norm() < 1e-3 or b_t.norm() < 1e-3 or torch.linalg.cross(a_t, b_t).norm() < 1e-3 * a_t.norm() * b_t.norm():
        return  # degenerate input: the two vectors span no plane
    r = rotation_from_6d(x)[0]
    assert torch.allclose(r.T @ r, torch.eye(3, dtype=torch.float64), atol=1e-9)
    assert math.isclose(torch.linalg.det(r).item(), 1.0, abs_tol=1e-9)
    # The first column is the first vector's direction.
    assert torch.allclose(r[:, 0], a_t / a_t.norm(), atol=1e-9)


def test_6d_of_a_rotation_recovers_it():
    r = random_rotations(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    six = torch.cat((r[:, :, 0], r[:, :, 1]), dim=-1)
    assert torch.allclose(rotation_from_6d(six), r, atol=1e-12)


def test_random_rotations_are_uniform():
    r = random_rotations(20000, torch.Generator().manual_seed(1), dtype=torch.float64)
    # Haar measure: E[R] = 0, and the rotation angle has density (1 - cos t)/pi, mean pi/2 + 2/pi.
    assert r.mean(dim=0).abs().max() < 0.02
    angles = torch.deg2rad(geodesic_angle_deg(torch.eye(3, dtype=torch.float64).expand_as(r), r))
    assert abs(angles.mean().item() - (math.pi / 2 + 2 / math.pi)) < 0.02


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31), spin=st.floats(0, 2 * math.pi), flip=st.booleans(), mirror=st.booleans())
def test_axial_error_ignores_spin_flip_and_depth_mirror(seed, spin, flip, mirror):
    r_true = random_rotations(1, torch.Generator().manual_seed(seed), dtype=torch.float64)
    # Same image: spin about the structure's own axis, flip that axis, mirror the depth.
    r = r_true @ _rot_z(spin)
    if flip:
        r = r @ _rot_x(math.pi)
    if mirror:
        # z -> -z in the camera frame, composed with the structure's own mirror plane to stay a rotation.
        r = DEPTH_MIRROR.double() @ r @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    assert math.isclose(torch.linalg.det(r[0]).item(), 1.0, abs_tol=1e-9)
    assert rotation_error_deg(r, r_true, "axial").item() < 1e-3


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31), tilt=st.floats(0.0, 80.0))
def test_axial_error_measures_axis_tilt(seed, tilt):
    r_true = random_rotations(1, torch.Generator().manual_seed(seed), dtype=torch.float64)
    # Tilt the axis by `tilt` degrees about an axis in the camera plane, perpendicular to the projected axis.
    axis = r_true[0] @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    # Work in the frame where the error is the plain angle between axis lines (or their mirror images):
    r = r_true @ _rot_x(math.radians(tilt))
    err = rotation_error_deg(r, r_true, "axial").item()
    assert err <= tilt + 1e-6  # the mirror can only make the error smaller
    assert math.isclose(rotation_error_deg(r, r_true, "none").item(), tilt, abs_tol=1e-6)
    if abs(axis[2].item()) > 0.999:  # axis along the view: the mirror maps it onto itself
        assert math.isclose(err, tilt, abs_tol=1e-4)


def test_geodesic_angle_of_known_rotations():
    assert math.isclose(
        geodesic_angle_deg(_rot_z(0.0)[None], _rot_z(math.radians(30))[None]).item(), 30.0, abs_tol=1e-6
    )
    q = torch.tensor([[math.cos(math.pi / 4), math.sin(math.pi / 4), 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(quaternion_to_matrix(q)[0], _rot_x(math.pi / 2), atol=1e-12)
