"""Who may call `kiln serve`: bearer tokens and scopes, per-token limits, TLS and mutual TLS.

Two real servers serve every end-to-end assertion: one over TLS with tokens (from the
config file and a token file), a limit of one Generate in flight per token, a plaintext
health-only port and metrics; one requiring client certificates (mutual TLS) without
tokens. Settings the server must refuse are tried on the real command, which exits 2 before
loading anything.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import TINY_MODEL_CONFIG, start_server
from e2e_support import (
    CHANNEL_OPTIONS,
    RPC_TIMEOUT,
    expect_error,
    generate,
    images,
    kinds,
    log_records,
    request,
    status_details,
)
from gateway_support import certificate_authority, self_signed_certificate
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_client.proto.kiln.v1 import model_admin_service_pb2 as admin_pb
from kiln_client.proto.kiln.v1 import model_admin_service_pb2_grpc as admin_grpc
from kiln_server.auth import read_tls
from kiln_server.local import LocalServer
from kiln_server.settings import SettingsError, load_settings
from kiln_server.tokens import ADMIN, GENERATE, parse_token_entries, read_token_file

APP = "app-a-3f9c1e77"  # generate, from the config file
ROOT = "root-77b2d0c4"  # generate+admin, from the config file
OTHER_APP = "app-b-8d41aa03"  # generate, from the token file
OPS = "ops-5e0c9f12"  # admin only, from the token file
TOKEN_FILE = f"""\
# tokens for kiln serve: one entry per line
{OTHER_APP}   # the second app

  # the operators' token cannot generate
{OPS}:admin
"""
SERVING = health_pb2.HealthCheckResponse.SERVING
START_TIMEOUT = 180.0


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Certificates:
    """A server certificate for 127.0.0.1 and a client certificate signed by a test CA."""

    server: tuple[Path, Path]
    ca: Path
    client: tuple[Path, Path]

    def channel_credentials(
        self, client: tuple[Path, Path] | None = None
    ) -> grpc.ChannelCredentials:
        """Trust the server's certificate; present `client` (cert, key) when given."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.server[0].read_bytes(),
            private_key=client[1].read_bytes() if client else None,
            certificate_chain=client[0].read_bytes() if client else None,
        )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls")
    ca = certificate_authority(folder)
    return Certificates(
        server=self_signed_certificate(folder, "127.0.0.1"),
        ca=ca[0],
        client=self_signed_certificate(folder, "kiln-client", issuer=ca, client=True),
    )


def start_tls_server(
    workdir: Path, cache_dir: Path, credentials: grpc.ChannelCredentials, *args: str, **kw: Any
) -> LocalServer:
    """A tiny-model server given --tls-cert: SERVING asked over TLS."""
    server = start_server(workdir, cache_dir, "--backend", "torch", *args, wait_serving=False, **kw)
    server.credentials = credentials
    server.wait_for_health(SERVING, START_TIMEOUT)
    return server


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory,
    kiln_cache_dir: Path,
    tiny_model_path: Path,
    certificates: Certificates,
) -> Iterator[LocalServer]:
    """TLS, four tokens (two in the config file, two in a token file), one Generate in
    flight per token, and a plaintext health-only port."""
    workdir = tmp_path_factory.mktemp("secured")
    token_file = workdir / "tokens"
    token_file.write_text(TOKEN_FILE)
    config = TINY_MODEL_CONFIG.replace(
        "[server]\n", f'[server]\napi_tokens = ["{APP}", "{ROOT}:generate+admin"]\n'
    )
    cert, key = certificates.server
    server = start_tls_server(
        workdir,
        kiln_cache_dir,
        certificates.channel_credentials(),
        *("--tls-cert", str(cert), "--tls-key", str(key)),
        *("--api-tokens-file", str(token_file), "--max-inflight-per-token", "1"),
        *("--health-port", "0", "--metrics-port", "0"),
        config=config,
    )
    yield server
    assert server.terminate() == 0


@pytest.fixture(scope="module")
def stub(secured: LocalServer) -> Iterator[pb_grpc.GenerationServiceStub]:
    with secured.channel(CHANNEL_OPTIONS) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def listening_record(server: LocalServer) -> dict[str, Any]:
    (record,) = [r for r in log_records(server.logs()) if r["message"].startswith("listening")]
    return record


# --- tokens and scopes ----------------------------------------------------------------------


