"""How the clients connect: addresses and round_robin, the bearer token, TLS, retries and the
resubmission of a Generate stream that broke mid-way. Against in-process fake servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from gateway_support import self_signed_certificate
from test_client_support import (
    Abort,
    FakeKiln,
    completed,
    image,
    progress,
    queued,
    running_fake_server,
    started,
)

from kiln_client.aio import AsyncKilnClient
from kiln_client.client import KilnClient
from kiln_client.connection import (
    ConnectionSettings,
    ConnectionSettingsError,
    RetryPolicy,
    is_retryable_stream_failure,
    parse_target,
)
from kiln_client.errors import KilnError, ServerUnreachable, Unavailable
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.requests import build_request

# Short pauses so that the tests that exhaust the attempts stay fast.
QUICK = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
TOKEN = "s3cret-token"


@pytest.fixture
def kiln() -> Iterator[FakeKiln]:
    with running_fake_server() as fake:
        yield fake


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_API_TOKEN", raising=False)


def option(settings: ConnectionSettings, name: str) -> Any:
    return dict(settings.options())[name]


# The service config: round_robin, and the retry policy


def test_service_config_balances_round_robin_and_retries_unavailable() -> None:
    settings = ConnectionSettings.resolve("127.0.0.1:50051")
    config = json.loads(option(settings, "grpc.service_config"))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [
        {"service": "kiln.v1.GenerationService"},
        {"service": "kiln.v1.ModelAdminService"},
    ]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.2s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert option(settings, "grpc.enable_retries") == 1
    assert option(settings, "grpc.service_config_disable_resolution") == 1


def test_retry_false_keeps_round_robin_without_a_retry_policy() -> None:
    settings = ConnectionSettings.resolve("127.0.0.1:50051", retry=False)
    assert settings.retry is None
    assert json.loads(option(settings, "grpc.service_config")) == {
        "loadBalancingConfig": [{"round_robin": {}}]
    }
    assert option(settings, "grpc.enable_retries") == 0


def test_retry_policy_bounds() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=6)  # gRPC refuses more than 5
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(initial_backoff=3.0, max_backoff=1.0)
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=1.0, backoff_multiplier=2)
    assert all(0 <= policy.backoff(1) <= 0.5 for _ in range(50))
    assert all(0 <= policy.backoff(5) <= 1.0 for _ in range(50))


# Targets


@pytest.mark.parametrize(
    ("target", "channel_target", "hosts"),
    [
        ("10.0.0.5:50051", "10.0.0.5:50051", ("10.0.0.5",)),
        ("10.0.0.5:1, 10.0.0.6:2", "ipv4:10.0.0.5:1,10.0.0.6:2", ("10.0.0.5", "10.0.0.6")),
        ("localhost:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2", ("127.0.0.1", "127.0.0.1")),
        ("[::1]:1,[fd00::2]:2", "ipv6:[::1]:1,[fd00::2]:2", ("::1", "fd00::2")),
        ("dns:///kiln-headless:50051", "dns:///kiln-headless:50051", ("kiln-headless",)),
        ("dns://10.0.0.10/kiln:50051", "dns://10.0.0.10/kiln:50051", ("kiln",)),
        ("ipv4:10.0.0.5:1,10.0.0.6:2", "ipv4:10.0.0.5:1,10.0.0.6:2", ("10.0.0.5", "10.0.0.6")),
        ("unix:/run/kiln.sock", "unix:/run/kiln.sock", ("localhost",)),
    ],
)
def test_targets_become_grpc_targets(
    target: str, channel_target: str, hosts: tuple[str, ...]
) -> None:
    assert parse_target(target) == (channel_target, hosts)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("kiln-a:50051,kiln-b:50051", "dns:///NAME:PORT"),
        ("10.0.0.5:1,[::1]:2", "not both"),
        ("10.0.0.5:1,10.0.0.6", "IP:PORT"),
        (" ", "empty"),
    ],
)
def test_targets_grpc_cannot_take_are_refused(target: str, message: str) -> None:
    with pytest.raises(ConnectionSettingsError, match=message) as caught:
        ConnectionSettings.resolve(target)
    assert caught.value.argument == "target"


def test_round_robin_spreads_calls_over_every_listed_server() -> None:
    with running_fake_server() as first, running_fake_server() as second:
        with KilnClient(f"{first.address},{second.address}", timeout=10) as client:
            client.wait_until_ready(timeout=10)
            for _ in range(40):
                client.list_models()
                if first.service.metadata and second.service.metadata:
                    break
        assert first.service.metadata and second.service.metadata


# The bearer token


def test_token_is_sent_on_generate_and_list_models(kiln: FakeKiln) -> None:
    kiln.service.script = [image(0, 7, b"png"), completed()]
    with KilnClient(kiln.address, token=TOKEN) as client:
        client.generate("a teapot")
        client.list_models()
    assert [m.get("authorization") for m in kiln.service.metadata] == [f"Bearer {TOKEN}"] * 2


def test_token_defaults_to_kiln_api_token_and_empty_sends_none(
    kiln: FakeKiln, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_API_TOKEN", "from-env")
    with KilnClient(kiln.address) as client:
        client.list_models()
    with KilnClient(kiln.address, token="") as client:
        client.list_models()
    assert [m.get("authorization") for m in kiln.service.metadata] == ["Bearer from-env", None]


async def test_async_client_sends_the_token(kiln: FakeKiln) -> None:
    kiln.service.script = [image(0, 7, b"png"), completed()]
    async with AsyncKilnClient(kiln.address, token=TOKEN) as client:
        await client.generate("a teapot")
        await client.list_models()
    assert [m.get("authorization") for m in kiln.service.metadata] == [f"Bearer {TOKEN}"] * 2


def test_token_is_refused_over_plain_text_to_another_host() -> None:
    with pytest.raises(ConnectionSettingsError) as caught:
        KilnClient("10.1.2.3:50051", token=TOKEN)
    message = str(caught.value)
    assert caught.value.argument == "allow_plaintext_token"
    assert "plain text" in message and "10.1.2.3:50051" in message
    assert "tls_ca" in message and "allow_plaintext_token=True" in message
    assert TOKEN not in message
    # One remote address in a list is enough to refuse.
    with pytest.raises(ConnectionSettingsError):
        ConnectionSettings.resolve("127.0.0.1:1,10.1.2.3:2", token=TOKEN)
    with pytest.raises(ConnectionSettingsError):
        ConnectionSettings.resolve("dns:///kiln-headless:50051", token=TOKEN)


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        ("127.0.0.1:50051", {}),
        ("127.8.9.10:50051", {}),
        ("localhost:50051", {}),
        ("[::1]:50051", {}),
        ("unix:/run/kiln.sock", {}),
        ("10.1.2.3:50051", {"allow_plaintext_token": True}),
        ("10.1.2.3:50051", {"secure": True}),
        ("10.1.2.3:50051", {"tls_ca": b"-----BEGIN CERTIFICATE-----"}),
    ],
)
def test_token_may_go_to_loopback_over_tls_or_when_allowed(
    target: str, extra: dict[str, Any]
) -> None:
    settings = ConnectionSettings.resolve(target, token=TOKEN, **extra)
    assert settings.call_metadata() == (("authorization", f"Bearer {TOKEN}"),)
    assert TOKEN not in repr(settings)


def test_tls_files_are_checked_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(ConnectionSettingsError, match="tls_cert needs tls_key") as caught:
        ConnectionSettings.resolve("127.0.0.1:1", tls_cert=b"cert")
    assert caught.value.argument == "tls_key"
    missing = tmp_path / "absent.pem"
    with pytest.raises(ConnectionSettingsError, match=r"absent\.pem: cannot read it") as caught:
        ConnectionSettings.resolve("127.0.0.1:1", tls_ca=missing)
    assert caught.value.message_for({"tls_ca": "--tls-ca"}).startswith("--tls-ca ")


# TLS and mutual TLS


def test_tls_with_a_ca_bundle_and_a_token(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path, "127.0.0.1")
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    with running_fake_server(credentials) as fake:
        fake.service.script = [image(0, 7, b"png"), completed()]
        with KilnClient(fake.address, tls_ca=cert, token=TOKEN, timeout=10) as client:
            client.wait_until_ready(timeout=10)
            assert client.generate("a teapot").images[0].data == b"png"
        assert fake.service.metadata[-1]["authorization"] == f"Bearer {TOKEN}"
        # A client that does not trust the certificate never gets through.
        (tmp_path / "other").mkdir()
        other, _ = self_signed_certificate(tmp_path / "other", "127.0.0.1")
        with (
            KilnClient(fake.address, tls_ca=other, timeout=10) as client,
            pytest.raises(ServerUnreachable, match=r"(?i)handshake"),
        ):
            client.list_models()


def test_tls_server_name_checks_a_certificate_for_another_name(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path, "kiln.internal")
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    with running_fake_server(credentials) as fake:
        with KilnClient(fake.address, tls_ca=cert, tls_server_name="kiln.internal") as client:
            client.list_models()
        with (
            KilnClient(fake.address, tls_ca=cert, timeout=10) as client,
            pytest.raises(ServerUnreachable),
        ):
            client.list_models()  # the certificate does not name 127.0.0.1


def test_mutual_tls_needs_the_client_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path, "127.0.0.1")
    client_cert, client_key = self_signed_certificate(tmp_path, "kiln-client")
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_cert.read_bytes(),
        require_client_auth=True,
    )
    with running_fake_server(credentials) as fake:
        with KilnClient(
            fake.address, tls_ca=cert.read_bytes(), tls_cert=client_cert, tls_key=client_key
        ) as client:
            client.list_models()
        with KilnClient(fake.address, tls_ca=cert, timeout=10) as client, pytest.raises(KilnError):
            client.list_models()
    assert len(fake.service.metadata) == 1


async def test_async_client_over_tls_to_a_list_of_servers(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path, "127.0.0.1")
    pair = [(key.read_bytes(), cert.read_bytes())]
    with (
        running_fake_server(grpc.ssl_server_credentials(pair)) as first,
        running_fake_server(grpc.ssl_server_credentials(pair)) as second,
    ):
        target = f"{first.address},{second.address}"
        async with AsyncKilnClient(target, tls_ca=cert, token=TOKEN, timeout=10) as client:
            await client.wait_until_ready(timeout=10)
            for _ in range(40):
                await client.list_models()
                if first.service.metadata and second.service.metadata:
                    break
        assert first.service.metadata and second.service.metadata


# Resubmitting a Generate stream that broke mid-way


def broken_then_whole(seed: int = 1234) -> tuple[list[Any], list[Any]]:
    """A first attempt that breaks after image 0, and a second that completes."""
    broken = [
        queued(0, request_id="req-1"),
        started(seed=seed, num_outputs=2, request_id="req-1"),
        progress(1, request_id="req-1"),
        image(0, seed, b"first", request_id="req-1"),
        Abort(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)"),
    ]
    whole = [
        queued(0, request_id="req-2"),
        started(seed=seed, num_outputs=2, request_id="req-2"),
        progress(1, request_id="req-2"),
        image(0, seed, b"first again", request_id="req-2"),
        image(1, seed + 1, b"second", request_id="req-2"),
        completed(num_images=2, request_id="req-2"),
    ]
    return broken, whole


def describe(event: pb.GenerateResponse) -> str:
    kind = str(event.WhichOneof("event"))
    return f"image {event.image.index}" if kind == "image" else kind


def test_a_stream_broken_mid_way_is_resubmitted_without_duplicate_images(
    kiln: FakeKiln,
) -> None:
    broken, whole = broken_then_whole()
    kiln.service.scripts = [broken]
    kiln.service.script = whole
    seen: list[str] = []
    with KilnClient(kiln.address, retry=QUICK) as client:
        result = client.generate(
            "a teapot", num_outputs=2, on_event=lambda e: seen.append(describe(e))
        )
    # The callback sees the restart (queued, started, progress again) but each image once.
    assert seen == [
        "queued", "started", "progress", "image 0",
        "queued", "started", "progress", "image 1", "completed",
    ]  # fmt: skip
    assert [image.data for image in result.images] == [b"first", b"second"]
    assert result.request_id == "req-2"
    first, second = kiln.service.requests
    # No seed was given: the client pinned one, the same for both attempts.
    assert first.HasField("seed") and second.seed == first.seed
    assert second == first


def test_a_given_seed_is_kept_on_resubmission(kiln: FakeKiln) -> None:
    broken, whole = broken_then_whole(seed=99)
    kiln.service.scripts = [broken]
    kiln.service.script = whole
    with KilnClient(kiln.address, retry=QUICK) as client:
        events = list(client.generate_events(build_request("a teapot", seed=99, num_outputs=2)))
    assert [describe(e) for e in events].count("image 0") == 1
    assert [request.seed for request in kiln.service.requests] == [99, 99]


async def test_async_client_resubmits_a_broken_stream(kiln: FakeKiln) -> None:
    broken, whole = broken_then_whole()
    kiln.service.scripts = [broken]
    kiln.service.script = whole
    async with AsyncKilnClient(kiln.address, retry=QUICK) as client:
        result = await client.generate("a teapot", num_outputs=2)
    assert [image.index for image in result.images] == [0, 1]
    first, second = kiln.service.requests
    assert first.HasField("seed") and second == first


def test_a_proxy_reset_before_any_event_is_resubmitted(kiln: FakeKiln) -> None:
    """nginx resets a stream whose upstream died before answering (it does not pass a POST
    on to another server) with an INTERNAL gRPC's retry policy does not cover."""
    reset = "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"
    kiln.service.scripts = [[Abort(grpc.StatusCode.INTERNAL, reset)]]
    kiln.service.script = [image(0, 7, b"png"), completed()]
    with KilnClient(kiln.address, retry=QUICK) as client:
        assert [image.data for image in client.generate("a teapot").images] == [b"png"]
    assert len(kiln.service.requests) == 2


