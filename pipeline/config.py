"""The run configuration: one typed, validated tree loaded from YAML.

Every section is a pydantic v2 model with ``extra="forbid"``, so a misspelt key is an
error that names the key path and the allowed keys. ``load_config`` applies
``--set a.b=c`` overrides before validation, and ``config_hash`` identifies a resolved
config in every artifact (store attributes, checkpoints, evaluation results).

This module is imported on login nodes: it must not import torch, ray or dask.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    model_validator,
)

from pipeline.errors import ConfigError

Forcing = Literal["cos_zenith", "toa_insolation", "sin_time_of_day", "cos_time_of_day",
                  "sin_year", "cos_year"]
FORCINGS: tuple[str, ...] = get_args(Forcing)
DERIVED_FUNCTIONS = ("wind_speed", "difference", "sum")


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


class TimeCoding(Section):
    """How to decode a source's time axis when its files carry no CF time units.

    Example: the storm files have ``timestep`` (integer hours) plus a separate
    reference time; ``dim: timestep, units: "hours since 1996-01-05 00:00"``.
    """

    dim: str = Field("time", description="Name of the time dimension in the files.")
    units: str = Field(description="CF units for the integer steps, e.g. 'hours since 2000-01-01'.")
    calendar: str = Field("standard", description="CF calendar of the reference time.")


class Source(Section):
    """One input: NetCDF/HDF5 or GRIB files by glob, or a Zarr store. Its variables are
    merged with those of the other sources on the same grid and time axis."""

    path: str = Field(description="Glob of NetCDF/HDF5 or GRIB files, or the path of a Zarr store.")
    engine: Literal["netcdf4", "h5netcdf", "zarr", "cfgrib"] | None = Field(
        None, description="xarray engine; inferred from the file suffix when omitted "
        "(.grib, .grib1, .grib2, .grb, .grb2: cfgrib).")
    filter_by_keys: dict[str, str | int | float | list[str | int | float]] = Field(
        default_factory=dict, description="GRIB only: the messages to read, by GRIB key, e.g. "
        "{shortName: t, typeOfLevel: isobaricInhPa} (cfgrib reads one kind of message at a "
        "time; a file that mixes levels or parameters needs one source per kind).")
    rename: dict[str, str] = Field(default_factory=dict,
                                   description="Rename variables or dimensions: {old: new}.")
    static: bool = Field(False, description="Time-invariant fields (orography, land-sea mask).")
    time: TimeCoding | None = Field(None, description="Decode integer time steps (see TimeCoding).")
    axes: dict[Literal["time", "lat", "lon", "level"], str] = Field(
        default_factory=dict, description="The variable holding each axis where CF attributes "
        "and common names do not find it, e.g. {time: valid_time, lat: latitude}; a 1-D "
        "variable of a plain HDF5 file becomes the coordinate of its dimension.")
    select: dict[str, str | int | float] = Field(
        default_factory=dict, description="One value of each extra dimension or coordinate, "
        "e.g. {number: 0} (an ensemble member) or {expver: '0001'}.")
    level_units: str | None = Field(
        None, description="Units of the level axis where the files do not say (Pa, hPa); "
        "pressure levels are converted to hPa, the unit of data.variables[].levels.")


class Variable(Section):
    """A variable to store; with ``levels`` each level is one channel (``t`` at 850 -> ``t850``)."""

    name: str
    levels: list[float] | None = None


class Derived(Section):
    """A channel computed from stored channels with a named function."""

    name: str
    function: Literal["wind_speed", "difference", "sum"]
    inputs: list[str] = Field(min_length=1)


class NanPolicy(Section):
    """What to do with NaNs in the inputs."""

    policy: Literal["reject", "fill"] = Field(
        "reject", description="reject: error naming variable and time; fill: fill and store a mask.")
    fill_value: float = Field(0.0, description="Value written where the input is NaN (fill).")
    channels: list[str] | None = Field(
        None, description="Channels that may hold NaNs under 'fill' (default: all); each gets "
                          "a '<channel>_mask' channel (1 where the input was missing).")


class Codec(Section):
    """Compression of the stored data. The default, Blosc LZ4 with byte shuffle, is
    chosen for read speed: the training loader decompresses every sample it reads."""

    name: Literal["blosc", "zstd", "none"] = "blosc"
    cname: Literal["lz4", "lz4hc", "zstd", "zlib"] = Field("lz4", description="Blosc's inner codec.")
    level: int = Field(5, ge=0, le=22, description="Compression level (Blosc: 0-9).")
    shuffle: bool = Field(True, description="Blosc byte shuffle (better ratio for floats).")


class Splits(Section):
    """Inclusive ``[start, end]`` time ranges (ISO strings)."""

    train: TimeRange
    val: TimeRange
    test: TimeRange


class Statistics(Section):
    """Normalisation statistics (over the train split, area weighted)."""

    recompute_on_append: bool = Field(
        False, description="Recompute statistics when appending (default: keep them frozen).")


class Data(Section):
    """Sources, selection, transforms and the store layout."""

    sources: list[Source] = Field(min_length=1)
    variables: list[Variable | str] = Field(min_length=1)
    static: list[str] = Field(default_factory=list, description="Static fields to store.")
    level_dim: str = Field("level", description="Name of the vertical dimension in the "
                           "sources where CF attributes do not mark it (positive, axis: Z).")
    start: TimeText | None = Field(None, description="First time to store (default: first in sources).")
    end: TimeText | None = Field(None, description="Last time to store (default: last in sources).")
    frequency: str = Field("6h", description="Time step as a pandas offset: 6h, 1D, MS (monthly).")
    splits: Splits
    coarsen: int = Field(1, ge=1, description="Integer coarsening factor in lat and lon (area weighted).")
    derived: list[Derived] = Field(default_factory=list)
    forcings: list[Forcing] = Field(default_factory=list)
    nan: NanPolicy = Field(default_factory=NanPolicy)
    store: str = Field(description="Path of the Zarr v3 training store.")
    shard_size: int = Field(32, ge=1, le=100_000,
                            description="Time steps per shard (the unit of writing).")
    codec: Codec = Field(default_factory=Codec)
    statistics: Statistics = Field(default_factory=Statistics)

    def variable_specs(self) -> list[Variable]:
        """The variables as :class:`Variable` objects (strings are normalised on load)."""
        return [v if isinstance(v, Variable) else Variable(name=v) for v in self.variables]

    def prognostic_channels(self) -> list[str]:
        """Channel names of the selected variables, in config order (levels expanded)."""
        names: list[str] = []
        for var in self.variable_specs():
            if var.levels is None:
                names.append(var.name)
            else:
                names.extend(level_channel(var.name, lev) for lev in var.levels)
        return names

    @model_validator(mode="after")
    def _check_channels(self) -> Data:
        base = self.prognostic_channels()
        seen = set(base)
        if len(seen) != len(base):
            raise ValueError(f"data.variables gives duplicate channels: {base}")
        for d in self.derived:
            missing = [i for i in d.inputs if i not in seen]
            if missing:
                raise ValueError(f"data.derived '{d.name}' uses unknown channels {missing}; "
                                 f"known: {sorted(seen)}")
            if d.name in seen:
                raise ValueError(f"data.derived name '{d.name}' repeats a channel name")
            seen.add(d.name)
        if self.nan.channels is not None:
            unknown = sorted(set(self.nan.channels) - seen)
            if unknown:
                raise ValueError(f"data.nan.channels names unknown channels {unknown}")
        return self


def level_channel(name: str, level: float) -> str:
    """Channel name of a variable on a level: ``t`` at 850.0 -> ``t850``."""
    return f"{name}{int(level) if float(level).is_integer() else level}"


class Model(Section):
    """Architecture and sizes."""

    arch: Literal["unet", "fno"] = "unet"
    width: int = Field(32, ge=1, description="Channels of the first layer (unet) or lifting width (fno).")
    depth: int = Field(2, ge=1, description="Down/up levels (unet) or Fourier layers (fno).")
    modes: int = Field(8, ge=1, description="Fourier modes per dimension (fno).")
    predict_tendency: bool = Field(True, description="Predict the normalised change, not the state.")


class Train(Section):
    """Training loop, Ray scaling and checkpointing."""

    history: int = Field(1, ge=1, description="Input time steps.")
    lead: int = Field(1, ge=1, description="Steps ahead of the last input step.")
    rollout: int = Field(1, ge=1, description="Autoregressive steps in the loss.")
    batch_size: int = Field(8, ge=1, description="Samples per worker per step.")
    max_steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    workers: int = Field(2, ge=1, description="Ray Train workers without a Slurm job; in "
                         "one, the allocation decides (pipeline.plan, `pipeline plan`).")
    use_gpu: bool = Field(False, description="A GPU per worker without a Slurm job; in one, "
                          "the allocation's GPUs decide.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per worker (on CPUs); a Slurm "
                                 "GPU job gives each GPU worker its share of the node's CPUs.")
    val_every: int = Field(50, ge=1, description="Validate (and checkpoint) every N steps.")
    val_batch_size: int | None = Field(
        None, ge=1, description="Samples per validation batch on each worker (default: "
        "batch_size); 1 can be faster for large grids on a CPU.")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    max_failures: int = Field(2, ge=0)
    early_stopping_patience: int | None = Field(
        5, ge=1, description="Stop after this many validations in a row without improvement "
        "(null: never). The default 5 is 250 steps at val_every 50: small data with a "
        "seasonal cycle (a few hundred monthly samples) overfits within a few hundred steps, "
        "and best/ keeps the checkpoint with the lowest val loss either way.")
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="Relative decrease of val loss that counts as improvement.")
    seed: int = 0
    loader: Literal["auto", "threads", "processes"] = Field(
        "auto", description="How batches are streamed: by reader 'threads' in the training "
        "process or reader 'processes', both filling reused (pinned) batch buffers; "
        "'auto': processes (pipeline.plan; pipeline.data.loading says why).")
    loader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="Reader threads or processes, as train.loader says; 0 reads in "
        "the training thread. auto: on a GPU the worker's CPUs less one (at least 1, at "
        "most 8), on the CPU 0 (the step uses the cores).")
    prefetch_factor: int = Field(2, ge=1, description="Batches read ahead.")
    assemble_on_device: bool = Field(
        True, description="With 'threads' or 'processes' on a GPU: copy each batch's raw "
        "steps to the GPU and normalise and gather the samples there (half the "
        "host-to-device bytes, no CPU copies); false makes the samples in pinned host "
        "buffers instead.")
    resident: Literal["auto", True, False] = Field(
        "auto", description="Keep the train and val splits' normalised steps in the "
        "training device's memory, read once, and make each batch by indexing them (no "
        "reads after the first pass; the loader settings then only set the threads of that "
        "pass). auto: on a GPU when they take at most half of its free memory, never on "
        "the CPU (pipeline.data.loading.resident).")
    shuffle_block: int = Field(8, ge=1, description="Time steps per shuffle block.")
    tensorboard: bool = Field(False, description="Also write metrics to <run>/tensorboard/.")
    mlflow_uri: str | None = Field(
        None, description="Also log the config and metrics to MLflow at this tracking URI "
        "(http://host:5000, databricks, sqlite:///path/mlflow.db with full mlflow; file:///path "
        "needs MLFLOW_ALLOW_FILE_STORE=true on MLflow 3); needs the 'mlflow' extra.")
    mlflow_experiment: str = Field("pipeline", min_length=1,
                                   description="MLflow experiment of the runs (mlflow_uri).")
    init_from: str | None = Field(
        None, description="Warm start: a checkpoint folder (e.g. runs/NAME/best or a registry "
        "version's best/) whose model weights initialise a new run (fresh optimiser, step 0). "
        "Ignored once the run has checkpoints of its own: it then resumes from them.")

    def stops_early(self, evals_without_improvement: int) -> bool:
        """Whether early stopping ends a run after this many validations in a row without
        improvement: the loop's rule, and how `pipeline run` knows a run is finished."""
        patience = self.early_stopping_patience
        return patience is not None and evals_without_improvement >= patience


