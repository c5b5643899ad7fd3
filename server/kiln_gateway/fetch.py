"""Fetching http(s) image inputs without letting a URL reach into the gateway's own network.

An `image` or `mask` input may be a URL the gateway downloads. A caller could aim such a URL
at places only the gateway can reach: cloud metadata at 169.254.169.254, an admin port on
127.0.0.1, a database on 10.0.0.5. So on every hop `UrlFetcher`:

- resolves the host name itself and refuses it unless every address it resolves to is public
  (`address_problem`: not loopback, private, link-local, carrier-grade NAT, unique local,
  site-local, multicast, reserved, unspecified or IPv4-mapped, nor an IPv6 address that
  wraps such an IPv4 address), unless `allow_private` is set;
- connects to the address it checked, sending the URL's host name in the Host header and as
  the TLS server name (so certificates are verified against it), so a second DNS answer
  cannot swap in another address (DNS rebinding);
- follows redirects itself, at most `max_redirects`, checking every new URL the same way.

One time limit covers the whole fetch (DNS, redirects and body). The body is read in chunks
and abandoned as soon as it passes the size limit. What the body must be is a `BodyRule`:
for image inputs (`IMAGE_BODY`, the default) the response's Content-Type must be
image/png, image/jpeg or image/webp and its bytes must be one of them; LoRA files
(`kiln_gateway.loras`) have their own rule. Every failure is a `FetchError` whose message
says what went wrong, for the caller to read.

The address rules live in `AddressGuard` and the pinned connection in `pinned`, which
webhook deliveries (`kiln_gateway.webhooks`) use too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from kiln_gateway.errors import shorten
from kiln_gateway.images import IMAGE_TYPES, IMAGE_TYPES_TEXT, sniff_image_type

__all__ = [
    "IMAGE_BODY",
    "AddressCheck",
    "AddressGuard",
    "BodyRule",
    "FetchError",
    "Fetched",
    "IPAddress",
    "Resolver",
    "UrlFetcher",
    "address_problem",
    "parse_outbound_url",
    "pinned",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""`resolver(host, port)`: the host's addresses as text (what getaddrinfo answers)."""
AddressCheck = Callable[[IPAddress], str | None]
"""`check(address)`: why the gateway must not connect to it, or None."""

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class FetchError(Exception):
    """A URL could not be fetched as an input; the message says why."""


@dataclass(frozen=True)
class BodyRule:
    """What a fetched body must be.

    `content_types`: the Content-Types a response may declare (None: any). `sniff(data)`:
    the type the bytes show, or None when they are not what is wanted, which `expected`
    words for the error ("a PNG, JPEG or WebP image"). `accept` is the Accept header sent.
    """

    accept: str
    content_types: tuple[str, ...] | None
    sniff: Callable[[bytes], str | None]
    expected: str


IMAGE_BODY = BodyRule(
    accept=", ".join(IMAGE_TYPES),
    content_types=IMAGE_TYPES,
    sniff=sniff_image_type,
    expected=f"a {IMAGE_TYPES_TEXT} image",
)
"""Image inputs: an image Content-Type, and bytes that are one of those images."""


@dataclass(frozen=True)
class Fetched:
    """A fetched body: its bytes, the type its bytes show, and the URL it came from."""

    data: bytes
    content_type: str
    url: str


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why the gateway must not fetch from `address` (e.g. "a loopback address"), or None.

    Only globally reachable unicast addresses pass. IPv4-mapped IPv6 addresses are refused
    outright; 6to4, Teredo and NAT64 addresses are judged by the IPv4 address they wrap.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        wrapped = _embedded_ipv4(address)
        if wrapped is not None:
            problem = address_problem(wrapped)
            if problem is not None:
                return f"an IPv6 address wrapping {wrapped}, {problem}"
            if address in _NAT64:  # DNS64 answers for public IPv4 hosts look like this
                return None
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in _CGNAT:
        return "a carrier-grade NAT (shared) address"
    if address in _UNIQUE_LOCAL:
        return "a unique local (private) IPv6 address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "not a public address"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's TCP addresses from the system resolver (getaddrinfo), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _parse(text: str) -> httpx.URL:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError) as error:
        raise FetchError(f"{shorten(text)} is not a valid URL: {error}") from None
    if url.scheme not in ("http", "https"):
        raise FetchError(f"{shorten(text)}: only http and https URLs are fetched")
    if not url.raw_host:
        raise FetchError(f"{shorten(text)} has no host")
    if url.userinfo:
        raise FetchError(f"{shorten(text)}: URLs with a user name or password are not fetched")
    if url.port is not None and not 0 < url.port < 65536:
        raise FetchError(f"{shorten(text)} has an invalid port {url.port}")
    return url


