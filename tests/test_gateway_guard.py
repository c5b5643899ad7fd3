"""Isolation and bounds: a token sees only its own predictions, requests are checked before
their bodies are read, outbound URLs reach only public addresses, and echoed input is short.

One gateway (in-process, SQLite) in front of the stand-in Kiln server of
tests/gateway_support.py serves the module; raw sockets show what is answered before a
body is sent.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_support import (
    ADMIN_TOKEN,
    OTHER_TOKEN,
    TOKEN,
    Gateway,
    fake_kiln,
    in_process,
    settings_for,
)

from kiln_gateway.settings import SettingsError, load_settings, parse_tokens
from kiln_gateway.webhooks import WebhookSender

LIMIT = 64 * 1024
CREATE = "/v1/models/acme/fake/predictions"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Tokens on (one admin), request bodies limited to 64 KiB, webhooks to public hosts only."""
    folder = tmp_path_factory.mktemp("guarded")
    with fake_kiln() as upstream:
        settings = settings_for(
            upstream,
            f"sqlite:///{folder / 'predictions.db'}",
            folder / "files",
            max_request_bytes=LIMIT,
            webhook_allowed_hosts=(),
        )
        with in_process(settings) as running:
            yield running


def raw_exchange(gateway: Gateway, head: str, body: bytes = b"") -> bytes:
    """Send request headers and part of a body on a raw socket; the answer the gateway gives
    without waiting for the rest."""
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while not _complete(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _complete(answer: bytes) -> bool:
    """True once the headers and the Content-Length bytes of body after them have arrived
    (they may come in separate packets)."""
    head, separator, body = answer.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# --- who sees what --------------------------------------------------------------------------


def test_a_token_sees_only_its_own_predictions_and_an_admin_sees_all(gateway: Gateway) -> None:
    with gateway.client(TOKEN) as mine, gateway.client(OTHER_TOKEN) as other:
        created = mine.post(CREATE, json={"input": {"prompt": "quick"}}).json()
        theirs = other.post(CREATE, json={"input": {"prompt": "quick"}}).json()
        path = f"/v1/predictions/{created['id']}"
        peeked = other.get(path)
        canceled = other.post(f"{path}/cancel")
        streamed = other.get(f"{path}/stream")
        other_list = [p["id"] for p in other.get("/v1/predictions").json()["results"]]
        my_list = [p["id"] for p in mine.get("/v1/predictions").json()["results"]]
    with gateway.client(ADMIN_TOKEN) as admin:
        admin_view = admin.get(path)
        admin_list = [p["id"] for p in admin.get("/v1/predictions").json()["results"]]

    assert (peeked.status_code, canceled.status_code, streamed.status_code) == (404, 404, 404)
    assert created["id"] not in other_list and theirs["id"] in other_list
    assert created["id"] in my_list and theirs["id"] not in my_list
    assert admin_view.status_code == 200 and admin_view.json()["id"] == created["id"]
    assert {created["id"], theirs["id"]} <= set(admin_list)


def test_tokens_carry_scopes_in_kiln_api_tokens() -> None:
    tokens, admins = parse_tokens(" app-a , ops:admin,app-b,,")

    assert tokens == ("app-a", "ops", "app-b") and admins == ("ops",)
    assert load_settings({}, {"KILN_API_TOKENS": "x:admin"}).admin_tokens == ("x",)
    with pytest.raises(SettingsError, match="entry 2: write TOKEN or TOKEN:admin") as caught:
        parse_tokens("fine,secret-value:root")
    assert "secret-value" not in str(caught.value)  # a token is never shown


# --- checked before the body ----------------------------------------------------------------


def test_a_request_without_a_token_is_refused_before_its_body_is_read(gateway: Gateway) -> None:
    head = (
        f"POST {CREATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 50000000\r\n"
    )

    answer = raw_exchange(gateway, head, b'{"input": {')  # 11 of the 50 MB announced

    assert status_of(answer) == 401
    assert b"connection: close" in answer.lower()


def test_a_body_declared_too_large_is_413_before_it_is_read(gateway: Gateway) -> None:
    head = (
        f"POST {CREATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {LIMIT + 1}\r\n"
    )

    answer = raw_exchange(gateway, head, b'{"input": {')

    assert status_of(answer) == 413
    assert f"limited to {LIMIT} bytes".encode() in answer


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(gateway: Gateway) -> None:
    chunk = b'{"input": {"prompt": "' + b"x" * 16000
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(400):  # 6.4 MB offered, 64 KiB allowed
            sent += 1
            yield chunk

    with gateway.client() as http:
        try:
            reply = http.post(CREATE, content=body(), headers={"Content-Type": "application/json"})
            status = reply.status_code
        except httpx.HTTPError:  # the gateway may close the connection while we still send
            status = 413
    with gateway.client() as http:
        after = http.get("/v1/predictions?page_size=1")

    assert status == 413
    assert sent < 400
    assert after.status_code == 200  # the gateway is fine


def test_a_foreign_host_header_is_refused_without_a_public_url(gateway: Gateway) -> None:
    with gateway.client() as http:
        forged = http.get("/v1/predictions", headers={"Host": "attacker.example"})
        own = http.get("/v1/predictions", headers={"Host": "localhost"})

    assert forged.status_code == 400
    detail = forged.json()["detail"]
    assert "--public-url" in detail and "--allowed-hosts" in detail
    assert own.status_code == 200


def test_links_come_from_the_public_url_whatever_the_host(tmp_path: Path) -> None:
    with fake_kiln() as upstream:
        settings = settings_for(
            upstream,
            f"sqlite:///{tmp_path / 'p.db'}",
            tmp_path / "files",
            public_url="https://kiln.example.com",
        )
        with in_process(settings) as gateway, gateway.client() as http:
            reply = http.post(
                CREATE,
                json={"input": {"prompt": "quick"}},
                headers={"Host": "attacker.example", "Prefer": "wait"},
            )

    body = reply.json()
    assert reply.headers["location"].startswith("https://kiln.example.com/v1/predictions/")
    assert body["urls"]["get"].startswith("https://kiln.example.com/")
    assert body["output"][0].startswith("https://kiln.example.com/files/")


# --- what is stored and echoed --------------------------------------------------------------


def test_unknown_input_fields_are_dropped_and_noted_not_stored(gateway: Gateway) -> None:
    junk = "y" * 40000
    with gateway.client() as http:
        reply = http.post(
            CREATE,
            json={"input": {"prompt": "quick", "x" * 500: junk, "extra": 1}},
            headers={"Prefer": "wait"},
        )
        again = http.get(f"/v1/predictions/{reply.json()['id']}").json()

    assert reply.status_code == 201
    assert again["input"] == {"prompt": "quick"}
    note = next(line for line in again["logs"].splitlines() if line.startswith("ignoring"))
    assert note.startswith("ignoring input field(s) this model does not have: extra, xxx")
    assert len(note) < 200 and junk not in again["logs"]


def test_user_input_echoed_in_errors_is_cut_short(gateway: Gateway) -> None:
    long = "z" * 5000
    with gateway.client() as http:
        missing = http.get(f"/v1/predictions/{long}")
        model = http.post(f"/v1/models/acme/{long}/predictions", json={"input": {}})
        version = http.post("/v1/predictions", json={"version": long, "input": {}})
        prefer = http.post(CREATE, json={"input": {}}, headers={"Prefer": f"wait={long}"})

    for reply, status in ((missing, 404), (model, 404), (version, 422), (prefer, 400)):
        assert reply.status_code == status
        assert len(reply.json()["detail"]) < 600 and long not in reply.text


# --- outbound URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "url", "reason"),
    [
        ("webhook", "http://127.0.0.1:9/hook", "127.0.0.1 is a loopback address"),
        ("webhook", "http://169.254.169.254/latest", "169.254.169.254 is a link-local address"),
        ("webhook_completed", "http://10.1.2.3/done", "10.1.2.3 is a private address"),
        ("webhook", "ftp://example.com/x", "use an http:// or https:// URL"),
    ],
)
def test_webhooks_to_non_public_addresses_are_422_naming_the_field(
    gateway: Gateway, field: str, url: str, reason: str
) -> None:
    with gateway.client() as http:
        reply = http.post(CREATE, json={"input": {"prompt": "quick"}, field: url})

    assert reply.status_code == 422
    (problem,) = reply.json()["invalid_fields"]
    assert problem["field"] == field and reason in problem["description"]


def test_webhook_addresses_are_checked_again_when_delivered() -> None:
    answers = {"hooks.example.com": ["93.184.216.34"]}

    async def resolver(host: str, port: int) -> list[str]:
        return answers[host]

    async def run() -> tuple[str | None, str | None, str | None]:
        settings = load_settings({}, {})
        sender = WebhookSender(settings, "whsec_" + "A" * 44, resolver=resolver)
        allowed = WebhookSender(
            load_settings({"webhook_allowed_hosts": "10.0.0.0/8"}, {}),
            "whsec_" + "A" * 44,
            resolver=resolver,
        )
        at_creation = await sender.check("https://hooks.example.com/h")
        answers["hooks.example.com"] = ["10.0.0.7"]  # the name now points inside
        at_delivery = await sender.deliver("https://hooks.example.com/h", b"{}", "msg_1")
        trusted = await allowed.check("https://hooks.example.com/h")
        return at_creation, at_delivery, trusted

    at_creation, at_delivery, trusted = asyncio.run(run())

    assert at_creation is None
    assert at_delivery is not None
    assert "hooks.example.com resolves to 10.0.0.7, a private address" in at_delivery
    assert "--webhook-allowed-hosts" in at_delivery
    assert trusted is None
