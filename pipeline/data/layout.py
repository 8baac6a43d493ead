"""Which of a store's channels are predicted, which are forcings and which are masks,
and where a predicted channel is missing: the channel roles as training and
evaluation read them. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.transforms import mask_name

OUTPUT_ROLES = ("prognostic", "derived")
# A point is missing where its stored mask exceeds this: the mask is 1 where the input
# was missing, after coarsening the missing fraction of the cell (any missing input
# cell makes the coarse value part fill value), and exactly 0 elsewhere.
MISSING_ABOVE = 1e-6


@dataclass(frozen=True)
class Layout:
    """Which stored channels are predicted, which are forcings, which are masks, and
    which masks say where each predicted channel is missing."""

    channels: tuple[str, ...]
    outputs: tuple[int, ...]  # predicted: prognostic and derived
    forcings: tuple[int, ...]
    masks: tuple[int, ...]
    # per output: positions in ``masks`` of the masks that make it missing (its own, or
    # for a derived channel those of its inputs: missing where any input is)
    output_masks: tuple[tuple[int, ...], ...]

    @classmethod
    def from_roles(cls, channels: list[str], roles: list[str],
                   derived: dict[str, list[str]] | None = None) -> Layout:
        """The layout of a store's channels from their roles; ``derived``: the inputs of
        each derived channel (the store's ``data.derived``), in build order."""
        pick = lambda wanted: tuple(i for i, r in enumerate(roles) if r in wanted)  # noqa: E731
        outputs, masks = pick(OUTPUT_ROLES), pick(("mask",))
        position = {channels[i]: k for k, i in enumerate(masks)}
        sources: dict[str, set[int]] = {}
        for i in outputs:  # prognostic first, then derived in build order (chains resolve)
            name = channels[i]
            own = {position[mask_name(name)]} if mask_name(name) in position else set()
            for source in (derived or {}).get(name, []):
                own |= sources.get(source, set())
            sources[name] = own
        return cls(tuple(channels), outputs, pick(("forcing",)), masks,
                   tuple(tuple(sorted(sources[channels[i]])) for i in outputs))

    @property
    def output_names(self) -> list[str]:
        return [self.channels[i] for i in self.outputs]

    @property
    def has_masks(self) -> bool:
        """Whether any predicted channel can be missing somewhere."""
        return any(self.output_masks)

    def mask_incidence(self) -> np.ndarray:
        """``(output, mask)`` float32: 1 where the mask can make the output missing."""
        incidence = np.zeros((len(self.outputs), len(self.masks)), np.float32)
        for j, positions in enumerate(self.output_masks):
            incidence[j, list(positions)] = 1.0
        return incidence

    def valid(self, steps: np.ndarray) -> np.ndarray | None:
        """Where each predicted channel holds data: raw stored ``steps`` ``(..., channel,
        lat, lon)`` (all channels) -> bool ``(..., output, lat, lon)``, False where a
        mask of the output marks the point missing; None for a store without masks."""
        if not self.has_masks:
            return None
        missing = np.asarray(steps)[..., list(self.masks), :, :] > MISSING_ABOVE
        valid = np.ones((*missing.shape[:-3], len(self.outputs), *missing.shape[-2:]), bool)
        for j, positions in enumerate(self.output_masks):
            if positions:
                valid[..., j, :, :] = ~missing[..., list(positions), :, :].any(axis=-3)
        return valid
