"""Running the gateway app under uvicorn on a socket bound here (so bind errors are clear)."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import uvicorn

from kiln_gateway.app import create_app
from kiln_gateway.database import Database
from kiln_gateway.settings import GatewaySettings
from kiln_server.atomic_files import write_atomic

__all__ = ["bind_socket", "build_server", "serve"]

log = logging.getLogger("kiln_gateway")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one).

    Raises:
        OSError: the address is in use or cannot be bound; the message names it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


def build_server(settings: GatewaySettings) -> uvicorn.Server:
    """A uvicorn server for the gateway app (TLS when a certificate is configured)."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


async def serve(settings: GatewaySettings, *, port_file: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM; write the bound port to `port_file` once ready.

    Raises:
        DatabaseError: the database cannot be opened (checked before binding).
        OSError: the address cannot be bound.
    """
    database = await Database.open(settings.database_url)  # a clear error before serving
    await database.close()
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    server = build_server(settings)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        scheme = "https" if settings.tls_certfile else "http"
        log.info(
            "gateway listening on %s://%s:%d (Replicate API at /v1, docs at /docs)",
            scheme,
            settings.host,
            port,
            extra={"port": port},
        )
        if port_file is not None:
            write_atomic(port_file, f"{port}\n")
    await task
