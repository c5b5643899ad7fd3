"""LoRA inputs through the gateway: names and URLs in replicate_weights, lora_weights and
extra_lora, imported into the Kiln server's LoRA cache once per URL.

The gateway runs for real (uvicorn on 127.0.0.1) with test_gateway_inputs' recording
stand-in for Generate, and a real `kiln.v1.ModelAdminService` (the server's own service,
its LoRA cache in a temporary folder, bearer tokens checked by the server's interceptor)
on a gRPC port of its own, so the imports go over the wire exactly as to a Kiln server.
LoRA files are served by a local HTTP server that counts its hits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from gateway_support import OTHER_TOKEN
from safetensors.torch import save_file
from test_gateway_inputs import SETTINGS, Gateway, http, predict, problems, running
from test_lora_api import write_kohya, write_loha

from kiln_server.admin_service import ModelAdminService, add_to_server
from kiln_server.auth import AuthInterceptor
from kiln_server.lora.imports import LoraCache
from kiln_server.tokens import ADMIN, GENERATE, ApiToken

UPSTREAM_ADMIN = "gateway-upstream-admin"
UPSTREAM_APP = "gateway-upstream-generate-only"


def _sha_name(data: bytes) -> str:
    return "sha256-" + hashlib.sha256(data).hexdigest()[:16]


def tar_of(
    members: dict[str, bytes], links: dict[str, str] | None = None, gz: bool = False
) -> bytes:
    """A tar of regular files (name -> bytes) and symlinks (name -> target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return gzip.compress(buffer.getvalue()) if gz else buffer.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("lora-files")
    torch.manual_seed(0)
    style = write_kohya(folder / "style.safetensors", 4).read_bytes()
    other = write_kohya(folder / "other.safetensors", 2).read_bytes()
    wrapped = write_kohya(folder / "wrapped.safetensors", 4).read_bytes()
    save_file({"x": torch.zeros(2)}, str(folder / "plain.safetensors"))
    return {
        "/style.safetensors": style,
        "/other.safetensors": other,
        "/trained.tar": tar_of(
            {"output/lora.safetensors": wrapped, "output/embeddings.pti": b"\x00" * 32}
        ),
        "/trained.tar.gz": tar_of({"lora.safetensors": other}, gz=True),
        "/empty.tar": tar_of({"README": b"nothing here"}),
        "/two.tar": tar_of({"a.safetensors": style, "b.safetensors": other}),
        "/climbing.tar": tar_of({"../lora.safetensors": style}),
        "/linked.tar": tar_of({"lora.safetensors": style}, links={"l.safetensors": "/etc/x"}),
        "/loha.safetensors": write_loha(folder / "loha.safetensors").read_bytes(),
        "/plain.safetensors": (folder / "plain.safetensors").read_bytes(),
        "/noise.bin": b"\x13\x37" * 500,
    }


@pytest.fixture(scope="module")
def web(files: dict[str, bytes]) -> Iterator[tuple[str, Counter[str]]]:
    """An HTTP server for `files` (404 for other paths) and its hit count per path."""
    hits: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[self.path] += 1
            data = files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def admin_upstream(cache: Path) -> Iterator[tuple[str, LoraCache]]:
    """The server's ModelAdminService on its own grpc.aio port (in a thread), behind the
    server's token interceptor: UPSTREAM_ADMIN may import, UPSTREAM_APP only generate."""
    loras = LoraCache(cache, max_bytes=64 * 1024 * 1024, max_rank=8)
    tokens = [
        ApiToken(UPSTREAM_ADMIN, frozenset({GENERATE, ADMIN})),
        ApiToken(UPSTREAM_APP, frozenset({GENERATE})),
    ]
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        server = grpc.aio.server(interceptors=[AuthInterceptor(tokens, 0)])
        add_to_server(ModelAdminService(loras), server)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        state["stop"] = asyncio.Event()
        state["loop"] = asyncio.get_running_loop()
        await server.start()
        ready.set()
        await state["stop"].wait()
        await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(20), "the admin stand-in did not start"
    try:
        yield f"127.0.0.1:{state['port']}", loras
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(timeout=20)


@contextlib.contextmanager
def gateway_with(
    address: str, upstream_token: str, files_dir: Path, allow_private: bool = True
) -> Iterator[Gateway]:
    """The gateway in front of the admin stand-in, sending `upstream_token` upstream; LoRA
    URLs on 127.0.0.1 (the test's web server) are allowed unless `allow_private` is off."""
    settings = replace(
        SETTINGS, upstream=address, allow_private_urls=allow_private, files_dir=files_dir
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_API_TOKEN", upstream_token)
        with running(settings) as gateway:
            yield gateway


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LoraCache]]:
    with admin_upstream(tmp_path_factory.mktemp("lora-cache")) as running_upstream:
        yield running_upstream


