"""What `kiln serve` and `kiln gateway` share about settings: the TOML file and value errors.

Both read one config file (each its own table) and convert flag, environment and file
values the same way. Nothing heavy is imported here, so the gateway stays light.
"""

from __future__ import annotations

import re
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


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def to_bytes(value: Any) -> int:
    """A size setting in bytes: an integer as is, or text such as `24GiB`, `512MiB`, `2GB`
    or `1048576` (units are case-insensitive; KiB/MiB/GiB are powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError("give a size such as 24GiB, not a boolean")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(
            r"(\d+(?:\.\d+)?)([a-z]*)", str(value).strip().lower().replace(" ", "")
        )
        if match is None or match[2] not in _SIZE_UNITS:
            raise ValueError("give a size such as 24GiB, 512MiB, 2GB or a number of bytes")
        size = int(float(match[1]) * _SIZE_UNITS[match[2]])
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size
