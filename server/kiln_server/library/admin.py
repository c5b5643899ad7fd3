"""The model-library half of kiln.v1.ModelAdminService: ListModelStates, LoadModel and
UnloadModel, answered by the engine core's library (API process side).

Errors: INVALID_ARGUMENT for an empty `model`, NOT_FOUND for a model the configuration does
not list (naming those it does), UNAVAILABLE while the engine core is starting or gone,
and the library's own refusals (FAILED_PRECONDITION for a busy or loading model or one
larger than the whole budget, UNAVAILABLE for a load that failed) with its message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NoReturn

import grpc

from kiln_client.proto.kiln.v1 import model_admin_service_pb2 as admin_pb
from kiln_server.core.client import EngineCoreClient, EngineCoreError
from kiln_server.core.messages import LibraryReply
from kiln_server.library.state import ModelState, ModelStatus
from kiln_server.models.registry import ModelRegistry
from kiln_server.user_text import shorten

_STATES = {
    ModelState.ON_DISK: admin_pb.MODEL_STATE_ON_DISK,
    ModelState.LOADING: admin_pb.MODEL_STATE_LOADING,
    ModelState.RESIDENT: admin_pb.MODEL_STATE_RESIDENT,
    ModelState.FAILED: admin_pb.MODEL_STATE_FAILED,
}


def status_message(status: ModelStatus, active: int, now: float) -> admin_pb.ModelStatus:
    """The wire form of one model's status; `active` is its queued + running requests and
    `now` the monotonic time the idle seconds count to (the same clock on one host)."""
    resident = status.state is ModelState.RESIDENT
    return admin_pb.ModelStatus(
        name=status.name,
        state=_STATES[status.state],
        memory_bytes=status.memory_bytes if resident else 0,
        active_requests=active,
        idle_seconds=0.0 if active else max(now - status.last_used, 0.0),
        error=status.error,
        loads=status.loads,
    )


class LibraryAdmin:
    """Answers the model-library RPCs through the engine core's library."""

    def __init__(
        self, registry: ModelRegistry, core: Callable[[], EngineCoreClient | None]
    ) -> None:
        self.registry = registry
        self._core = core

    async def list_states(
        self, context: grpc.aio.ServicerContext
    ) -> admin_pb.ListModelStatesResponse:
        """Every configured model's state and the budget."""
        reply = await self._ask(context, "status")
        return self._states(reply)

    async def load(
        self, model: str, context: grpc.aio.ServicerContext
    ) -> admin_pb.LoadModelResponse:
        """Make `model` resident; returns once it is."""
        await self._check_model(model, context)
        reply = await self._ask(context, "load", model)
        states = self._states(reply)
        status = next(m for m in states.models if m.name == model)
        return admin_pb.LoadModelResponse(status=status, unloaded=list(reply.unloaded))

    async def unload(
        self, model: str, context: grpc.aio.ServicerContext
    ) -> admin_pb.UnloadModelResponse:
        """Unload `model` when it is idle."""
        await self._check_model(model, context)
        reply = await self._ask(context, "unload", model)
        states = self._states(reply)
        status = next(m for m in states.models if m.name == model)
        return admin_pb.UnloadModelResponse(status=status)

    @staticmethod
    def _states(reply: LibraryReply) -> admin_pb.ListModelStatesResponse:
        now = time.monotonic()
        active = dict(reply.active)
        library = reply.status
        return admin_pb.ListModelStatesResponse(
            models=[status_message(m, active.get(m.name, 0), now) for m in library.models],
            device=library.device,
            memory_budget_bytes=library.budget_bytes,
            memory_used_bytes=library.used_bytes,
        )

    async def _check_model(self, model: str, context: grpc.aio.ServicerContext) -> None:
        if not model:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "model: name a model")
        if model not in self.registry.models:
            known = ", ".join(self.registry.models)
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"model: no configured model is called {shorten(model, 80)!r}; configured: {known}",
            )

    async def _ask(
        self, context: grpc.aio.ServicerContext, action: str, model: str = ""
    ) -> LibraryReply:
        core = self._core()
        if core is None:
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the server is still loading its models; try again once it reports SERVING",
            )
        try:
            reply = await core.library(action, model)
        except EngineCoreError as error:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
        if reply.error_code:
            await _abort(context, grpc.StatusCode[reply.error_code], reply.error)
        return reply


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")
