"""Gateway settings from flags, environment variables and the `[gateway]` table of a config file.

Precedence: command-line flag, then environment variable, then the config file, then the
default here. Environment variables are `KILN_GATEWAY_<NAME>` (so they never collide with
`kiln serve`'s `KILN_<NAME>`), except the two secrets: accepted bearer tokens come only from
`KILN_API_TOKENS` (comma-separated entries in `kiln_server.tokens`' syntax; every accepted
token may create predictions, and one with the `admin` scope, `TOKEN:admin`, sees every
prediction) and the webhook signing secret from `KILN_WEBHOOK_SECRET` (or `webhook_secret` in
the config file), never from a flag. `database` may hold a password: it is never shown in logs
or errors.

Example config (the same file `kiln serve --config` reads; `kiln serve` ignores the table):

    [gateway]
    upstream = "127.0.0.1:50051"
    port = 8080
    retention_seconds = 3600

    [gateway.aliases]
    "stability-ai/sdxl" = "sdxl-base"
    # a pinned Replicate version id can be mapped too, so `owner/name:<id>` still runs:
    "stability-ai/sdxl:39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b" = "base"
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from kiln_server.config_file import SettingsError, convert_setting, read_config_file, to_bool
from kiln_server.tokens import ADMIN, GENERATE, ApiToken, is_loopback, parse_token_entries

__all__ = [
    "Alias",
    "GatewaySettings",
    "SettingsError",
    "default_files_dir",
    "is_loopback",
    "load_settings",
    "parse_alias",
    "parse_tokens",
]

OUTPUT_MODES = ("auto", "url", "data-uri")
"""How outputs are returned: "url" (gateway-served file URLs), "data-uri" (inline), or "auto":
URLs when the prediction's base URL is https, data URIs otherwise. The official client turns
only https: and data: URLs into file objects, so "auto" keeps `output[0].read()` working on a
plain-HTTP gateway."""

DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")
_HOST_ENTRY = re.compile(r"^[A-Za-z0-9._:\[\]/-]{1,253}$")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ALIAS_KEY = re.compile(rf"^(?P<owner>{_NAME})/(?P<name>{_NAME})(?::(?P<version>[A-Za-z0-9]+))?$")


@dataclass(frozen=True)
class Alias:
    """`owner/name` (optionally pinned to a Replicate version id) served by Kiln model `target`."""

    owner: str
    name: str
    target: str
    version: str | None = None

    @property
    def ref(self) -> str:
        """The `owner/name` this alias answers to."""
        return f"{self.owner}/{self.name}"


MIB = 1024 * 1024
GIB = 1024 * MIB
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host names every gateway answers to, whatever --allowed-hosts says."""
ADMIN_SCOPE = ADMIN
"""The scope of a `TOKEN:admin` entry in KILN_API_TOKENS: sees every prediction."""


