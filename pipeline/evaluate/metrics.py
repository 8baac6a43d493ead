"""Latitude-weighted verification metrics with the conventions of WeatherBench 2.

- Area weights: each latitude row weighs by the difference of the sines of its cell
  bounds (:func:`pipeline.data.grid.area_weights`, normalised to mean 1; the store
  keeps them as ``area_weight``). Poles and non-uniform grids are handled there.
- RMSE: the weighted spatial mean of the squared error per sample, averaged over the
  samples (init times), then the square root (WB2's ``MSE`` then ``sqrt``).
- ACC: per sample, the uncentred correlation of forecast and truth anomalies against
  the climatology at the valid time, ``<w f'o'> / sqrt(<w f'^2> <w o'^2>)``; averaged
  over the samples (WB2's ``ACC``).
- Skill scores: ``1 - MSE / MSE_reference`` (1 is perfect, 0 no better than the
  reference, negative worse).

- Masks: points where the truth is missing (``valid`` False) carry no weight; the
  spatial means run over the valid points, and a sample without any is left out.

Everything is accumulated as mergeable partial sums in float64 (:class:`ScoreSums`),
one chunk of samples at a time, so the evaluation of a long split runs in bounded
memory and gives the same numbers however it is chunked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def normalised_weights(lat_weights: np.ndarray, n_lon: int) -> np.ndarray:
    """Weights of a ``(lat, lon)`` grid that sum to 1: ``w[lat] / (sum(w) * n_lon)``."""
    w = np.asarray(lat_weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"latitude weights must be a non-empty, non-negative 1-d array: {w}")
    return np.broadcast_to((w / (w.sum() * n_lon))[:, None], (w.size, n_lon))


def spatial_mean(x: np.ndarray, lat_weights: np.ndarray,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Area-weighted mean over the last two axes ``(lat, lon)``, in float64; with ``valid``
    (bool, broadcastable to ``x``) the mean over the valid points only (NaN where a
    field has none), whatever ``x`` holds at the others."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-2] != np.size(lat_weights):
        raise ValueError(f"{np.size(lat_weights)} latitude weights for a grid of shape {x.shape[-2:]}")
    w = normalised_weights(lat_weights, x.shape[-1])
    if valid is None:
        return np.einsum("...ij,ij->...", x, w)
    w = np.where(valid, w, 0.0)
    area = np.broadcast_to(w, np.broadcast_shapes(w.shape, x.shape)).sum(axis=(-2, -1))
    total = (np.where(valid, x, 0.0) * w).sum(axis=(-2, -1))
    return np.where(area > 0, total / np.where(area > 0, area, 1.0), np.nan)


def mse_per_sample(forecast: np.ndarray, truth: np.ndarray, lat_weights: np.ndarray,
                   valid: np.ndarray | None = None) -> np.ndarray:
    """Weighted spatial mean of the squared error, for every leading index (over the
    ``valid`` points only, if given)."""
    err = np.asarray(forecast, np.float64) - np.asarray(truth, np.float64)
    return spatial_mean(err * err, lat_weights, valid)


def acc_per_sample(forecast: np.ndarray, truth: np.ndarray, climatology: np.ndarray,
                   lat_weights: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Anomaly correlation for every leading index (NaN where an anomaly is all zero, or
    no point is ``valid``)."""
    clim = np.asarray(climatology, np.float64)
    f = np.asarray(forecast, np.float64) - clim
    o = np.asarray(truth, np.float64) - clim
    num = spatial_mean(f * o, lat_weights, valid)
    den = np.sqrt(spatial_mean(f * f, lat_weights, valid) * spatial_mean(o * o, lat_weights, valid))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def rmse(forecast: np.ndarray, truth: np.ndarray, lat_weights: np.ndarray) -> np.ndarray:
    """RMSE over samples on axis 0: ``sqrt(mean_samples(weighted spatial MSE))``."""
    return np.sqrt(mse_per_sample(forecast, truth, lat_weights).mean(axis=0))


def acc(forecast: np.ndarray, truth: np.ndarray, climatology: np.ndarray,
        lat_weights: np.ndarray) -> np.ndarray:
    """ACC over samples on axis 0: the mean of the per-sample anomaly correlations."""
    return acc_per_sample(forecast, truth, climatology, lat_weights).mean(axis=0)


def skill_score(mse: np.ndarray, mse_reference: np.ndarray) -> np.ndarray:
    """``1 - mse / mse_reference``; NaN where the reference is perfect."""
    mse, ref = np.asarray(mse, np.float64), np.asarray(mse_reference, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 0, 1.0 - mse / np.where(ref > 0, ref, 1.0), np.nan)


@dataclass
class ScoreSums:
    """Partial sums of one forecast's scores over samples, for any trailing shape
    (e.g. ``(lead, channel)``). Sums of chunks merge with ``+``. With masks, a sample
    counts only where it has valid points (``scored``), and its scores are over those."""

    count: int  # samples
    sq_error: np.ndarray  # sum over the scored samples of the weighted spatial MSE
    acc: np.ndarray  # sum over the scored samples of the anomaly correlation
    scored: np.ndarray  # samples with a valid point, per entry (all of them without masks)

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> ScoreSums:
        return cls(0, np.zeros(shape), np.zeros(shape), np.zeros(shape))

    @classmethod
    def of_chunk(cls, forecast: np.ndarray, truth: np.ndarray, climatology: np.ndarray,
                 lat_weights: np.ndarray, valid: np.ndarray | None = None) -> ScoreSums:
        """Sums over the samples on axis 0 of ``(sample, ..., lat, lon)`` arrays; ``valid``
        (bool, the same shape): the points to score, the others carry no weight."""
        n = int(np.shape(truth)[0])
        mse = mse_per_sample(forecast, truth, lat_weights, valid)
        acc = acc_per_sample(forecast, truth, climatology, lat_weights, valid)
        if valid is None:
            return cls(n, mse.sum(axis=0), acc.sum(axis=0), np.full(mse.shape[1:], float(n)))
        has = np.asarray(valid).any(axis=(-2, -1))
        return cls(n, np.where(has, mse, 0.0).sum(axis=0), np.where(has, acc, 0.0).sum(axis=0),
                   has.sum(axis=0).astype(np.float64))

    def __add__(self, other: ScoreSums) -> ScoreSums:
        return ScoreSums(self.count + other.count, self.sq_error + other.sq_error,
                         self.acc + other.acc, self.scored + other.scored)

    def _mean(self, total: np.ndarray) -> np.ndarray:
        """``total`` over the scored samples; NaN where none was scored."""
        return np.where(self.scored > 0, total / np.maximum(self.scored, 1.0), np.nan)

    def mse(self) -> np.ndarray:
        return self._mean(self.sq_error)

    def rmse(self) -> np.ndarray:
        return np.sqrt(self.mse())

    def mean_acc(self) -> np.ndarray:
        return self._mean(self.acc)
