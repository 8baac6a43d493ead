"""Unit tests of the models and the loss: shapes on odd grids, the longitude wrap,
determinism, autocast, serialisation and a tiny overfit."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch

from pipeline.config import Model
from pipeline.errors import ConfigError
from pipeline.train.models import area_weighted_mse, build_model, count_parameters

pytestmark = pytest.mark.unit
ARCHS = ["unet", "fno"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: the test machine's cores are shared, and sums stay in one order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(arch: str, grid: tuple[int, int], periodic: bool, seed: int = 0,
         in_channels: int = 3, out_channels: int = 2, **sizes: int) -> torch.nn.Module:
    """A small model of ``arch`` built under a fixed seed."""
    torch.manual_seed(seed)
    cfg = Model(arch=arch, **{"width": 8, **sizes})
    return build_model(cfg, in_channels, out_channels, grid, periodic)


def batch(grid: tuple[int, int], n: int = 2, channels: int = 3, seed: int = 1) -> torch.Tensor:
    """A random input batch, reproducible from ``seed``."""
    return torch.randn(n, channels, *grid, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("grid, periodic", [((17, 32), True), ((33, 36), False),
                                            ((8, 16), True), ((8, 16), False)])
def test_output_shape_on_any_grid(arch: str, grid: tuple[int, int], periodic: bool) -> None:
    model = make(arch, grid, periodic)
    out = model(batch(grid))
    assert out.shape == (2, 2, *grid)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("arch, shift", [("unet", 4), ("fno", 3)])
def test_periodic_model_is_equivariant_to_longitude_shifts(arch: str, shift: int) -> None:
    # U-Net (depth 2) pools by 4, so only shifts by multiples of 4 commute with it; the
    # FNO does not pad a periodic longitude, so any shift does.
    grid = (17, 32)
    x = batch(grid)
    model = make(arch, grid, periodic=True)
    with torch.no_grad():
        rolled_out = model(x.roll(shift, dims=-1))
        out_rolled = model(x).roll(shift, dims=-1)
    torch.testing.assert_close(rolled_out, out_rolled, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch, shift", [("unet", 4), ("fno", 3)])
def test_regional_model_is_not_equivariant_at_the_edges(arch: str, shift: int) -> None:
    grid = (17, 32)
    x = batch(grid)
    model = make(arch, grid, periodic=False)
    with torch.no_grad():
        diff = (model(x.roll(shift, dims=-1)) - model(x).roll(shift, dims=-1)).abs()
    # Float noise is below 1e-5 (see the periodic test); the edge effect is far above it.
    assert diff[..., :shift + 1].max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_model_and_output(arch: str) -> None:
    grid = (17, 32)
    a, b = make(arch, grid, True, seed=3), make(arch, grid, True, seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    x = batch(grid)
    assert torch.equal(a(x), b(x))
    c = make(arch, grid, True, seed=4)
    assert not torch.equal(a(x), c(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_gets_a_gradient(arch: str) -> None:
    # DistributedDataParallel hangs or errors on parameters unused in the forward pass.
    grid = (8, 16)
    model = make(arch, grid, periodic=False)
    model(batch(grid)).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_forward_and_backward(arch: str) -> None:
    # CPU autocast runs the same code path as CUDA autocast: convolutions in bf16, the
    # spectral convolution in float32.
    grid = (8, 16)
    model = make(arch, grid, periodic=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch(grid))
    assert out.shape == (2, 2, *grid) and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trips_with_weights_only(arch: str) -> None:
    grid = (8, 16)
    model = make(arch, grid, periodic=True)
    assert not any(p.is_complex() for p in model.parameters())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    copy = make(arch, grid, periodic=True, seed=99)
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    x = batch(grid)
    assert torch.equal(model(x), copy(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_default_sizes_are_modest(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(Model(arch=arch), 20, 9, (33, 64), periodic_lon=True)
    assert 100_000 <= count_parameters(model) <= 2_000_000


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_one_batch(arch: str) -> None:
    grid = (8, 16)
    model = make(arch, grid, periodic=True)
    x = batch(grid)
    target = torch.tanh(x[:, :2] + 0.5 * x[:, 1:].roll(1, dims=-1))
    lat_weights = torch.ones(grid[0])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = area_weighted_mse(model(x), target, lat_weights)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses


def test_unknown_arch_is_a_config_error() -> None:
    cfg = Model.model_construct(arch="transformer", width=8, depth=2, modes=4,
                                predict_tendency=True)
    with pytest.raises(ConfigError, match="transformer") as info:
        build_model(cfg, 3, 2, (8, 16), periodic_lon=True)
    assert "'unet' or 'fno'" in str(info.value)


def test_grid_too_small_for_unet_depth_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.depth=4"):
        build_model(Model(arch="unet", depth=4), 3, 2, (8, 16), periodic_lon=True)


# --------------------------------------------------------------------------- loss


def test_area_weighted_mse_by_hand() -> None:
    # One sample, one channel, 2 latitudes x 3 longitudes.
    pred = torch.tensor([[[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]])
    target = torch.tensor([[[[0.0, 2.0, 1.0], [1.0, -1.0, 2.0]]]])
    lat_weights = torch.tensor([0.5, 1.5])
    # squared errors: row 0 -> 1, 0, 4 (x 0.5); row 1 -> 1, 1, 4 (x 1.5)
    expected = (0.5 * (1 + 0 + 4) + 1.5 * (1 + 1 + 4)) / 6
    loss = area_weighted_mse(pred, target, lat_weights)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected)


def test_area_weighted_mse_channel_weights() -> None:
    pred = torch.zeros(2, 2, 2, 3)
    target = torch.ones(2, 2, 2, 3)
    target[:, 1] = 3.0  # channel 0 errors 1, channel 1 errors 9
    lat_weights = torch.ones(2)
    assert area_weighted_mse(pred, target, lat_weights).item() == pytest.approx(5.0)
    weighted = area_weighted_mse(pred, target, lat_weights, torch.tensor([2.0, 0.0]))
    assert weighted.item() == pytest.approx(1.0)


def test_area_weighted_mse_rejects_mismatched_shapes() -> None:
    pred, target = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="lat_weights"):
        area_weighted_mse(pred, target, torch.ones(4))
    with pytest.raises(ValueError, match="channel_weights"):
        area_weighted_mse(pred, target, torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="target shape"):
        area_weighted_mse(pred, target[..., :3], torch.ones(3))
