"""What every Kiln client object shares: resolved connection settings, one channel, the
call metadata, a default deadline, and closing (sync and asyncio forms).

`KilnClient`, `AsyncKilnClient` and the admin clients inherit from these and add their
stubs and calls; `target`, `timeout` and the connection keywords mean the same for all of
them (see `KilnClient`).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self, Unpack

import grpc

from kiln_client.connection import (
    ConnectionOptions,
    ConnectionSettings,
    open_aio_channel,
    open_channel,
)

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where `kiln serve` listens by default."""


class _Settings:
    def __init__(
        self,
        target: str | ConnectionSettings,
        timeout: float | None,
        connection: ConnectionOptions,
    ) -> None:
        self.connection = ConnectionSettings.resolve(target, **connection)
        self.target = self.connection.target
        self.timeout = timeout
        self._metadata = self.connection.call_metadata()

    def _deadline(self, timeout: float | None) -> float | None:
        """A call's deadline: its own `timeout`, else the client's default."""
        return self.timeout if timeout is None else timeout


class SyncChannelClient(_Settings):
    """Owns one synchronous channel; a context manager that closes it."""

    def __init__(
        self,
        target: str | ConnectionSettings = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(target, timeout, connection)
        self._channel: grpc.Channel = open_channel(self.connection)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled. Safe to call twice."""
        self._channel.close()


class AsyncChannelClient(_Settings):
    """Owns one `grpc.aio` channel (create it inside a running event loop); an async
    context manager that closes it."""

    def __init__(
        self,
        target: str | ConnectionSettings = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(target, timeout, connection)
        self._channel: grpc.aio.Channel = open_aio_channel(self.connection)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled. Safe to call twice."""
        await self._channel.close()