@pytest.mark.parametrize(
    "failure",
    [
        Abort(grpc.StatusCode.INTERNAL, "the engine failed"),
        Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests in flight"),
        Abort(grpc.StatusCode.INVALID_ARGUMENT, "width: must be a multiple of 8"),
        Abort(grpc.StatusCode.UNAUTHENTICATED, "missing token"),
    ],
)
def test_a_server_decision_is_never_resubmitted(kiln: FakeKiln, failure: Abort) -> None:
    kiln.service.script = [queued(0), failure]
    with KilnClient(kiln.address, retry=QUICK) as client, pytest.raises(KilnError) as caught:
        client.generate("a teapot")
    assert caught.value.code == failure.code
    assert len(kiln.service.requests) == 1


def test_resubmission_stops_after_max_attempts(kiln: FakeKiln) -> None:
    kiln.service.script = [queued(0), Abort(grpc.StatusCode.UNAVAILABLE, "gone")]
    with KilnClient(kiln.address, retry=QUICK) as client, pytest.raises(Unavailable):
        client.generate("a teapot")
    assert len(kiln.service.requests) == QUICK.max_attempts


def test_a_failure_before_any_event_is_left_to_grpcs_retry_policy(kiln: FakeKiln) -> None:
    """gRPC itself retries a call the server refused before answering: the client does not
    multiply those attempts with its own."""
    kiln.service.script = [Abort(grpc.StatusCode.UNAVAILABLE, "draining")]
    with KilnClient(kiln.address, retry=QUICK) as client, pytest.raises(Unavailable):
        client.generate("a teapot")
    assert len(kiln.service.requests) == QUICK.max_attempts


