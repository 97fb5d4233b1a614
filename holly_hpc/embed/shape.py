"""Shape embedding from contour distance matrices.

The pipeline, from a segmentation mask to an embedding and back to a contour:

1. mask -> the longest closed contour of the foreground (`largest_contour`, marching squares at level
   0.5 on a zero-padded copy, so objects touching the border still give closed contours);
2. contour -> N points equally spaced in arc length, counter-clockwise, starting at the contour's first
   point (`resample_contour`);
3. points -> the N x N Euclidean distance matrix (`distance_matrix`). It does not change under rotation,
   translation or reflection of the shape, so the model never has to learn those; dividing by the mean
   off-diagonal distance (`contour_distance_matrix`, `scale_normalised`) removes size as well;
4. matrix -> `DistanceMatrixAutoEncoder`: a ResNet autoencoder on the matrix as a one-channel image. Two
   things are left that a distance matrix does not fix: where the contour starts and which way it runs.
   Both re-index the matrix as P D P^T for a cyclic shift or reflection P (the dihedral group, 2N
   elements), so the reconstruction loss is the minimum MSE over those 2N re-indexings of the target
   (`invariant_mse`). A decoder output is not a distance matrix by construction: penalties push its
   diagonal to zero, make it symmetric and non-negative (`matrix_penalties`);
5. the latent vector is the embedding. Decoding it gives a matrix, and classical MDS (`classical_mds`)
   turns a distance matrix back into a contour, up to rotation, translation and reflection
   (`rigid_rmsd` measures the error modulo those).

`region_properties` gives classical shape descriptors (area, perimeter, axes, eccentricity, solidity)
to compare embeddings with.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage import measure

from .models import EmbeddingModel, latent_decoder, pooled_linear
from .resnet import ResNetEncoder

Array = np.ndarray | torch.Tensor

# ----------------------------------------------------------------------------------------------------
# Mask -> contour -> distance matrix


def largest_contour(mask: np.ndarray) -> np.ndarray:
    """The longest closed contour (by arc length) of the foreground (mask > 0), (M, 2) float (row, col).

    Marching squares at level 0.5 on a copy padded with one row/column of zeros, so an object touching
    the image border still has a closed contour (there it runs half a pixel outside the image, at -0.5 or
    size - 0.5). The closing point (equal to the first) is dropped: the polyline is implicitly closed.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    foreground = mask > 0
    if not foreground.any():
        raise ValueError("mask is empty: no foreground pixel (mask > 0) to take a contour of")
    padded = np.pad(foreground, 1).astype(np.float64)
    contours = measure.find_contours(padded, 0.5)
    lengths = [np.linalg.norm(np.diff(c, axis=0), axis=1).sum() for c in contours]
    contour = contours[int(np.argmax(lengths))] - 1.0  # undo the pad offset
    if len(contour) > 1 and np.array_equal(contour[0], contour[-1]):
        contour = contour[:-1]
    return contour


