"""The model step: a network wrapped as one forecast step and its autoregressive
rollout, sized for a store (:func:`build_stepper`), and which of its targets hold data
(:func:`target_validity`). Training and evaluation both use it.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.store import StoreInfo
from pipeline.train.models import build_model


class Stepper(nn.Module):
    """One forecast step around a network: (history, forcings at the target time,
    static fields) -> next normalised state of the predicted channels.

    With ``predict_tendency`` the network predicts the change in units of the typical
    one-step change (``tendency_scale``), which is added to the last input state.
    """

    outputs: torch.Tensor  # buffers (register_buffer), declared for the type checker
    forcings: torch.Tensor
    static: torch.Tensor
    scale: torch.Tensor

    def __init__(self, net: nn.Module, outputs: list[int], forcings: list[int],
                 static: torch.Tensor, tendency_scale: torch.Tensor, predict_tendency: bool):
        super().__init__()
        self.net = net
        self.register_buffer("outputs", torch.tensor(outputs, dtype=torch.long), persistent=False)
        self.register_buffer("forcings", torch.tensor(forcings, dtype=torch.long), persistent=False)
        self.register_buffer("static", static, persistent=False)
        self.register_buffer("scale", tendency_scale[:, None, None], persistent=False)
        self.predict_tendency = predict_tendency

    def step(self, history: torch.Tensor, target_forcing: torch.Tensor) -> torch.Tensor:
        """One step: (B, H, C, Y, X) history and (B, C_forcing, Y, X) -> (B, C_out, Y, X)."""
        b = history.shape[0]
        x = torch.cat([history.flatten(1, 2), target_forcing,
                       self.static.expand(b, -1, -1, -1)], dim=1)
        y = self.net(x)
        if not self.predict_tendency:
            return y
        return history[:, -1, self.outputs] + y * self.scale

    def forward(self, history: torch.Tensor, target_forcings: torch.Tensor) -> torch.Tensor:
        """Autoregressive rollout (the forward pass, so that DDP sees it):
        (B, R, C_forcing, Y, X) forcings -> (B, R, C_out, Y, X) predictions."""
        preds = []
        for k in range(target_forcings.shape[1]):
            pred = self.step(history, target_forcings[:, k])
            preds.append(pred)
            if k + 1 < target_forcings.shape[1]:
                nxt = history[:, -1].clone()  # masks persist; outputs and forcings update
                nxt[:, self.outputs] = pred.to(nxt.dtype)
                nxt[:, self.forcings] = target_forcings[:, k]
                history = torch.cat([history[:, 1:], nxt[:, None]], dim=1)
        return torch.stack(preds, dim=1)


def build_stepper(cfg: Config, info: StoreInfo) -> Stepper:
    """The network sized for the store's channels and grid, wrapped in a Stepper."""
    layout = info.layout
    n_channels, n_static = len(layout.channels), info.static.shape[0]
    in_channels = cfg.train.history * n_channels + len(layout.forcings) + n_static
    net = build_model(cfg.model, in_channels, len(layout.outputs), (info.lat.size, info.lon.size),
                      info.periodic_lon)
    return Stepper(net, list(layout.outputs), list(layout.forcings),
                   torch.from_numpy(info.normalised_static()),
                   torch.from_numpy(info.tendency_scale()), cfg.model.predict_tendency)


def target_validity(target_masks: torch.Tensor, missing_above: torch.Tensor,
                    incidence: torch.Tensor) -> torch.Tensor:
    """Where targets hold data: normalised mask channels ``(..., mask, lat, lon)`` at the
    target times -> bool ``(..., output, lat, lon)``, False where a mask of the output
    exceeds its threshold (``missing_above``: ``StoreInfo.missing_above``, shape
    ``(mask, 1, 1)``; ``incidence``: ``Layout.mask_incidence``), in one contraction."""
    missing = (target_masks > missing_above).to(incidence.dtype)
    return torch.einsum("...myx,cm->...cyx", missing, incidence) == 0