def test_without_retry_a_broken_stream_fails_at_once(kiln: FakeKiln) -> None:
    broken, whole = broken_then_whole()
    kiln.service.scripts = [broken]
    kiln.service.script = whole
    with KilnClient(kiln.address, retry=False) as client, pytest.raises(Unavailable):
        client.generate("a teapot", num_outputs=2)
    (request,) = kiln.service.requests
    assert not request.HasField("seed")  # the server picks it, as without a client


class _FixedPause(RetryPolicy):
    """A retry policy without jitter: every pause is `initial_backoff`."""

    def backoff(self, retry: int) -> float:
        return self.initial_backoff


def test_no_resubmission_when_the_pause_would_pass_the_deadline(kiln: FakeKiln) -> None:
    slow = _FixedPause(initial_backoff=5.0, max_backoff=5.0)
    kiln.service.script = [queued(0), Abort(grpc.StatusCode.UNAVAILABLE, "gone")]
    with KilnClient(kiln.address, retry=slow, timeout=2) as client, pytest.raises(Unavailable):
        client.generate("a teapot")
    assert len(kiln.service.requests) == 1


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "retryable"),
    [
        (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)", True),
        # What gRPC reports when nginx resets the stream because its upstream died.
        (
            grpc.StatusCode.INTERNAL,
            "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))",
            True,
        ),
        (grpc.StatusCode.INTERNAL, "the engine failed", False),
        (grpc.StatusCode.UNKNOWN, "Stream removed", False),
        (grpc.StatusCode.CANCELLED, "cancelled", False),
    ],
)
def test_retryable_stream_failures(code: grpc.StatusCode, details: str, retryable: bool) -> None:
    assert is_retryable_stream_failure(_Failure(code, details)) is retryable


