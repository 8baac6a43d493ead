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
# Moments from shifted sums, m2 = s2 - s1^2 / w, lose about log10(s2 / m2) of float64's
# 16 digits to cancellation. Where they would lose more than 5, the channel's moments
# are recomputed from exactly centred values instead (twice the work, rarely needed).
CANCELLATION = 1e-5


def empty(n_channels: int) -> np.ndarray:
    """The neutral partial: merging it changes nothing."""
    out = np.zeros((N_FIELDS, n_channels), dtype=np.float64)
    out[FIELDS.index("min")] = np.inf
    out[FIELDS.index("max")] = -np.inf
    return out


def _moments(x: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """Weighted (sum of weights, mean, M2) of one channel's values, float64."""
    wsum = float(w.sum())
    if wsum <= 0:
        return 0.0, 0.0, 0.0
    mean = float((w * x).sum() / wsum)
    return wsum, mean, float((w * (x - mean) ** 2).sum())


def _row_moments(x64: np.ndarray, lat_w: np.ndarray) -> tuple[float, float, float]:
    """Like :func:`_moments` for weights that vary by latitude only (no masks), by
    exact centring: ``x64`` is a float64 array of the caller's that this overwrites
    with the deviations. The fallback of :func:`_unmasked_partial`."""
    n_rows = x64.shape[0] * x64.shape[2]
    wsum = float(lat_w.sum()) * n_rows
    mean = float(lat_w @ x64.sum(axis=(0, 2))) / wsum
    x64 -= mean
    return wsum, mean, float(lat_w @ np.einsum("tyx,tyx->y", x64, x64))


def _row_sums(x: np.ndarray, shift: float, lat_w: np.ndarray,
              scratch: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Latitude-weighted sums per step of ``v = x - shift`` in float64 (x: (n, Y, X)):
    of v, of v squared, and of v times the step before (0 for the first step).

    One step at a time through two float64 (Y, X) buffers that stay in the CPU's
    cache: half the time of passes over the whole window. Shifting float32 values by
    one of them is exact, and products of float32 values are exact in float64.
    """
    n = x.shape[0]
    rows = np.empty((3, n, x.shape[1]))
    rows[2, 0] = 0.0
    for t in range(n):
        now, before = scratch[t % 2], scratch[(t + 1) % 2]
        np.subtract(x[t], shift, out=now, dtype=np.float64)
        np.einsum("yx->y", now, out=rows[0, t])
        np.einsum("yx,yx->y", now, now, out=rows[1, t])
        if t:
            np.einsum("yx,yx->y", now, before, out=rows[2, t])
    return tuple(rows @ lat_w)


def _shifted_moments(wsum: float, s1: float, s2: float, scale: float) -> tuple[float, float] | None:
    """(mean, m2) relative to the shift from the weighted sums s1 and s2 of shifted
    values; None where the subtraction would cancel more than :data:`CANCELLATION`
    allows (``scale``: the size of the terms that s2 was made of)."""
    mean = s1 / wsum
    m2 = s2 - s1 * mean
    if m2 <= CANCELLATION * scale:
        return None
    return mean, m2


def _unmasked_partial(x: np.ndarray, lat_w: np.ndarray, steps: np.ndarray,
                      diff_steps: np.ndarray, scratch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One channel's column of a partial (see :func:`shard_partial`) where every value
    counts: from per-step sums, so that values and differences share one float64 pass
    (the statistics are a third of a shard's work when every step is in the train
    split); exact centring for a channel where shifted sums would cancel."""
    col = empty(1)[:, 0]
    shift = float(x.flat[x[0].size // 2])  # any value of the channel: near its others
    sums, squares, products = _row_sums(x, shift, lat_w, scratch)
    per_step = float(lat_w.sum()) * x.shape[2]
    if steps.size:
        wsum, s2 = per_step * steps.size, squares[steps].sum()
        moments = _shifted_moments(wsum, sums[steps].sum(), s2, s2)
        if moments is None:
            col[0], col[1], col[2] = _row_moments(x[steps].astype(np.float64), lat_w)
        else:
            col[0], col[1], col[2] = wsum, shift + moments[0], moments[1]
        xs = x[_selector(steps)]
        col[3], col[4] = xs.min(), xs.max()
    if diff_steps.size:
        # sum over steps i of (v_i - v_{i-1})^2 = v_i^2 + v_{i-1}^2 - 2 v_i v_{i-1}
        parts = squares[diff_steps].sum() + squares[diff_steps - 1].sum()
        s1 = sums[diff_steps].sum() - sums[diff_steps - 1].sum()
        wsum = per_step * diff_steps.size
        moments = _shifted_moments(wsum, s1, parts - 2.0 * products[diff_steps].sum(), parts)
        if moments is None:
            d = x[diff_steps].astype(np.float64)
            d -= x[diff_steps - 1]
            col[5], col[6], col[7] = _row_moments(d, lat_w)
        else:
            col[5], col[6], col[7] = wsum, moments[0], moments[1]
    return col


def _selector(steps: np.ndarray) -> slice | np.ndarray:
    """A slice (a view, no copy) when the steps are consecutive, else the index array."""
    if steps.size and steps[-1] - steps[0] == steps.size - 1:
        return slice(int(steps[0]), int(steps[-1]) + 1)
    return steps


def shard_partial(values: np.ndarray, valid: np.ndarray | None, lat_weights: np.ndarray,
                  in_values: np.ndarray, in_diffs: np.ndarray) -> np.ndarray:
    """Statistics of one shard's window.

    values, valid: (n, C, Y, X) float arrays of the window (valid: 1 where a value
        counts, 0 where it was filled, fractions after coarsening; None: all count).
    in_values: boolean (n,), steps whose values count (train split, inside the shard).
    in_diffs: boolean (n,), steps i whose difference x[i] - x[i-1] counts.
    Works channel by channel so that temporaries stay one channel in size.
    """
    out = empty(values.shape[1])
    lat_w = lat_weights.astype(np.float64)
    steps = np.flatnonzero(in_values)
    diff_steps = np.flatnonzero(in_diffs)
    if valid is None:
        if steps.size or diff_steps.size:
            scratch = (np.empty(values.shape[2:]), np.empty(values.shape[2:]))
            for c in range(values.shape[1]):
                out[:, c] = _unmasked_partial(values[:, c], lat_w, steps, diff_steps, scratch)
        return out
    for c in range(values.shape[1]):
        x = values[:, c]
        w = valid[:, c].astype(np.float64) * lat_w[None, :, None]
        if steps.size:
            xs, ws = x[steps].astype(np.float64), w[steps]
            out[0, c], out[1, c], out[2, c] = _moments(xs, ws)
            counted = ws > 0
            if counted.any():
                out[3, c], out[4, c] = xs[counted].min(), xs[counted].max()
        if diff_steps.size:
            d = x[diff_steps].astype(np.float64) - x[diff_steps - 1]
            dw = np.minimum(w[diff_steps], w[diff_steps - 1])
            out[5, c], out[6, c], out[7, c] = _moments(d, dw)
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