def _describe(error: httpx.HTTPError) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in text:
        return "its TLS certificate could not be verified"
    return shorten(text, 200)


def parse_outbound_url(text: str) -> httpx.URL:
    """`text` as an http(s) URL the gateway may send a request to.

    Raises:
        FetchError: not a valid http(s) URL, no host, credentials in it, or a bad port.
    """
    return _parse(text)


def _allowed_entry(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    try:
        return ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return entry.lower().rstrip(".")


class AddressGuard:
    """Which addresses an outbound URL (an input to fetch, a webhook) may reach.

    `addresses(url)` resolves the URL's host itself and refuses it unless every address is
    public (`address_check`, by default `address_problem`), unless `allow_private` is set or
    `allowed` names the host or a network holding the address. Connecting to exactly the
    addresses it returns (see `pinned`) closes the gap a second DNS answer could use.
    """

    def __init__(
        self,
        *,
        resolver: Resolver | None = None,
        address_check: AddressCheck = address_problem,
        allow_private: bool = False,
        allowed: tuple[str, ...] = (),
        remedy: str = "an operator can allow others with --allow-private-urls",
    ) -> None:
        self._resolver = resolver or system_resolver
        self._check = address_check
        self._allow_private = allow_private
        self._allowed = [_allowed_entry(entry) for entry in allowed]
        self._remedy = remedy

    def _trusted(self, host: str, address: IPAddress) -> bool:
        name = host.lower().rstrip(".")
        for entry in self._allowed:
            if isinstance(entry, str):
                if entry == name:
                    return True
            elif address.version == entry.version and address in entry:
                return True
        return False

    async def addresses(self, url: httpx.URL) -> list[IPAddress]:
        """The addresses to connect to for `url`, each checked.

        Raises:
            FetchError: the host cannot be resolved or resolves to a refused address.
        """
        host = url.raw_host.decode("ascii")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                answers = await self._resolver(host, port)
                addresses = [ipaddress.ip_address(answer.split("%")[0]) for answer in answers]
            except (OSError, UnicodeError, ValueError) as error:
                raise FetchError(f"cannot resolve host {shorten(host)}: {error}") from None
            if not addresses:
                raise FetchError(f"host {shorten(host)} has no address")
        if self._allow_private:
            return addresses
        for address in addresses:
            problem = self._check(address)
            if problem is not None and not self._trusted(host, address):
                where = f"{address} is" if literal is not None else f"{host} resolves to {address},"
                raise FetchError(
                    f"{shorten(where)} {problem}; the gateway connects only to public "
                    f"addresses ({self._remedy})"
                )
        return addresses


def pinned(url: httpx.URL, address: IPAddress) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """(URL aimed at `address`, Host header, TLS server-name extension) for one request.

    The request goes to the checked address while the server sees, and the certificate is
    verified against, the URL's own host name.
    """
    extensions: dict[str, Any] = {}
    if url.scheme == "https":
        extensions["sni_hostname"] = url.raw_host.decode("ascii")
    return url.copy_with(host=str(address)), {"Host": url.netloc.decode("ascii")}, extensions


class UrlFetcher:
    """Downloads http(s) inputs under the rules in this module's docstring."""

    def __init__(
        self,
        *,
        timeout_seconds: float,
        max_redirects: int = 5,
        allow_private: bool = False,
        resolver: Resolver | None = None,
        address_check: AddressCheck = address_problem,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._timeout = timeout_seconds
        self._max_redirects = max_redirects
        self._guard = AddressGuard(
            resolver=resolver, address_check=address_check, allow_private=allow_private
        )
        self._verify = verify

    async def fetch(self, url: str, max_bytes: int, rule: BodyRule = IMAGE_BODY) -> Fetched:
        """Download the body at `url` (at most `max_bytes` bytes), which `rule` checks
        (by default: an image).

        Raises:
            FetchError: the URL is refused, the download failed or the body breaks the
                rule; the message says why.
        """
        try:
            async with asyncio.timeout(self._timeout):
                return await self._follow(url, max_bytes, rule)
        except TimeoutError:
            raise FetchError(
                f"fetching {shorten(url)} took longer than the gateway's limit of "
                f"{self._timeout:g} s"
            ) from None

    async def _follow(self, text: str, max_bytes: int, rule: BodyRule) -> Fetched:
        current = text
        for _ in range(self._max_redirects + 1):
            url = _parse(current)
            addresses = await self._guard.addresses(url)
            result = await self._get(url, addresses, max_bytes, rule)
            if isinstance(result, Fetched):
                return result
            current = result
        raise FetchError(
            f"{shorten(text)} redirects more than {self._max_redirects} times; give the "
            "file's final URL"
        )

    async def _get(
        self, url: httpx.URL, addresses: list[IPAddress], max_bytes: int, rule: BodyRule
    ) -> Fetched | str:
        """The body, or the absolute URL a redirect points to."""
        for position, address in enumerate(addresses):
            target, host, extensions = pinned(url, address)
            headers = {"User-Agent": "kiln-gateway", "Accept": rule.accept, **host}
            # A fresh client per hop: a pooled connection opened for one host name must never
            # serve another that happens to share its address.
            async with httpx.AsyncClient(
                trust_env=False, follow_redirects=False, verify=self._verify, timeout=self._timeout
            ) as client:
                try:
                    async with client.stream(
                        "GET", target, headers=headers, extensions=extensions
                    ) as response:
                        return await self._read(url, response, max_bytes, rule)
                except httpx.ConnectError as error:
                    if position + 1 < len(addresses):
                        continue  # try the host's next address
                    reason = f"cannot connect to {_origin(url)}: {_describe(error)}"
                    raise FetchError(reason) from None
                except httpx.HTTPError as error:
                    reason = f"fetching {_origin(url)} failed: {_describe(error)}"
                    raise FetchError(reason) from None
        raise FetchError(f"host {_origin(url)} has no address")  # addresses is never empty

    @staticmethod
    async def _read(
        url: httpx.URL, response: httpx.Response, max_bytes: int, rule: BodyRule
    ) -> Fetched | str:
        shown = shorten(str(url))
        if response.status_code in _REDIRECTS:
            location = response.headers.get("location")
            if not location:
                raise FetchError(f"{shown} answered a redirect without a Location")
            return str(url.join(location))
        if response.status_code != 200:
            raise FetchError(f"{shown} answered HTTP {response.status_code}")
        declared = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if rule.content_types is not None and declared not in rule.content_types:
            raise FetchError(
                f"{shown} has Content-Type {shorten(declared, 60) or '(none)'}; expected "
                f"{', '.join(rule.content_types)}"
            )
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"{shown} is {int(length)} bytes; the limit is {max_bytes} bytes")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise FetchError(f"{shown} is larger than the limit of {max_bytes} bytes")
        data = bytes(body)
        actual = rule.sniff(data)
        if actual is None:
            raise FetchError(
                f"{shown} is not {rule.expected} (its bytes are not one, whatever its "
                "Content-Type says)"
            )
        return Fetched(data, actual, str(url))


def _origin(url: httpx.URL) -> str:
    return shorten(f"{url.scheme}://{url.netloc.decode('ascii')}")
