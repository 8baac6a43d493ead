"""The run configuration: one typed, validated tree loaded from YAML.

Every section is a pydantic v2 model with ``extra="forbid"``, so a misspelt key is an
error that names the key path and the allowed keys. ``load_config`` applies
``--set a.b=c`` overrides before validation, and ``config_hash`` identifies a resolved
config in every artifact (store attributes, checkpoints, evaluation results).

This package is the import point of the config (``from pipeline.config import ...``);
its modules hold one part each: ``base`` (the strict section, ``TimeText``), ``data``,
``train`` (with ``model``), ``evaluate`` (with ``registry``), ``slurm``, ``tree`` (the
whole ``Config``) and ``loading`` (YAML, overrides, validation errors, hash, dump).

It is imported on login nodes: it must not import torch, ray or dask.
"""

from pipeline.config.base import Section, TimeRange, TimeText
from pipeline.config.data import (
    FORCINGS,
    Codec,
    Data,
    Derived,
    DerivedFunction,
    Forcing,
    NanPolicy,
    Source,
    Splits,
    Statistics,
    TimeCoding,
    Variable,
    level_channel,
)
from pipeline.config.evaluate import Evaluate, Registry
from pipeline.config.loading import (
    apply_overrides,
    config_from_dict,
    config_hash,
    dump_config,
    load_config,
    parse_override,
    resolved_dict,
)
from pipeline.config.slurm import Slurm
from pipeline.config.train import Model, Train
from pipeline.config.tree import Config

__all__ = [
    "FORCINGS", "Codec", "Config", "Data", "Derived", "DerivedFunction", "Evaluate", "Forcing",
    "Model", "NanPolicy", "Registry", "Section", "Slurm", "Source", "Splits", "Statistics",
    "TimeCoding", "TimeRange", "TimeText", "Train", "Variable", "apply_overrides",
    "config_from_dict", "config_hash", "dump_config", "level_channel", "load_config",
    "parse_override", "resolved_dict",
]
