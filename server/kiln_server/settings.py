"""Server settings from flags, KILN_* environment variables and a TOML config file.

Precedence: command-line flag, then environment variable, then the config file's
`[server]` table, then the default here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kiln_server.config_file import SettingsError, convert_setting, read_config_file, to_bool
from kiln_server.models.registry import default_cache_dir

__all__ = ["ServerSettings", "SettingsError", "load_settings", "read_config_file"]


@dataclass(frozen=True)
class ServerSettings:
    """Everything `kiln serve` needs to start."""

    host: str = "127.0.0.1"
    port: int = 50051
    # Prometheus /metrics on its own port (same host); None: no metrics endpoint, 0: any
    # free port (logged as `metrics_port`).
    metrics_port: int | None = None
    config: Path | None = None
    backend: str | None = None  # None picks the fastest available
    engines: Path | None = None
    device: str | None = None  # None: cuda when torch sees a GPU, else cpu
    dtype: str | None = None  # None: fp16 on a GPU, fp32 on the CPU
    compile: bool = False
    cuda_graphs: bool = False
    cache_dir: Path = field(default_factory=default_cache_dir)
    max_queue: int = 64
    max_batch_rows: int = 8
    intra_op_threads: int = 0  # CPU threads per engine call; 0 = every core but one
    aging_seconds: float = 5.0
    # Shape groups that share the engine at once (time-sliced step by step).
    max_shape_groups: int = 4
    # A step that makes no progress for this long fails everything and exits (supervisor).
    engine_stall_seconds: float = 300.0
    # Most work one request may ask for: denoising steps x outputs x megapixels.
    max_request_work: float = 1000.0
    drain_timeout: float = 60.0
    max_message_mb: int = 64
    # Request photos: encoded size of `image` or `mask`, and decoded pixels.
    max_image_mb: int = 20
    max_image_pixels: int = 4096 * 4096
    log_format: str = "auto"  # auto | json | text
    log_level: str = "INFO"


_CONVERTERS: dict[str, Any] = {
    "port": int,
    "metrics_port": int,
    "max_queue": int,
    "max_batch_rows": int,
    "intra_op_threads": int,
    "max_message_mb": int,
    "max_image_mb": int,
    "max_image_pixels": int,
    "aging_seconds": float,
    "max_shape_groups": int,
    "engine_stall_seconds": float,
    "max_request_work": float,
    "drain_timeout": float,
    "compile": to_bool,
    "cuda_graphs": to_bool,
    "config": Path,
    "engines": Path,
    "cache_dir": Path,
}


def _convert(name: str, value: Any, source: str) -> Any:
    return convert_setting(name, value, source, _CONVERTERS)


def load_settings(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[ServerSettings, dict[str, Any]]:
    """Resolve settings (flags over env over config file) and return them with the config."""
    environ = os.environ if environ is None else environ
    names = [f.name for f in fields(ServerSettings)]
    env_values = {
        name: _convert(name, environ[f"KILN_{name.upper()}"], f"KILN_{name.upper()}")
        for name in names
        if environ.get(f"KILN_{name.upper()}")
    }
    flag_values = {k: v for k, v in flags.items() if k in names and v is not None}
    config_path = flag_values.get("config") or env_values.get("config")
    config: dict[str, Any] = {}
    file_values: dict[str, Any] = {}
    if config_path is not None:
        config = read_config_file(Path(config_path))
        server = config.get("server") or {}
        unknown = set(server) - set(names) - {"default_model"}
        if unknown:
            raise SettingsError(
                f"config file {config_path}: unknown [server] setting(s) {sorted(unknown)}"
            )
        file_values = {
            k: _convert(k, v, f"config file {config_path}") for k, v in server.items() if k in names
        }
        if "engines" in file_values and not file_values["engines"].is_absolute():
            file_values["engines"] = Path(config["_config_dir"]) / file_values["engines"]
    settings = replace(ServerSettings(), **{**file_values, **env_values, **flag_values})
    if settings.backend not in (None, "torch", "onnxruntime", "tensorrt"):
        raise SettingsError(
            f"unknown backend {settings.backend!r}: choose torch, onnxruntime or tensorrt"
        )
    if settings.dtype not in (None, "fp16", "bf16", "fp32"):
        raise SettingsError(f"unknown dtype {settings.dtype!r}: choose fp16, bf16 or fp32")
    if settings.max_queue < 1 or settings.max_batch_rows < 1:
        raise SettingsError("max_queue and max_batch_rows must be at least 1")
    if settings.max_shape_groups < 1 or settings.engine_stall_seconds <= 0:
        raise SettingsError("max_shape_groups must be at least 1 and engine_stall_seconds above 0")
    if settings.max_request_work <= 0:
        raise SettingsError("max_request_work must be above 0 (steps x outputs x megapixels)")
    if settings.max_image_mb < 1 or settings.max_image_pixels < 64 * 64:
        raise SettingsError("max_image_mb must be at least 1 and max_image_pixels at least 4096")
    if settings.max_message_mb < 2 * settings.max_image_mb + 1:
        raise SettingsError(
            f"max_message_mb ({settings.max_message_mb}) must fit a request with an image and "
            f"a mask of max_image_mb ({settings.max_image_mb}) each: raise it to at least "
            f"{2 * settings.max_image_mb + 1} or lower max_image_mb"
        )
    if settings.metrics_port is not None and not 0 <= settings.metrics_port <= 65535:
        raise SettingsError(
            f"metrics_port {settings.metrics_port} is not a port: use 0 to 65535 (0 picks a "
            "free one)"
        )
    if settings.intra_op_threads < 0:
        raise SettingsError("intra_op_threads must be 0 (every core but one) or more")
    return settings, config