class Evaluate(Section):
    """Evaluation on a held-out split."""

    split: Literal["val", "test"] = "test"
    leads: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4], min_length=1,
                                     description="Lead times in model steps (of train.lead).")
    channels_to_plot: list[str] = Field(
        default_factory=list, description="Channels with maps in the report (default: the first two).")
    max_samples: int | None = Field(None, ge=1, description="Cap on init times (spread evenly).")
    chunk_size: int = Field(16, ge=1, description="Init times per chunk (bounds memory).")
    climatology_window: int = Field(
        1, ge=1, description="Days averaged around each day of year (odd; 1: no smoothing).")


class Registry(Section):
    """Model registry and promotion rule."""

    path: str = Field("registry", description="Registry directory; this config's models go "
                      "to <path>/<name>/.")
    metric: Literal["rmse", "acc"] = Field(
        "rmse", description="Metric used to compare challenger and champion (rmse: lower is "
        "better; acc: higher is better).")
    lead: int = Field(1, ge=1, description="Lead (model steps) compared; must be in evaluate.leads.")
    min_improvement: float = Field(
        0.0, ge=0, description="Relative improvement needed to promote (0.01: 1 %), averaged "
        "over channels.")


SINGLE_LINE = r"^[^\x00-\x1f\x7f]*$"  # no newlines or other control characters
DIRECTIVE_VALUE = r"^[^\x00-\x1f\x7f\"\s]+$"  # one word: it lands on an #SBATCH line


