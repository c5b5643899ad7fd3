"""Per-request LoRAs at the API: validation, ListModels, the clients, the CLI, the gateway.

Validation cases run through `validate_request` directly (no model needed); the statuses
ListModels' LoRA listing and generations with LoRAs run through a real `kiln serve` with a
LoRA folder in its config. LoRA files are written as kohya and PEFT files with random
weights; listing reads only their headers.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from gateway_support import wait_until
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from lora_support import make_peft_lora, record_opens
from PIL import Image
from safetensors.torch import save_file
from test_metrics import metrics_port, scraper, value

from kiln_client.generate_cli import describe_error, format_models, lora_flag
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_client.requests import build_request
from kiln_server.lora.listing import LoraCatalog, read_header
from kiln_server.models.registry import ModelRegistry, make_spec
from kiln_server.pipeline.params import LoraUse
from kiln_server.validation import (
    LoraMissing,
    LorasUnsupported,
    RequestBudget,
    RequestInvalid,
    validate_request,
)
from kiln_server.wire import invalid_string_field

MODULE = "lora_unet_down_blocks_1_attentions_0_proj_in"


def write_kohya(path: Path, rank: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            f"{MODULE}.lora_down.weight": torch.randn(rank, 64),
            f"{MODULE}.lora_up.weight": torch.randn(64, rank),
            f"{MODULE}.alpha": torch.tensor(float(rank)),
        },
        str(path),
    )
    return path


def write_peft(path: Path, rank: int) -> Path:
    module = "unet.down_blocks.1.attentions.0.proj_in"
    save_file(
        {
            f"{module}.lora_A.weight": torch.randn(rank, 64),
            f"{module}.lora_B.weight": torch.randn(64, rank),
        },
        str(path),
    )
    return path


def write_loha(path: Path) -> Path:
    save_file({f"{MODULE}.hada_w1_a": torch.zeros(4, 4)}, str(path))
    return path


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    write_kohya(folder / "ink.safetensors", 4)
    write_peft(folder / "paper.safetensors", 8)
    write_loha(folder / "fuzzy.safetensors")
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    return folder


def _validate(
    tmp_path: Path,
    request: pb.GenerateRequest,
    lora_dirs: tuple[Path, ...],
    backend: str | None = "torch",
    max_loras: int = 4,
) -> Any:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    spec = make_spec("m", model, {"lora_dirs": lora_dirs})
    registry = ModelRegistry(models={"m": spec}, default_model="m")
    return validate_request(
        request,
        registry,
        lambda _model, _text: 3,
        lambda _model: 77,
        budget=RequestBudget(max_loras=max_loras),
        backend=lambda _model: backend,
    )


def _request(*loras: tuple[str, float | None]) -> pb.GenerateRequest:
    request = pb.GenerateRequest(prompt="a red circle")
    for name, scale in loras:
        entry = request.loras.add(name=name)
        if scale is not None:
            entry.scale = scale
    return request


def _violations(error: RequestInvalid) -> dict[str, str]:
    return {v.field: v.description for v in error.violations}


def test_loras_become_generation_params(tmp_path: Path, lora_dir: Path) -> None:
    request = _request(("ink", 0.5), ("paper.safetensors", None), ("fuzzy", 0.0))
    params = _validate(tmp_path, request, (lora_dir,))
    # Names lose the suffix; an unset scale is 1.0; scale 0 is kept (the engine gives the
    # base model's bytes for it).
    assert params.loras == (LoraUse("ink", 0.5), LoraUse("paper", 1.0), LoraUse("fuzzy", 0.0))
    assert _validate(tmp_path, _request(), (lora_dir,)).loras == ()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../x", "path separator"),
        ("a/b", "path separator"),
        ("/etc/passwd", "path separator"),
        ("..", "'..'"),
        ("a\\b", "path separator"),
        ("", "1 to 255"),
    ],
)
def test_names_that_are_not_plain_names_are_invalid(
    tmp_path: Path, lora_dir: Path, name: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = record_opens(monkeypatch)
    with pytest.raises(RequestInvalid) as caught:
        _validate(tmp_path, _request((name, 1.0)), (lora_dir,))
    assert not isinstance(caught.value, LoraMissing)
    assert why in _violations(caught.value)["loras[0].name"]
    assert opened == []


def test_a_missing_file_is_not_found_naming_the_entry(tmp_path: Path, lora_dir: Path) -> None:
    with pytest.raises(LoraMissing) as caught:
        _validate(tmp_path, _request(("ink", 1.0), ("nope", 1.0)), (lora_dir,))
    assert "no such LoRA file" in _violations(caught.value)["loras[1].name"]


def test_a_link_out_of_the_folder_is_refused(tmp_path: Path, lora_dir: Path) -> None:
    (lora_dir / "sneaky.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(RequestInvalid) as caught:
        _validate(tmp_path, _request(("sneaky", 1.0)), (lora_dir,))
    assert "outside" in _violations(caught.value)["loras[0].name"]


def test_other_problems_make_missing_files_invalid_argument(tmp_path: Path, lora_dir: Path) -> None:
    with pytest.raises(RequestInvalid) as caught:
        _validate(tmp_path, _request(("nope", 1.0), ("a/b", 1.0)), (lora_dir,))
    assert not isinstance(caught.value, LoraMissing)
    assert set(_violations(caught.value)) == {"loras[0].name", "loras[1].name"}


def test_too_many_duplicates_and_bad_scales(tmp_path: Path, lora_dir: Path) -> None:
    with pytest.raises(RequestInvalid) as caught:
        _validate(tmp_path, _request(*[("ink", 1.0)] * 3), (lora_dir,), max_loras=2)
    assert "at most 2" in _violations(caught.value)["loras"]

    with pytest.raises(RequestInvalid) as caught:
        _validate(tmp_path, _request(("ink", 1.0), ("ink.safetensors", 0.5)), (lora_dir,))
    assert "already loras[0]" in _violations(caught.value)["loras[1].name"]

    for scale in (float("nan"), float("inf"), 4.5, -5.0):
        with pytest.raises(RequestInvalid) as caught:
            _validate(tmp_path, _request(("ink", scale)), (lora_dir,))
        assert "between -4 and 4" in _violations(caught.value)["loras[0].scale"]
    assert _validate(tmp_path, _request(("ink", -4.0)), (lora_dir,)).loras[0].scale == -4.0


def test_a_model_without_lora_folders_refuses_loras(tmp_path: Path) -> None:
    with pytest.raises(RequestInvalid) as caught:
        _validate(tmp_path, _request(("ink", 1.0)), ())
    assert "no LoRA folders" in _violations(caught.value)["loras"]


def test_a_backend_without_loras_is_a_failed_precondition(tmp_path: Path, lora_dir: Path) -> None:
    # Every Kiln backend may apply LoRAs (compiled engines built without LoRA inputs are
    # refused by the engine core, tests/test_lora_onnx.py); a backend outside them is not.
    with pytest.raises(LorasUnsupported, match="mlx"):
        _validate(tmp_path, _request(("ink", 1.0)), (lora_dir,), backend="mlx")
    assert _validate(tmp_path, _request(("ink", 1.0)), (lora_dir,), backend="tensorrt").loras
    # Without LoRAs the backend does not matter.
    assert _validate(tmp_path, _request(), (lora_dir,), backend="mlx").loras == ()


def test_listing_reads_rank_and_format_and_leaves_out_refused_files(
    lora_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_kohya(lora_dir / "huge.safetensors", 16)
    (lora_dir / "junk.safetensors").write_bytes(b"\x08\x00")
    (lora_dir / "notes.txt").write_text("not a LoRA")
    catalog = LoraCatalog(max_rank=8)
    with caplog.at_level(logging.WARNING, logger="kiln_server.lora.listing"):
        listed = catalog.list([lora_dir, tmp_path / "missing"])
        again = catalog.list([lora_dir])
    assert [(x.name, x.rank, x.format) for x in listed] == [
        ("ink", 4, "kohya"),
        ("paper", 8, "diffusers"),
    ]
    assert again == listed
    warnings = [r.getMessage() for r in caplog.records]
    # One warning per left-out file, not one per listing.
    assert len(warnings) == 3
    assert any("fuzzy" in w and "LoHa" in w for w in warnings)
    assert any("huge" in w and "rank 16" in w for w in warnings)
    # A changed file is read again.
    write_kohya(lora_dir / "huge.safetensors", 2)
    assert [x.name for x in catalog.list([lora_dir])] == ["huge", "ink", "paper"]


def test_read_header_reads_shapes_only(lora_dir: Path) -> None:
    shapes = read_header(lora_dir / "ink.safetensors")
    assert shapes[f"{MODULE}.lora_down.weight"] == [4, 64]


def test_wire_names_the_lora_entry_with_bad_utf8() -> None:
    request = pb.GenerateRequest(prompt="x", loras=[pb.LoraWeight(name="a"), pb.LoraWeight()])
    data = request.SerializeToString() + b"\xa2\x01\x03\x0a\x01\xff"  # loras[2].name = 0xff
    assert invalid_string_field(data, pb.GenerateRequest.DESCRIPTOR) == "loras[2].name"


# ------------------------------------------------------------------ client and CLI


def test_build_request_takes_names_pairs_and_mappings() -> None:
    request = build_request("x", loras=[("ink", 0.8), "paper"])
    assert [(w.name, w.scale, w.HasField("scale")) for w in request.loras] == [
        ("ink", pytest.approx(0.8), True),
        ("paper", 1.0, True),
    ]
    request = build_request("x", loras={"ink": 0})
    assert [(w.name, w.scale) for w in request.loras] == [("ink", 0.0)]
    assert not build_request("x").loras
    for bad in ("ink", [("ink", "high")], [("ink", float("nan"))], [""], [("a", 1, 2)]):
        with pytest.raises(ValueError, match="loras"):
            build_request("x", loras=bad)


def test_lora_flag_parses_name_and_scale() -> None:
    import argparse

    assert lora_flag("ink") == ("ink", 1.0)
    assert lora_flag("ink:0.25") == ("ink", 0.25)
    assert lora_flag("ink:-1") == ("ink", -1.0)
    for bad in (":1", "ink:x", "ink:nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            lora_flag(bad)


def test_generate_cli_bad_lora_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from kiln_client.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["generate", "a cat", "--lora", "ink:strong"])
    assert exited.value.code == 2
    assert "--lora" in capsys.readouterr().err


def test_format_models_lists_loras() -> None:
    response = pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                name="m",
                loras=[pb.LoraInfo(name="ink", rank=4, format="kohya")],
                max_loras_per_request=4,
            )
        ]
    )
    text = format_models(response)
    assert "ink  (rank 4, kohya)" in text
    assert "up to 4 per request" in text


# ------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def lora_server(
    tmp_path_factory: pytest.TempPathFactory, kiln_cache_dir: Path, tiny_model_path: Path
) -> Iterator[Any]:
    from conftest import start_server

    root = tmp_path_factory.mktemp("lora-api")
    folder = root / "loras"
    write_kohya(folder / "ink.safetensors", 4)
    write_loha(folder / "fuzzy.safetensors")
    make_peft_lora(tiny_model_path, folder / "paint.safetensors", rank=4, alpha=4, seed=3)
    write_text_encoder_lora(folder / "words.safetensors")
    write_text_encoder_lora(folder / "words_unet.safetensors", text_encoder=False)
    config = f"""
