"""What `kiln serve` and `kiln gateway` share about settings: the TOML file and value errors.

Both read one config file (each its own table) and convert flag, environment and file
values the same way. Nothing heavy is imported here, so the gateway stays light.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A setting is invalid; the message names the setting, its source and the fix."""


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML config; the result remembers its folder for relative model paths."""
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SettingsError(f"config file {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    config["_config_dir"] = str(path.resolve().parent)
    return config


def convert_setting(
    name: str, value: Any, source: str, converters: Mapping[str, Callable[[Any], Any]]
) -> Any:
    """`value` of setting `name` as its type (`converters[name]`, else str).

    Raises SettingsError naming the setting, the value and where it came from.
    """
    try:
        return converters.get(name, str)(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}: invalid value {value!r} for {name}: {exc}") from exc


def to_bool(value: Any) -> bool:
    """A boolean setting: a bool as is; from text, true for 1, true, yes or on."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")
