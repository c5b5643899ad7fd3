"""Image inputs through the gateway: data URIs, the files API, fetched URLs, output modes.

These tests run the real gateway (uvicorn on 127.0.0.1) and drive it with the official
`replicate` client and plain HTTP, but put a recording stand-in in place of the Kiln server:
it serves one model and answers each Generate with the request's own image as the output.
So they pin what the gateway itself does (which bytes reach Kiln, under which field, and
what comes back) whether or not the server implements image conditioning yet; the tests in
test_gateway.py run the same flow against a real Kiln server.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import random
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
import replicate
import uvicorn
from gateway_support import MODEL, OTHER_TOKEN, TOKEN, serving
from PIL import Image
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput

from kiln_client.aio import AsyncKilnClient
from kiln_client.errors import InvalidArgument
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_gateway.app import create_app
from kiln_gateway.forms import FormError, parse_form
from kiln_gateway.inputs import InputRejected, abbreviate_input, parse_data_uri
from kiln_gateway.settings import GatewaySettings

UPLOAD_LIMIT = 64 * 1024


def png(size: tuple[int, int] = (24, 16), colour: str = "red", noise: bool = False) -> bytes:
    """A PNG image; with `noise` it barely compresses (for size limits)."""
    image = Image.new("RGB", size, colour)
    if noise:
        pixels = random.Random(7).randbytes(3 * size[0] * size[1])
        image = Image.frombytes("RGB", size, pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


PHOTO = png((24, 16), "red")
MASK = png((24, 16), "white")
_gif = io.BytesIO()
Image.new("RGB", (8, 8), "blue").save(_gif, format="GIF")
GIF = _gif.getvalue()  # an image, but not in a format Kiln decodes


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


# --- a stand-in for the Kiln server ---------------------------------------------------------


@dataclass
class Upstream:
    """What the stand-in Kiln server received, shared with the test."""

    requests: list[pb.GenerateRequest] = field(default_factory=list)


class RecordingKiln:
    """Serves MODEL; Generate records the request and returns its image (or PHOTO) as output."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    async def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[MODEL], default_model=MODEL.name)

    async def generate_events(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        kept = pb.GenerateRequest()
        kept.CopyFrom(request)
        self._upstream.requests.append(kept)
        if request.prompt == "refused by kiln":
            raise InvalidArgument(
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid request",
                field_violations=[("strength", "must leave at least one denoising step")],
            )
        mode = "inpaint" if request.mask else "image_to_image" if request.image else "text_to_image"
        yield pb.GenerateResponse(
            request_id="r1",
            started=pb.StartedEvent(
                model=MODEL.name, width=24, height=16, num_outputs=1, num_inference_steps=4,
                scheduler="K_EULER", seed=1, mode=mode, strength=request.strength,
            ),
        )  # fmt: skip
        output = request.image or PHOTO
        yield pb.GenerateResponse(
            request_id="r1",
            image=pb.ImageEvent(index=0, seed=1, data=output, mime_type="image/png"),
        )
        yield pb.GenerateResponse(
            request_id="r1",
            completed=pb.CompletedEvent(inference_seconds=0.01, engine_seconds=0.01, num_images=1),
        )

    async def close(self) -> None:
        pass


@dataclass
class Gateway:
    url: str
    upstream: Upstream
    settings: GatewaySettings


SETTINGS = GatewaySettings(
    host="127.0.0.1",
    port=0,
    tokens=(TOKEN, OTHER_TOKEN),
    max_input_bytes=UPLOAD_LIMIT,
    log_level="WARNING",
)


@contextlib.contextmanager
def running(settings: GatewaySettings) -> Iterator[Gateway]:
    """The real gateway app in front of a RecordingKiln, on an ephemeral 127.0.0.1 port."""
    own_folder = settings.files_dir is None
    if own_folder:
        settings = replace(settings, files_dir=Path(tempfile.mkdtemp(prefix="kiln-gateway-")))
    upstream = Upstream()

    def stand_in(target: str) -> AsyncKilnClient:
        return cast(AsyncKilnClient, RecordingKiln(upstream))

    app = create_app(settings, client_factory=stand_in)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    try:
        with serving(server) as served:
            yield Gateway(f"http://127.0.0.1:{served.port}", upstream, settings)
    finally:
        if own_folder and settings.files_dir is not None:
            shutil.rmtree(settings.files_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Plain HTTP, default output mode (auto), private URLs refused."""
    files = tmp_path_factory.mktemp("gateway-files")
    with running(replace(SETTINGS, files_dir=files)) as serving:
        yield serving


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, gateway: Gateway) -> Iterator[replicate.Client]:
    monkeypatch.setenv("REPLICATE_BASE_URL", gateway.url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    fresh = replicate.Client()
    yield fresh
    fresh._client.close()


def http(gateway: Gateway, token: str = TOKEN) -> httpx.Client:
    return httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def problems(reply: httpx.Response) -> dict[str, str]:
    """A 422's invalid fields, field -> description."""
    assert reply.status_code == 422, reply.text
    return {item["field"]: item["description"] for item in reply.json()["invalid_fields"]}


def predict(gateway: Gateway, input: dict[str, Any], token: str = TOKEN) -> httpx.Response:
    with http(gateway, token) as session:
        return session.post(
            "/v1/models/acme/fake/predictions", json={"input": input}, headers={"Prefer": "wait"}
        )


# --- data URIs ------------------------------------------------------------------------------


def test_data_uris_decode_to_their_image() -> None:
    wrapped = base64.encodebytes(PHOTO).decode()  # base64 with line breaks, as some tools write

    assert parse_data_uri(data_uri(PHOTO), 1 << 20) == PHOTO
    assert parse_data_uri(f"data:image/png;base64,{wrapped}", 1 << 20) == PHOTO
    assert parse_data_uri(data_uri(PHOTO, "application/octet-stream"), 1 << 20) == PHOTO
    assert parse_data_uri("data:;base64," + base64.b64encode(PHOTO).decode(), 1 << 20) == PHOTO
    percent = "".join(f"%{byte:02X}" for byte in PHOTO)
    assert parse_data_uri(f"data:image/png,{percent}", 1 << 20) == PHOTO


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("data:image/png;base64,iVBORw0KGgo!!!", "base64 payload is invalid"),
        ("data:image/png;base64,iVBORw0KGg", "base64 payload is invalid"),  # truncated
        ("data:text/plain;base64,aGVsbG8=", "has type text/plain"),
        (data_uri(b"<svg></svg>"), "is not a PNG, JPEG or WebP image"),
        ("data:image/png;base64", "not a valid data URI"),
        (data_uri(png((64, 64), noise=True)), "larger than the limit of 1000 bytes"),
    ],
)
def test_bad_data_uris_say_why(uri: str, reason: str) -> None:
    with pytest.raises(InputRejected) as caught:
        parse_data_uri(uri, 1000)

    assert reason in str(caught.value)