[server]
default_model = "tiny"

[[models]]
name = "tiny"
path = "{tiny_model_path}"
default_num_inference_steps = 2
lora_dirs = ["{folder}"]

[[models]]
name = "bare"
path = "{tiny_model_path}"
default_num_inference_steps = 2
"""
    server = start_server(
        root / "server", kiln_cache_dir, "--backend", "torch", "--metrics-port", "0", config=config
    )
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def stub(lora_server: Any) -> Iterator[pb_grpc.GenerationServiceStub]:
    channel = grpc.insecure_channel(lora_server.address)
    yield pb_grpc.GenerationServiceStub(channel)
    channel.close()


def _refusal(stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest) -> Any:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=60))
    error = caught.value
    status = rpc_status.from_call(error)
    fields: dict[str, str] = {}
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.update({v.field: v.description for v in bad.field_violations})
    return error.code(), fields


def test_server_lists_loras_with_rank_and_format(stub: pb_grpc.GenerationServiceStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=60).models}
    listed = [(x.name, x.rank, x.format) for x in models["tiny"].loras]
    assert listed == [  # not fuzzy (LoHa)
        ("ink", 4, "kohya"),
        ("paint", 4, "diffusers"),
        ("words", 2, "kohya"),
        ("words_unet", 2, "kohya"),
    ]
    assert models["tiny"].max_loras_per_request == 4
    assert list(models["bare"].loras) == []


def test_server_statuses_for_bad_loras(stub: pb_grpc.GenerationServiceStub) -> None:
    code, fields = _refusal(stub, build_request("a red circle", loras=["nope"]))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "no such LoRA file" in fields["loras[0].name"]

    code, fields = _refusal(stub, build_request("a red circle", loras=["../etc/passwd"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "path separator" in fields["loras[0].name"]

    code, fields = _refusal(stub, build_request("a red circle", loras=["ink"] * 5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 4" in fields["loras"]

    code, fields = _refusal(stub, build_request("x", model="bare", loras=["ink"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no LoRA folders" in fields["loras"]


def test_client_error_text_names_the_lora_flag(lora_server: Any) -> None:
    from kiln_client import KilnClient
    from kiln_client.errors import KilnError

    with KilnClient(lora_server.address) as client, pytest.raises(KilnError) as caught:
        client.generate("a red circle", loras=[("nope", 0.5)], timeout=60)
    text = describe_error(caught.value, lora_server.address)
    assert "loras[0].name (--lora)" in text
    assert "kiln models" in text


def write_text_encoder_lora(path: Path, *, text_encoder: bool = True) -> Path:
    """A kohya file with weights on the first text encoder's first attention block beside
    its UNet weights (fixed random values); without `text_encoder`, the same UNet weights
    alone. (diffusers' converters need a kohya text-encoder block whole, out_proj too.)"""
    generator = torch.Generator().manual_seed(7)
    tensors = {
        f"{MODULE}.lora_down.weight": torch.randn(2, 64, generator=generator),
        f"{MODULE}.lora_up.weight": torch.randn(64, 2, generator=generator),
        f"{MODULE}.alpha": torch.tensor(2.0),
    }
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj") if text_encoder else ():
        key = f"lora_te1_text_model_encoder_layers_0_self_attn_{projection}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, 32, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(32, 2, generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _image(stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest) -> bytes:
    events = list(stub.Generate(request, timeout=120))
    images = [e.image.data for e in events if e.WhichOneof("event") == "image"]
    assert len(images) == 1
    return images[0]


def test_a_lora_changes_the_image_and_scale_zero_gives_the_base_bytes(
    stub: pb_grpc.GenerationServiceStub, lora_server: Any
) -> None:
    def request(*loras: Any) -> pb.GenerateRequest:
        return build_request("a red circle", seed=5, width=32, height=32, loras=list(loras))

    base = _image(stub, request())
    painted = _image(stub, request(("paint", 1.0)))
    assert painted != base
    # The first use read the file into the stack: counted once, by the core's next report.
    scrape = scraper(metrics_port(lora_server))
    wait_until(
        lambda: value(scrape(), "kiln_lora_loads_total", model="tiny") == 1,
        what="the LoRA load to be counted",
    )
    assert _image(stub, request(("paint", 0.0))) == base
    # Concurrent requests with and without the LoRA share UNet calls, each as when alone
    # (within 1 level: a batch of other rows changes the float summation order).
    with ThreadPoolExecutor(3) as pool:
        together = list(
            pool.map(lambda r: _image(stub, r), [request(("paint", 1.0)), request(), request()])
        )
    for image, alone in zip(together, [painted, base, base], strict=True):
        difference = _pixels(image).astype(int) - _pixels(alone).astype(int)
        assert np.abs(difference).max() <= 1
    assert value(scrape(), "kiln_lora_loads_total", model="tiny") == 1  # resident since


def test_a_lora_with_text_encoder_weights_applies_them(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    def request(*loras: Any) -> pb.GenerateRequest:
        return build_request("a red circle", seed=5, width=32, height=32, loras=list(loras))

    base = _image(stub, request())
    words = _image(stub, request(("words", 1.0)))
    # words_unet holds the same UNet weights: the difference is the text-encoder part.
    assert words != _image(stub, request(("words_unet", 1.0)))
    assert _image(stub, request(("words", 0.0))) == base
    assert _image(stub, request()) == base  # the LoRA's prompt embeddings stay its own


def test_kiln_generate_lora_flag_end_to_end(lora_server: Any, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "kiln_client.cli", "generate", "a red circle",
            "--server", lora_server.address, "--lora", "paint:0.5", "--seed", "5",
            "--width", "32", "--height", "32", "--out", "out.png",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")