class Slurm(Section):
    """Cluster resources and site set-up for the sbatch templates (``pipeline slurm``).

    Values that land on ``#SBATCH`` lines must be single words without quotes or control
    characters; shell set-up goes in ``modules`` and ``setup``. Paths and names in the
    job scripts are shell-quoted by the renderer.
    """

    partition: str | None = Field(None, pattern=DIRECTIVE_VALUE)
    account: str | None = Field(None, pattern=DIRECTIVE_VALUE)
    nodes: int = Field(1, ge=1, description="Nodes of the training job (one Ray node each).")
    gpus_per_node: int = Field(0, ge=0, description="0 trains on CPUs (gloo), else one worker per GPU.")
    cpus_per_task: int = Field(2, ge=1, description="CPUs per node task (Dask workers, Ray CPUs).")
    time: str = Field("01:00:00", pattern=r"^[0-9][0-9:-]*$",
                      description="Time limit of each job, in Slurm's format.")
    mem: str | None = Field(None, pattern=r"^[0-9]+[KMGT]?$")
    modules: list[Annotated[str, Field(pattern=DIRECTIVE_VALUE)]] = Field(
        default_factory=list, description="Environment modules loaded before each job.")
    setup: list[Annotated[str, Field(pattern=SINGLE_LINE)]] = Field(
        default_factory=list,
        description="Shell lines run after the modules, verbatim (e.g. activating a venv).")
    extra_directives: list[Annotated[str, Field(pattern=r"^--[A-Za-z][A-Za-z-]*(=[^\x00-\x1f\x7f\"\s]+)?$")]] = Field(
        default_factory=list, description="More #SBATCH options, e.g. --qos=normal.")
    command: str = Field("pipeline", pattern=SINGLE_LINE,
                         description="How jobs call this tool, e.g. '/opt/venv/bin/pipeline' "
                         "or 'python -m pipeline'.")
    log_dir: str | None = Field(None, pattern=SINGLE_LINE,
                                description="Job logs and scripts; default <run dir>/slurm.")
    preprocess_parts: int = Field(2, ge=1, description="Array tasks of the preprocess job.")
    signal_seconds: int = Field(
        180, ge=0, description="SIGUSR1 this long before the time limit: checkpoint, requeue.")
    port_base: int = Field(20000, ge=1024, le=60000,
                           description="Start of the per-job Ray port blocks.")
    node_timeout: int = Field(300, ge=1, description="Seconds to wait for all Ray nodes to join.")
    retrain_every: str = Field("7d", pattern=r"^[0-9]+[smhdw]$",
                               description="Period of scheduled retraining, e.g. 7d, 12h.")

    def log_path(self, run_dir: Path) -> Path:
        return Path(self.log_dir) if self.log_dir else run_dir / "slurm"


