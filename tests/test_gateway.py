"""End-to-end tests of `kiln gateway`: the official `replicate` client and plain HTTP against a
real gateway (uvicorn on 127.0.0.1) in front of a real Kiln server (the tiny model).

The replicate client is configured the way a Replicate user configures it: only through
REPLICATE_BASE_URL and REPLICATE_API_TOKEN (plus, for the HTTPS gateway, SSL_CERT_FILE naming
the test certificate, which stands in for a public CA). The shared gateway keeps the default
output mode, "auto": on its plain-HTTP URL outputs are data URIs, on the HTTPS one file URLs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import pytest
import replicate
from gateway_support import self_signed_certificate, serving, wait_until
from PIL import Image
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput
from replicate.webhook import InvalidSignatureError, WebhookSigningSecret

from kiln_gateway.server import bind_socket, build_server
from kiln_gateway.settings import Alias, GatewaySettings

TOKEN = "kiln-test-token"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"kiln-gateway-test-signing-key-32").decode()
# The hosted stability-ai/sdxl version a Replicate script pins; the gateway maps it to "tiny".
SDXL_VERSION = "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"
# Long enough (150 Heun steps at 256 px: many seconds on a CPU) to be caught mid-generation.
LONG_INPUT = {
    "prompt": "a slow, detailed landscape",
    "width": 256,
    "height": 256,
    "num_inference_steps": 150,
    "scheduler": "HeunDiscrete",
    "seed": 1,
}
PREDICTION_KEYS = {
    "id",
    "model",
    "version",
    "status",
    "input",
    "output",
    "error",
    "logs",
    "metrics",
    "created_at",
    "started_at",
    "completed_at",
    "urls",
}

BASE_SETTINGS = GatewaySettings(
    host="127.0.0.1",
    port=0,
    tokens=(TOKEN,),
    aliases=(
        Alias("stability-ai", "sdxl", "tiny"),
        Alias("stability-ai", "sdxl", "tiny", SDXL_VERSION),
    ),
    webhook_secret=WEBHOOK_SECRET,
    webhook_retry_seconds=0.05,
    webhook_allowed_hosts=("127.0.0.1",),  # the test's webhook receiver
    log_level="WARNING",
)


class KilnServer(Protocol):
    """The `kiln_server` fixture (tests/conftest.py): a running `kiln serve`."""

    @property
    def address(self) -> str: ...


@dataclass
class Gateway:
    """A gateway served from a thread of the test process."""

    url: str
    settings: GatewaySettings


@contextlib.contextmanager
def running_gateway(settings: GatewaySettings) -> Iterator[Gateway]:
    """Serve the gateway app on an ephemeral 127.0.0.1 port until the block ends.

    Without a `files_dir`, it gets a fresh folder (and so its own SQLite database).
    """
    own_folder = settings.files_dir is None
    if own_folder:
        settings = replace(settings, files_dir=Path(tempfile.mkdtemp(prefix="kiln-gateway-")))
    scheme = "https" if settings.tls_certfile else "http"
    try:
        with serving(build_server(settings)) as served:
            yield Gateway(f"{scheme}://127.0.0.1:{served.port}", settings)
    finally:
        if own_folder and settings.files_dir is not None:
            shutil.rmtree(settings.files_dir, ignore_errors=True)


def png_size(data: bytes) -> tuple[int, int]:
    """Size of a PNG image (fails unless `data` is a PNG)."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def output_bytes(item: str) -> bytes:
    """An output's bytes: decoded from its data URI, or fetched (without a token) from its URL."""
    if item.startswith("data:"):
        return base64.b64decode(item.partition(",")[2])
    reply = httpx.get(item)
    assert reply.status_code == 200, reply.text
    return reply.content


