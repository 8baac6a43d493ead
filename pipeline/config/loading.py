"""Reading a config: YAML (dates a Gregorian calendar lacks kept as text), ``--set
key.path=value`` overrides, validation with one-line errors that name the key path and
what is allowed there; and the resolved config's dump and hash that artifacts record.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.tree import Config
from pipeline.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """The safe loader, except that a date the Gregorian calendar lacks stays text (an
    unquoted ``2000-02-30`` of a 360_day calendar), where the safe loader would fail,
    and that ``1:00:00`` is text, as in YAML 1.2: YAML 1.1 reads it as the base-60
    number 3600, which a Slurm time limit, say, would then take as 3600 minutes."""


def _timestamp(loader: _Loader, node: yaml.ScalarNode) -> Any:
    try:
        return loader.construct_yaml_timestamp(node)
    except ValueError:
        return loader.construct_scalar(node)


def _number(construct: Any) -> Any:
    """A number constructor that leaves base-60 numbers (with a ``:``) as text."""

    def number(loader: _Loader, node: yaml.ScalarNode) -> Any:
        text = loader.construct_scalar(node)
        return text if ":" in str(text) else construct(loader, node)

    return number


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)
_Loader.add_constructor("tag:yaml.org,2002:int", _number(yaml.SafeLoader.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _number(yaml.SafeLoader.construct_yaml_float))


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
