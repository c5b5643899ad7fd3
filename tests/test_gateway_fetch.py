"""The gateway's URL fetcher: which addresses it refuses, and its redirect, size, time and
type limits, against a real HTTP(S) server on 127.0.0.1.

The success paths reach that local server either with `allow_private=True` or with an
address check that trusts exactly 127.0.0.1, and host names come from a resolver the test
controls, so no test needs the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import ipaddress
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gateway_support import self_signed_certificate
from PIL import Image

from kiln_gateway.fetch import FetchError, IPAddress, UrlFetcher, address_problem

PNG = Image.new("RGB", (8, 8), "red")
_buffer = io.BytesIO()
PNG.save(_buffer, format="PNG")
PNG_BYTES = _buffer.getvalue()


@dataclass
class ImageServer:
    """A local HTTP(S) server with one route per behaviour a fetch must handle."""

    port: int = 0
    scheme: str = "http"
    hosts: list[str] = field(default_factory=list)
    """The Host header of every request, in order."""
    server_names: list[str | None] = field(default_factory=list)
    """The TLS server name (SNI) of every handshake, for HTTPS."""

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _handler(state: ImageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _png(self, body: bytes = PNG_BYTES, kind: str = "image/png") -> None:
            self._send(200, {"Content-Type": kind, "Content-Length": str(len(body))}, body)

        def _stream(self, chunk: bytes, pause: float, limit: int) -> None:
            """Send a PNG signature then `chunk` repeatedly (no length) until cut off."""
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            sent = 0
            try:
                self.wfile.write(PNG_BYTES[:8])
                while sent < limit:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    sent += len(chunk)
                    time.sleep(pause)
            except OSError:
                pass  # the fetcher hung up, as it should

        def do_GET(self) -> None:
            state.hosts.append(self.headers.get("Host", ""))
            path = self.path
            if path == "/photo.png":
                self._png()
            elif path.startswith("/redirect/"):
                hops = int(path.rsplit("/", 1)[1])
                target = "/photo.png" if hops == 0 else f"/redirect/{hops - 1}"
                self._send(302, {"Location": target, "Content-Length": "0"})
            elif path.startswith("/to/"):
                target = path[len("/to/") :].replace("PORT", str(state.port))
                self._send(302, {"Location": target, "Content-Length": "0"})
            elif path == "/html":
                body = b"<html>not an image</html>"
                self._send(
                    200, {"Content-Type": "text/html", "Content-Length": str(len(body))}, body
                )
            elif path == "/untyped":
                self._send(200, {"Content-Length": str(len(PNG_BYTES))}, PNG_BYTES)
            elif path == "/liar":
                self._png(b"<html>not an image</html>")
            elif path == "/typed-with-charset":
                self._png(kind="IMAGE/PNG; charset=binary")
            elif path == "/huge-declared":
                self._send(200, {"Content-Type": "image/png", "Content-Length": str(10**9)})
            elif path == "/endless":
                self._stream(b"\0" * 65536, 0, 10**9)
            elif path == "/slow":
                self._stream(b"\0", 0.1, 200)
            elif path == "/gzip-bomb":
                body = gzip.compress(PNG_BYTES[:8] + b"\0" * (4 * 1024 * 1024))
                headers = {
                    "Content-Type": "image/png",
                    "Content-Encoding": "gzip",
                    "Content-Length": str(len(body)),
                }
                self._send(200, headers, body)
            else:
                self._send(404, {"Content-Length": "0"})

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextlib.contextmanager
def serving(tls: ssl.SSLContext | None = None) -> Iterator[ImageServer]:
    """Run an ImageServer on 127.0.0.1 (HTTPS when `tls` is given) until the block ends."""
    state = ImageServer(scheme="https" if tls else "http")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    if tls is not None:

        def remember_name(sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
            state.server_names.append(name)

        tls.sni_callback = remember_name
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def web() -> Iterator[ImageServer]:
    with serving() as state:
        yield state


def fake_dns(table: dict[str, list[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    """A resolver answering from `table` (a missing name fails as DNS would)."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return table[host]

    return resolve