def signed_area(points: np.ndarray) -> float:
    """Shoelace area of the closed polygon (M, 2), taking (row, col) as (x, y). Positive means
    counter-clockwise as an image is displayed (rows downwards, columns rightwards)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def resample_contour(contour: np.ndarray, n: int) -> np.ndarray:
    """n points equally spaced in arc length along the closed polyline `contour` (M, 2) -> (n, 2).

    The first point is contour[0]; the direction is counter-clockwise (see `signed_area`), the input is
    reversed if it runs clockwise. A consistent direction means mirror-free shapes give matrices that
    differ only by the start index; the model's loss handles both anyway.
    """
    if n < 3:
        raise ValueError(f"need n >= 3 points, got {n}")
    points = np.asarray(contour, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"contour must be (M, 2), got shape {points.shape}")
    if signed_area(points) < 0:
        points = np.roll(points[::-1], 1, axis=0)  # reversed, still starting at contour[0]
    closed = np.concatenate([points, points[:1]])
    steps = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    keep = np.concatenate([[True], steps > 0])  # repeated points would give np.interp a flat abscissa
    closed, arc = closed[keep], np.concatenate([[0.0], np.cumsum(steps[steps > 0])])
    total = arc[-1]
    if total <= 0:
        raise ValueError("contour has zero length")
    targets = np.arange(n) * (total / n)
    return np.stack([np.interp(targets, arc, closed[:, 0]), np.interp(targets, arc, closed[:, 1])], axis=1)


def distance_matrix(points: Array) -> Array:
    """Euclidean distances between points: numpy (n, d) -> (n, n), torch (..., n, d) -> (..., n, n).

    The diagonal is exactly zero. For torch the square root is taken only where the squared distance is
    positive (the double-where trick): sqrt's gradient at 0 is infinite, and 0 x inf would fill every
    gradient with NaN.
    """
    if isinstance(points, torch.Tensor):
        squared = (points[..., :, None, :] - points[..., None, :, :]).pow(2).sum(-1)
        positive = squared > 0
        return torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)
    points = np.asarray(points, dtype=np.float64)
    return np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))


def scale_normalised(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """(matrix / scale, scale) with scale = the mean off-diagonal entry (the mean distance between
    points), so shapes of any size give matrices of mean 1."""
    n = matrix.shape[-1]
    scale = float(matrix.sum() / (n * (n - 1)))
    if scale <= 0:
        raise ValueError("all distances are zero: the scale is undefined")
    return matrix / scale, scale


def contour_distance_matrix(mask: np.ndarray, n: int, normalise_scale: bool = True) -> tuple[np.ndarray, float]:
    """Mask -> (distance matrix (n, n) float32 of the resampled largest contour, scale).

    scale is the mean off-diagonal distance when normalise_scale (the matrix is divided by it), else 1.0.
    """
    matrix = distance_matrix(resample_contour(largest_contour(mask), n))
    scale = 1.0
    if normalise_scale:
        matrix, scale = scale_normalised(matrix)
    return matrix.astype(np.float32), scale


# ----------------------------------------------------------------------------------------------------
# Invariance to the start index and direction


def cyclic_permutations(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(2n, n) index maps: row k < n is the shift i -> (i + k) mod n, row n + k the reflection
    i -> (k - i) mod n. Together they are the dihedral group of the n-cycle: every start and direction."""
    i = torch.arange(n, device=device)
    k = torch.arange(n, device=device)[:, None]
    return torch.cat([(i + k) % n, (k - i) % n])


def cyclic_variants(matrix: torch.Tensor) -> torch.Tensor:
    """(B, N, N) -> (B, 2N, N, N): P D P^T for every cyclic shift and reflection P (see
    `cyclic_permutations`), i.e. variant k is D[perm_k[i], perm_k[j]]. One gather for the whole batch.

    Memory grows as B x 2N^3; `invariant_mse` does not build this tensor.
    """
    perms = cyclic_permutations(matrix.shape[-1], matrix.device)
    return matrix[:, perms[:, :, None], perms[:, None, :]]


def best_variant(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) index k into `cyclic_variants` of the re-indexing of target closest to pred (least MSE).

    ||A - P T P^T||² = ||A||² + ||T||² - 2 <A, P T P^T>, and only the cross term depends on P. For the
    shifts it is a circular correlation along the diagonals: with A'[i, d] = A[i, i + d] and T' alike,
    <A, P_s T P_s^T> = Σ_i (A' T'^T)[i, i + s], one (N x N) matmul per image instead of 2N full
    comparisons. The reflections are the shifts of T[-i, -j]. Computed in float64 without gradient: it
    only chooses k, and the expansion loses precision to cancellation when pred is close to a variant.
    """
    n = pred.shape[-1]
    with torch.no_grad(), torch.autocast(device_type=pred.device.type, enabled=False):
        i = torch.arange(n, device=pred.device)
        diagonal_index = (i[:, None] + i[None, :]) % n  # [i, d] -> i + d
        negate = (-i) % n

        def along_diagonals(m: torch.Tensor) -> torch.Tensor:
            return m.gather(-1, diagonal_index.expand_as(m))

        a = along_diagonals(pred.detach().double())
        t = target.detach().double()
        reflected = t[:, negate[:, None], negate[None, :]]
        shifts = torch.cat([along_diagonals(t), along_diagonals(reflected)])  # (2B, N, N)
        products = a.repeat(2, 1, 1) @ shifts.transpose(-1, -2)
        cross = products.gather(-1, diagonal_index.expand_as(products)).sum(-2)  # [s] = Σ_i M[i, i + s]
        cross_shift, cross_reflected = cross.chunk(2)
        # Shift s of the reflected matrix is the reflection with k = -s: reorder to cyclic_permutations'.
        cross = torch.cat([cross_shift, cross_reflected[:, negate]], dim=1)
        return cross.argmax(dim=1)


def invariant_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, N, N), (B, N, N) -> (B,): the least mean squared error between pred and any cyclic shift or
    reflection P T P^T of target, i.e. the MSE to the contour read from the best start and direction.

    The best variant is chosen without gradient (`best_variant`), then its MSE is computed exactly, with
    gradients: the gradient of a minimum is that of the minimising term. Memory is O(B N²).
    """
    perms = cyclic_permutations(pred.shape[-1], pred.device)[best_variant(pred, target)]  # (B, N)
    batch = torch.arange(pred.shape[0], device=pred.device)[:, None, None]
    aligned = target[batch, perms[:, :, None], perms[:, None, :]]
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)  # bf16 -> f32
    return (pred.to(dtype) - aligned.to(dtype)).pow(2).mean(dim=(-2, -1))