def default_files_dir() -> Path:
    """`$XDG_DATA_HOME/kiln/gateway` (`~/.local/share/kiln/gateway` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kiln" / "gateway"


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs; every field has a working default for local use."""

    upstream: str = "127.0.0.1:50051"
    host: str = "127.0.0.1"
    port: int = 8080
    config: Path | None = None
    public_url: str | None = None
    """Base URL clients reach the gateway at (behind a proxy). Without it, links are built
    from the request's Host header, which must then be one of `allowed_hosts`."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names (or addresses) the gateway answers to besides loopback and its bind
    address, when no `public_url` is set; `*` allows any Host header."""
    retention_seconds: float = 3600.0
    """How long output files and prediction data stay available after completion."""
    aliases: tuple[Alias, ...] = ()
    tokens: tuple[str, ...] = field(default=(), repr=False)
    """Every accepted bearer token (from KILN_API_TOKENS)."""
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    """The tokens given as `TOKEN:admin`: they see and cancel every prediction."""
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_max_attempts: int = 5
    webhook_retry_seconds: float = 1.0
    """Delay before the first webhook retry; it doubles on each further retry."""
    webhook_timeout_seconds: float = 10.0
    webhook_allowed_hosts: tuple[str, ...] = ()
    """Host names, addresses or networks (CIDR) webhooks may reach although they are not
    public (loopback, private, link-local...); every other webhook must go to a public
    address."""
    output_mode: str = "auto"
    files_dir: Path | None = None
    """The gateway's folder: output files, `uploads/` and, by default, the prediction
    database `data/predictions.db`. Default: `default_files_dir()`."""
    database: str | None = field(default=None, repr=False)
    """Where predictions are stored: `sqlite:///PATH` or `postgresql://...` (shared by
    several replicas). Default: SQLite at `<files_dir>/data/predictions.db`."""
    lease_seconds: float = 15.0
    """How long a running prediction stays with a replica that stopped renewing it before
    another replica (or the next start) re-submits it to Kiln."""
    max_submissions: int = 3
    """How often one prediction is sent to Kiln at most: it is re-submitted when the gateway
    that ran it stopped, and fails with the reason after this many tries."""
    max_input_bytes: int = 20 * MIB
    """Largest `image` or `mask` input (data URI, uploaded file or fetched URL) and largest
    upload to POST /v1/files; a Kiln model's smaller `max_image_bytes` wins for its inputs."""
    max_lora_bytes: int = 512 * MIB
    """Largest LoRA a `replicate_weights` / `lora_weights` / `extra_lora` URL may fetch (the
    .safetensors file, or the .tar holding it). Uploads to POST /v1/files stay within
    `max_input_bytes`."""
    max_request_bytes: int | None = None
    """Largest request body; default: room for two `max_input_bytes` images as base64 data
    URIs plus 1 MiB (about 54 MiB with the defaults)."""
    max_files_bytes: int = 10 * GIB
    """Cap on the output files kept; past it the oldest finished predictions lose their
    outputs (`data_removed`)."""
    max_inline_bytes: int = 1 * GIB
    """Cap on the data-URI outputs kept in the database, enforced the same way."""
    upload_expiry_seconds: float = 86400.0
    """How long a file uploaded to POST /v1/files stays available."""
    fetch_timeout_seconds: float = 15.0
    """Longest time to fetch one http(s) input, redirects and body included."""
    fetch_max_redirects: int = 5
    allow_private_urls: bool = False
    """Fetch http(s) inputs from loopback, private, link-local and other non-public
    addresses too (only for trusted callers on a private network)."""
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    max_wait_seconds: float = 60.0
    """Longest `Prefer: wait` hold, as on Replicate."""
    max_predictions: int = 100000
    """Prediction records kept; beyond it the oldest finished ones are deleted with their
    outputs (checked on every retention pass)."""
    default_owner: str = "kiln"
    """Owner shown for Kiln models reached by version id or listed by GET /v1/models."""
    upstream_timeout_seconds: float = 600.0
    """Deadline of one generation on the Kiln server."""
    upstream_tls_ca: Path | None = None
    """CA bundle (PEM) that signed the Kiln server's certificate: reach `upstream` over TLS.
    The token sent upstream comes from `KILN_API_TOKEN`."""
    upstream_tls_cert: Path | None = None
    """Client certificate (PEM) for a Kiln server that requires mutual TLS."""
    upstream_tls_key: Path | None = None
    """Private key (PEM) of `upstream_tls_cert`."""
    upstream_tls_server_name: str | None = None
    """Name the Kiln server's certificate carries, when it is not `upstream`'s host."""
    upstream_allow_plaintext_token: bool = False
    """Send `KILN_API_TOKEN` to a non-loopback `upstream` without TLS (a private path only)."""
    log_format: str = "auto"
    log_level: str = "INFO"

    @property
    def auth_enabled(self) -> bool:
        """True when bearer tokens are configured and therefore required."""
        return bool(self.tokens)

    @cached_property
    def api_tokens(self) -> tuple[ApiToken, ...]:
        """The accepted tokens with their gateway scopes (`admin` for `admin_tokens`)."""
        admins = set(self.admin_tokens)
        return tuple(
            ApiToken(token, frozenset({ADMIN_SCOPE if token in admins else GENERATE}))
            for token in self.tokens
        )

    @property
    def files_root(self) -> Path:
        """The gateway's folder: `files_dir`, or `default_files_dir()` when unset."""
        return self.files_dir if self.files_dir is not None else default_files_dir()

    @property
    def database_url(self) -> str:
        """`database`, or SQLite at `<files_root>/data/predictions.db`."""
        if self.database:
            return self.database
        return f"sqlite:///{(self.files_root / 'data' / 'predictions.db').resolve()}"

    @property
    def request_limit(self) -> int:
        """Largest request body in bytes (`max_request_bytes` or its default)."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return -(-2 * self.max_input_bytes * 4 // 3) + 64 + MIB


def parse_alias(text: str, source: str = "--alias") -> Alias:
    """Parse `owner/name[:version]=kiln_model` into an Alias; SettingsError names the problem."""
    key, sep, target = text.partition("=")
    return _alias(key.strip(), target.strip() if sep else "", source)


def _alias(key: str, target: str, source: str) -> Alias:
    match = _ALIAS_KEY.match(key)
    if not match or not target:
        raise SettingsError(
            f"{source}: invalid alias {key}={target!r}: write owner/name=KILN_MODEL or "
            f"owner/name:VERSION_ID=KILN_MODEL (e.g. stability-ai/sdxl=sdxl-base)"
        )
    return Alias(match["owner"], match["name"], target, match["version"])


def _names(value: Any) -> tuple[str, ...]:
    """A list setting: a TOML array, or comma-separated text (flags and variables)."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


