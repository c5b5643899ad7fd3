"""How a Kiln client reaches its servers: addresses, TLS, the bearer token, balancing, retries.

`ConnectionSettings.resolve(...)` turns the clients' keyword arguments into one checked
value (files read, the token taken from `KILN_API_TOKEN` when not given, a token over
plain text to another host refused); `open_channel` and `open_aio_channel` build the sync
and asyncio gRPC channels from it. Both use gRPC's `round_robin` over every address the
target names (a comma-separated list of addresses, or a DNS name with several records
such as a Kubernetes headless Service), and a service config that retries UNAVAILABLE.

gRPC retries a call only until the server has answered, and only on UNAVAILABLE. A
Generate stream is answered early (its `queued` event), so a server that dies
mid-generation breaks the stream (UNAVAILABLE, or INTERNAL "RST_STREAM" through a proxy
such as nginx) and gRPC does not retry it: `StreamAttempts` is the rule both clients
follow to resubmit such a request themselves, to another server, with the same seed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import grpc

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb

__all__ = [
    "DEFAULT_RETRY",
    "TOKEN_ENV",
    "ConnectionSettings",
    "ConnectionSettingsError",
    "RetryPolicy",
    "StreamAttempts",
    "TlsFile",
    "is_loopback",
    "is_retryable_stream_failure",
    "open_aio_channel",
    "open_channel",
    "parse_target",
]

log = logging.getLogger("kiln_client")

TOKEN_ENV = "KILN_API_TOKEN"
"""Environment variable holding the bearer token the clients send when none is passed."""

SERVICE_NAME = "kiln.v1.GenerationService"
ADMIN_SERVICE_NAME = "kiln.v1.ModelAdminService"

TlsFile = str | os.PathLike[str] | bytes
"""A PEM file for `tls_ca` / `tls_cert` / `tls_key`: its path, or its contents as bytes."""

# Seeds a server picks for a request without one come from the same range.
_SEED_RANGE = 2**32
# Schemes of gRPC targets that are resolved to local sockets only.
_LOCAL_SCHEMES = ("unix:", "unix-abstract:", "vsock:")


class ConnectionSettingsError(ValueError):
    """Connection arguments a client refuses before connecting.

    `argument` is the offending keyword (`tls_ca`, `tls_cert`, `tls_key`, `target`, or
    `allow_plaintext_token` for a token that would travel in plain text). The message
    names arguments as `{name}` placeholders in `template`; `message_for(labels)` words it
    with other names, such as the CLI's flags.
    """

    def __init__(self, argument: str, template: str) -> None:
        self.argument = argument
        self.template = template
        super().__init__(self.message_for({}))

    def message_for(self, labels: Mapping[str, str]) -> str:
        """The message with each `{name}` replaced by `labels[name]` (default: the keyword)."""
        return self.template.format_map({**_KEYWORD_LABELS, **labels})


_KEYWORD_LABELS = {
    "target": "target",
    "token": "token",
    "tls_ca": "tls_ca",
    "tls_cert": "tls_cert",
    "tls_key": "tls_key",
    "allow_plaintext_token": "allow_plaintext_token=True",
}


def _literal(text: str) -> str:
    """`text` as it must appear in a `ConnectionSettingsError` template."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is retried when the server is UNAVAILABLE.

    It becomes the channel's gRPC retryPolicy (for calls that failed before the server
    answered) and bounds the clients' own resubmission of a Generate stream that broke
    after it had started (`StreamAttempts`): one request is submitted at most
    `max_attempts` times. The pause before retry n is random, up to
    `initial_backoff * backoff_multiplier ** (n - 1)` seconds, capped at `max_backoff`.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        # gRPC refuses a service config asking for more than 5 attempts.
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be 2 to 5; got {self.max_attempts}")
        if not (0 < self.initial_backoff <= self.max_backoff and self.backoff_multiplier >= 1):
            raise ValueError(
                "need 0 < initial_backoff <= max_backoff and backoff_multiplier >= 1; got "
                f"{self.initial_backoff}, {self.max_backoff}, {self.backoff_multiplier}"
            )

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 = the second attempt), jittered."""
        ceiling = self.initial_backoff * self.backoff_multiplier ** (retry - 1)
        return random.uniform(0, min(self.max_backoff, ceiling))

    def method_config(self) -> dict[str, Any]:
        """The `retryPolicy` object of a gRPC service config."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff:g}s",
            "maxBackoff": f"{self.max_backoff:g}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }


DEFAULT_RETRY = RetryPolicy()
"""The retry policy the clients use unless told otherwise (`retry=False` turns it off)."""


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_host_port(address: str) -> tuple[str, str]:
    """`host:port` or `[v6]:port` (or a bare host) as (host without brackets, port or "")."""
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        return host, rest[1:] if bracket and rest.startswith(":") else ""
    if address.count(":") > 1:  # a bare IPv6 address
        return address, ""
    host, _, port = address.partition(":")
    return host, port


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def parse_target(target: str) -> tuple[str, tuple[str, ...]]:
    """The gRPC channel target for `target`, and the host of each address it names.

    `target` is one address (`host:port`), any gRPC target URI (`dns:///name:port`,
    `ipv4:a:p,b:p`, `unix:path`), or a comma-separated list of `host:port` whose hosts are
    IP addresses of one family or `localhost`; a list becomes an `ipv4:` / `ipv6:` target.
    The hosts of `unix:` targets are reported as "localhost".

    Raises:
        ConnectionSettingsError: an empty target, or a list gRPC cannot take as one target.
    """
    target = target.strip()
    if not target:
        raise ConnectionSettingsError("target", "{target} is empty: give HOST:PORT")
    lowered = target.lower()
    if lowered.startswith(_LOCAL_SCHEMES):
        return target, ("localhost",)
    for scheme in ("ipv4:", "ipv6:"):
        if lowered.startswith(scheme):
            entries = target[len(scheme) :].split(",")
            return target, tuple(_split_host_port(entry.strip())[0] for entry in entries)
    if "://" in target or lowered.startswith("dns:"):
        # dns:[//authority/]host[:port] and other resolvers: the host is the last path part.
        name = target.split(":", 1)[1].lstrip("/")
        if target.split(":", 1)[1].startswith("//"):
            name = name.split("/", 1)[-1]
        return target, (_split_host_port(name)[0],)
    if "," not in target:
        return target, (_split_host_port(target)[0],)
    return _address_list(target)


def _address_list(target: str) -> tuple[str, tuple[str, ...]]:
    entries = [entry.strip() for entry in target.split(",")]
    hosts: list[str] = []
    addresses: list[str] = []
    versions: set[int] = set()
    for entry in entries:
        host, port = _split_host_port(entry)
        if host.lower() == "localhost":
            host = "127.0.0.1"
        version = _ip_version(host)
        if not entry or not port.isdigit() or version is None:
            raise ConnectionSettingsError(
                "target",
                f"{{target}} {_literal(repr(target))}: a list of servers must be IP:PORT "
                "entries (or localhost:PORT) separated by commas; for servers known by a DNS "
                "name, give one name that resolves to all of them, as dns:///NAME:PORT",
            )
        versions.add(version)
        hosts.append(host)
        addresses.append(f"[{host}]:{port}" if version == 6 else f"{host}:{port}")
    if len(versions) > 1:
        raise ConnectionSettingsError(
            "target", f"{{target}} {_literal(repr(target))}: list IPv4 or IPv6 addresses, not both"
        )
    scheme = "ipv6" if versions == {6} else "ipv4"
    return f"{scheme}:{','.join(addresses)}", tuple(hosts)