def invariant_mse_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The oracle for `invariant_mse`: loops over images, start shifts and both directions with
    torch.roll and torch.flip."""
    n = pred.shape[-1]
    result = []
    for a, t in zip(pred, target, strict=True):
        errors = [
            (a - torch.roll(candidate, shifts=(s, s), dims=(0, 1))).pow(2).mean()
            for candidate in (t, t.flip(0, 1))
            for s in range(n)
        ]
        result.append(torch.stack(errors).min())
    return torch.stack(result)


def matrix_penalties(pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far (B, N, N) is from being a distance matrix, as mean squares: "diagonal" (d_ii = 0),
    "symmetry" (d_ij = d_ji), "nonnegative" (d_ij >= 0). All exactly 0 for a true distance matrix."""
    return {
        "diagonal": pred.diagonal(dim1=-2, dim2=-1).pow(2).mean(),
        "symmetry": (pred - pred.transpose(-1, -2)).pow(2).mean(),
        "nonnegative": torch.relu(-pred).pow(2).mean(),
    }


# ----------------------------------------------------------------------------------------------------
# Distance matrix -> points


def classical_mds(matrix: Array, dim: int = 2) -> Array:
    """Coordinates whose distances best match matrix: numpy (N, N) -> (N, dim); torch (N, N) or
    (B, N, N) -> (..., N, dim), same dtype (computed in float64).

    Torgerson's classical MDS: the matrix is symmetrised and its diagonal zeroed (a decoded matrix is
    only approximately a distance matrix), the squared distances double-centred into a Gram matrix
    G = -J D² J / 2, and the coordinates are the top `dim` eigenvectors scaled by sqrt(eigenvalue),
    negative eigenvalues (noise, or a non-Euclidean matrix) clamped to 0. Exact, up to rotation,
    translation and reflection, for the distance matrix of points in `dim` dimensions.
    """
    if isinstance(matrix, torch.Tensor):
        d = matrix.double()
        d = 0.5 * (d + d.transpose(-1, -2))
        d = d - torch.diag_embed(d.diagonal(dim1=-2, dim2=-1))
        squared = d.pow(2)
        gram = -0.5 * (
            squared
            - squared.mean(-1, keepdim=True)
            - squared.mean(-2, keepdim=True)
            + squared.mean((-2, -1), keepdim=True)
        )
        values, vectors = torch.linalg.eigh(gram)  # ascending
        values, vectors = values[..., -dim:].flip(-1), vectors[..., -dim:].flip(-1)
        return (vectors * values.clamp_min(0).sqrt()[..., None, :]).to(matrix.dtype)
    d = np.asarray(matrix, dtype=np.float64)
    d = 0.5 * (d + d.T)
    np.fill_diagonal(d, 0.0)
    squared = d**2
    gram = -0.5 * (squared - squared.mean(1, keepdims=True) - squared.mean(0, keepdims=True) + squared.mean())
    values, vectors = np.linalg.eigh(gram)
    values, vectors = values[::-1][:dim], vectors[:, ::-1][:, :dim]
    return vectors * np.sqrt(np.clip(values, 0, None))


