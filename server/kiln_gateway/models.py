"""Model and version resolution, and the model endpoints the official client calls.

Rules:
- `{owner}/{name}` reaches the Kiln model called `name`, whatever the owner; a configured
  alias (`stability-ai/sdxl=sdxl-base`) maps any other `owner/name` and wins over the
  direct name.
- Each Kiln model has one version id, stable across restarts and machines: the SHA-256 of
  its name. An alias may also pin a Replicate version id (`owner/name:<id>=model`), so
  scripts that run `owner/name:<id>` keep working; both ids resolve to the same model.
- The served models come from the Kiln server's ListModels, cached for a few seconds and
  refreshed on a miss, so models added upstream appear without restarting the gateway.

Endpoints: GET /v1/models, GET /v1/models/{owner}/{name}, GET .../versions and
GET .../versions/{version_id}.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from kiln_client.aio import AsyncKilnClient
from kiln_client.errors import KilnError
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_gateway.auth import require_token
from kiln_gateway.errors import ApiError, ProblemDetail, shorten
from kiln_gateway.schema import openapi_schema
from kiln_gateway.settings import Alias, GatewaySettings
from kiln_gateway.state import GatewayState, gateway_state, public_base_url
from kiln_gateway.timefmt import iso8601

__all__ = [
    "ModelCatalog",
    "ModelPage",
    "ModelResponse",
    "ResolvedModel",
    "VersionPage",
    "VersionResponse",
    "router",
    "version_id_for",
]

CACHE_SECONDS = 30.0
"""How long a ListModels answer is trusted before it is fetched again."""
MISS_REFRESH_SECONDS = 1.0
"""A lookup miss refetches the list at most this often."""
LIST_MODELS_TIMEOUT = 10.0
COG_VERSION = "kiln-0.1.0"


def version_id_for(kiln_model: str) -> str:
    """The stable version id of a Kiln model: 64 hex digits, like Replicate's."""
    return hashlib.sha256(f"kiln-model:{kiln_model}".encode()).hexdigest()


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to a served Kiln model."""

    owner: str
    name: str
    info: pb.ModelInfo
    version: str
    """The version id predictions made through this reference report."""
    versions: tuple[str, ...]
    """Every version id this reference accepts (the Kiln id first, then pinned ones)."""

    @property
    def ref(self) -> str:
        """`owner/name`."""
        return f"{self.owner}/{self.name}"


class ModelCatalog:
    """The Kiln server's models (via ListModels) plus configured aliases, resolved on demand."""

    def __init__(self, client: AsyncKilnClient, settings: GatewaySettings) -> None:
        self._client = client
        self._settings = settings
        self._aliases: tuple[Alias, ...] = settings.aliases
        self._models: dict[str, pb.ModelInfo] = {}
        self._first_seen: dict[str, float] = {}
        self._fetched_at = -1e9
        self._lock = asyncio.Lock()

    async def refresh(self, *, force: bool = False) -> dict[str, pb.ModelInfo]:
        """The served models by name, fetched again when stale (or when `force`d, rate-limited).

        Raises:
            ApiError: 503 when the Kiln server cannot be asked.
        """
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if age < CACHE_SECONDS and not (force and age >= MISS_REFRESH_SECONDS):
                return self._models
            try:
                reply = await self._client.list_models(timeout=LIST_MODELS_TIMEOUT)
            except KilnError as error:
                if self._models:  # serve the last known list while the upstream is down
                    return self._models
                raise ApiError(
                    503,
                    "Kiln server unavailable",
                    f"could not list models from the Kiln server at "
                    f"{self._settings.upstream}: {error.message or error.code.name}",
                    headers={"Retry-After": "5"},
                ) from None
            self._models = {info.name: info for info in reply.models}
            now = time.time()
            for name in self._models:
                self._first_seen.setdefault(name, now)
            self._fetched_at = time.monotonic()
            return self._models

    def first_seen(self, kiln_model: str) -> float:
        """When this gateway first saw the model (the version's `created_at`)."""
        return self._first_seen.get(kiln_model, time.time())

    def _served(self, target: str, ref: str, models: dict[str, pb.ModelInfo]) -> pb.ModelInfo:
        info = models.get(target)
        if info is None:
            raise ApiError(
                404,
                "Model not found",
                f"{ref} is an alias of Kiln model {target!r}, which the Kiln server at "
                f"{self._settings.upstream} does not serve (it serves: "
                f"{', '.join(sorted(models)) or 'nothing'}); fix the alias",
            )
        return info

    def _resolve_in(
        self, owner: str, name: str, models: dict[str, pb.ModelInfo]
    ) -> ResolvedModel | None:
        aliases = [a for a in self._aliases if a.owner == owner and a.name == name]
        if aliases:
            info = self._served(aliases[0].target, f"{owner}/{name}", models)
            pinned = tuple(a.version for a in aliases if a.version and a.target == info.name)
        elif name in models:
            info, pinned = models[name], ()
        else:
            return None
        kiln_version = version_id_for(info.name)
        return ResolvedModel(owner, name, info, kiln_version, (kiln_version, *pinned))

    async def resolve(self, owner: str, name: str) -> ResolvedModel:
        """Resolve `owner/name`: an alias first, then the Kiln model called `name`.

        Raises:
            ApiError: 404 naming the served models and aliases; 503 if Kiln is unreachable.
        """
        try:
            resolved = self._resolve_in(owner, name, await self.refresh())
        except ApiError:  # an alias to a model not (yet) in the cached list: ask again
            resolved = None
        if resolved is None:
            resolved = self._resolve_in(owner, name, await self.refresh(force=True))
        if resolved is None:
            models = await self.refresh()
            aliases = ", ".join(sorted({a.ref for a in self._aliases})) or "none"
            raise ApiError(
                404,
                "Model not found",
                f"no Kiln model called {shorten(name, 60)!r} and no alias for "
                f"{shorten(f'{owner}/{name}', 100)}; served models: "
                f"{', '.join(sorted(models)) or 'none'}; aliases: {aliases}",
            )
        return resolved

    async def resolve_version(self, version: str) -> ResolvedModel:
        """Resolve the `version` of POST /v1/predictions: an id, `owner/name` or `owner/name:id`.

        Raises:
            ApiError: 422 "Invalid version or not permitted" (as Replicate answers), 404 for
                an unknown `owner/name`, 503 if Kiln is unreachable.
        """
        ref, _, pinned = version.partition(":")
        if "/" in ref:
            owner, _, name = ref.partition("/")
            resolved = await self.resolve(owner, name)
            if pinned and pinned not in resolved.versions:
                raise _invalid_version(version)
            return resolved if not pinned else _with_version(resolved, pinned)
        for force in (False, True):
            models = await self.refresh(force=force)
            for alias in self._aliases:
                if alias.version == version:
                    found = self._resolve_in(alias.owner, alias.name, models)
                    if found is not None:
                        return _with_version(found, version)
            for kiln_name in models:
                if version_id_for(kiln_name) == version:
                    found = self._resolve_in(self._settings.default_owner, kiln_name, models)
                    if found is not None:
                        return found
        raise _invalid_version(version)

    async def listing(self) -> list[ResolvedModel]:
        """Every served model under the default owner, then every alias that resolves."""
        models = await self.refresh()
        found = [
            self._resolve_in(self._settings.default_owner, name, models) for name in sorted(models)
        ]
        seen: set[str] = set()
        for alias in self._aliases:
            if alias.ref not in seen and alias.target in models:
                seen.add(alias.ref)
                found.append(self._resolve_in(alias.owner, alias.name, models))
        return [item for item in found if item is not None]