_CONVERTERS: dict[str, Any] = {
    "port": int,
    "retention_seconds": float,
    "webhook_max_attempts": int,
    "webhook_retry_seconds": float,
    "webhook_timeout_seconds": float,
    "max_wait_seconds": float,
    "max_predictions": int,
    "upstream_timeout_seconds": float,
    "upstream_tls_ca": Path,
    "upstream_tls_cert": Path,
    "upstream_tls_key": Path,
    "upstream_allow_plaintext_token": to_bool,
    "max_input_bytes": int,
    "max_lora_bytes": int,
    "upload_expiry_seconds": float,
    "fetch_timeout_seconds": float,
    "fetch_max_redirects": int,
    "allow_private_urls": to_bool,
    "allowed_hosts": _names,
    "webhook_allowed_hosts": _names,
    "lease_seconds": float,
    "max_submissions": int,
    "max_request_bytes": int,
    "max_files_bytes": int,
    "max_inline_bytes": int,
    "config": Path,
    "files_dir": Path,
    "tls_certfile": Path,
    "tls_keyfile": Path,
}
_LISTS = {"allowed_hosts", "webhook_allowed_hosts"}
# Settings with their own sources or shapes, handled outside the generic loop.
_SPECIAL = {"aliases", "tokens", "admin_tokens", "webhook_secret"}


def _convert(name: str, value: Any, source: str) -> Any:
    return convert_setting(name, value, source, _CONVERTERS)


def _read_config(path: Path) -> dict[str, Any]:
    table = read_config_file(path).get("gateway") or {}
    if not isinstance(table, dict):
        raise SettingsError(f"config file {path}: [gateway] must be a table")
    return table


