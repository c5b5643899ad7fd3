"""The server process: listen, start the engine core, serve, and drain on SIGTERM.

The port opens first with health NOT_SERVING, so orchestrators can watch start-up; health
turns SERVING only after the engine core has loaded every model and run a warm-up
generation. On SIGTERM or SIGINT health goes NOT_SERVING, new requests get UNAVAILABLE,
in-flight ones finish (up to the drain timeout), and the process exits 0. If the engine
core dies, in-flight requests end with UNAVAILABLE and the server exits 1 for its
supervisor to restart it.

Who may call is `kiln_server.auth`'s: bearer tokens (an interceptor, when tokens are
configured), TLS or mutual TLS on the port, and optionally a second, plaintext port that
answers grpc.health.v1 only, for probes that cannot speak TLS.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_server import admin_service
from kiln_server.atomic_files import write_atomic
from kiln_server.auth import AuthInterceptor, NoAdminInterceptor, TlsFiles
from kiln_server.core.client import EngineCoreClient
from kiln_server.image_inputs import ImageInputLimits
from kiln_server.library.admin import LibraryAdmin
from kiln_server.lora.imports import LoraCache, with_lora_cache
from kiln_server.metrics import UNKNOWN_MODEL, MetricsEndpoint, ServerMetrics
from kiln_server.models.flux_loader import read_flux_model_files
from kiln_server.models.loader import read_model_files
from kiln_server.models.registry import ModelRegistry
from kiln_server.pipeline.flux_prompts import FluxPromptTokenizer
from kiln_server.pipeline.prompts import PromptTokenizer
from kiln_server.service import GenerationService, add_to_server
from kiln_server.settings import ServerSettings
from kiln_server.tokens import is_loopback
from kiln_server.validation import RequestBudget

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


def load_tokenizers(registry: ModelRegistry) -> dict[str, PromptTokenizer | FluxPromptTokenizer]:
    """Every served model's tokenizers, for validating prompt lengths in this process."""
    tokenizers: dict[str, PromptTokenizer | FluxPromptTokenizer] = {}
    for name, spec in registry.models.items():
        if spec.family == "flux":
            tokenizers[name] = FluxPromptTokenizer.for_model(read_flux_model_files(spec.path))
        else:
            tokenizers[name] = PromptTokenizer.for_model(read_model_files(spec.path))
    return tokenizers