def _with_version(resolved: ResolvedModel, version: str) -> ResolvedModel:
    return ResolvedModel(resolved.owner, resolved.name, resolved.info, version, resolved.versions)


def _invalid_version(version: str) -> ApiError:
    return ApiError(
        422,
        "Invalid version or not permitted",
        f"version {shorten(version, 80)!r} is not a Kiln model version; use owner/name, a "
        "version id "
        "from GET /v1/models/{owner}/{name}/versions, or pin it with "
        "--alias owner/name:VERSION=MODEL",
    )


class VersionResponse(BaseModel):
    """A model version as Replicate describes it."""

    id: str
    created_at: str
    cog_version: str
    openapi_schema: dict[str, Any]


class ModelResponse(BaseModel):
    """A model as Replicate describes it; `latest_version` is the Kiln model's version."""

    url: str
    owner: str
    name: str
    description: str | None
    visibility: Literal["public", "private"]
    github_url: str | None
    paper_url: str | None
    license_url: str | None
    run_count: int
    cover_image_url: str | None
    default_example: dict[str, Any] | None
    latest_version: VersionResponse | None


class VersionPage(BaseModel):
    """A page of versions (there is never a next page)."""

    previous: str | None = None
    next: str | None = None
    results: list[VersionResponse]


class ModelPage(BaseModel):
    """A page of models (there is never a next page)."""

    previous: str | None = None
    next: str | None = None
    results: list[ModelResponse]