# The gateway's upstream connection


def test_gateway_reaches_a_tls_upstream_with_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln_gateway.app import upstream_connection
    from kiln_gateway.settings import load_settings

    cert, key = self_signed_certificate(tmp_path, "127.0.0.1")
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    monkeypatch.setenv("KILN_API_TOKEN", TOKEN)
    with running_fake_server(credentials) as fake:
        settings = load_settings(
            {"upstream": fake.address}, {"KILN_GATEWAY_UPSTREAM_TLS_CA": str(cert)}
        )
        assert settings.upstream_tls_ca == cert
        connection = upstream_connection(settings)
        assert connection.tls and connection.token == TOKEN

        async def list_models() -> None:
            async with AsyncKilnClient(connection) as client:
                await client.list_models()

        asyncio.run(list_models())
    assert fake.service.metadata[0]["authorization"] == f"Bearer {TOKEN}"


def test_gateway_refuses_a_plaintext_token_to_a_remote_upstream(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln_gateway.cli import main

    monkeypatch.delenv("KILN_API_TOKENS", raising=False)
    monkeypatch.setenv("KILN_API_TOKEN", TOKEN)
    assert main(["--upstream", "10.1.2.3:50051"]) == 2
    message = capsys.readouterr().err
    assert "--upstream-tls-ca" in message and "--upstream-allow-plaintext-token" in message
    assert TOKEN not in message


# End to end: a real `kiln serve` with tokens, TLS and mutual TLS


def test_client_and_cli_reach_a_server_with_tokens_and_mutual_tls(
    tmp_path: Path,
    kiln_cache_dir: Path,
    tiny_model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway_support import certificate_authority
    from test_generate_cli import run_cli
    from test_server_auth import start_tls_server

    from kiln_client.errors import Unauthenticated

    ca = certificate_authority(tmp_path)
    cert, key = self_signed_certificate(tmp_path, "127.0.0.1")
    client_cert, client_key = self_signed_certificate(
        tmp_path, "kiln-client", issuer=ca, client=True
    )
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    tls = {"tls_ca": cert, "tls_cert": client_cert, "tls_key": client_key}
    server = start_tls_server(
        tmp_path / "server",
        kiln_cache_dir,
        grpc.ssl_channel_credentials(
            cert.read_bytes(), client_key.read_bytes(), client_cert.read_bytes()
        ),
        *("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca[0])),
        *("--api-tokens-file", str(tokens)),
    )
    try:
        monkeypatch.setenv("KILN_API_TOKEN", TOKEN)
        with KilnClient(server.address, timeout=60, **tls) as client:
            client.wait_until_ready(timeout=60)
            result = client.generate("a teapot", width=32, height=32, num_inference_steps=2)
            assert [image.index for image in result.images] == [0]
            assert [model.name for model in client.list_models().models] == ["tiny"]
        with (
            KilnClient(server.address, token="", timeout=60, **tls) as client,
            pytest.raises(Unauthenticated),
        ):
            client.list_models()
        with (
            KilnClient(server.address, tls_ca=cert, timeout=60) as client,
            pytest.raises(KilnError),
        ):
            client.list_models()  # no client certificate: the handshake fails

        out = tmp_path / "cli.png"
        flags = ["--tls-ca", str(cert), "--tls-cert", str(client_cert), "--tls-key"]
        flags += [str(client_key), "--server", server.address]
        assert run_cli("generate", "x", *flags, "--steps", "2", "--out", str(out)) == 0
        assert out.read_bytes().startswith(b"\x89PNG")
        monkeypatch.delenv("KILN_API_TOKEN")
        assert run_cli("models", *flags) == 1
        assert "requires an API token and none was sent" in capsys.readouterr().err
    finally:
        assert server.terminate() == 0