def test_predictions_report_long_data_uris_shortened() -> None:
    long_uri = data_uri(png((64, 64), noise=True))

    shown = abbreviate_input({"image": long_uri, "mask": "data:image/png;base64,AAAA", "seed": 3})

    assert shown["image"] == f"data:image/png;base64,<{len(long_uri) - 22} characters omitted>"
    assert shown["mask"] == "data:image/png;base64,AAAA" and shown["seed"] == 3


# --- multipart bodies -----------------------------------------------------------------------


def test_multipart_bodies_split_into_fields_byte_for_byte() -> None:
    tricky = PHOTO + b"\r\n--\r\n\r\n" + bytes(range(256))  # CRLFs and dashes inside the file
    request = httpx.Request(
        "POST",
        "http://gateway/v1/files",
        files={"content": ("photo.png", tricky, "image/png")},
        data={"metadata": '{"sku": 7}'},
    )

    form = parse_form(request.read(), request.headers["content-type"])

    assert form["content"].data == tricky
    assert (form["content"].filename, form["content"].content_type) == ("photo.png", "image/png")
    assert form["metadata"].text == '{"sku": 7}' and form["metadata"].filename is None


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{}", "application/json", "expected Content-Type multipart/form-data"),
        (b"--x\r\n\r\nabc\r\n--x--", "multipart/form-data", "no boundary"),
        (
            b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nabc",
            "multipart/form-data; boundary=x",
            "not terminated",
        ),
        (b"hello", "multipart/form-data; boundary=x", "does not contain the multipart boundary"),
    ],
)
def test_malformed_multipart_bodies_are_refused(
    body: bytes, content_type: str, reason: str
) -> None:
    with pytest.raises(FormError, match=reason):
        parse_form(body, content_type)


