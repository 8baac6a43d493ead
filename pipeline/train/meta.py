"""The contract of a checkpoint's ``meta.json``: what training writes, what readers read.

``meta.json`` is written last into a checkpoint folder (its completeness mark) by
:func:`pipeline.train.checkpoint.write_into` and validated where it is read
(:func:`pipeline.train.checkpoint.load`, :func:`read_meta`), so that a meta.json from an
older version or a damaged one fails in one line naming the field, not deep in a
caller. The JSON on disk is exactly ``CheckpointMeta.model_dump()``.

Light: pydantic only (the workflows and the registry read it on login nodes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import CheckpointError, CheckpointFormatError

META_FILE = "meta.json"


class StoreFingerprint(BaseModel):
    """The store a checkpoint was trained on (``StoreInfo.fingerprint``)."""

    model_config = ConfigDict(extra="forbid")

    path: str
    data_hash: str | None
    dataset_version: int
    channels: list[str]
    mean: list[float]
    std: list[float]


class InitFrom(BaseModel):
    """The warm start's source (``train.init_from``): folder, step, config, weights."""

    model_config = ConfigDict(extra="forbid")

    path: str
    step: int | None
    config_hash: str | None
    weights_digest: str


class CheckpointMeta(BaseModel):
    """A checkpoint's ``meta.json``: where training was and on what it was trained."""

    model_config = ConfigDict(extra="forbid")

    step: int
    epoch: int
    config: dict[str, Any]  # the resolved config (validated by whoever builds a Config)
    config_hash: str
    store: StoreFingerprint
    world_size: int
    channels_out: list[str]
    init_from: InitFrom | None = None

    def to_json(self) -> str:
        """The file's text (keys sorted, as always)."""
        return json.dumps(self.model_dump(), indent=1, sort_keys=True)


def first_problem(err: ValidationError) -> str:
    """The first invalid field of a validation error, as ``field.sub: message``."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(the whole file)"
    return f"{where}: {first['msg']}"


def parse_meta(data: Any, folder: Path) -> CheckpointMeta:
    """Validate the decoded ``meta.json`` of ``folder``; CheckpointError naming the field."""
    try:
        return CheckpointMeta.model_validate(data)
    except ValidationError as err:
        raise CheckpointFormatError(f"checkpoint {folder} has an invalid {META_FILE} "
                              f"({first_problem(err)})",
                              "it is damaged or from an older version: retrain the run "
                              "or delete the checkpoint") from None


def read_meta(folder: Path) -> CheckpointMeta:
    """Read and validate ``folder/meta.json`` (no torch: for light callers)."""
    path = Path(folder) / META_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: "
                              f"{' '.join(str(err).split())[:160]}",
                              "retrain the run or delete the checkpoint") from None
    return parse_meta(data, Path(folder))
