"""Server settings from flags, KILN_* environment variables and a TOML config file.

Precedence: command-line flag, then environment variable, then the config file's
`[server]` table, then the default here. Accepted API tokens are secrets and never a flag:
they come from `KILN_API_TOKENS` (else the config file's `api_tokens` list), plus those of
`api_tokens_file`; see `kiln_server.tokens` for the entry syntax.

Who may call is checked here, before anything starts: without tokens the server binds
loopback only (or requires client certificates), and tokens never travel in plain text to a
non-loopback address unless `allow_plaintext_tokens` says a TLS proxy sits in front.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kiln_server.config_file import (
    SettingsError,
    convert_setting,
    read_config_file,
    to_bool,
    to_bytes,
)
from kiln_server.models.registry import default_cache_dir
from kiln_server.tokens import (
    ApiToken,
    is_loopback,
    merge_tokens,
    parse_token_entries,
    read_token_file,
)

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
    dtype: str | None = None  # None: fp16 on a GPU (FLUX: bf16), fp32 on the CPU
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
    # Every accepted token: KILN_API_TOKENS (else [server] api_tokens) and api_tokens_file's.
    api_tokens: tuple[ApiToken, ...] = field(default=(), repr=False)
    api_tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Set: clients must present a certificate signed by this CA (mutual TLS).
    tls_client_ca: Path | None = None
    # Accept tokens over plain text on a non-loopback address (a TLS proxy is in front).
    allow_plaintext_tokens: bool = False
    # Generate calls one token may have in flight; 0: no limit.
    max_inflight_per_token: int = 32
    # Plaintext grpc.health.v1-only port (probes that cannot speak TLS); None: none, 0: any.
    health_port: int | None = None
    # Clients re-resolve DNS only when a connection closes, so closing each one after this
    # many seconds (GOAWAY; its calls may finish) lets round_robin clients reach new pods.
    max_connection_age: float = 300.0
    # LoRAs: resident adapters per model (an LRU), the highest rank a file may have, and
    # how many one request may apply.
    lora_slots: int = 8
    max_lora_rank: int = 128
    max_loras_per_request: int = 4
    # Device memory the resident models' engines may hold together (bytes); 0: no budget,
    # every configured model stays resident. Others load on first use, evicting the least
    # recently used idle model.
    model_memory_budget: int = 0
    # Where LoRAs imported through ModelAdminService.ImportLora are kept (None:
    # <cache_dir>/loras), and the most bytes kept there (oldest unused removed first).
    lora_cache_dir: Path | None = None
    lora_cache_size: int = 10 * 1024**3

    @property
    def lora_cache(self) -> Path:
        """The folder of imported LoRAs."""
        return self.lora_cache_dir if self.lora_cache_dir is not None else self.cache_dir / "loras"

    @property
    def auth_enabled(self) -> bool:
        """True when bearer tokens are configured and therefore required."""
        return bool(self.api_tokens)

    @property
    def tls_enabled(self) -> bool:
        """True when the gRPC port speaks TLS."""
        return self.tls_cert is not None

    @property
    def mtls_enabled(self) -> bool:
        """True when callers must present a client certificate signed by `tls_client_ca`."""
        return self.tls_client_ca is not None


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
    "api_tokens_file": Path,
    "tls_cert": Path,
    "tls_key": Path,
    "tls_client_ca": Path,
    "allow_plaintext_tokens": to_bool,
    "max_inflight_per_token": int,
    "health_port": int,
    "max_connection_age": float,
    "lora_slots": int,
    "max_lora_rank": int,
    "max_loras_per_request": int,
    "model_memory_budget": to_bytes,
    "lora_cache_dir": Path,
    "lora_cache_size": to_bytes,
}
# Paths a config file gives relative to its own folder.
_FILE_RELATIVE = (
    "engines",
    "lora_cache_dir",
    "api_tokens_file",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
)
# Read by their own rules: tokens are secrets, so no flag and no value echoed in errors.
_SPECIAL = {"api_tokens"}


def _convert(name: str, value: Any, source: str) -> Any:
    return convert_setting(name, value, source, _CONVERTERS)


def load_settings(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[ServerSettings, dict[str, Any]]:
    """Resolve settings (flags over env over config file) and return them with the config."""
    environ = os.environ if environ is None else environ
    names = [f.name for f in fields(ServerSettings) if f.name not in _SPECIAL]
    env_values = {
        name: _convert(name, environ[f"KILN_{name.upper()}"], f"KILN_{name.upper()}")
        for name in names
        if environ.get(f"KILN_{name.upper()}")
    }
    flag_values = {
        k: _convert(k, v, f"--{k.replace('_', '-')}")
        for k, v in flags.items()
        if k in names and v is not None
    }
    config_path = flag_values.get("config") or env_values.get("config")
    config: dict[str, Any] = {}
    file_values: dict[str, Any] = {}
    tokens: tuple[ApiToken, ...] = ()
    if config_path is not None:
        config = read_config_file(Path(config_path))
        server = config.get("server") or {}
        unknown = set(server) - set(names) - _SPECIAL - {"default_model"}
        if unknown:
            raise SettingsError(
                f"config file {config_path}: unknown [server] setting(s) {sorted(unknown)}"
            )
        file_values = {
            k: _convert(k, v, f"config file {config_path}") for k, v in server.items() if k in names
        }
        for name in _FILE_RELATIVE:
            if name in file_values and not file_values[name].is_absolute():
                file_values[name] = Path(config["_config_dir"]) / file_values[name]
        if "api_tokens" in server:
            tokens = _file_tokens(server["api_tokens"], f"config file {config_path} api_tokens")
    if environ.get("KILN_API_TOKENS", "").strip():
        tokens = parse_token_entries(environ["KILN_API_TOKENS"], "KILN_API_TOKENS")
    settings = replace(ServerSettings(), **{**file_values, **env_values, **flag_values})
    if settings.api_tokens_file is not None:
        tokens = (*tokens, *read_token_file(settings.api_tokens_file))
    settings = replace(settings, api_tokens=merge_tokens(tokens))
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
    _check_access(settings)
    return settings, config


def _file_tokens(value: Any, source: str) -> tuple[ApiToken, ...]:
    if not isinstance(value, list | str):
        raise SettingsError(f'{source}: write a list of token entries, e.g. ["TOKEN:generate"]')
    return parse_token_entries(value, source)


def _check_access(settings: ServerSettings) -> None:
    """Refuse settings that would let anyone in, or send tokens where others can read them."""
    if settings.max_inflight_per_token < 0:
        raise SettingsError(
            f"max_inflight_per_token {settings.max_inflight_per_token} is negative: use 1 or "
            "more, or 0 for no per-token limit"
        )
    if settings.lora_slots < 1 or settings.max_lora_rank < 1 or settings.max_loras_per_request < 1:
        raise SettingsError(
            "lora_slots, max_lora_rank and max_loras_per_request must each be at least 1"
        )
    if settings.max_connection_age < 0:
        raise SettingsError(
            f"max_connection_age {settings.max_connection_age:g} is negative: give seconds "
            "(default 300) or 0 to keep connections open forever"
        )
    if settings.health_port is not None:
        if not 0 <= settings.health_port <= 65535:
            raise SettingsError(
                f"health_port {settings.health_port} is not a port: use 0 to 65535 (0 picks a "
                "free one)"
            )
        if settings.health_port != 0 and settings.health_port in (
            settings.port,
            settings.metrics_port,
        ):
            raise SettingsError(
                f"health_port {settings.health_port} is already the gRPC or metrics port: "
                "choose another --health-port"
            )
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SettingsError("give both --tls-cert and --tls-key (TLS), or neither (plain text)")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise SettingsError(
            "--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked "
            "in the TLS handshake"
        )
    if is_loopback(settings.host):
        return
    if not settings.auth_enabled and not settings.mtls_enabled:
        raise SettingsError(
            f"refusing to listen on {settings.host} without API tokens: anyone who can reach "
            "it could run generations. Set KILN_API_TOKENS=token1,token2 (comma-separated "
            "bearer tokens) or --api-tokens-file FILE, require client certificates with "
            "--tls-cert, --tls-key and --tls-client-ca, or bind to 127.0.0.1 (--host)."
        )
    if settings.auth_enabled and not settings.tls_enabled and not settings.allow_plaintext_tokens:
        raise SettingsError(
            f"refusing to accept API tokens in plain text on {settings.host}: anyone on the "
            "network path could read and reuse them. Serve TLS with --tls-cert and --tls-key, "
            "or give --allow-plaintext-tokens when a TLS-terminating proxy sits in front."
        )
