"""Mergeable, area-weighted, per-channel statistics in float64.

Each shard contributes a partial (weight sum, mean, sum of squared deviations, min,
max) for the values and for the one-step differences; partials merge exactly with
Chan et al.'s parallel formula, so the result does not depend on how the time axis
was split into shards or in which order parts ran.
"""

from __future__ import annotations

import numpy as np

FIELDS = ("w", "mean", "m2", "min", "max", "dw", "dmean", "dm2")
N_FIELDS = len(FIELDS)


def empty(n_channels: int) -> np.ndarray:
    """The neutral partial: merging it changes nothing."""
    out = np.zeros((N_FIELDS, n_channels), dtype=np.float64)
    out[FIELDS.index("min")] = np.inf
    out[FIELDS.index("max")] = -np.inf
    return out


def _moments(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted (sum of weights, mean, M2) per channel of x with shape (n, C, Y, X)."""
    wsum = w.sum(axis=(0, 2, 3))
    safe = np.where(wsum > 0, wsum, 1.0)
    mean = (w * x).sum(axis=(0, 2, 3)) / safe
    m2 = (w * (x - mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))
    return wsum, np.where(wsum > 0, mean, 0.0), m2


def shard_partial(values: np.ndarray, valid: np.ndarray, lat_weights: np.ndarray,
                  in_values: np.ndarray, in_diffs: np.ndarray) -> np.ndarray:
    """Statistics of one shard's window.

    values, valid: (n, C, Y, X) float arrays of the window.
    in_values: boolean (n,), steps whose values count (train split, inside the shard).
    in_diffs: boolean (n,), steps i whose difference x[i] - x[i-1] counts.
    """
    x = values.astype(np.float64)
    n_channels = x.shape[1]
    out = empty(n_channels)
    w = valid.astype(np.float64) * lat_weights[None, None, :, None]
    if in_values.any():
        xs, ws = x[in_values], w[in_values]
        out[0], out[1], out[2] = _moments(xs, ws)
        counted = ws > 0
        out[3] = np.where(counted, xs, np.inf).min(axis=(0, 2, 3))
        out[4] = np.where(counted, xs, -np.inf).max(axis=(0, 2, 3))
    if in_diffs.any():
        idx = np.flatnonzero(in_diffs)
        d = x[idx] - x[idx - 1]
        dw = np.minimum(w[idx], w[idx - 1])
        out[5], out[6], out[7] = _moments(d, dw)
    return out


def _merge_moments(wa, ma, sa, wb, mb, sb):  # noqa: ANN001, ANN202 - arrays in, arrays out
    w = wa + wb
    safe = np.where(w > 0, w, 1.0)
    delta = mb - ma
    mean = np.where(w > 0, ma + delta * wb / safe, 0.0)
    m2 = sa + sb + delta**2 * wa * wb / safe
    return w, mean, m2


def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Combine two partials exactly (order-independent up to rounding)."""
    out = np.empty_like(a)
    out[0], out[1], out[2] = _merge_moments(a[0], a[1], a[2], b[0], b[1], b[2])
    out[3] = np.minimum(a[3], b[3])
    out[4] = np.maximum(a[4], b[4])
    out[5], out[6], out[7] = _merge_moments(a[5], a[6], a[7], b[5], b[6], b[7])
    return out


def merge_all(partials: np.ndarray) -> np.ndarray:
    """Merge a stack of partials (S, N_FIELDS, C) in index order (deterministic)."""
    total = empty(partials.shape[-1])
    for p in partials:
        total = merge(total, p)
    return total


def finalise(total: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, std, min, max, diff_mean, diff_std from a merged partial."""
    w, dw = total[0], total[5]
    if np.any(w <= 0):
        raise ValueError("statistics cover no train-split values for some channel")
    std = np.sqrt(total[2] / w)
    dstd = np.sqrt(np.where(dw > 0, total[7] / np.where(dw > 0, dw, 1.0), 0.0))
    return {"mean": total[1], "std": std, "min": total[3], "max": total[4],
            "diff_mean": total[6], "diff_std": dstd}
