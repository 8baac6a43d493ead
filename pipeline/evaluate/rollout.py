"""A trained model ready for forecasting: the checkpoint found, checked against the
store and loaded; autoregressive rollouts in physical units.

The network is rebuilt from the checkpoint's own config (its architecture and
``train.history``/``train.lead`` must match the weights); the store comes from the
caller's config. One model step covers ``train.lead`` time steps of the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, config_from_dict
from pipeline.data.store import StoreInfo
from pipeline.errors import CheckpointError
from pipeline.train import checkpoint
from pipeline.train.checkpoint import check_compatible
from pipeline.train.meta import CheckpointMeta
from pipeline.train.rundir import RunFiles
from pipeline.train.stepper import Stepper, build_stepper

log = logging.getLogger(__name__)


def candidates(path: Path) -> list[Path]:
    """Checkpoint folders to try, best first: a checkpoint folder itself, or a run
    directory's ``best/`` followed by its checkpoints, newest first."""
    path = Path(path)
    if (path / checkpoint.META_FILE).exists() or (path / checkpoint.STATE_FILE).exists():
        return [path]
    run = RunFiles(path)
    found = [run.best] if run.best.is_dir() else []
    found += checkpoint.list_steps(run.checkpoints)
    if not found:
        raise CheckpointError(f"no checkpoint at {path}",
                              "pass a checkpoint folder (runs/NAME/best) or a run directory "
                              "that has one; train first with `pipeline train CONFIG`")
    return found


def find_checkpoint(path: Path) -> tuple[Path, dict[str, Any], CheckpointMeta]:
    """The first valid checkpoint of :func:`candidates` as (folder, state, meta)."""
    tried = candidates(path)
    if len(tried) == 1:  # one explicit folder: its own error says what is wrong
        state, meta = checkpoint.load(tried[0])
        return tried[0].resolve(), state, meta
    found = checkpoint.latest_valid(tried)
    if found is None:
        raise CheckpointError(f"no valid checkpoint in {path} (all {len(tried)} are incomplete "
                              "or corrupt)", "train again, or restore a checkpoint")
    if found[0] != RunFiles(Path(path)).best.resolve():
        log.warning("no valid best/ checkpoint in %s: using %s", path, found[0])
    return found


@dataclass
class Forecaster:
    """A loaded network plus what is needed to run it on the store's data."""

    stepper: Stepper
    cfg: Config  # the checkpoint's config
    meta: CheckpointMeta
    folder: Path
    info: StoreInfo
    device: torch.device

    @property
    def history(self) -> int:
        return self.cfg.train.history

    @property
    def lead(self) -> int:
        """Store time steps per model step."""
        return self.cfg.train.lead

    def normalise(self, block: np.ndarray) -> np.ndarray:
        """Physical ``(..., channel, lat, lon)`` values of all channels -> model units."""
        mean, std = self.info.normalisation()
        return ((block - mean[:, None, None]) / std[:, None, None]).astype(np.float32)

    def denormalise(self, pred: np.ndarray) -> np.ndarray:
        """Model outputs ``(..., output, lat, lon)`` -> physical units (float64)."""
        mean, std = self.info.normalisation()
        out = list(self.info.layout.outputs)
        m = mean[out].astype(np.float64)[:, None, None]
        s = std[out].astype(np.float64)[:, None, None]
        return np.asarray(pred, dtype=np.float64) * s + m

    @torch.no_grad()
    def rollout(self, inputs: np.ndarray | torch.Tensor,
                target_forcings: np.ndarray | torch.Tensor) -> np.ndarray:
        """Normalised ``(B, history, C, Y, X)`` inputs and ``(B, R, C_forcing, Y, X)``
        forcings at the R target times -> ``(B, R, C_out, Y, X)`` in physical units."""
        x = torch.as_tensor(inputs, dtype=torch.float32).to(self.device)
        f = torch.as_tensor(target_forcings, dtype=torch.float32).to(self.device)
        pred = self.stepper(x, f)
        return self.denormalise(pred.float().cpu().numpy())


def load(path: Path, info: StoreInfo, device: torch.device | None = None) -> Forecaster:
    """Load the checkpoint at ``path`` (a folder or a run directory) for ``info``'s store.

    A checkpoint trained on other channels or statistics is refused with a
    :class:`CheckpointError`.
    """
    return from_checkpoint(find_checkpoint(Path(path)), info, device)


def from_checkpoint(found: tuple[Path, dict[str, Any], CheckpointMeta], info: StoreInfo,
                    device: torch.device | None = None) -> Forecaster:
    """:func:`load` for a checkpoint already read by :func:`find_checkpoint`."""
    folder, state, meta = found
    try:
        check_compatible(meta, info, folder)
    except CheckpointError as err:
        raise CheckpointError(err.message, "evaluate or forecast with the store it was "
                              "trained on (data.store), or retrain on this one") from None
    if "model" not in state:
        raise CheckpointError(f"checkpoint {folder} holds no config or model weights",
                              "it was not written by `pipeline train`")
    cfg = config_from_dict(meta.config, origin=f"{folder}/{checkpoint.META_FILE}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stepper = build_stepper(cfg, info)
    stepper.load_state_dict(state["model"])
    stepper.to(device).eval()
    return Forecaster(stepper, cfg, meta, folder, info, device)