@pytest.fixture(scope="module")
def gateway(
    upstream: tuple[str, LoraCache], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with gateway_with(upstream[0], UPSTREAM_ADMIN, tmp_path_factory.mktemp("gw")) as running_gw:
        yield running_gw


def _loras(gateway: Gateway) -> list[tuple[str, float]]:
    request = gateway.upstream.requests[-1]
    return [(lora.name, round(lora.scale, 4)) for lora in request.loras]


def test_a_url_is_fetched_once_and_applied_by_its_cache_name(
    gateway: Gateway, web: tuple[str, Counter[str]], files: dict[str, bytes]
) -> None:
    base, hits = web
    url = f"{base}/style.safetensors"
    name = _sha_name(files["/style.safetensors"])
    for _ in range(2):
        reply = predict(gateway, {"prompt": "a fox", "replicate_weights": url})
        assert reply.status_code == 201, reply.text
        assert reply.json()["status"] == "succeeded"
        assert _loras(gateway) == [(name, 0.6)]
    assert hits["/style.safetensors"] == 1

    # Two predictions at once with a URL not seen before: still one fetch.
    other = f"{base}/other.safetensors"
    with http(gateway) as session:

        async def both() -> list[int]:
            async with httpx.AsyncClient(
                base_url=gateway.url, headers=session.headers, timeout=30
            ) as client:
                replies = await asyncio.gather(
                    *(
                        client.post(
                            "/v1/models/acme/fake/predictions",
                            json={"input": {"lora_weights": other}},
                            headers={"Prefer": "wait"},
                        )
                        for _ in range(2)
                    )
                )
            return [reply.status_code for reply in replies]

        assert asyncio.run(both()) == [201, 201]
    assert hits["/other.safetensors"] == 1
    assert _loras(gateway) == [(_sha_name(files["/other.safetensors"]), 1.0)]


def test_a_tar_gives_its_one_safetensors(
    gateway: Gateway,
    web: tuple[str, Counter[str]],
    files: dict[str, bytes],
    upstream: tuple[str, LoraCache],
) -> None:
    base, _ = web
    reply = predict(gateway, {"replicate_weights": f"{base}/trained.tar", "lora_scale": 0.9})
    assert reply.status_code == 201, reply.text
    ((name, scale),) = _loras(gateway)
    assert scale == 0.9
    found = upstream[1].lookup(f"{base}/trained.tar")
    assert found is not None and found.name == name
    assert found.size_bytes < len(files["/trained.tar"])  # the member, not the archive

    reply = predict(gateway, {"extra_lora": f"{base}/trained.tar.gz", "extra_lora_scale": -0.5})
    assert reply.status_code == 201, reply.text
    assert _loras(gateway) == [(_sha_name(files["/other.safetensors"]), -0.5)]


def test_flux_style_inputs_map_the_same_way(
    gateway: Gateway, web: tuple[str, Counter[str]], files: dict[str, bytes]
) -> None:
    base, _ = web
    reply = predict(
        gateway,
        {
            "lora_weights": f"{base}/style.safetensors",
            "lora_scale": 0.8,
            "extra_lora": f"{base}/other.safetensors",
            "extra_lora_scale": 0.25,
        },
    )
    assert reply.status_code == 201, reply.text
    assert sorted(_loras(gateway)) == sorted(
        [
            (_sha_name(files["/style.safetensors"]), 0.8),
            (_sha_name(files["/other.safetensors"]), 0.25),
        ]
    )
    both = predict(
        gateway,
        {"replicate_weights": f"{base}/style.safetensors", "lora_weights": f"{base}/x"},
    )
    assert "not both" in problems(both)["input.lora_weights"]
    unknown = predict(gateway, {"extra_lora": "no-such-lora"})
    assert "not a LoRA of this model" in problems(unknown)["input.extra_lora"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/empty.tar", "without a .safetensors file"),
        ("/two.tar", "with 2 .safetensors files"),
        ("/climbing.tar", "outside the archive"),
        ("/linked.tar", "is a link"),
        ("/noise.bin", "is not a .safetensors LoRA or a .tar holding one"),
        ("/missing.safetensors", "answered HTTP 404"),
        ("/loha.safetensors", "the Kiln server refused"),
        ("/plain.safetensors", "no LoRA weights"),
    ],
)
def test_bad_lora_urls_are_422_naming_the_input(
    gateway: Gateway, web: tuple[str, Counter[str]], path: str, expected: str
) -> None:
    reply = predict(gateway, {"replicate_weights": f"{web[0]}{path}"})
    assert expected in problems(reply)["input.replicate_weights"]