# --- the files API --------------------------------------------------------------------------


def test_upload_with_the_official_client_then_get_download_list_and_delete(
    client: replicate.Client, gateway: Gateway, tmp_path: Path
) -> None:
    photo = tmp_path / "product.png"
    photo.write_bytes(PHOTO)

    with photo.open("rb") as handle:
        uploaded = client.files.create(handle, metadata={"sku": "A-1"})
    fetched = client.files.get(uploaded.id)
    listed = [item.id for item in client.files.list()]
    with http(gateway) as session:
        content = session.get(f"/v1/files/{uploaded.id}/download")
    deleted = client.files.delete(uploaded.id)
    with http(gateway) as session:
        after = session.get(f"/v1/files/{uploaded.id}")

    assert (uploaded.name, uploaded.content_type, uploaded.size) == (
        "product.png",
        "image/png",
        len(PHOTO),
    )
    assert uploaded.urls["get"] == f"{gateway.url}/v1/files/{uploaded.id}"
    assert uploaded.metadata == {"sku": "A-1"}
    assert uploaded.checksums["sha256"] == hashlib.sha256(PHOTO).hexdigest()
    created = datetime.fromisoformat(uploaded.created_at.replace("Z", "+00:00"))
    expires = datetime.fromisoformat(str(uploaded.expires_at).replace("Z", "+00:00"))
    assert (expires - created).total_seconds() == pytest.approx(86400, abs=1)
    assert fetched.id == uploaded.id and fetched.size == uploaded.size
    assert uploaded.id in listed
    assert content.status_code == 200 and content.content == PHOTO
    assert content.headers["content-type"] == "image/png"
    assert deleted is True
    assert after.status_code == 404


def test_another_token_cannot_see_or_use_a_file(gateway: Gateway) -> None:
    with http(gateway) as owner:
        uploaded = owner.post("/v1/files", files={"content": ("p.png", PHOTO, "image/png")}).json()
    file_url = uploaded["urls"]["get"]

    with http(gateway, OTHER_TOKEN) as other:
        seen = other.get(f"/v1/files/{uploaded['id']}")
        downloaded = other.get(f"/v1/files/{uploaded['id']}/download")
        listed = [item["id"] for item in other.get("/v1/files").json()["results"]]
        deleted = other.delete(f"/v1/files/{uploaded['id']}")
    used = predict(gateway, {"prompt": "x", "image": file_url}, token=OTHER_TOKEN)
    still_mine = predict(gateway, {"prompt": "x", "image": file_url})

    assert (seen.status_code, downloaded.status_code, deleted.status_code) == (404, 404, 404)
    assert uploaded["id"] not in listed
    assert "was not uploaded with this token" in problems(used)["input.image"]
    assert still_mine.status_code == 201 and still_mine.json()["status"] == "succeeded"


def test_uploads_past_the_size_limit_are_413(client: replicate.Client) -> None:
    big = png((160, 160), noise=True)
    assert len(big) > UPLOAD_LIMIT

    with pytest.raises(ReplicateError) as caught:
        client.files.create(io.BytesIO(big))

    assert caught.value.status == 413
    assert f"limited to {UPLOAD_LIMIT} bytes" in str(caught.value.detail)