def _version_body(state: GatewayState, resolved: ResolvedModel, version: str) -> VersionResponse:
    return VersionResponse(
        id=version,
        created_at=iso8601(state.catalog.first_seen(resolved.info.name)),
        cog_version=COG_VERSION,
        openapi_schema=openapi_schema(resolved.info),
    )


async def _model_body(state: GatewayState, resolved: ResolvedModel, base: str) -> ModelResponse:
    info = resolved.info
    return ModelResponse(
        url=f"{base}/v1/models/{resolved.ref}",
        owner=resolved.owner,
        name=resolved.name,
        description=(
            f"Kiln model {info.name} ({info.family or 'sdxl'}, {info.backend or 'unknown'} "
            f"backend) served by Kiln"
        ),
        visibility="public",
        github_url=None,
        paper_url=None,
        license_url=None,
        run_count=await state.store.run_count(info.name),
        cover_image_url=None,
        default_example=None,
        latest_version=_version_body(state, resolved, resolved.versions[0]),
    )


router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_token)])
_errors: dict[int | str, dict[str, Any]] = {
    401: {"model": ProblemDetail},
    404: {"model": ProblemDetail},
    503: {"model": ProblemDetail},
}
StateDep = Annotated[GatewayState, Depends(gateway_state)]


@router.get("/models", response_model=ModelPage, responses=_errors)
async def list_models(request: Request, state: StateDep) -> ModelPage:
    """Every Kiln model (under the default owner) and every alias that resolves."""
    base = public_base_url(request, state)
    resolved = await state.catalog.listing()
    return ModelPage(results=[await _model_body(state, item, base) for item in resolved])


@router.get("/models/{owner}/{name}", response_model=ModelResponse, responses=_errors)
async def get_model(owner: str, name: str, request: Request, state: StateDep) -> ModelResponse:
    """The model `owner/name` resolves to, with its latest version and input schema."""
    resolved = await state.catalog.resolve(owner, name)
    return await _model_body(state, resolved, public_base_url(request, state))


@router.get("/models/{owner}/{name}/versions", response_model=VersionPage, responses=_errors)
async def list_versions(owner: str, name: str, state: StateDep) -> VersionPage:
    """Every version id `owner/name` accepts (all run the same Kiln model)."""
    resolved = await state.catalog.resolve(owner, name)
    return VersionPage(results=[_version_body(state, resolved, v) for v in resolved.versions])


@router.get(
    "/models/{owner}/{name}/versions/{version_id}",
    response_model=VersionResponse,
    responses=_errors,
)
async def get_version(owner: str, name: str, version_id: str, state: StateDep) -> VersionResponse:
    """One version of `owner/name`; 404 when the id is not one of its versions."""
    resolved = await state.catalog.resolve(owner, name)
    if version_id not in resolved.versions:
        raise ApiError(
            404,
            "Version not found",
            f"{shorten(resolved.ref, 100)} has no version {shorten(version_id, 80)!r}; its "
            "versions: "
            f"{', '.join(resolved.versions)}",
        )
    return _version_body(state, resolved, version_id)
