"""Summaries of pose-fit quality."""

from __future__ import annotations

import torch


def rotation_error_summary(errors_deg: torch.Tensor) -> dict[str, float]:
    """Median, mean and 90th percentile of per-image rotation errors (degrees), and the share under 10°."""
    e = errors_deg.detach().double().cpu()
    return {
        "rot_err_median_deg": float(torch.quantile(e, 0.5)),  # interpolated, as numpy.median
        "rot_err_mean_deg": float(e.mean()),
        "rot_err_p90_deg": float(torch.quantile(e, 0.9)),
        "rot_within_10deg": float((e < 10).double().mean()),
    }
