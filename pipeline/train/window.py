"""What the loop handles between two reports: a batch on the device and the report
window (steps, samples, time waiting for data, summed loss)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Window:
    """The steps of one report: seconds spent asking the loader for batches, samples,
    steps and the summed loss (on the device, so that adding to it does not wait for
    the step), from ``start``."""

    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    samples: int = 0
    steps: int = 0
    loss_sum: torch.Tensor | float = 0.0
    losses: list[torch.Tensor] = field(default_factory=list)  # each step's, on the device

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> tuple[float, float]:
        """(mean loss, seconds): reading the loss waits for the queued steps, so the
        seconds, taken after it, are the device's."""
        loss = float(self.loss_sum) / max(self.steps, 1)
        return loss, self.elapsed()

    def first_non_finite(self) -> int | None:
        """Position in the window of the first step whose loss is NaN or infinite."""
        if not self.losses:
            return None
        bad = torch.nonzero(~torch.isfinite(torch.stack(self.losses))).flatten()
        return int(bad[0]) if bad.numel() else None


@dataclass
class Batch:
    inputs: torch.Tensor
    target_forcings: torch.Tensor
    targets: torch.Tensor
    target_masks: torch.Tensor | None = None  # stores with masks: the masks at the targets

    @classmethod
    def to(cls, sample: dict[str, torch.Tensor], device: torch.device) -> Batch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        masks = move(sample["target_masks"]) if "target_masks" in sample else None
        return cls(move(sample["inputs"]), move(sample["target_forcings"]), move(sample["targets"]),
                   masks)