class Config(Section):
    """The whole run configuration."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    runs_dir: str = "runs"
    data: Data
    model: Model = Field(default_factory=Model)
    train: Train = Field(default_factory=Train)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    registry: Registry = Field(default_factory=Registry)
    slurm: Slurm = Field(default_factory=Slurm)

    def run_dir(self) -> Path:
        """Where this run's checkpoints, metrics and evaluation go."""
        return Path(self.runs_dir) / self.name


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """The safe loader, except that a date the Gregorian calendar lacks stays text (an
    unquoted ``2000-02-30`` of a 360_day calendar), where the safe loader would fail."""


def _timestamp(loader: _Loader, node: yaml.ScalarNode) -> Any:
    try:
        return loader.construct_yaml_timestamp(node)
    except ValueError:
        return loader.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not key.path=value",
                          "write e.g. --set train.max_steps=100")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``tree`` with each ``key.path=value`` set (intermediate dicts are created)."""
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for key in path[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{key}' is not a section")
            node = child
        node[path[-1]] = value
    return tree


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at ``loc`` (the parent of an unknown key), for the error message."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _first_model(annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _first_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``list[Source] | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _key_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error's location as config keys: without pydantic's names of the union members
    it tried (``Variable``, ``str``, ``constrained-int``, ``literal['auto']``, ...)."""
    return tuple(p for p in loc if not (isinstance(p, str) and (
        p in ("Variable", "str", "int", "bool", "float") or not p.replace("_", "a").isalnum())))