def rigid_rmsd(a: np.ndarray, b: np.ndarray, allow_reflection: bool = True) -> float:
    """Root mean square distance between corresponding points of a and b (N, d) after the rotation
    (and reflection, if allowed) and translation of a that best fits b (Kabsch / orthogonal Procrustes)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, d) arrays of the same shape, got {a.shape} and {b.shape}")
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    if not allow_reflection and np.linalg.det(u @ vt) < 0:
        u[:, -1] = -u[:, -1]  # the best proper rotation gives up the smallest singular direction
    return float(np.sqrt(((a @ u @ vt - b) ** 2).sum(1).mean()))


# ----------------------------------------------------------------------------------------------------
# Classical shape descriptors

REGION_PROPERTIES = ("area", "perimeter", "major_axis_length", "minor_axis_length", "eccentricity", "solidity")

# skimage 0.26 renamed the axis lengths (the old names are deprecated); REGION_PROPERTIES keeps the
# familiar names and this maps them.
_SKIMAGE_NAMES = {"major_axis_length": "axis_major_length", "minor_axis_length": "axis_minor_length"}


def region_properties(mask: np.ndarray) -> np.ndarray:
    """REGION_PROPERTIES of the largest connected component (by area) of mask > 0, float64 in that order."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    regions = measure.regionprops(measure.label(mask > 0))
    if not regions:
        raise ValueError("mask is empty: no foreground pixel (mask > 0) to describe")
    region = max(regions, key=lambda r: r.area)
    return np.array([float(getattr(region, _SKIMAGE_NAMES.get(name, name))) for name in REGION_PROPERTIES])


# ----------------------------------------------------------------------------------------------------
# The model


class DistanceMatrixAutoEncoder(EmbeddingModel):
    """Autoencoder of contour distance matrices (B, 1, N, N); the latent vector is the shape embedding.

    ResNet encoder -> global average pool + linear -> latent -> decoder, as `AutoEncoder`, with a loss
    suited to distance matrices: the reconstruction term is `invariant_mse` (start index and direction
    of the contour do not matter) and `matrix_penalties`, weighted, pull the output towards a true
    distance matrix.
    """

    def __init__(
        self,
        points: int,
        latent_dim: int,
        depth: int = 18,
        width: int = 16,
        diagonal_weight: float = 1.0,
        symmetry_weight: float = 1.0,
        nonnegative_weight: float = 1.0,
    ):
        super().__init__()
        if min(diagonal_weight, symmetry_weight, nonnegative_weight) < 0:
            raise ValueError("penalty weights must be >= 0")
        self.in_channels, self.image_size, self.embedding_dim = 1, points, latent_dim
        self.weights = {
            "diagonal": float(diagonal_weight),
            "symmetry": float(symmetry_weight),
            "nonnegative": float(nonnegative_weight),
        }
        self.encoder = ResNetEncoder(depth, 1, width)
        self.to_latent = pooled_linear(self.encoder.out_channels, latent_dim)
        self.decoder = latent_decoder(latent_dim, 1, points, width)

    @property
    def loss_weights(self) -> dict[str, float]:
        return dict(self.weights)

    def forward(self, x: torch.Tensor) -> dict:
        self.check_input(x)
        features = self.encoder(x)
        z = self.to_latent(features)
        reconstruction = self.decoder(z)
        terms = {"recon": invariant_mse(reconstruction[:, 0], x[:, 0]).mean(), **matrix_penalties(reconstruction[:, 0])}
        return {
            "reconstruction": reconstruction,
            "embedding": z,
            "features": features.mean((2, 3)),
            "loss_terms": terms,
            "stats": {},
        }

    def loss(self, x: torch.Tensor, out: dict) -> torch.Tensor:
        # The base class's plain MSE would punish reading the same contour from another start.
        total = invariant_mse(out["reconstruction"][:, 0], x[:, 0]).mean()
        for name, weight in self.loss_weights.items():
            total = total + weight * out["loss_terms"][name]
        return total

    def decode_contours(self, embedding: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, latent_dim) -> contours (B, N, 2), up to rotation, translation and reflection,
        in the scale of the training matrices. Call in eval mode (BatchNorm) and under no_grad."""
        matrix = self.decoder(embedding)[:, 0]
        matrix = 0.5 * (matrix + matrix.transpose(-1, -2))
        matrix = (matrix - torch.diag_embed(matrix.diagonal(dim1=-2, dim2=-1))).clamp_min(0)
        return classical_mds(matrix, 2)
