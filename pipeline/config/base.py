"""What every config section shares: the strict base model and the time type.

``Section`` forbids unknown keys, so a misspelt key is an error naming the key path;
``TimeText`` keeps a time as ISO text whether YAML read it as a date or as a string.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _iso_time(value: Any) -> Any:
    """An unquoted YAML date or datetime as the ISO text that ``within()`` slices with.

    YAML reads ``2010-01-07`` as a date and ``2010-01-07 06:00:00`` as a datetime; as
    text they select the same steps in every calendar (cftime ones too), and a quoted
    and an unquoted date make the same config (and hash). Aware datetimes become UTC.
    """
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value.isoformat()
    if isinstance(value, datetime.date):
        return value.isoformat()
    return value


TimeText = Annotated[str, BeforeValidator(_iso_time)]
"""A time as ISO text ('2010-01-07', '2010-01-07T06:00:00'); YAML dates are accepted."""
TimeRange = tuple[TimeText, TimeText]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
