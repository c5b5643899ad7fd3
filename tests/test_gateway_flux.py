"""The gateway in front of Kiln's FLUX models: Replicate's flux-schnell and flux-dev input
schemas (kiln_gateway.flux_schema), reached through the aliases black-forest-labs/flux-schnell
and black-forest-labs/flux-dev, with the official `replicate` client and a real Kiln server
serving the tiny FLUX models (torch backend, 64x64 defaults, sizes 32-256 in steps of 16).

The Kiln models are called tiny-schnell and tiny-dev, so every schema seen here was chosen
by the served model's family, not by the alias's name.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import replicate
from e2e_support import images, kinds
from PIL import Image
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput
from test_gateway import TOKEN, Gateway, official_client, output_bytes, running_gateway

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_gateway.settings import Alias, GatewaySettings

SCHNELL, DEV = "black-forest-labs/flux-schnell", "black-forest-labs/flux-dev"
CONFIG = """
[server]
default_model = "tiny-schnell"

[[models]]
name = "tiny-schnell"
builtin = "kiln-tiny-flux-schnell"

[[models]]
name = "tiny-dev"
builtin = "kiln-tiny-flux-dev"
"""


@pytest.fixture(scope="module")
def flux_server(tmp_path_factory: pytest.TempPathFactory, kiln_cache_dir: Path) -> Iterator[Any]:
    from conftest import start_server

    server = start_server(
        tmp_path_factory.mktemp("gateway-flux"), kiln_cache_dir, "--backend", "torch", config=CONFIG
    )
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def gateway(flux_server: Any) -> Iterator[Gateway]:
    settings = GatewaySettings(
        host="127.0.0.1",
        port=0,
        tokens=(TOKEN,),
        aliases=(
            Alias("black-forest-labs", "flux-schnell", "tiny-schnell"),
            Alias("black-forest-labs", "flux-dev", "tiny-dev"),
        ),
        log_level="WARNING",
    )
    with running_gateway(replace(settings, upstream=flux_server.address)) as running:
        yield running


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, gateway: Gateway) -> Iterator[replicate.Client]:
    monkeypatch.setenv("REPLICATE_BASE_URL", gateway.url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    with official_client() as fresh:
        yield fresh


@pytest.fixture(scope="module")
def stub(flux_server: Any) -> Iterator[pb_grpc.GenerationServiceStub]:
    channel = grpc.insecure_channel(flux_server.address)
    yield pb_grpc.GenerationServiceStub(channel)
    channel.close()


def opened(data: bytes) -> tuple[str, tuple[int, int]]:
    """The format and size of an encoded image."""
    with Image.open(io.BytesIO(data)) as image:
        return str(image.format), image.size


def run(client: replicate.Client, model: str, **values: Any) -> Any:
    """A prediction created with the official client and waited for."""
    prediction = client.models.predictions.create(model=model, input=values, wait=True)
    prediction.wait()
    return prediction


def test_official_client_runs_flux_schnell_through_the_alias_and_gets_webp(
    client: replicate.Client,
) -> None:
    output = client.run(SCHNELL, input={"prompt": "a red circle", "num_outputs": 2, "seed": 5})

    assert isinstance(output, list) and len(output) == 2
    assert all(isinstance(item, FileOutput) for item in output)
    assert all(item.url.startswith("data:image/webp;base64,") for item in output)
    data = [item.read() for item in output]
    assert [opened(item) for item in data] == [("WEBP", (64, 64))] * 2
    assert data[0] != data[1]  # seeds 5 and 6


@pytest.mark.parametrize(
    ("aspect_ratio", "megapixels", "size"),
    [("16:9", "1", (80, 48)), ("9:21", "1", (48, 96)), ("1:1", "0.25", (32, 32))],
)
def test_aspect_ratio_and_megapixels_scale_replicates_sizes_to_the_model(
    client: replicate.Client, aspect_ratio: str, megapixels: str, size: tuple[int, int]
) -> None:
    # Replicate's 1344x768 (16:9) times 64/1024 is 84x48: 84 rounds to 80, the nearest
    # multiple of 16; 9:21 is 640x1536 -> 40x96 -> 48x96; "0.25" halves 64x64 to 32x32.
    prediction = run(
        client, SCHNELL, prompt="a blue square", aspect_ratio=aspect_ratio, megapixels=megapixels
    )

    assert prediction.status == "succeeded", prediction.error
    assert opened(output_bytes(prediction.output[0])) == ("WEBP", size)


def test_inputs_out_of_replicates_bounds_are_422_naming_the_input(
    client: replicate.Client,
) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        (SCHNELL, {"prompt": "x", "num_outputs": 5}, "input.num_outputs: Must be less than "
         "or equal to 4"),
        (SCHNELL, {"prompt": "x", "num_inference_steps": 5}, "input.num_inference_steps: Must "
         "be less than or equal to 4"),
        (DEV, {"prompt": "x", "guidance": 11}, "input.guidance: Must be less than or equal "
         "to 10"),
        (DEV, {"prompt": "x", "aspect_ratio": "2:1"}, "input.aspect_ratio: aspect_ratio must "
         'be one of the following: "1:1", "16:9"'),
        (DEV, {"prompt": "x", "megapixels": 1}, "input.megapixels: Invalid type. Expected: "
         "string, given: integer"),
        (SCHNELL, {"num_outputs": 1}, "input.prompt: prompt is required"),
        (DEV, {"prompt": "x", "lora_weights": "https://example.com/style.safetensors"},
         "input.lora_weights: the Kiln server applies no LoRAs to FLUX models yet"),
    ]  # fmt: skip
    for model, values, expected in cases:
        with pytest.raises(ReplicateError) as refused:
            client.run(model, input=values)
        assert refused.value.status == 422, values
        assert expected in str(refused.value.detail), refused.value.detail
    # dev is not schnell: 5 steps are within its bounds
    assert run(client, DEV, prompt="x", num_inference_steps=5).status == "succeeded"


def _png_pixels(stub: pb_grpc.GenerationServiceStub, **fields: Any) -> bytes:
    request = pb.GenerateRequest(output_format=pb.OUTPUT_FORMAT_PNG, **fields)
    events = list(stub.Generate(request, timeout=120))
    assert kinds(events)[-1] == "completed"
    with Image.open(io.BytesIO(images(events)[0].data)) as image:
        return image.convert("RGB").tobytes()


def test_guidance_on_dev_is_kilns_guidance_scale(
    client: replicate.Client, stub: pb_grpc.GenerationServiceStub
) -> None:
    common = {"prompt": "a green triangle", "seed": 3, "output_format": "png"}
    prediction = run(client, DEV, guidance=7, go_fast=False, **common)

    assert prediction.status == "succeeded", prediction.error
    with Image.open(io.BytesIO(output_bytes(prediction.output[0]))) as image:
        served = image.convert("RGB").tobytes()
    direct = {"model": "tiny-dev", "prompt": "a green triangle", "seed": 3}
    assert served == _png_pixels(stub, guidance_scale=7, **direct)
    assert served != _png_pixels(stub, guidance_scale=1, **direct)
    assert "go_fast is accepted but has no effect in Kiln" in prediction.logs
    # schnell's schema has no guidance (as on Replicate): dropped and noted, not applied
    ignored = run(client, SCHNELL, guidance=7, **common)
    assert ignored.status == "succeeded", ignored.error
    assert "this model does not have: guidance" in ignored.logs


def test_openapi_schema_shows_replicates_flux_inputs(client: replicate.Client) -> None:
    schnell = client.models.get(SCHNELL).latest_version
    dev = client.models.get(DEV).latest_version
    assert schnell is not None and dev is not None

    fast = schnell.openapi_schema["components"]["schemas"]["Input"]
    slow = dev.openapi_schema["components"]["schemas"]["Input"]
    assert fast["required"] == slow["required"] == ["prompt"]
    props = fast["properties"]
    assert props["aspect_ratio"]["default"] == "1:1" and len(props["aspect_ratio"]["enum"]) == 11
    assert (props["megapixels"]["default"], props["megapixels"]["enum"]) == ("1", ["1", "0.25"])
    assert (props["num_outputs"]["minimum"], props["num_outputs"]["maximum"]) == (1, 4)
    assert (props["num_inference_steps"]["default"], props["num_inference_steps"]["maximum"]) == (
        4,
        4,
    )
    assert (props["output_format"]["default"], props["output_quality"]["default"]) == ("webp", 80)
    assert props["go_fast"]["default"] is True
    assert props["disable_safety_checker"]["default"] is False
    assert not {"guidance", "image", "width", "scheduler", "negative_prompt"} & set(props)
    props = slow["properties"]
    assert props["guidance"] == props["guidance"] | {"default": 3.5, "minimum": 0, "maximum": 10}
    assert props["num_inference_steps"]["default"] == 8
    assert props["num_inference_steps"]["maximum"] > 4
    assert props["image"]["format"] == "uri" and props["prompt_strength"]["default"] == 0.8


def test_image_and_prompt_strength_on_dev_run_kilns_img2img(
    client: replicate.Client, tmp_path: Path
) -> None:
    # The output takes the photo's size, as on Replicate.
    photo = io.BytesIO()
    Image.new("RGB", (96, 48), "orange").save(photo, format="PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(photo.getvalue())
    with path.open("rb") as file:
        values = {"image": file, "prompt": "a watercolour", "prompt_strength": 0.5}
        prediction = client.models.predictions.create(
            model=DEV, input=values, file_encoding_strategy="base64", wait=True
        )
    prediction.wait()
    assert prediction.status == "succeeded", prediction.error
    assert prediction.output is not None
    assert opened(output_bytes(prediction.output[0])) == ("WEBP", (96, 48))


def test_sizes_are_replicates_on_a_1024_model_and_clamped_to_the_models_limits() -> None:
    from kiln_gateway.flux_schema import ASPECT_RATIOS, flux_size

    def model(min_size: int, max_size: int) -> pb.ModelInfo:
        return pb.ModelInfo(
            family="flux", default_width=1024, default_height=1024, min_size=min_size,
            max_size=max_size, size_multiple=16,
        )  # fmt: skip

    full = model(64, 2048)
    assert {ratio: flux_size(full, ratio, "1") for ratio in ASPECT_RATIOS} == ASPECT_RATIOS
    assert flux_size(full, "16:9", "0.25") == (672, 384)
    limited = model(352, 1440)
    assert flux_size(limited, "21:9", "1") == (1440, 640)  # 1536 clamped to max_size
    assert flux_size(limited, "21:9", "0.25") == (768, 352)  # 320 clamped to min_size