def parse_tokens(raw: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """KILN_API_TOKENS (entries as `kiln_server.tokens` reads them) as (every token, the ones
    with the admin scope).

    Raises:
        SettingsError: an entry is not `TOKEN[:SCOPE[+SCOPE]]` (the message never shows it).
    """
    parsed = parse_token_entries(raw, "KILN_API_TOKENS")
    admins = tuple(token.secret for token in parsed if token.allows(ADMIN_SCOPE))
    return tuple(token.secret for token in parsed), admins


def load_settings(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> GatewaySettings:
    """Resolve settings: flags over `KILN_GATEWAY_*` env over the config file's `[gateway]`.

    `flags` may hold any GatewaySettings field (None = not given) and `alias`, a list of
    `owner/name[:version]=model` strings that add to the aliases from env and config.

    Raises:
        SettingsError: an unreadable config file, an unknown setting or an invalid value.
    """
    environ = os.environ if environ is None else environ
    names = [f.name for f in fields(GatewaySettings) if f.name not in _SPECIAL]
    env_values = {
        name: _convert(name, environ[var], var)
        for name in names
        if environ.get(var := f"KILN_GATEWAY_{name.upper()}")
    }
    flag_values: dict[str, Any] = {
        k: _names(v) if k in _LISTS else v for k, v in flags.items() if k in names and v is not None
    }
    config_path = flag_values.get("config") or env_values.get("config")
    file_values: dict[str, Any] = {}
    aliases: dict[tuple[str, str, str | None], Alias] = {}
    webhook_secret = environ.get("KILN_WEBHOOK_SECRET") or None
    if config_path is not None:
        source = f"config file {config_path}"
        table = _read_config(Path(config_path))
        unknown = set(table) - set(names) - _SPECIAL
        if unknown:
            raise SettingsError(f"{source}: unknown [gateway] setting(s) {sorted(unknown)}")
        if "tokens" in table:
            raise SettingsError(f"{source}: put API tokens in KILN_API_TOKENS, not in the file")
        file_values = {k: _convert(k, v, source) for k, v in table.items() if k in names}
        table_aliases = table.get("aliases") or {}
        if not isinstance(table_aliases, dict):
            raise SettingsError(f"{source}: [gateway.aliases] must map owner/name to a model")
        for key, target in table_aliases.items():
            alias = _alias(str(key), str(target), f"{source} [gateway.aliases]")
            aliases[(alias.owner, alias.name, alias.version)] = alias
        webhook_secret = webhook_secret or table.get("webhook_secret") or None
    for text in filter(None, environ.get("KILN_GATEWAY_ALIASES", "").split(",")):
        alias = parse_alias(text, "KILN_GATEWAY_ALIASES")
        aliases[(alias.owner, alias.name, alias.version)] = alias
    for text in flags.get("alias") or ():
        alias = parse_alias(text)
        aliases[(alias.owner, alias.name, alias.version)] = alias
    tokens, admin_tokens = parse_tokens(environ.get("KILN_API_TOKENS", ""))
    settings = replace(
        GatewaySettings(),
        **{**file_values, **env_values, **flag_values},
        aliases=tuple(aliases.values()),
        tokens=tokens,
        admin_tokens=admin_tokens,
        webhook_secret=webhook_secret,
    )
    return validate_settings(settings)


def validate_settings(settings: GatewaySettings) -> GatewaySettings:
    """Check value ranges and combinations; return the settings unchanged or raise."""
    if settings.output_mode not in OUTPUT_MODES:
        raise SettingsError(
            f"output_mode must be one of {', '.join(OUTPUT_MODES)}; got {settings.output_mode!r}"
        )
    if not 0 <= settings.port <= 65535:
        raise SettingsError(f"port must be between 0 and 65535; got {settings.port}")
    if settings.retention_seconds <= 0:
        raise SettingsError("retention_seconds must be positive")
    if settings.webhook_max_attempts < 1:
        raise SettingsError("webhook_max_attempts must be at least 1")
    if not 0 < settings.max_wait_seconds <= 600:
        raise SettingsError("max_wait_seconds must be between 0 and 600")
    if settings.max_predictions < 1:
        raise SettingsError("max_predictions must be at least 1")
    if settings.max_input_bytes < 1:
        raise SettingsError("max_input_bytes must be at least 1")
    if settings.max_lora_bytes < 1:
        raise SettingsError("max_lora_bytes must be at least 1")
    if settings.upload_expiry_seconds <= 0:
        raise SettingsError("upload_expiry_seconds must be positive")
    if settings.fetch_timeout_seconds <= 0:
        raise SettingsError("fetch_timeout_seconds must be positive")
    if not 0 <= settings.fetch_max_redirects <= 20:
        raise SettingsError("fetch_max_redirects must be between 0 and 20")
    if settings.lease_seconds < 1:
        raise SettingsError("lease_seconds must be at least 1")
    if settings.max_submissions < 1:
        raise SettingsError("max_submissions must be at least 1")
    if settings.max_request_bytes is not None and settings.max_request_bytes < 1024:
        raise SettingsError("max_request_bytes must be at least 1024")
    if settings.max_files_bytes < 1 or settings.max_inline_bytes < 1:
        raise SettingsError("max_files_bytes and max_inline_bytes must be positive")
    if settings.database is not None and not settings.database.startswith(DATABASE_SCHEMES):
        raise SettingsError(
            f"database must be sqlite:///PATH or postgresql://...; got "
            f"{settings.database.partition('://')[0][:20]!r}:// (credentials not shown)"
        )
    for name in ("allowed_hosts", "webhook_allowed_hosts"):
        for entry in getattr(settings, name):
            if entry != "*" and not _HOST_ENTRY.match(entry):
                raise SettingsError(f"{name}: {entry[:80]!r} is not a host name or address")
    if (settings.tls_certfile is None) != (settings.tls_keyfile is None):
        raise SettingsError("give both --tls-certfile and --tls-keyfile, or neither")
    if settings.public_url is not None and not re.match(r"^https?://", settings.public_url):
        raise SettingsError(
            f"public_url must start with http:// or https://; got {settings.public_url!r}"
        )
    if settings.webhook_secret is not None:
        _check_secret(settings.webhook_secret)
    return settings


def _check_secret(secret: str) -> None:
    import base64
    import binascii

    prefix, _, encoded = secret.partition("_")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if prefix != "whsec" or len(key) < 16:
        raise SettingsError(
            "webhook secret must look like whsec_<base64 of at least 16 random bytes>; "
            'generate one with: python -c "import base64,os; '
            "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
        )
