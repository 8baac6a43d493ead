"""Models for gridded (lat x lon) fields, chosen by name: a U-Net and a Fourier neural
operator, plus the area-weighted loss.

Every model maps ``(batch, in_channels, lat, lon)`` to ``(batch, out_channels, lat,
lon)`` for any grid size. On global grids longitude wraps: convolutions pad it
circularly (and latitude by replication), so rolling the input in longitude rolls the
output; regional grids get ordinary zero padding. All padding goes through
:func:`pad_grid`.

Training is data-parallel and must resume bit-exactly, so the models use GroupNorm
(no batch statistics, no running buffers) and keep complex spectral weights as real
parameters with a trailing dimension of 2, which DDP, ``torch.save`` and
``torch.load(weights_only=True)`` handle everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Model
from pipeline.errors import ConfigError

Pad = tuple[int, int]


# --------------------------------------------------------------------------- padding


def pad_grid(x: torch.Tensor, lat: Pad, lon: Pad, periodic_lon: bool) -> torch.Tensor:
    """Pad the last two dims (lat, lon) by ``(before, after)`` each.

    Periodic grids wrap longitude circularly and replicate latitude (a pole has no
    neighbour beyond it); regional grids pad both with zeros.
    """
    if periodic_lon:
        if any(lon):
            x = F.pad(x, (*lon, 0, 0), mode="circular")
        if any(lat):
            x = F.pad(x, (0, 0, *lat), mode="replicate")
        return x
    return F.pad(x, (*lon, *lat)) if any(lat) or any(lon) else x


class GridPad(nn.Module):
    """:func:`pad_grid` as a layer, so that convolutions can be built without padding."""

    def __init__(self, lat: Pad, lon: Pad, periodic_lon: bool) -> None:
        super().__init__()
        self.lat, self.lon, self.periodic_lon = lat, lon, periodic_lon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_grid(x, self.lat, self.lon, self.periodic_lon)

    def extra_repr(self) -> str:
        return f"lat={self.lat}, lon={self.lon}, periodic_lon={self.periodic_lon}"


def _split(total: int) -> Pad:
    """``total`` padding split as evenly as possible into (before, after)."""
    return total // 2, total - total // 2


# --------------------------------------------------------------------------- U-Net


def conv_block(c_in: int, c_out: int, periodic_lon: bool) -> nn.Sequential:
    """(pad, 3x3 conv, GroupNorm, GELU) twice; the norm makes the conv bias redundant."""
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers += [GridPad((1, 1), (1, 1), periodic_lon),
                   nn.Conv2d(c, c_out, kernel_size=3, bias=False),
                   nn.GroupNorm(math.gcd(c_out, 8), c_out),
                   nn.GELU()]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net with ``depth`` levels of width ``width * 2**level`` and skip connections.

    The input is padded to a multiple of ``2**depth`` in both dims (circularly in
    longitude when periodic) and the output cropped back, so any grid size works.
    Downsampling is 2x2 average pooling, upsampling a stride-2 transposed convolution:
    both are exactly equivariant to shifts by multiples of ``2**depth``.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int, depth: int,
                 periodic_lon: bool) -> None:
        super().__init__()
        self.depth, self.periodic_lon = depth, periodic_lon
        widths = [width * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList([conv_block(in_channels, widths[0], periodic_lon)])
        self.encoder.extend(conv_block(widths[i], widths[i + 1], periodic_lon)
                            for i in range(depth))
        self.pool = nn.AvgPool2d(2)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                      for i in reversed(range(depth)))
        self.decoder = nn.ModuleList(conv_block(2 * widths[i], widths[i], periodic_lon)
                                     for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_lat, n_lon = x.shape[-2:]
        multiple = 2**self.depth
        lat, lon = _split(-n_lat % multiple), _split(-n_lon % multiple)
        x = pad_grid(x, lat, lon, self.periodic_lon)
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        skips.pop()  # the bottom level feeds the decoder directly
        for up, block in zip(self.upsample, self.decoder, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        x = self.head(x)
        return x[..., lat[0]:lat[0] + n_lat, lon[0]:lon[0] + n_lon]


# --------------------------------------------------------------------------- FNO


class SpectralConv(nn.Module):
    """Multiply the lowest Fourier modes by learned complex weights; drop the rest.

    ``rfft2`` keeps ``modes_lon`` non-negative longitude frequencies and ``modes_lat``
    frequencies of each sign in latitude; weights ``[0]`` act on the non-negative,
    ``[1]`` on the negative latitude frequencies. The FFT runs in float32 with autocast
    off (bf16 FFTs are unsupported or inaccurate). On a grid smaller than the one the
    layer was built for, only the modes that grid has are used.
    """

    def __init__(self, channels: int, modes_lat: int, modes_lon: int) -> None:
        super().__init__()
        self.modes_lat, self.modes_lon = modes_lat, modes_lon
        scale = 1.0 / (channels * channels)
        self.weight = nn.Parameter(
            scale * torch.rand(2, channels, channels, modes_lat, modes_lon, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_lat, n_lon = x.shape[-2:]
        m_lat = min(self.modes_lat, n_lat // 2)
        m_lon = min(self.modes_lon, n_lon // 2 + 1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_ft = torch.fft.rfft2(x.float())
            w = torch.view_as_complex(self.weight.float())[..., :m_lat, :m_lon]
            out = torch.zeros_like(x_ft)
            mix = "bixy,ioxy->boxy"
            out[..., :m_lat, :m_lon] = torch.einsum(mix, x_ft[..., :m_lat, :m_lon], w[0])
            out[..., -m_lat:, :m_lon] = torch.einsum(mix, x_ft[..., -m_lat:, :m_lon], w[1])
            return torch.fft.irfft2(out, s=(n_lat, n_lon))


class FourierLayer(nn.Module):
    """GELU(spectral conv + 1x1 conv): global mixing plus a local skip."""

    def __init__(self, channels: int, modes_lat: int, modes_lon: int) -> None:
        super().__init__()
        self.spectral = SpectralConv(channels, modes_lat, modes_lon)
        self.skip = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.spectral(x) + self.skip(x))


def fno_padding(n: int) -> int:
    """Points added after a non-periodic dim before the FFT: a quarter, rounded up.

    The FFT treats the domain as periodic; the padding keeps the two edges of a
    regional domain (or the two poles) from interacting through the wrap.
    """
    return (n + 3) // 4


class FNO(nn.Module):
    """Fourier neural operator: 1x1 lift, ``depth`` Fourier layers, 1x1 projection.

    Latitude is always padded before the Fourier layers and cropped after; longitude
    only on regional grids, since a global grid is already periodic in longitude (which
    also makes the model exactly equivariant to longitude shifts).
    """

    def __init__(self, in_channels: int, out_channels: int, width: int, depth: int,
                 modes: int, grid: tuple[int, int], periodic_lon: bool) -> None:
        super().__init__()
        self.periodic_lon = periodic_lon
        n_lat, n_lon = (n + pad for n, pad in zip(grid, self._padding(grid), strict=True))
        modes_lat, modes_lon = min(modes, n_lat // 2), min(modes, n_lon // 2 + 1)
        self.lift = nn.Conv2d(in_channels, width, kernel_size=1)
        self.layers = nn.Sequential(*(FourierLayer(width, modes_lat, modes_lon)
                                      for _ in range(depth)))
        self.project = nn.Sequential(nn.Conv2d(width, 2 * width, kernel_size=1), nn.GELU(),
                                     nn.Conv2d(2 * width, out_channels, kernel_size=1))

    def _padding(self, grid: tuple[int, int]) -> Pad:
        """(lat, lon) points padded after the grid before the FFT."""
        n_lat, n_lon = grid
        return fno_padding(n_lat), 0 if self.periodic_lon else fno_padding(n_lon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_lat, n_lon = x.shape[-2:]
        pad_lat, pad_lon = self._padding((n_lat, n_lon))
        x = pad_grid(self.lift(x), (0, pad_lat), (0, pad_lon), self.periodic_lon)
        x = self.layers(x)[..., :n_lat, :n_lon]
        return self.project(x)


# --------------------------------------------------------------------------- public API


def _build_unet(cfg: Model, in_channels: int, out_channels: int, grid: tuple[int, int],
                periodic_lon: bool) -> nn.Module:
    if min(grid) < 2**cfg.depth:
        raise ConfigError(f"grid {grid[0]} x {grid[1]} is too small for a U-Net of "
                          f"model.depth={cfg.depth}",
                          f"use model.depth <= {int(math.log2(min(grid)))}")
    return UNet(in_channels, out_channels, cfg.width, cfg.depth, periodic_lon)


def _build_fno(cfg: Model, in_channels: int, out_channels: int, grid: tuple[int, int],
               periodic_lon: bool) -> nn.Module:
    return FNO(in_channels, out_channels, cfg.width, cfg.depth, cfg.modes, grid, periodic_lon)


_BUILDERS: dict[str, Callable[[Model, int, int, tuple[int, int], bool], nn.Module]] = {
    "unet": _build_unet,
    "fno": _build_fno,
}


def build_model(cfg: Model, in_channels: int, out_channels: int, grid: tuple[int, int],
                periodic_lon: bool) -> nn.Module:
    """The model named by ``cfg.arch`` for ``grid`` = (lat, lon).

    Input ``(batch, in_channels, lat, lon)`` float tensor, output ``(batch,
    out_channels, lat, lon)``. ``periodic_lon`` is true for global grids, whose
    longitude wraps.
    """
    builder = _BUILDERS.get(cfg.arch)
    if builder is None:
        allowed = " or ".join(repr(name) for name in _BUILDERS)
        raise ConfigError(f"unknown model.arch {cfg.arch!r}", f"use {allowed}")
    n_lat, n_lon = grid
    return builder(cfg, in_channels, out_channels, (n_lat, n_lon), periodic_lon)


def area_weighted_mse(pred: torch.Tensor, target: torch.Tensor, lat_weights: torch.Tensor,
                      channel_weights: torch.Tensor | None = None,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over batch, channels and grid of ``lat_weights[lat] * (pred - target)**2``.

    ``pred`` and ``target`` are ``(..., channels, lat, lon)``; ``lat_weights`` (shape
    ``(lat,)``) is normalised to mean 1 by the caller, so that the loss is an area
    mean; ``channel_weights`` (shape ``(channels,)``) scales each channel's term. With
    ``valid`` (bool, shaped like ``pred``) the mean runs over the valid points only:
    a missing target carries no weight and does not dilute the others. The sum runs
    in float32 even under bf16 autocast.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if lat_weights.shape != pred.shape[-2:-1]:
        raise ValueError(f"lat_weights shape {tuple(lat_weights.shape)} does not match "
                         f"{pred.shape[-2]} latitudes")
    if valid is not None and valid.shape != pred.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} != pred shape {tuple(pred.shape)}")
    weights = lat_weights.float()[:, None]
    if channel_weights is not None:
        if channel_weights.shape != pred.shape[-3:-2]:
            raise ValueError(f"channel_weights shape {tuple(channel_weights.shape)} does "
                             f"not match {pred.shape[-3]} channels")
        weights = weights * channel_weights.float()[:, None, None]
    terms = weights * (pred.float() - target.float()) ** 2
    if valid is None:
        return terms.mean()
    area = torch.where(valid, lat_weights.float()[:, None], 0.0).sum()
    return torch.where(valid, terms, 0.0).sum() / area.clamp_min(torch.finfo(torch.float32).tiny)


def channel_mse(pred: torch.Tensor, target: torch.Tensor, lat_weights: torch.Tensor,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of ``(sample, channel, lat, lon)`` fields: the sum over samples of the
    area-weighted MSE of each sample (over its valid points, with ``valid``), and how
    many samples had a point to score (all of them without ``valid``)."""
    terms = (pred - target) ** 2 * lat_weights[:, None]
    if valid is None:
        return terms.mean(dim=(2, 3)).sum(dim=0), torch.full(pred.shape[1:2], pred.shape[0])
    area = torch.where(valid, lat_weights[:, None], 0.0).sum(dim=(2, 3))
    scored = area > 0
    per_sample = torch.where(valid, terms, 0.0).sum(dim=(2, 3)) / area.clamp_min(
        torch.finfo(area.dtype).tiny)
    return torch.where(scored, per_sample, 0.0).sum(dim=0), scored.sum(dim=0)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (a complex weight counts as two real numbers)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