def test_other_urls_are_refused_with_the_fix(gateway: Gateway) -> None:
    reply = predict(gateway, {"replicate_weights": "ftp://example.com/x.safetensors"})
    assert "not an http(s) URL" in problems(reply)["input.replicate_weights"]
    reply = predict(gateway, {"lora_weights": "data:application/octet-stream;base64,AAAA"})
    assert "not an http(s) URL" in problems(reply)["input.lora_weights"]


def test_private_addresses_follow_the_image_rules(
    upstream: tuple[str, LoraCache], web: tuple[str, Counter[str]], tmp_path: Path
) -> None:
    with gateway_with(upstream[0], UPSTREAM_ADMIN, tmp_path, allow_private=False) as strict:
        # (A URL the server has imported is not fetched again, so one it has not.)
        reply = predict(strict, {"replicate_weights": f"{web[0]}/fresh.safetensors"})
    assert "loopback" in problems(reply)["input.replicate_weights"]
    assert web[1]["/fresh.safetensors"] == 0


def test_an_uploaded_lora_is_used_by_its_owner_only(
    gateway: Gateway, files: dict[str, bytes], web: tuple[str, Counter[str]]
) -> None:
    data = files["/style.safetensors"]
    with http(gateway) as session:
        uploaded = session.post(
            "/v1/files", files={"content": ("style.safetensors", data, "application/octet-stream")}
        )
    assert uploaded.status_code == 201, uploaded.text
    url = uploaded.json()["urls"]["get"]
    reply = predict(gateway, {"replicate_weights": url})
    assert reply.status_code == 201, reply.text
    assert _loras(gateway) == [(_sha_name(data), 0.6)]
    stranger = predict(gateway, {"replicate_weights": url}, token=OTHER_TOKEN)
    assert "not uploaded with this token" in problems(stranger)["input.replicate_weights"]


def test_an_upstream_token_without_admin_scope_is_named(
    upstream: tuple[str, LoraCache], web: tuple[str, Counter[str]], tmp_path: Path
) -> None:
    with gateway_with(upstream[0], UPSTREAM_APP, tmp_path) as limited:
        reply = predict(limited, {"replicate_weights": f"{web[0]}/style.safetensors"})
    assert reply.status_code == 502, reply.text
    assert "`generate+admin`" in reply.json()["detail"]