def test_a_good_token_generates_and_lists_models(stub: pb_grpc.GenerationServiceStub) -> None:
    events = list(
        stub.Generate(request(seed=3, num_inference_steps=2), metadata=bearer(APP), timeout=60)
    )
    listed = stub.ListModels(pb.ListModelsRequest(), metadata=bearer(OTHER_APP), timeout=30)

    assert kinds(events)[-1] == "completed" and len(images(events)) == 1
    assert [model.name for model in listed.models] == ["tiny"]


def test_a_call_without_a_token_is_unauthenticated(stub: pb_grpc.GenerationServiceStub) -> None:
    generating = expect_error(lambda: generate(stub, request(seed=1)))
    listing = expect_error(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30))

    for error in (generating, listing):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing `authorization` metadata" in error.details()
        assert "Bearer <token>" in error.details()


def test_a_wrong_token_is_unauthenticated(stub: pb_grpc.GenerationServiceStub) -> None:
    wrong = "app-a-3f9c1e78"
    error = expect_error(
        lambda: list(stub.Generate(request(seed=1), metadata=bearer(wrong), timeout=30))
    )

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "the bearer token is not one this server accepts"


MALFORMED_HEADERS = {
    "no scheme": ((("authorization", APP),)),
    "another scheme": ((("authorization", f"Basic {APP}"),)),
    "Bearer without a token": ((("authorization", "Bearer "),)),
    "two authorization entries": (("authorization", f"Bearer {APP}"),) * 2,
}


@pytest.mark.parametrize("metadata", MALFORMED_HEADERS.values(), ids=MALFORMED_HEADERS.keys())
def test_a_malformed_authorization_header_is_unauthenticated(
    stub: pb_grpc.GenerationServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    error = expect_error(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata))

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "malformed `authorization` metadata" in error.details()
    assert APP not in error.details()  # a token is never echoed


def test_an_admin_only_token_may_not_generate(stub: pb_grpc.GenerationServiceStub) -> None:
    generating = expect_error(
        lambda: list(stub.Generate(request(seed=1), metadata=bearer(OPS), timeout=30))
    )
    listing = expect_error(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=bearer(OPS)))

    for error in (generating, listing):
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs a token with the `generate` scope; this token has `admin`" in error.details()
    # A token with both scopes generates.
    assert stub.ListModels(pb.ListModelsRequest(), metadata=bearer(ROOT), timeout=30).models


def test_health_and_reflection_are_open_without_a_token(secured: LocalServer) -> None:
    with secured.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        services = ProtoReflectionDescriptorDatabase(channel).get_services()

    assert reply.status == SERVING
    assert {"kiln.v1.GenerationService", "grpc.health.v1.Health"} <= set(services)


def test_the_health_port_answers_health_only_in_plain_text(secured: LocalServer) -> None:
    (record,) = [r for r in log_records(secured.logs()) if "grpc.health.v1 only" in r["message"]]
    address = record["message"].rpartition(" ")[2]

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kiln.v1.GenerationService"), timeout=10
        )
        stub = pb_grpc.GenerationServiceStub(channel)
        error = expect_error(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=bearer(APP)))

    assert reply.status == SERVING
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- per-token limit ------------------------------------------------------------------------


def refused_requests(server: LocalServer) -> float:
    """kiln_requests_total{model="tiny",outcome="refused"} from the server's /metrics."""
    (record,) = [r for r in log_records(server.logs()) if "metrics_port" in r]
    page = httpx.get(f"http://127.0.0.1:{record['metrics_port']}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "kiln_requests_total"
        and sample.labels == {"model": "tiny", "outcome": "refused"}
    )


def test_a_token_over_its_in_flight_limit_is_refused_while_others_are_admitted(
    secured: LocalServer, stub: pb_grpc.GenerationServiceStub
) -> None:
    refused_before = refused_requests(secured)
    long_job = request(seed=1, width=512, height=512, num_inference_steps=150)
    running = stub.Generate(long_job, metadata=bearer(APP), timeout=RPC_TIMEOUT)
    others = None
    try:
        assert next(running).WhichOneof("event") == "queued"

        error = expect_error(
            lambda: list(stub.Generate(long_job, metadata=bearer(APP), timeout=RPC_TIMEOUT))
        )
        others = stub.Generate(long_job, metadata=bearer(OTHER_APP), timeout=RPC_TIMEOUT)
        others_first = next(others).WhichOneof("event")

        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_per_token" in error.details()
        (retry,) = status_details(error, error_details_pb2.RetryInfo)
        assert retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9 > 0
        assert others_first == "queued"  # another token is still admitted
        assert running.is_active()
        assert refused_requests(secured) == refused_before + 1
    finally:
        running.cancel()
        if others is not None:
            others.cancel()
    # The cancelled call gives its slot back once the server has seen it end.
    deadline = time.monotonic() + 30
    while True:
        try:
            events = list(
                stub.Generate(request(seed=2, num_inference_steps=2), metadata=bearer(APP))
            )
            break
        except grpc.RpcError as refused:
            if refused.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert kinds(events)[-1] == "completed"