class KilnServer:
    """One gRPC server with its engine core and health status; TLS when `tls` is given."""

    def __init__(
        self, settings: ServerSettings, registry: ModelRegistry, tls: TlsFiles | None = None
    ) -> None:
        self.settings = settings
        self.registry = with_lora_cache(registry, settings.lora_cache)
        self.tls = tls
        self.core: EngineCoreClient | None = None
        self.draining = False
        self.core_lost = asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.metrics = ServerMetrics()
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.service = GenerationService(
            self.registry,
            is_draining=lambda: self.draining,
            budget=RequestBudget(
                images=ImageInputLimits(
                    max_bytes=settings.max_image_mb * 1024 * 1024,
                    max_pixels=settings.max_image_pixels,
                ),
                max_work=settings.max_request_work,
                max_loras=settings.max_loras_per_request,
            ),
            metrics=self.metrics,
            max_lora_rank=settings.max_lora_rank,
        )
        max_bytes = settings.max_message_mb * 1024 * 1024
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if settings.auth_enabled:
            interceptors.append(
                AuthInterceptor(
                    settings.api_tokens, settings.max_inflight_per_token, self._count_over_limit
                )
            )
        elif not is_loopback(settings.host):
            interceptors.append(NoAdminInterceptor())
        options = [
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
        ]
        if settings.max_connection_age > 0:
            # No max_connection_age_grace: calls on a closing connection run to their end.
            options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)))
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        add_to_server(self.service, self.server)
        self.admin = admin_service.ModelAdminService(
            LoraCache(
                settings.lora_cache,
                max_bytes=settings.lora_cache_size,
                max_rank=settings.max_lora_rank,
            ),
            LibraryAdmin(self.registry, lambda: self.service.core),
        )
        admin_service.add_to_server(self.admin, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                admin_service.SERVICE_NAME,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = 0
        # Plaintext and health only: what a probe that cannot speak TLS may see.
        self.health_server: grpc.aio.Server | None = None
        if settings.health_port is not None:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port: int | None = None

    def _count_over_limit(self, request: Any) -> None:
        model = (
            self.service.model_label(request)
            if isinstance(request, pb.GenerateRequest)
            else UNKNOWN_MODEL
        )
        self.metrics.request_ended(model, "refused")

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind and start answering (NOT_SERVING); returns the bound port."""
        address = f"{self.settings.host}:{self.settings.port}"
        if self.tls is not None:
            self.port = self.server.add_secure_port(address, self.tls.credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: the address is in use or not local")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._start_health_port()
        if self.settings.metrics_port is not None:
            self.metrics.declare_models(self.registry.models)
            try:
                self.metrics_endpoint = MetricsEndpoint(
                    self.metrics, self.settings.host, self.settings.metrics_port
                )
            except OSError as error:
                raise OSError(
                    f"cannot serve metrics on {self.settings.host}:"
                    f"{self.settings.metrics_port} ({error.strerror or error}): choose another "
                    "--metrics-port"
                ) from error
            metrics_port = self.metrics_endpoint.port
            logger.info(
                f"serving metrics at http://{self.settings.host}:{metrics_port}/metrics",
                extra={"metrics_port": metrics_port},
            )
        await self.server.start()
        self._log_listening()
        return self.port

    async def _start_health_port(self) -> None:
        if self.health_server is None:
            return
        address = f"{self.settings.host}:{self.settings.health_port}"
        self.health_port = self.health_server.add_insecure_port(address)
        if self.health_port == 0:
            raise OSError(
                f"cannot serve health on {address}: the address is in use or not local; "
                "choose another --health-port"
            )
        await self.health_server.start()
        logger.info(
            f"serving grpc.health.v1 only, in plain text, on {self.settings.host}:"
            f"{self.health_port}"
        )

    def _log_listening(self) -> None:
        settings = self.settings
        auth = f"on, {len(settings.api_tokens)} token(s)" if settings.auth_enabled else "off"
        if self.tls is None:
            tls = "TLS off"
        elif self.tls.client_ca is None:
            tls = "TLS on"
        else:
            tls = "mutual TLS on: client certificates required"
        logger.info(
            f"listening on {settings.host}:{self.port} (auth {auth}; {tls})",
            extra={"port": self.port},
        )
        if not settings.auth_enabled and not settings.mtls_enabled:
            logger.warning(
                "no API tokens configured (KILN_API_TOKENS, api_tokens_file): authentication "
                f"is OFF and the server listens on loopback {settings.host} only"
            )
        elif not settings.auth_enabled:
            logger.info("callers are authenticated by their client certificates only")
        if settings.auth_enabled and self.tls is None and not is_loopback(settings.host):
            logger.warning(
                f"accepting API tokens in plain text on {settings.host} "
                "(--allow-plaintext-tokens): only safe behind a TLS-terminating proxy"
            )

    async def stop_health_port(self) -> None:
        """Stop the health-only port, if one runs."""
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
            self.health_server = None

    def close_metrics(self) -> None:
        """Stop the metrics endpoint, if one runs."""
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
            self.metrics_endpoint = None

    async def load(self) -> None:
        """Start the engine core, wait for its models to be warm, then report SERVING."""
        loop = asyncio.get_running_loop()

        def on_core_lost(_message: str) -> None:
            loop.call_soon_threadsafe(self.core_lost.set)

        # Tokens stay in this process: the engine core never needs them.
        self.core = EngineCoreClient(
            replace(self.settings, api_tokens=()),
            self.registry,
            on_core_lost,
            on_stats=self.metrics.core_stats,
        )
        self.core.start()
        tokenizers = await asyncio.to_thread(load_tokenizers, self.registry)
        served = await self.core.ready()
        self.metrics.models_loaded(served)
        self.service.attach(self.core, {m.name: m for m in served}, tokenizers)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("ready: SERVING", extra={"port": self.port})

    async def shutdown(self) -> None:
        """Drain: NOT_SERVING, refuse new work, let in-flight requests finish, stop."""
        if self.draining:
            return
        self.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("draining", extra={"in_flight": self.service.active_streams})
        if not await self.service.wait_idle(self.settings.drain_timeout):
            logger.warning(
                "drain timeout reached; ending the requests still in flight with UNAVAILABLE",
                extra={"in_flight": self.service.active_streams},
            )
            # Stopping the core first ends each leftover job with a precise status, which
            # then reaches its client within the grace below.
            if self.core is not None:
                await self.core.stop()
        await self.server.stop(grace=5.0)
        if self.core is not None:
            await self.core.stop()
        self.close_metrics()
        await self.stop_health_port()
        logger.info("stopped")


async def run_server(
    settings: ServerSettings,
    registry: ModelRegistry,
    port_file: Path | None = None,
    tls: TlsFiles | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    server = KilnServer(settings, registry, tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = await server.start()
    if port_file is not None:
        write_atomic(port_file, str(port))
    loader = asyncio.create_task(server.load())
    stopper = asyncio.create_task(stop.wait())
    lost = asyncio.create_task(server.core_lost.wait())
    done, _ = await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        logger.error("start-up failed: %s", loader.exception())
        await server.server.stop(grace=None)
        if server.core is not None:
            await server.core.stop()
        server.close_metrics()
        await server.stop_health_port()
        return 1
    await asyncio.wait({stopper, lost}, return_when=asyncio.FIRST_COMPLETED)
    if not loader.done():
        loader.cancel()
    await server.shutdown()
    return 1 if server.core_lost.is_set() else 0