def _format_validation_error(err: ValidationError, origin: str) -> ConfigError:
    """Turn pydantic's report into one line naming the key path and what is allowed."""
    errors = err.errors()
    # A misspelt key also makes its intended key "missing": report the misspelling.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = _key_path(first["loc"])
    path = ".".join(str(p) for p in loc) or "<root>"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(Config, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return ConfigError(f"{origin}: unknown config key '{path}'",
                           f"{hint}allowed keys there: {', '.join(allowed)}")
    if first["type"] == "missing":
        return ConfigError(f"{origin}: missing config key '{path}'", "add it to the config")
    # a value that fits none of a union's kinds fails each: say what each would need
    msgs = [e["msg"].removeprefix("Value error, ") for e in errors if _key_path(e["loc"]) == loc]
    msg = "; or ".join(dict.fromkeys(msgs))
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return ConfigError(f"{origin}: invalid value for '{path}': {msg}{shown}",
                       "fix the config or the --set override")


def config_from_dict(tree: dict[str, Any], origin: str = "config") -> Config:
    """Validate a plain dict as a :class:`Config`, raising :class:`ConfigError`."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _format_validation_error(err, origin) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "pass the path of a YAML config")
    try:
        tree = _load_yaml(path.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}", "check indentation and quoting") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping", "start with 'name: ...'")
    return config_from_dict(apply_overrides(tree, overrides or []), origin=str(path))


def resolved_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config with all defaults filled in, as plain JSON-compatible data."""
    return cfg.model_dump(mode="json")


def config_hash(cfg: BaseModel) -> str:
    """A short, stable hash of the resolved config (or of one section of it)."""
    canonical = json.dumps(resolved_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (what a run directory keeps)."""
    path.write_text(yaml.safe_dump(resolved_dict(cfg), sort_keys=False))