# --- what the server says -------------------------------------------------------------------


def test_the_start_up_log_states_auth_and_tls_and_no_token_is_ever_logged(
    secured: LocalServer,
) -> None:
    record = listening_record(secured)
    logs = secured.logs()

    assert record["message"].endswith("(auth on, 4 token(s); TLS on)")
    for token in (APP, ROOT, OTHER_APP, OPS):
        assert token not in logs


# --- mutual TLS ------------------------------------------------------------------------------


def test_mutual_tls_lets_in_clients_with_a_certificate_only(
    tmp_path_factory: pytest.TempPathFactory,
    kiln_cache_dir: Path,
    tiny_model_path: Path,
    certificates: Certificates,
) -> None:
    cert, key = certificates.server
    with_certificate = certificates.channel_credentials(certificates.client)
    server = start_tls_server(
        tmp_path_factory.mktemp("mtls"),
        kiln_cache_dir,
        with_certificate,
        *("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(certificates.ca)),
        # Beyond loopback: without tokens, mutual TLS is what admits callers.
        *("--host", "0.0.0.0"),
    )
    stranger = self_signed_certificate(tmp_path_factory.mktemp("stranger"), "stranger", client=True)
    try:
        with server.channel() as channel:  # the client certificate, no token
            listed = pb_grpc.GenerationServiceStub(channel).ListModels(
                pb.ListModelsRequest(), timeout=30
            )
            # A certificate admits to generate; the admin RPCs need an admin-scoped token.
            admin = admin_grpc.ModelAdminServiceStub(channel)
            admin_refusal = expect_error(
                functools.partial(
                    admin.ListModelStates, admin_pb.ListModelStatesRequest(), timeout=30
                )
            )
        refused = []
        for credentials in (
            certificates.channel_credentials(),  # no client certificate
            certificates.channel_credentials(stranger),  # not signed by the client CA
        ):
            with grpc.secure_channel(server.address, credentials) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                call = functools.partial(stub.ListModels, pb.ListModelsRequest(), timeout=30)
                refused.append(expect_error(call))
        record = listening_record(server)
    finally:
        assert server.terminate() == 0

    assert [model.name for model in listed.models] == ["tiny"]
    assert [error.code() for error in refused] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert admin_refusal.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "TOKEN:admin" in (admin_refusal.details() or "")
    assert record["message"].endswith("(auth off; mutual TLS on: client certificates required)")


# --- settings the server refuses --------------------------------------------------------------


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`kiln serve ARGS` as a user runs it, expected to stop at its settings."""
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    return subprocess.run(
        [sys.executable, "-m", "kiln_client.cli", "serve", "--port", "0", *args],
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


REFUSED_STARTS = {
    "non-loopback without tokens": (
        ("--host", "0.0.0.0"),
        {},
        "refusing to listen on 0.0.0.0 without API tokens",
        "Set KILN_API_TOKENS=token1,token2",
    ),
    "tokens in plain text on a non-loopback address": (
        ("--host", "0.0.0.0"),
        {"KILN_API_TOKENS": APP},
        "refusing to accept API tokens in plain text on 0.0.0.0",
        "--allow-plaintext-tokens",
    ),
    "a missing TLS key": (
        ("--tls-cert", "{cert}", "--tls-key", "{folder}/missing.key"),
        {},
        "--tls-key {folder}/missing.key does not exist",
        "give the path of a PEM file",
    ),
    "a missing token file": (
        ("--api-tokens-file", "{folder}/tokens.txt"),
        {},
        "API token file {folder}/tokens.txt does not exist",
        "create it",
    ),
    "a token entry with an unknown scope": (
        (),
        {"KILN_API_TOKENS": f"{APP}:generate,{OPS}:root"},
        "KILN_API_TOKENS entry 2: write TOKEN or TOKEN:admin",
        "scopes generate and admin",
    ),
}


@pytest.mark.parametrize(
    ("args", "env", "problem", "fix"), REFUSED_STARTS.values(), ids=REFUSED_STARTS.keys()
)
def test_unsafe_or_broken_settings_stop_the_server_with_exit_2(
    tmp_path: Path,
    certificates: Certificates,
    args: tuple[str, ...],
    env: dict[str, str],
    problem: str,
    fix: str,
) -> None:
    values = {"cert": str(certificates.server[0]), "folder": str(tmp_path)}

    result = run_serve(*(arg.format(**values) for arg in args), env=env)

    assert result.returncode == 2, result.stderr
    assert problem.format(**values) in result.stderr and fix in result.stderr
    assert OPS not in result.stderr and APP not in result.stderr  # a token is never shown


def test_safe_non_loopback_settings_are_accepted(tmp_path: Path) -> None:
    behind_proxy, _ = load_settings(
        {"host": "0.0.0.0", "allow_plaintext_tokens": True}, {"KILN_API_TOKENS": APP}
    )
    certificate = {"tls_cert": Path("c"), "tls_key": Path("k"), "tls_client_ca": Path("ca")}
    mutual_tls, _ = load_settings({"host": "0.0.0.0", **certificate}, {})

    assert behind_proxy.auth_enabled and not behind_proxy.tls_enabled
    assert mutual_tls.mtls_enabled and not mutual_tls.auth_enabled


INCOMPLETE_SETTINGS = {
    "a certificate without its key": (
        {"tls_cert": Path("c.pem")},
        "give both --tls-cert and --tls-key",
    ),
    "a client CA without TLS": (
        {"tls_client_ca": Path("ca.pem")},
        "--tls-client-ca needs --tls-cert and --tls-key",
    ),
    "a negative in-flight limit": (
        {"max_inflight_per_token": -1},
        "use 1 or more, or 0 for no per-token limit",
    ),
    "the health port on the gRPC port": (
        {"port": 50051, "health_port": 50051},
        "choose another --health-port",
    ),
}


@pytest.mark.parametrize(
    ("flags", "fix"), INCOMPLETE_SETTINGS.values(), ids=INCOMPLETE_SETTINGS.keys()
)
def test_incomplete_access_settings_name_the_fix(flags: dict[str, Any], fix: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(fix)):
        load_settings(flags, {})


def test_a_key_that_is_not_the_certificates_is_refused(
    tmp_path: Path, certificates: Certificates
) -> None:
    settings, _ = load_settings(
        {"tls_cert": certificates.server[0], "tls_key": certificates.client[1]}, {}
    )

    with pytest.raises(SettingsError, match="are not a PEM certificate and its unencrypted"):
        read_tls(settings)


# --- the shared token syntax ------------------------------------------------------------------


def test_token_entries_carry_scopes() -> None:
    tokens = parse_token_entries(
        " plain , ops:admin, both:generate+admin, has:colon:generate,plain:admin", "test"
    )

    assert {token.secret: token.scopes for token in tokens} == {
        "plain": {GENERATE, ADMIN},  # entries for one token add up
        "ops": {ADMIN},
        "both": {GENERATE, ADMIN},
        "has:colon": {GENERATE},
    }
    assert "plain" not in repr(tokens)
    for bad in ("x:", ":admin", "x:generate+", "with space", "x:Admin"):
        with pytest.raises(SettingsError, match="test entry 1: write TOKEN or TOKEN:admin"):
            parse_token_entries(bad, "test")


def test_token_sources_add_up_and_the_environment_beats_the_config_file(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN_FILE)
    config = tmp_path / "kiln.toml"
    config.write_text('[server]\napi_tokens = ["from-config"]\napi_tokens_file = "tokens"\n')

    from_file, _ = load_settings({"config": config}, {})
    from_env, _ = load_settings({"config": config}, {"KILN_API_TOKENS": "from-env:admin"})

    assert [t.secret for t in from_file.api_tokens] == ["from-config", OTHER_APP, OPS]
    assert [(t.secret, t.scopes) for t in from_env.api_tokens] == [
        ("from-env", {ADMIN}),
        (OTHER_APP, {GENERATE}),
        (OPS, {ADMIN}),
    ]
    assert "from-env" not in repr(from_env)


def test_a_bad_token_file_line_is_named_by_number_not_content(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# ok\ngood\nsecret-one:root\n")

    with pytest.raises(SettingsError, match=r"tokens line 3: write TOKEN") as caught:
        read_token_file(token_file)
    assert "secret-one" not in str(caught.value)