def trust_only(*trusted: str) -> Callable[[IPAddress], str | None]:
    """An address check that lets `trusted` through and judges the rest as the gateway does."""
    allowed = {ipaddress.ip_address(text) for text in trusted}
    return lambda address: None if address in allowed else address_problem(address)


def fetch(fetcher: UrlFetcher, url: str, max_bytes: int = 1 << 20) -> bytes:
    return asyncio.run(fetcher.fetch(url, max_bytes)).data


def refusal(fetcher: UrlFetcher, url: str, max_bytes: int = 1 << 20) -> str:
    with pytest.raises(FetchError) as caught:
        fetch(fetcher, url, max_bytes)
    return str(caught.value)


# --- which addresses are refused ------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.0.0.5", "private"),
        ("172.16.3.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "private"),  # reserved (class E), which ipaddress also counts private
        ("255.255.255.255", "private"),
        ("192.0.2.10", "private"),  # documentation range
        ("198.18.0.1", "private"),  # benchmarking range
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "unique local"),
        ("fd12:3456::1", "unique local"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),  # documentation range
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("::ffff:8.8.8.8", "IPv4-mapped"),  # refused outright, whatever it maps to
        ("2002:a00:1::1", "wrapping 10.0.0.1, a private address"),  # 6to4
        ("64:ff9b::7f00:1", "wrapping 127.0.0.1, a loopback address"),  # NAT64
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    problem = address_problem(ipaddress.ip_address(address))

    assert problem is not None and reason in problem


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


# --- host names and the address actually connected to ---------------------------------------


def test_loopback_url_is_refused_without_connecting(web: ImageServer) -> None:
    before = len(web.hosts)

    reason = refusal(UrlFetcher(timeout_seconds=5), web.url("/photo.png"))

    assert "127.0.0.1 is a loopback address" in reason and "--allow-private-urls" in reason
    assert len(web.hosts) == before  # no request reached the server


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost/x.png",
        "http://2130706433/x.png",  # 127.0.0.1 as one number
        "http://0x7f.1/x.png",  # and in hex shorthand
        "http://127.1/x.png",
        "http://[::1]/x.png",
        "http://[::ffff:7f00:1]/x.png",
    ],
)
def test_loopback_in_any_spelling_is_refused(url: str) -> None:
    reason = refusal(UrlFetcher(timeout_seconds=5), url)

    assert "loopback" in reason or "IPv4-mapped" in reason


def test_a_dns_answer_with_any_private_address_is_refused() -> None:
    dns = fake_dns({"rebind.example": ["93.184.216.34", "10.0.0.7"]})

    reason = refusal(UrlFetcher(timeout_seconds=5, resolver=dns), "http://rebind.example/a.png")

    assert "rebind.example resolves to 10.0.0.7, a private address" in reason


def test_fetch_connects_to_the_address_it_checked_and_sends_the_host_name(
    web: ImageServer,
) -> None:
    lookups: list[str] = []

    async def dns(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    fetcher = UrlFetcher(timeout_seconds=5, resolver=dns, address_check=trust_only("127.0.0.1"))

    data = fetch(fetcher, web.url("/photo.png", host="images.example"))

    assert data == PNG_BYTES
    assert lookups == ["images.example"]  # resolved once, by the gateway itself
    assert web.hosts[-1] == f"images.example:{web.port}"


def test_unknown_host_is_refused_with_the_reason() -> None:
    fetcher = UrlFetcher(timeout_seconds=5, resolver=fake_dns({}))

    assert "cannot resolve host nowhere.example" in refusal(fetcher, "http://nowhere.example/")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/a.png", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http://user:secret@example.com/a.png", "user name or password"),
        ("http:///a.png", "has no host"),
    ],
)
def test_urls_that_are_not_fetched(url: str, reason: str) -> None:
    assert reason in refusal(UrlFetcher(timeout_seconds=5), url)


def test_allow_private_fetches_from_loopback(web: ImageServer) -> None:
    fetched = asyncio.run(
        UrlFetcher(timeout_seconds=5, allow_private=True).fetch(web.url("/photo.png"), 1 << 20)
    )

    assert fetched.data == PNG_BYTES and fetched.content_type == "image/png"