def _read_pem(argument: str, value: TlsFile | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    path = Path(value)
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConnectionSettingsError(
            argument,
            f"{{{argument}}} {_literal(str(path))}: cannot read it "
            f"({_literal(str(err.strerror or err))})",
        ) from None


class ConnectionOptions(TypedDict, total=False):
    """The connection keywords `KilnClient` and `AsyncKilnClient` take, as `resolve` reads them."""

    token: str | None
    tls_ca: TlsFile | None
    tls_cert: TlsFile | None
    tls_key: TlsFile | None
    tls_server_name: str | None
    secure: bool
    allow_plaintext_token: bool
    retry: RetryPolicy | bool
    max_message_mb: int


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything needed to open a channel to Kiln, checked.

    `target` is as given; `channel_target` is what gRPC is handed, `hosts` the host of each
    address. `token` (never shown in repr) is sent as `authorization: Bearer TOKEN` on
    Generate and ListModels. `tls` is True when the channel uses TLS: with
    `root_certificates` (None: the system's roots) and, for mutual TLS, a client
    `certificate_chain` and `private_key`; `tls_server_name` is the name the servers'
    certificates must carry when it is not the target's host (for a list: its first
    address, also sent as the calls' authority). `retry` is None when retries are off.
    """

    target: str
    channel_target: str
    hosts: tuple[str, ...]
    token: str | None = field(default=None, repr=False)
    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    tls_server_name: str | None = None
    retry: RetryPolicy | None = DEFAULT_RETRY
    max_message_mb: int = 64

    @classmethod
    def resolve(
        cls,
        target: str | ConnectionSettings,
        *,
        token: str | None = None,
        tls_ca: TlsFile | None = None,
        tls_cert: TlsFile | None = None,
        tls_key: TlsFile | None = None,
        tls_server_name: str | None = None,
        secure: bool = False,
        allow_plaintext_token: bool = False,
        retry: RetryPolicy | bool = True,
        max_message_mb: int = 64,
        environ: Mapping[str, str] | None = None,
    ) -> ConnectionSettings:
        """Check and resolve the clients' connection arguments (see `KilnClient`).

        A `target` that is already a `ConnectionSettings` is returned as it is (the other
        arguments must then be left at their defaults). `token` None reads
        `KILN_API_TOKEN` from `environ` (default: the process's environment); "" sends no
        token. TLS is on with `secure`, `tls_ca` or a client certificate.

        Raises:
            ConnectionSettingsError: an unreadable file, a certificate without its key (or
                the reverse), a target gRPC cannot take, or a token that would go in plain
                text to a host other than this one without `allow_plaintext_token`.
        """
        if isinstance(target, ConnectionSettings):
            return target
        channel_target, hosts = parse_target(target)
        environ = os.environ if environ is None else environ
        if token is None:
            token = environ.get(TOKEN_ENV, "")
        token = token.strip() or None
        if (tls_cert is None) != (tls_key is None):
            given, missing = ("tls_cert", "tls_key") if tls_key is None else ("tls_key", "tls_cert")
            raise ConnectionSettingsError(
                missing,
                f"{{{given}}} needs {{{missing}}}: mutual TLS takes the client certificate "
                "and its private key",
            )
        tls = secure or tls_ca is not None or tls_cert is not None
        remote = [host for host in hosts if not is_loopback(host)]
        if token and not tls and remote and not allow_plaintext_token:
            raise ConnectionSettingsError(
                "allow_plaintext_token",
                "refusing to send the API token in plain text to "
                f"{_literal(target)} (not a loopback address): use TLS "
                "({tls_ca} with the server's CA bundle) or, when the path is private (e.g. "
                "a TLS-terminating proxy on the same host), pass {allow_plaintext_token}",
            )
        if retry is True:
            policy: RetryPolicy | None = DEFAULT_RETRY
        elif retry is False:
            policy = None
        else:
            policy = retry
        return cls(
            target=target,
            channel_target=channel_target,
            hosts=hosts,
            token=token,
            tls=tls,
            root_certificates=_read_pem("tls_ca", tls_ca),
            certificate_chain=_read_pem("tls_cert", tls_cert),
            private_key=_read_pem("tls_key", tls_key),
            tls_server_name=tls_server_name or None,
            retry=policy,
            max_message_mb=max_message_mb,
        )

    def service_config(self) -> dict[str, Any]:
        """The gRPC service config: round_robin, and the retry policy on Kiln's methods."""
        config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
        if self.retry is not None:
            config["methodConfig"] = [
                {
                    # Every admin RPC is safe to repeat: loads and unloads are idempotent, and
                    # an import is keyed by its content.
                    "name": [{"service": SERVICE_NAME}, {"service": ADMIN_SERVICE_NAME}],
                    "retryPolicy": self.retry.method_config(),
                }
            ]
        return config

    def options(self) -> list[tuple[str, str | int]]:
        """Channel options: message size limits, the service config, retries on or off,
        and the authority and TLS name where they are not the target's."""
        size = int(self.max_message_mb * 1024 * 1024)
        options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            ("grpc.service_config", json.dumps(self.service_config())),
            # A service config published in DNS must not replace the one chosen here.
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.enable_retries", int(self.retry is not None)),
        ]
        scheme, _, addresses = self.channel_target.partition(":")
        if scheme in ("ipv4", "ipv6"):
            # gRPC's authority for an address list is the whole list, which neither a
            # certificate nor a proxy knows; the first address stands for all of them.
            options.append(("grpc.default_authority", addresses.split(",")[0]))
        if self.tls_server_name is not None:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials, or None for plain text."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The metadata each Generate and ListModels call carries (the bearer token)."""
        if self.token is None:
            return None
        return (("authorization", f"Bearer {self.token}"),)


def open_channel(settings: ConnectionSettings) -> grpc.Channel:
    """A synchronous channel as `settings` describe."""
    credentials = settings.credentials()
    if credentials is None:
        return grpc.insecure_channel(settings.channel_target, settings.options())
    return grpc.secure_channel(settings.channel_target, credentials, settings.options())


def open_aio_channel(settings: ConnectionSettings) -> grpc.aio.Channel:
    """A `grpc.aio` channel as `settings` describe (call inside the event loop)."""
    credentials = settings.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(settings.channel_target, settings.options())
    return grpc.aio.secure_channel(settings.channel_target, credentials, settings.options())


def is_retryable_stream_failure(err: grpc.RpcError) -> bool:
    """True for the ways a stream breaks when its server or the path to it fails.

    UNAVAILABLE (the connection dropped, or a server that is shutting down), and the
    INTERNAL "RST_STREAM" that gRPC reports when a proxy resets the stream because its
    upstream died (nginx's grpc_pass does). Every other status is the server's decision
    about the request and is never retried.
    """
    code = err.code() if callable(getattr(err, "code", None)) else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    details = err.details() if callable(getattr(err, "details", None)) else None
    return code == grpc.StatusCode.INTERNAL and "RST_STREAM" in str(details or "")


@dataclass
class StreamAttempts:
    """The resubmission rule for one Generate stream, shared by both clients.

    A stream that broke with a retryable failure (`is_retryable_stream_failure`) before
    its `completed` event is submitted again, the same request, up to
    `policy.max_attempts` submissions in all and within the call's deadline; except an
    UNAVAILABLE before any event, which gRPC's own retry policy has already retried. (A
    proxy's reset is not UNAVAILABLE, and nginx does not pass a POST whose upstream died
    on to another server, so that one is resubmitted here even before any event.)

    The seed is pinned before the first submission when the request has none, so every
    attempt draws the same images. Image events of an index already passed on are
    dropped, so a caller never sees an image twice; queued, started and progress events
    of the new attempt do pass on (a progress display restarts).
    """

    request: pb.GenerateRequest
    policy: RetryPolicy | None
    deadline: float | None
    target: str = ""
    attempt: int = 1
    received: bool = False
    completed: bool = False
    delivered: set[int] = field(default_factory=set)

    @classmethod
    def start(
        cls,
        request: pb.GenerateRequest,
        policy: RetryPolicy | None,
        timeout: float | None,
        target: str = "",
    ) -> StreamAttempts:
        """The attempts of `request` under `policy` (None: one attempt) and `timeout` s."""
        if policy is not None and not request.HasField("seed"):
            pinned = pb.GenerateRequest()
            pinned.CopyFrom(request)
            pinned.seed = random.randrange(_SEED_RANGE)
            request = pinned
        deadline = None if timeout is None else time.monotonic() + timeout
        return cls(request, policy, deadline, target)

    def timeout(self) -> float | None:
        """The deadline of the next submission in seconds from now (None: no deadline)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def passes(self, event: pb.GenerateResponse) -> bool:
        """Record an event of the current attempt; False when it repeats a delivered image."""
        self.received = True
        kind = event.WhichOneof("event")
        if kind == "completed":
            self.completed = True
        elif kind == "image":
            if event.image.index in self.delivered:
                return False
            self.delivered.add(event.image.index)
        return True

    def retry_after(self, err: grpc.RpcError) -> float | None:
        """Seconds to wait before submitting again after `err`, or None to give up."""
        if (
            self.policy is None
            or self.completed
            or self.attempt >= self.policy.max_attempts
            or not is_retryable_stream_failure(err)
            or (not self.received and err.code() == grpc.StatusCode.UNAVAILABLE)
        ):
            return None
        pause = self.policy.backoff(self.attempt)
        remaining = self.timeout()
        if remaining is not None and remaining <= pause:
            return None
        self.attempt += 1
        self.received = False
        log.warning(
            "Generate stream from %s broke (%s: %s); submitting it again in %.2f s "
            "(attempt %d of %d, seed %d)",
            self.target or "the server",
            err.code().name,
            err.details(),
            pause,
            self.attempt,
            self.policy.max_attempts,
            self.request.seed,
            extra={"status": err.code().name, "attempt": self.attempt},
        )
        return pause