def test_uploads_must_be_images_and_need_a_token(gateway: Gateway) -> None:
    with http(gateway) as session:
        text = session.post("/v1/files", files={"content": ("notes.txt", b"hello", "text/plain")})
        missing = session.post("/v1/files", files={"file": ("p.png", PHOTO, "image/png")})
        bad_metadata = session.post(
            "/v1/files", files={"content": ("p.png", PHOTO)}, data={"metadata": "[1]"}
        )
        not_a_form = session.post("/v1/files", json={"content": "x"})
    anonymous = httpx.post(f"{gateway.url}/v1/files", files={"content": ("p.png", PHOTO)})

    assert "must be a PNG, JPEG or WebP image" in problems(text)["content"]
    assert "content" in problems(missing)
    assert problems(bad_metadata) == {"metadata": "must be a JSON object"}
    assert not_a_form.status_code == 400 and "multipart/form-data" in not_a_form.json()["detail"]
    assert anonymous.status_code == 401


def test_uploads_are_kept_on_disk_across_a_restart(tmp_path: Path) -> None:
    settings = replace(SETTINGS, files_dir=tmp_path)
    with running(settings) as first, http(first) as session:
        uploaded = session.post("/v1/files", files={"content": ("p.png", PHOTO)}).json()

    with running(settings) as second, http(second) as session:
        content = session.get(f"/v1/files/{uploaded['id']}/download")
        used = predict(second, {"image": f"{second.url}/v1/files/{uploaded['id']}"})
        sent = second.upstream.requests[-1].image

    assert content.status_code == 200 and content.content == PHOTO
    assert used.status_code == 201 and sent == PHOTO


def test_uploads_expire(tmp_path: Path) -> None:
    settings = replace(SETTINGS, files_dir=tmp_path, upload_expiry_seconds=0.3)
    with running(settings) as short, http(short) as session:
        uploaded = session.post("/v1/files", files={"content": ("p.png", PHOTO)}).json()
        assert session.get(f"/v1/files/{uploaded['id']}").status_code == 200
        deadline = time.monotonic() + 20
        while (tmp_path / "uploads" / uploaded["id"]).exists():
            assert time.monotonic() < deadline, "the expired upload was not deleted"
            time.sleep(0.05)
        gone = session.get(f"/v1/files/{uploaded['id']}")

    assert gone.status_code == 404


# --- image inputs in predictions ------------------------------------------------------------


def test_replicate_run_with_open_files_sends_their_bytes_to_kiln(
    client: replicate.Client, gateway: Gateway, tmp_path: Path
) -> None:
    (tmp_path / "photo.png").write_bytes(PHOTO)
    (tmp_path / "mask.png").write_bytes(MASK)

    with (tmp_path / "photo.png").open("rb") as photo, (tmp_path / "mask.png").open("rb") as mask:
        output = client.run(
            "acme/fake",
            input={
                "image": photo,
                "mask": mask,
                "prompt": "a new background",
                "prompt_strength": 0.6,
                "keep_unmasked": False,
                "mask_crop_padding": 16,
            },
        )

    sent = gateway.upstream.requests[-1]
    assert (sent.image, sent.mask) == (PHOTO, MASK)
    assert sent.strength == pytest.approx(0.6)
    assert sent.HasField("keep_unmasked") and sent.keep_unmasked is False
    assert sent.mask_crop_padding == 16
    # Plain HTTP and the default output mode: a data URI, which FileOutput reads.
    assert isinstance(output, list) and isinstance(output[0], FileOutput)
    assert output[0].url.startswith("data:image/png")
    assert output[0].read() == PHOTO


def test_base64_file_encoding_reaches_kiln_and_is_reported_shortened(
    client: replicate.Client, gateway: Gateway
) -> None:
    prediction = client.models.predictions.create(
        model="acme/fake",
        input={"image": io.BytesIO(PHOTO), "prompt": "x"},
        file_encoding_strategy="base64",
        wait=True,
    )

    assert gateway.upstream.requests[-1].image == PHOTO
    assert not gateway.upstream.requests[-1].HasField("strength")  # the model's default
    assert prediction.status == "succeeded" and prediction.input is not None
    assert prediction.input["image"].startswith("data:application/octet-stream;base64,")
    assert "Kiln model fake: 24x16" in str(prediction.logs)
    assert "image to image at strength 0" in str(prediction.logs)


