"""The training store's root attributes as a typed contract: :class:`StoreAttrs`.

``build_init`` writes them through the model and the readers of a store (training,
evaluation, forecasts, the registry, ``pipeline inspect``) read them through it, so a
store whose attributes are missing or of the wrong type (an older build, a hand edit,
a damaged ``zarr.json``) is refused in one line naming the field, not deep inside
training with a ``KeyError``. The JSON on disk is what the model dumps; keys it does
not know are kept (a newer build's additions stay readable). pydantic only: reading a
store's facts loads no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import StoreError

T = TypeVar("T")
Pair = Annotated[list[T], Field(min_length=2, max_length=2)]
"""A ``[first, last]`` pair, as JSON stores it (a list)."""

FIX = ("the store is damaged or was built by an older version: delete it and rerun "
       "`pipeline preprocess CONFIG` to rebuild it")


class _Attrs(BaseModel):
    """JSON types as written, no coercion (``"2"`` is not a version); unknown keys kept."""

    model_config = ConfigDict(extra="allow", strict=True)


class SourceRecord(_Attrs):
    """Provenance of one source file: a changed size or time means changed data."""

    path: str
    size: int
    mtime: float


class SplitRanges(_Attrs):
    """Inclusive ``[start, end]`` time ranges of the splits, as in ``data.splits``."""

    train: Pair[str]
    val: Pair[str]
    test: Pair[str]

    def of(self, split: str) -> list[str]:
        """The range of ``split`` by name (train, val or test)."""
        if split not in ("train", "val", "test"):
            raise KeyError(split)
        return list(getattr(self, split))


class GridExtent(_Attrs):
    """The stored grid's first and last latitude and longitude, and the coarsening."""

    lat_range: Pair[float]
    lon_range: Pair[float]
    coarsen: int


class BuildCount(_Attrs):
    """Shards of the store and shards written, recorded by finalise."""

    shards: int
    done: int


class Appending(_Attrs):
    """An append in progress: the time axis grows from ``from_length`` to ``to_length``."""

    from_length: int
    to_length: int


class StoreAttrs(_Attrs):
    """The root attributes of a training store, in the order init writes them.

    The last three are written by finalise and append only: absent from a store that
    was never finalised. ``channel_attrs`` is absent from stores built before channels
    recorded their CF attributes.
    """

    format_version: int
    dataset_version: int = Field(description="0 until the first finalise; +1 per append")
    complete: bool
    name: str
    config: dict[str, Any] = Field(description="the resolved config the store was built from")
    config_hash: str
    data_hash: str = Field(description="identity of the data section (not end, statistics)")
    sources: list[SourceRecord]
    splits: SplitRanges
    channel_attrs: dict[str, dict[str, str]] = Field(default_factory=dict)
    frequency: str = Field(description="the time step: a pandas offset (6h, MS)")
    time_start: str
    time_end: str
    grid: GridExtent
    shard_size: int
    statistics_period: Pair[str]
    statistics_version: int
    code_version: str
    created: str
    updated: str
    build: BuildCount | None = None
    statistics_frozen: bool = False
    appending: Appending | None = None

    def to_json(self) -> dict[str, Any]:
        """The attributes as stored: only the fields that were set, JSON types."""
        return self.model_dump(mode="json", exclude_unset=True)


def parse_attrs(values: Mapping[str, Any], store: str) -> StoreAttrs:
    """``values`` (a store's root attributes) as :class:`StoreAttrs`; a
    :class:`StoreError` naming ``store`` and the first bad field otherwise."""
    try:
        return StoreAttrs.model_validate(dict(values))
    except ValidationError as err:
        raise bad_attrs(store, err) from None


def bad_attrs(store: str, err: ValidationError) -> StoreError:
    """One line for a validation error: the field, what is wrong, how many more."""
    errors = err.errors()
    first = errors[0]
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        what = "is missing"
    else:
        got = repr(first["input"])
        got = got if len(got) <= 40 else got[:37] + "..."
        what = f"is {got}: {first['msg'][:1].lower()}{first['msg'][1:]}"
    more = f"; {len(errors) - 1} more bad attribute(s)" if len(errors) > 1 else ""
    return StoreError(f"training store {store}: attribute '{field}' {what}{more}", FIX)