# --- redirects ------------------------------------------------------------------------------


def test_redirects_are_followed_up_to_the_limit(web: ImageServer) -> None:
    within = UrlFetcher(timeout_seconds=5, max_redirects=3, allow_private=True)
    beyond = UrlFetcher(timeout_seconds=5, max_redirects=2, allow_private=True)

    # /redirect/2 -> /redirect/1 -> /redirect/0 -> /photo.png: three redirects
    assert fetch(within, web.url("/redirect/2")) == PNG_BYTES
    assert "redirects more than 2 times" in refusal(beyond, web.url("/redirect/2"))


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://10.1.2.3/x.png", "10.1.2.3 is a private address"),
        ("http://127.0.0.2:PORT/photo.png", "127.0.0.2 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://intranet.example/x.png", "intranet.example resolves to 192.168.1.20"),
        ("file:///etc/passwd", "only http and https"),
        ("http://a:xx/x.png", "Invalid URL in location header"),
        ("http://8.8.8.8:99999/x.png", "invalid port 99999"),
    ],
)
def test_every_redirect_is_checked_again(web: ImageServer, target: str, reason: str) -> None:
    # 127.0.0.1 stands in for a public server that redirects somewhere the gateway must not go.
    fetcher = UrlFetcher(
        timeout_seconds=5,
        resolver=fake_dns({"intranet.example": ["192.168.1.20"]}),
        address_check=trust_only("127.0.0.1"),
    )
    before = len(web.hosts)

    assert reason in refusal(fetcher, web.url(f"/to/{target}"))
    assert web.hosts[before:] == [f"127.0.0.1:{web.port}"]  # only the redirecting server


# --- size, time and content type ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/huge-declared", "is 1000000000 bytes; the limit is 100000 bytes"),
        ("/endless", "larger than the limit of 100000 bytes"),
        ("/gzip-bomb", "larger than the limit of 100000 bytes"),  # counted after decoding
    ],
)
def test_bodies_past_the_size_limit_are_abandoned(web: ImageServer, path: str, reason: str) -> None:
    fetcher = UrlFetcher(timeout_seconds=30, allow_private=True)

    assert reason in refusal(fetcher, web.url(path), max_bytes=100_000)


def test_a_slow_server_hits_the_time_limit(web: ImageServer) -> None:
    fetcher = UrlFetcher(timeout_seconds=0.5, allow_private=True)

    assert "took longer than the gateway's limit of 0.5 s" in refusal(fetcher, web.url("/slow"))


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/html", "has Content-Type text/html; expected image/png, image/jpeg, image/webp"),
        ("/untyped", "has Content-Type (none)"),
        ("/liar", "is not a PNG, JPEG or WebP image"),
        ("/missing", "answered HTTP 404"),
    ],
)
def test_only_images_are_accepted(web: ImageServer, path: str, reason: str) -> None:
    assert reason in refusal(UrlFetcher(timeout_seconds=5, allow_private=True), web.url(path))


def test_content_type_parameters_and_case_do_not_matter(web: ImageServer) -> None:
    fetcher = UrlFetcher(timeout_seconds=5, allow_private=True)

    assert fetch(fetcher, web.url("/typed-with-charset")) == PNG_BYTES


# --- HTTPS: the certificate is checked against the URL's host name --------------------------


def test_https_sends_the_host_name_as_sni_and_verifies_the_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path, "images.example")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    trusted = ssl.create_default_context(cafile=str(cert))
    dns = fake_dns({"images.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    fetcher = UrlFetcher(
        timeout_seconds=5, resolver=dns, address_check=trust_only("127.0.0.1"), verify=trusted
    )

    with serving(server_tls) as secure:
        data = fetch(fetcher, secure.url("/photo.png", host="images.example"))
        wrong_name = refusal(fetcher, secure.url("/photo.png", host="other.example"))

    assert data == PNG_BYTES
    assert secure.server_names[0] == "images.example"
    assert "certificate could not be verified" in wrong_name