def test_bad_image_inputs_are_422_naming_each_field(gateway: Gateway) -> None:
    before = len(gateway.upstream.requests)

    both = predict(gateway, {"image": "data:image/png;base64,%%%", "mask": "ftp://x/m.png"})
    local = predict(gateway, {"image": "http://127.0.0.1:9/photo.png"})
    metadata = predict(gateway, {"image": "http://169.254.169.254/latest/meta-data/"})
    lonely_mask = predict(gateway, {"mask": data_uri(MASK)})
    zero = predict(gateway, {"image": data_uri(PHOTO), "prompt_strength": 0})
    too_big = predict(gateway, {"image": data_uri(png((160, 160), noise=True))})
    not_image = predict(gateway, {"image": data_uri(GIF)})
    own_api = predict(gateway, {"image": f"{gateway.url}/v1/predictions"})

    assert set(problems(both)) == {"input.image", "input.mask"}
    assert "base64 payload is invalid" in problems(both)["input.image"]
    assert "neither a data: URI nor an http(s) URL" in problems(both)["input.mask"]
    assert "127.0.0.1 is a loopback address" in problems(local)["input.image"]
    assert "169.254.169.254 is a link-local address" in problems(metadata)["input.image"]
    assert "a mask needs an image" in problems(lonely_mask)["input.mask"]
    assert "Must be greater than 0" in problems(zero)["input.prompt_strength"]
    assert f"larger than the limit of {UPLOAD_LIMIT} bytes" in problems(too_big)["input.image"]
    assert "is not a PNG, JPEG or WebP image" in problems(not_image)["input.image"]
    assert "not of a file" in problems(own_api)["input.image"]
    assert len(gateway.upstream.requests) == before  # none of them reached Kiln


def test_kilns_strength_violation_is_reported_as_prompt_strength(gateway: Gateway) -> None:
    reply = predict(gateway, {"prompt": "refused by kiln", "image": data_uri(PHOTO)})

    assert problems(reply) == {"input.prompt_strength": "must leave at least one denoising step"}


def test_prompt_strength_without_an_image_is_not_sent(gateway: Gateway) -> None:
    reply = predict(gateway, {"prompt": "text only", "prompt_strength": 0.3})

    assert reply.status_code == 201
    assert not gateway.upstream.requests[-1].HasField("strength")
    assert (
        "prompt_strength is accepted but has no effect without input.image" in reply.json()["logs"]
    )


# --- fetched URLs and output modes ----------------------------------------------------------


@pytest.fixture
def image_site() -> Iterator[str]:
    """A local web server with /photo.png; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/photo.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PHOTO) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(PHOTO)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_private_urls_are_fetched_when_allowed_and_outputs_chain(
    image_site: str, tmp_path: Path
) -> None:
    settings = replace(SETTINGS, files_dir=tmp_path, allow_private_urls=True, output_mode="url")
    with running(settings) as trusting:
        fetched = predict(trusting, {"image": f"{image_site}/photo.png"})
        first = trusting.upstream.requests[-1].image
        output_url = fetched.json()["output"][0]
        chained = predict(trusting, {"image": output_url})  # an earlier output as the input
        second = trusting.upstream.requests[-1].image
        missing = predict(trusting, {"image": f"{image_site}/gone.png"})

    assert fetched.status_code == 201 and first == PHOTO
    assert output_url.startswith(f"{trusting.url}/files/")
    assert chained.status_code == 201 and second == PHOTO
    assert "answered HTTP 404" in problems(missing)["input.image"]


def test_auto_output_mode_gives_urls_when_the_public_url_is_https(tmp_path: Path) -> None:
    settings = replace(SETTINGS, files_dir=tmp_path, public_url="https://kiln.example.com")
    with running(settings) as behind_tls_proxy:
        reply = predict(behind_tls_proxy, {"prompt": "x"})

    assert reply.json()["output"][0].startswith("https://kiln.example.com/files/")