def parse_time(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def gateway(kiln_server: KilnServer) -> Iterator[Gateway]:
    """The shared plain-HTTP gateway (tokens on, stability-ai/sdxl aliased to tiny)."""
    with running_gateway(replace(BASE_SETTINGS, upstream=kiln_server.address)) as running:
        yield running


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1 (made with the openssl CLI)."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), "127.0.0.1")


@pytest.fixture(scope="module")
def tls_gateway(kiln_server: KilnServer, tls_files: tuple[Path, Path]) -> Iterator[Gateway]:
    """The same gateway served over HTTPS, so output URLs are https: like Replicate's."""
    cert, key = tls_files
    settings = replace(
        BASE_SETTINGS, upstream=kiln_server.address, tls_certfile=cert, tls_keyfile=key
    )
    with running_gateway(settings) as running:
        yield running


@contextlib.contextmanager
def official_client() -> Iterator[replicate.Client]:
    """A fresh official client (configured by the environment); its connections closed after."""
    client = replicate.Client()
    try:
        yield client
    finally:
        client._client.close()  # the official client never closes its connection pool


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, gateway: Gateway) -> Iterator[replicate.Client]:
    """A fresh official client configured only through the environment, as scripts do."""
    monkeypatch.setenv("REPLICATE_BASE_URL", gateway.url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    with official_client() as fresh:
        yield fresh


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    """Plain HTTP with the bearer token."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=70) as session:
        yield session


# --- the official client --------------------------------------------------------------------


def test_run_returns_file_outputs_read_over_https(
    monkeypatch: pytest.MonkeyPatch, tls_gateway: Gateway, tls_files: tuple[Path, Path]
) -> None:
    monkeypatch.setenv("REPLICATE_BASE_URL", tls_gateway.url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))

    with official_client() as client:
        output = client.run(
            "stability-ai/sdxl", input={"prompt": "a red teapot", "num_outputs": 2, "seed": 7}
        )
        images = [item.read() for item in output]

    assert isinstance(output, list) and len(output) == 2
    assert all(isinstance(item, FileOutput) for item in output)
    assert all(item.url.startswith(f"{tls_gateway.url}/files/") for item in output)
    assert [png_size(data) for data in images] == [(64, 64), (64, 64)]
    assert images[0] != images[1]  # seeds 7 and 8


MIGRATION_SCRIPT = textwrap.dedent(
    """
    import replicate

    output = replicate.run(
        "stability-ai/sdxl:39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b",
        input={
            "prompt": "An astronaut riding a rainbow unicorn, cinematic, dramatic",
            "negative_prompt": "blurry, low quality",
            "num_outputs": 2,
            "scheduler": "K_EULER",
            "num_inference_steps": 25,
            "guidance_scale": 7.5,
            "seed": 1234,
            "apply_watermark": False,
        },
    )
    for index, item in enumerate(output):
        with open(f"output_{index}.png", "wb") as file:
            file.write(item.read())
    print("wrote", len(output), "images")
    """
)


def test_script_written_for_replicate_runs_unchanged(
    tls_gateway: Gateway, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    script = tmp_path / "generate.py"
    script.write_text(MIGRATION_SCRIPT)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "REPLICATE_BASE_URL": tls_gateway.url,
        "REPLICATE_API_TOKEN": TOKEN,
        "SSL_CERT_FILE": str(tls_files[0]),  # trust the test certificate, as a CA would be
    }

    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, timeout=120
    )

    assert done.returncode == 0, done.stderr.decode()
    assert b"wrote 2 images" in done.stdout
    for index in (0, 1):
        assert png_size((tmp_path / f"output_{index}.png").read_bytes()) == (64, 64)


def test_readme_example_reads_outputs_from_a_plain_http_gateway(client: replicate.Client) -> None:
    # The default output mode ("auto") answers data URIs on http://, which FileOutput reads;
    # file URLs on http:// would come back as plain strings without .read().
    output = client.run("stability-ai/sdxl", input={"prompt": "a blue cube", "num_outputs": 2})

    assert isinstance(output, list) and all(isinstance(item, FileOutput) for item in output)
    assert all(item.url.startswith("data:image/png;base64,") for item in output)
    assert [png_size(item.read()) for item in output] == [(64, 64), (64, 64)]


def test_output_as_data_uri_over_https(
    monkeypatch: pytest.MonkeyPatch, tls_gateway: Gateway, tls_files: tuple[Path, Path]
) -> None:
    monkeypatch.setenv("REPLICATE_BASE_URL", tls_gateway.url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))

    with official_client() as client:
        output = client.run(
            "stability-ai/sdxl", input={"prompt": "a blue cube", "output_as_data_uri": True}
        )

    assert isinstance(output[0], FileOutput) and output[0].url.startswith("data:image/png")
    assert png_size(output[0].read()) == (64, 64)


def product_photo(folder: Path) -> tuple[Path, Path]:
    """A 72x48 noisy "photo" and its mask: white (repaint) around a black (keep) product box."""
    noise = np.random.default_rng(11).integers(0, 256, size=(48, 72, 3), dtype=np.uint8)
    mask = np.full((48, 72), 255, dtype=np.uint8)
    mask[12:36, 20:44] = 0
    photo_path, mask_path = folder / "photo.png", folder / "mask.png"
    Image.fromarray(noise, "RGB").save(photo_path)
    Image.fromarray(mask, "L").save(mask_path)
    return photo_path, mask_path


def test_replicate_run_with_photo_and_mask_keeps_the_product(
    client: replicate.Client, tmp_path: Path
) -> None:
    photo_path, mask_path = product_photo(tmp_path)

    with photo_path.open("rb") as photo, mask_path.open("rb") as mask:
        output = client.run(
            "stability-ai/sdxl",
            input={
                "image": photo,
                "mask": mask,
                "prompt": "a red circle on a yellow background",
                "prompt_strength": 0.8,
                "num_outputs": 2,
                "seed": 5,
            },
        )

    images = [np.asarray(Image.open(io.BytesIO(item.read())).convert("RGB")) for item in output]
    original = np.asarray(Image.open(photo_path).convert("RGB"))
    keep = np.asarray(Image.open(mask_path)) == 0
    assert [image.shape for image in images] == [original.shape, original.shape]  # 72x48
    for image in images:
        assert np.array_equal(image[keep], original[keep])  # the product, pixel for pixel
        assert not np.array_equal(image[~keep], original[~keep])  # the background repainted
    assert not np.array_equal(images[0], images[1])  # seeds 5 and 6


def test_img2img_from_a_data_uri_has_the_photos_size(
    client: replicate.Client, tmp_path: Path
) -> None:
    photo_path, _ = product_photo(tmp_path)

    with photo_path.open("rb") as photo:
        prediction = client.models.predictions.create(
            model="stability-ai/sdxl",
            input={"image": photo, "prompt": "a watercolour", "prompt_strength": 0.5},
            file_encoding_strategy="base64",
            wait=True,
        )

    assert prediction.status == "succeeded", prediction.error
    assert png_size(output_bytes(prediction.output[0])) == (72, 48)
    assert "image to image at strength 0.5" in str(prediction.logs)
    assert prediction.input["image"].endswith("characters omitted>")


def test_predictions_create_then_wait(client: replicate.Client) -> None:
    version = client.models.get("kiln/tiny").latest_version
    assert version is not None

    prediction = client.predictions.create(
        version=version.id, input={"prompt": "a red circle", "seed": 11}
    )
    assert prediction.status in ("starting", "processing")
    assert prediction.output is None
    prediction.wait()

    assert prediction.status == "succeeded"
    assert prediction.model == "kiln/tiny" and prediction.version == version.id
    assert prediction.error is None
    assert len(prediction.output) == 1
    assert prediction.metrics is not None and prediction.metrics["predict_time"] > 0
    progress = prediction.progress
    assert progress is not None and (progress.current, progress.total) == (8, 8)
    again = client.predictions.get(prediction.id)
    assert (again.status, again.output) == ("succeeded", prediction.output)
    assert png_size(output_bytes(prediction.output[0])) == (64, 64)


def test_models_predictions_create_reaches_kiln_model_whatever_the_owner(
    client: replicate.Client,
) -> None:
    prediction = client.models.predictions.create(
        model="acme/tiny", input={"prompt": "a green triangle", "num_inference_steps": 4}
    )
    prediction.wait()

    assert prediction.model == "acme/tiny"
    assert prediction.status == "succeeded"
    assert prediction.logs is not None and "4/4" in prediction.logs
    fetched = client.predictions.get(prediction.id)
    assert fetched.model == "acme/tiny" and fetched.output == prediction.output


def test_cancel_mid_generation_stops_the_work(client: replicate.Client) -> None:
    prediction = client.models.predictions.create(model="stability-ai/sdxl", input=LONG_INPUT)

    def generating() -> bool:
        prediction.reload()
        return prediction.progress is not None

    wait_until(generating, what="the first denoising step")
    prediction.cancel()

    assert prediction.status == "canceled"
    assert prediction.progress is not None and prediction.progress.current < 150
    fetched = client.predictions.get(prediction.id)
    assert fetched.status == "canceled"
    assert fetched.completed_at is not None and fetched.output is None
    assert fetched.logs is not None and fetched.logs.rstrip().endswith("Prediction canceled")
    # The Kiln server let go of the canceled work: a new prediction runs right away.
    after = client.run("stability-ai/sdxl", input={"prompt": "next", "num_inference_steps": 2})
    assert isinstance(after, list) and len(after) == 1


def test_stream_sends_logs_output_and_done(client: replicate.Client) -> None:
    events = list(client.stream("stability-ai/sdxl", input={"prompt": "a star", "seed": 5}))

    kinds = [event.event.value for event in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    assert kinds.count("output") == 1
    logs = [event.data for event in events if event.event.value == "logs"]
    assert "Using seed: 5" in logs
    assert [line.split("|")[-1].split()[0] for line in logs if "it/s" in line] == [
        f"{step}/8" for step in range(1, 9)
    ]
    output = str(next(event.data for event in events if event.event.value == "output"))
    assert png_size(output_bytes(output)) == (64, 64)


def test_stream_of_a_finished_prediction_replays_it(client: replicate.Client) -> None:
    prediction = client.models.predictions.create(
        model="stability-ai/sdxl", input={"prompt": "a moon"}, wait=True
    )
    assert prediction.status == "succeeded"

    kinds = [event.event.value for event in prediction.stream()]

    assert kinds.count("output") == 1 and kinds[-1] == "done" and "logs" in kinds


def test_bad_input_is_422_naming_the_field(client: replicate.Client) -> None:
    with pytest.raises(ReplicateError) as wrong_type:
        client.run("stability-ai/sdxl", input={"prompt": "x", "width": "wide"})
    with pytest.raises(ReplicateError) as private_url:
        client.run("stability-ai/sdxl", input={"prompt": "x", "image": "http://127.0.0.1:9/a.png"})
    with pytest.raises(ReplicateError) as kiln_limit:  # checked by the Kiln server itself
        client.run("stability-ai/sdxl", input={"prompt": "x", "height": 100})

    assert wrong_type.value.status == 422
    assert wrong_type.value.title == "Input validation failed"
    assert wrong_type.value.detail == (
        "- input.width: Invalid type. Expected: integer, given: string\n"
    )
    assert private_url.value.status == 422
    assert "input.image: 127.0.0.1 is a loopback address" in str(private_url.value.detail)
    assert kiln_limit.value.status == 422
    assert "input.height: must be a multiple of 8" in str(kiln_limit.value.detail)


def test_bad_or_missing_token_is_401(monkeypatch: pytest.MonkeyPatch, gateway: Gateway) -> None:
    monkeypatch.setenv("REPLICATE_BASE_URL", gateway.url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", "not-the-token")
    with pytest.raises(ReplicateError) as wrong, official_client() as client:
        client.run("stability-ai/sdxl", input={"prompt": "x"})
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    with pytest.raises(ReplicateError) as missing, official_client() as client:
        client.predictions.list()

    for error in (wrong.value, missing.value):
        assert error.status == 401
        assert error.title == "Unauthenticated"
        assert error.detail == "You did not pass a valid authentication token"


def test_model_and_version_endpoints(client: replicate.Client) -> None:
    model = client.models.get("stability-ai/sdxl")

    assert (model.owner, model.name) == ("stability-ai", "sdxl")
    assert model.latest_version is not None
    kiln_version = model.latest_version.id
    direct = client.models.get("x/tiny").latest_version
    assert len(kiln_version) == 64 and direct is not None and direct.id == kiln_version
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    assert schema["Input"]["properties"]["num_inference_steps"]["default"] == 8
    assert "K_EULER" in schema["Input"]["properties"]["scheduler"]["enum"]
    assert schema["Output"]["items"]["format"] == "uri"
    assert [v.id for v in model.versions.list()] == [kiln_version, SDXL_VERSION]
    assert model.versions.get(SDXL_VERSION).id == SDXL_VERSION
    with pytest.raises(ReplicateError) as unknown:
        client.models.get("acme/no-such-model")
    assert unknown.value.status == 404 and "tiny" in str(unknown.value.detail)


@dataclass
class Receiver:
    """A local webhook receiver that fails its first `fail_first` requests with HTTP 500."""

    url: str
    fail_first: int = 1
    deliveries: list[tuple[dict[str, str], str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            with state.lock:
                status = 500 if len(state.deliveries) < state.fail_first else 200
                state.deliveries.append((dict(self.headers), body, status))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/replicate?customId=7"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    thread.join(timeout=10)


def test_webhooks_are_signed_filtered_and_retried(
    client: replicate.Client, receiver: Receiver
) -> None:
    secret = client.webhooks.default.secret()
    assert secret.key == WEBHOOK_SECRET

    prediction = client.predictions.create(
        model="stability-ai/sdxl",
        input={"prompt": "a webhook"},
        webhook=receiver.url,
        webhook_events_filter=["start", "completed"],
    )

    def completed_delivered() -> bool:
        with receiver.lock:
            return any(
                status == 200 and json.loads(body)["status"] == "succeeded"
                for _, body, status in receiver.deliveries
            )

    wait_until(completed_delivered, what="the completed webhook")
    with receiver.lock:
        deliveries = list(receiver.deliveries)
    for headers, body, _ in deliveries:
        assert (
            client.webhooks.validate(headers=headers, body=body, secret=secret, tolerance=60)
            is None
        )
        assert json.loads(body)["id"] == prediction.id
    first_headers, _, first_status = deliveries[0]
    retry_headers, retry_body, retry_status = deliveries[1]
    assert (first_status, retry_status) == (500, 200)
    assert retry_headers["webhook-id"] == first_headers["webhook-id"]
    assert json.loads(retry_body)["status"] in ("starting", "processing")  # the start event
    accepted = [json.loads(body) for _, body, status in deliveries if status == 200]
    assert [body["status"] for body in accepted][-1] == "succeeded"
    assert len(accepted) == 2  # start and completed; logs and output were filtered out
    tampered = deliveries[-1][1].replace("succeeded", "failed")
    with pytest.raises(InvalidSignatureError):
        client.webhooks.validate(
            headers=deliveries[-1][0], body=tampered, secret=WebhookSigningSecret(key=secret.key)
        )


# --- the raw HTTP shapes --------------------------------------------------------------------


def test_prediction_object_shape(http: httpx.Client, gateway: Gateway) -> None:
    reply = http.post(
        "/v1/models/stability-ai/sdxl/predictions",
        json={"input": {"prompt": "a teapot", "seed": 42, "num_outputs": 2, "lora_scale": 0.9}},
        headers={"Prefer": "wait"},
    )

    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert set(body) >= PREDICTION_KEYS
    assert reply.headers["location"] == body["urls"]["get"]
    assert body["status"] == "succeeded" and body["error"] is None
    assert body["model"] == "stability-ai/sdxl"
    assert body["version"] == hashlib.sha256(b"kiln-model:tiny").hexdigest()
    assert body["input"] == {"prompt": "a teapot", "seed": 42, "num_outputs": 2, "lora_scale": 0.9}
    assert "Using seed: 42" in body["logs"] and "lora_scale is accepted" in body["logs"]
    metrics = body["metrics"]
    assert set(metrics) == {
        "predict_time",
        "total_time",
        "queue_time",
        "engine_seconds",
        "image_count",
    }
    assert (
        metrics["image_count"] == 2 and metrics["predict_time"] > 0 and metrics["queue_time"] >= 0
    )
    assert metrics["engine_seconds"] > 0
    created, started, completed = (
        parse_time(body[key]) for key in ("created_at", "started_at", "completed_at")
    )
    assert created <= started <= completed
    get_url = f"{gateway.url}/v1/predictions/{body['id']}"
    assert body["urls"] == {
        "get": get_url,
        "cancel": f"{get_url}/cancel",
        "stream": f"{get_url}/stream",
    }
    assert len(body["output"]) == 2
    for item in body["output"]:  # data URIs: the default output mode on plain HTTP
        assert item.startswith("data:image/png;base64,")
        assert png_size(output_bytes(item)) == (64, 64)
    assert http.get(f"/v1/predictions/{body['id']}").json() == body
    canceled_late = http.post(f"/v1/predictions/{body['id']}/cancel")
    assert canceled_late.status_code == 200 and canceled_late.json()["status"] == "succeeded"


def test_create_without_prefer_returns_at_once_and_client_polls(http: httpx.Client) -> None:
    reply = http.post("/v1/predictions", json={"version": "stability-ai/sdxl", "input": {}})

    assert reply.status_code == 201
    body = reply.json()
    assert body["status"] in ("starting", "processing") and body["output"] is None
    assert body["input"] == {}

    def finished() -> dict[str, Any] | None:
        current = http.get(f"/v1/predictions/{body['id']}").json()
        return current if current["status"] == "succeeded" else None

    done = wait_until(finished, what="the prediction to finish")
    assert "Using seed:" in done["logs"] and len(done["output"]) == 1


def test_prefer_wait_n_answers_starting_when_time_runs_out(http: httpx.Client) -> None:
    reply = http.post(
        "/v1/models/stability-ai/sdxl/predictions",
        json={"input": LONG_INPUT},
        headers={"Prefer": "wait=1"},
    )

    assert reply.status_code == 201
    body = reply.json()
    try:
        # Replicate reports "starting" when the wait runs out; the official client relies
        # on it to fall back to polling.
        assert body["status"] == "starting" and body["output"] is None
        current = http.get(f"/v1/predictions/{body['id']}").json()
        assert current["status"] in ("starting", "processing")
    finally:
        canceled = http.post(f"/v1/predictions/{body['id']}/cancel").json()
    assert canceled["status"] == "canceled"
    bad = http.post(
        "/v1/predictions",
        json={"version": "stability-ai/sdxl", "input": {}},
        headers={"Prefer": "wait=soon"},
    )
    assert bad.status_code == 400 and "wait=N" in bad.json()["detail"]


def test_list_predictions_pages_newest_first(
    kiln_server: KilnServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = replace(BASE_SETTINGS, upstream=kiln_server.address)
    with running_gateway(settings) as fresh:
        session = httpx.Client(
            base_url=fresh.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        created = [
            session.post(
                "/v1/models/stability-ai/sdxl/predictions",
                json={"input": {"prompt": f"item {i}", "num_inference_steps": 1}},
            ).json()["id"]
            for i in range(5)
        ]
        pages: list[dict[str, Any]] = []
        url: str | None = "/v1/predictions?page_size=2"
        while url is not None and len(pages) < 10:
            pages.append(session.get(url).json())
            url = pages[-1]["next"]
        monkeypatch.setenv("REPLICATE_BASE_URL", fresh.url)
        monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
        with official_client() as client:
            official = client.predictions.list()
        back = session.get(pages[1]["previous"]).json()
        session.close()

    assert [len(page["results"]) for page in pages] == [2, 2, 1]
    listed = [result["id"] for page in pages for result in page["results"]]
    assert listed == created[::-1]
    assert pages[0]["previous"] is None and pages[-1]["next"] is None
    assert [r["id"] for r in back["results"]] == [r["id"] for r in pages[0]["results"]]
    assert [p.id for p in official] == created[::-1] and official.next is None


def test_output_urls_need_no_token_and_expire_after_the_retention_time(
    kiln_server: KilnServer,
) -> None:
    settings = replace(
        BASE_SETTINGS, upstream=kiln_server.address, retention_seconds=0.5, output_mode="url"
    )
    with running_gateway(settings) as short:
        session = httpx.Client(
            base_url=short.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        body = session.post(
            "/v1/predictions",
            json={"version": "stability-ai/sdxl", "input": {"prompt": "fleeting"}},
            headers={"Prefer": "wait=30"},
        ).json()
        file_url = body["output"][0]
        assert file_url.startswith(f"{short.url}/files/")
        image = httpx.get(file_url)  # no token: like Replicate's delivery URLs
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        wait_until(lambda: httpx.get(file_url).status_code == 404, timeout=20, what="expiry")
        expired = session.get(f"/v1/predictions/{body['id']}").json()
        session.close()

    assert expired["data_removed"] is True
    assert expired["output"] is None and expired["input"] == {} and expired["logs"] == ""
    assert expired["status"] == "succeeded"


def test_error_shapes(http: httpx.Client) -> None:
    missing = http.get("/v1/predictions/doesnotexist")
    unknown_model = http.post("/v1/models/acme/nothing/predictions", json={"input": {}})
    bad_version = http.post("/v1/predictions", json={"version": "f" * 64, "input": {}})
    no_input = http.post("/v1/predictions", json={"version": "acme/tiny"})

    assert missing.status_code == 404
    assert set(missing.json()) == {"title", "detail", "status"}
    assert (
        unknown_model.status_code == 404 and "served models: tiny" in unknown_model.json()["detail"]
    )
    assert bad_version.status_code == 422
    assert bad_version.json()["title"] == "Invalid version or not permitted"
    assert no_input.status_code == 422
    assert no_input.json()["invalid_fields"][0]["field"] == "input"


def test_openapi_describes_the_api(gateway: Gateway) -> None:
    spec = httpx.get(f"{gateway.url}/openapi.json").json()

    assert {
        "/v1/predictions",
        "/v1/predictions/{prediction_id}",
        "/v1/predictions/{prediction_id}/cancel",
        "/v1/predictions/{prediction_id}/stream",
        "/v1/models/{owner}/{name}",
        "/v1/models/{owner}/{name}/predictions",
        "/v1/models/{owner}/{name}/versions",
        "/v1/models/{owner}/{name}/versions/{version_id}",
        "/v1/webhooks/default/secret",
        "/v1/files",
        "/v1/files/{file_id}",
        "/v1/files/{file_id}/download",
    } <= set(spec["paths"])
    assert "PredictionResponse" in spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_unreachable_kiln_server_is_503() -> None:
    closed = bind_socket("127.0.0.1", 0)
    port = closed.getsockname()[1]
    closed.close()
    settings = replace(BASE_SETTINGS, upstream=f"127.0.0.1:{port}")
    with running_gateway(settings) as orphan:
        reply = httpx.post(
            f"{orphan.url}/v1/models/stability-ai/sdxl/predictions",
            json={"input": {}},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )

    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "5"
    assert f"127.0.0.1:{port}" in reply.json()["detail"]
