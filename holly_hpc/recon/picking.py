"""Particle picking: a field of view's localisations clustered into particles, as users of Picasso or SMAP
pick them by hand or by density.

DBSCAN (or HDBSCAN) on x, y groups localisations closer than `eps_nm` into clusters; each cluster is then
measured (centre, localisation count, diameter: that of the circle about its centroid holding 90% of its
localisations) and kept only when its count and diameter are those of one particle, and when the field's
edge does not cut it (no localisation within `edge_nm` of the field's bounding box). Background
localisations fall out as DBSCAN's noise.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A cluster's diameter: that of the circle about its centroid holding this fraction of its localisations.
DIAMETER_QUANTILE = 0.9


@dataclass(frozen=True)
class PickingOptions:
    """data.localisations.picking: defaults suit ~100 nm structures (an NPC is 107 nm across) with
    localisation precisions of 3-15 nm and particles a few hundred nm apart."""

    method: str = "dbscan"
    eps_nm: float = 50.0
    min_samples: int = 5
    min_localisations: int = 15
    max_localisations: int | None = None
    min_diameter_nm: float = 30.0
    max_diameter_nm: float = 180.0
    edge_nm: float = 50.0
    merge_nm: float = 100.0

    @classmethod
    def from_spec(cls, picking: dict | None) -> PickingOptions:
        given = {k: v for k, v in (picking or {}).items() if v is not None}
        return cls(**given)


@dataclass(frozen=True)
class Cluster:
    """One cluster found: its id (the particle id when kept), centre, count, diameter; why it was dropped."""

    particle: int
    x_nm: float
    y_nm: float
    localisations: int
    diameter_nm: float
    kept: bool
    reason: str  # "" when kept; "few localisations", "many localisations", "small", "large", "edge"


@dataclass
class Picked:
    """labels (n,): the particle id of each localisation, -1 for noise and for dropped clusters."""

    labels: np.ndarray
    clusters: list[Cluster]
    field_nm: tuple[float, float, float, float]  # x0, y0, x1, y1 of the field's bounding box

    @property
    def kept(self) -> list[Cluster]:
        return [c for c in self.clusters if c.kept]

    def dropped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.clusters:
            if not c.kept:
                counts[c.reason] = counts.get(c.reason, 0) + 1
        return counts


def cluster_labels(xy: np.ndarray, options: PickingOptions) -> np.ndarray:
    """Cluster ids (n,) from scikit-learn, -1 for noise."""
    if options.method == "dbscan":
        from sklearn.cluster import DBSCAN

        return DBSCAN(eps=options.eps_nm, min_samples=options.min_samples).fit_predict(xy)
    if options.method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        # HDBSCAN finds clusters across densities, and so also the dense corners within one particle; they
        # are merged back below. (Its own cluster_selection_epsilon would do it, but raises a TypeError with
        # NumPy 2: scikit-learn issue #33219.)
        labels = HDBSCAN(
            min_cluster_size=options.min_localisations, min_samples=options.min_samples, copy=True
        ).fit_predict(xy)
        return _absorb_border_points(xy, labels, options.eps_nm)
    raise ValueError(f"unknown picking method {options.method!r}; expected dbscan or hdbscan")


def diameter_nm(xy: np.ndarray) -> float:
    """The diameter of the circle about the centroid of (n, 2) points that holds DIAMETER_QUANTILE of them."""
    return 2 * float(np.quantile(np.linalg.norm(xy - xy.mean(axis=0), axis=1), DIAMETER_QUANTILE))


def _absorb_border_points(xy: np.ndarray, labels: np.ndarray, eps_nm: float) -> np.ndarray:
    """HDBSCAN calls a particle's sparse outer localisations noise, which pulls its centre towards its dense
    side; as DBSCAN does with border points, give each noise point within eps_nm of a cluster to that cluster."""
    noise = labels < 0
    if not noise.any() or noise.all():
        return labels
    from scipy.spatial import cKDTree

    distance, nearest = cKDTree(xy[~noise]).query(xy[noise], distance_upper_bound=eps_nm)
    hit = np.isfinite(distance)
    labels = labels.copy()
    labels[np.flatnonzero(noise)[hit]] = labels[~noise][nearest[hit]]
    return labels


def merge_close_clusters(xy: np.ndarray, found: np.ndarray, merge_nm: float) -> np.ndarray:
    """Clusters whose centres are closer than merge_nm made one: the pieces of a particle that a gap in its
    labelling split (two halves of a ring are ~0.6 diameters apart; two particles never closer than one)."""
    ids = np.unique(found[found >= 0])
    if len(ids) < 2 or merge_nm <= 0:
        return found
    centres = np.array([xy[found == i].mean(axis=0) for i in ids])
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pairs = cKDTree(centres).query_pairs(merge_nm, output_type="ndarray")
    if not len(pairs):
        return found
    from scipy.sparse import coo_matrix

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(ids), len(ids)))
    _, component = connected_components(graph, directed=False)
    lookup = np.full(found.max() + 1, -1)
    lookup[ids] = ids[np.unique(component, return_index=True)[1]][component]  # each group takes its first id
    merged = found.copy()
    merged[found >= 0] = lookup[found[found >= 0]]
    return merged


def pick_particles(xy: np.ndarray, options: PickingOptions) -> Picked:
    """Cluster `xy` (n, 2) in nm and keep the clusters that look like one whole particle."""
    xy = np.asarray(xy, dtype=np.float64)
    found = merge_close_clusters(xy, cluster_labels(xy, options), options.merge_nm)
    x0, y0 = xy.min(axis=0)
    x1, y1 = xy.max(axis=0)
    labels = np.full(len(xy), -1, dtype=np.int64)
    clusters = []
    members_of = _members(found)
    for index, members in enumerate(members_of):
        points = xy[members]
        centre = points.mean(axis=0)
        diameter = diameter_nm(points)
        edge = min(points[:, 0].min() - x0, x1 - points[:, 0].max(), points[:, 1].min() - y0, y1 - points[:, 1].max())
        reason = _reason(len(points), diameter, edge, options)
        clusters.append(Cluster(index, float(centre[0]), float(centre[1]), len(points), diameter, not reason, reason))
        if not reason:
            labels[members] = index
    return Picked(labels, clusters, (float(x0), float(y0), float(x1), float(y1)))


def _members(found: np.ndarray) -> list[np.ndarray]:
    """The indices of each cluster, clusters numbered in order of their first localisation (stable ids)."""
    ids = [i for i in dict.fromkeys(found.tolist()) if i >= 0]
    return [np.flatnonzero(found == i) for i in ids]


def _reason(count: int, diameter: float, edge: float, o: PickingOptions) -> str:
    if count < o.min_localisations:
        return "few localisations"
    if o.max_localisations is not None and count > o.max_localisations:
        return "many localisations"
    if diameter < o.min_diameter_nm:
        return "small"
    if diameter > o.max_diameter_nm:
        return "large"
    if edge < o.edge_nm:
        return "edge"
    return ""


def write_picked_csv(path: Path, picked: Picked, sources: list[str] | str = "") -> Path:
    """picked.csv: one row per cluster found (particle, centre, count, diameter, kept, reason, file)."""
    sources = [sources] * len(picked.clusters) if isinstance(sources, str) else sources
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["particle", "x [nm]", "y [nm]", "localisations", "diameter [nm]", "kept", "reason", "file"])
        for c, source in zip(picked.clusters, sources, strict=True):
            writer.writerow(
                [
                    c.particle,
                    f"{c.x_nm:.2f}",
                    f"{c.y_nm:.2f}",
                    c.localisations,
                    f"{c.diameter_nm:.2f}",
                    int(c.kept),
                    c.reason,
                    source,
                ]
            )
    tmp.replace(path)
    return path


def picked_picture(xy: np.ndarray, picked: Picked, max_side: int = 1024):
    """The field of view as a localisation density (PIL image), kept particles circled in green, dropped
    clusters in orange, with a scale bar."""
    from PIL import Image, ImageDraw

    from ..runtime.captions import nice_length

    x0, y0, x1, y1 = picked.field_nm
    nm_per_px = max(x1 - x0, y1 - y0, 1.0) / (max_side - 1)
    w, h = int((x1 - x0) / nm_per_px) + 1, int((y1 - y0) / nm_per_px) + 1
    density, _, _ = np.histogram2d(
        (xy[:, 1] - y0) / nm_per_px, (xy[:, 0] - x0) / nm_per_px, bins=(h, w), range=((0, h), (0, w))
    )
    shade = 255 - (np.clip(density / max(np.quantile(density[density > 0], 0.99), 1), 0, 1) * 255).astype(np.uint8)
    picture = Image.fromarray(shade).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for c in picked.clusters:
        cx, cy, r = (c.x_nm - x0) / nm_per_px, (c.y_nm - y0) / nm_per_px, max(c.diameter_nm / 2 / nm_per_px, 3)
        colour = (0, 170, 0) if c.kept else (230, 120, 0)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=2)
        if c.kept:
            draw.text((cx + r + 2, cy - 6), str(c.particle), fill=colour)
    length = nice_length((x1 - x0) / 5)
    bar = length / nm_per_px
    draw.rectangle((10, h - 14, 10 + bar, h - 10), fill=(0, 0, 0))
    draw.text((14 + bar, h - 22), f"{length:g} nm", fill=(0, 0, 0))
    draw.text(
        (10, 4),
        f"kept {len(picked.kept)} of {len(picked.clusters)} clusters (green kept, orange dropped)",
        fill=(0, 0, 0),
    )
    return picture
