"""The model library: models resident within a memory budget, loaded on first use, the
least recently used idle one unloaded for room, and the admin RPCs that show and steer it.

Eviction choices are checked on `choose_evictions` directly; everything else through a real
`kiln serve` with three names for the tiny model (each loads its own copy) and a budget
that holds one copy and a half.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_support import kinds
from gateway_support import wait_until
from PIL import Image
from test_metrics import metrics_port, scraper, value

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_client.proto.kiln.v1 import model_admin_service_pb2 as admin_pb
from kiln_client.proto.kiln.v1 import model_admin_service_pb2_grpc as admin_grpc
from kiln_server.config_file import to_bytes
from kiln_server.library.budget import Resident, choose_evictions
from kiln_server.library.memory import engine_set_bytes

RESIDENT = admin_pb.MODEL_STATE_RESIDENT
ON_DISK = admin_pb.MODEL_STATE_ON_DISK
LOADING = admin_pb.MODEL_STATE_LOADING


# ------------------------------------------------------------------ eviction choice


def test_evictions_take_least_recently_used_idle_models_until_it_fits() -> None:
    resident = [Resident("a", 40, 3.0), Resident("b", 40, 1.0), Resident("c", 40, 2.0)]
    assert choose_evictions(20, 150, resident, busy=()) == []
    assert choose_evictions(40, 150, resident, busy=()) == ["b"]
    assert choose_evictions(80, 150, resident, busy=()) == ["b", "c"]
    # A busy model is never unloaded, however old.
    assert choose_evictions(40, 150, resident, busy={"b"}) == ["c"]
    # Not enough idle memory: the load waits (None), nothing is unloaded for it.
    assert choose_evictions(100, 150, resident, busy={"a", "c"}) is None
    # No budget: everything fits.
    assert choose_evictions(10**12, 0, resident, busy=()) == []


def test_sizes_are_read_in_binary_and_decimal_units() -> None:
    assert to_bytes("24GiB") == 24 * 1024**3
    assert to_bytes("1.5 gb") == 1_500_000_000
    assert to_bytes(4096) == 4096
    for bad in ("lots", "-3", "3XB", True):
        with pytest.raises(ValueError, match="give a size"):
            to_bytes(bad)


# ------------------------------------------------------------------ a real server


SHIPPED_PREVIEW_DECODER = Path(__file__).resolve().parents[1] / "models/kiln-shapes/preview_decoder"


def _config(model_path: Path) -> str:
    entries = "\n".join(
        f"""
[[models]]
name = "{name}"
path = "{model_path}"
default_num_inference_steps = 2
default_width = 64
default_height = 64
"""
        for name in ("first", "second", "third")
    )
    # The third borrows kiln-shapes' preview decoder (the tiny model has none).
    entries += f'preview_decoder = "{SHIPPED_PREVIEW_DECODER}"\n'
    return f'[server]\ndefault_model = "first"\n{entries}'


@pytest.fixture(scope="module")
def model_bytes(tiny_pipeline: Any) -> int:
    """What one copy of the tiny model holds, counted as the server counts it."""
    return engine_set_bytes(tiny_pipeline.engines)


@pytest.fixture(scope="module")
def library_server(
    tmp_path_factory: pytest.TempPathFactory,
    kiln_cache_dir: Path,
    tiny_model_path: Path,
    model_bytes: int,
) -> Iterator[Any]:
    from conftest import start_server

    root = tmp_path_factory.mktemp("library")
    server = start_server(
        root,
        kiln_cache_dir,
        "--backend",
        "torch",
        "--model-memory-budget",
        str(int(model_bytes * 1.5)),
        "--metrics-port",
        "0",
        config=_config(tiny_model_path),
    )
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def stubs(library_server: Any) -> Iterator[tuple[pb_grpc.GenerationServiceStub, Any]]:
    channel = grpc.insecure_channel(library_server.address)
    yield pb_grpc.GenerationServiceStub(channel), admin_grpc.ModelAdminServiceStub(channel)
    channel.close()


def _pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


def _states(admin: Any) -> dict[str, admin_pb.ModelStatus]:
    reply = admin.ListModelStates(admin_pb.ListModelStatesRequest(), timeout=30)
    return {status.name: status for status in reply.models}


def _generate(stub: pb_grpc.GenerationServiceStub, model: str, **fields: Any) -> list[Any]:
    request = pb.GenerateRequest(model=model, prompt="a red circle", seed=7, **fields)
    return list(stub.Generate(request, timeout=120))


def test_start_up_keeps_what_fits_and_reports_every_model(stubs: Any, model_bytes: int) -> None:
    _, admin = stubs
    reply = admin.ListModelStates(admin_pb.ListModelStatesRequest(), timeout=30)
    states = {status.name: status for status in reply.models}
    assert reply.device == "cpu"
    assert reply.memory_budget_bytes == int(model_bytes * 1.5)
    assert states["first"].state == RESIDENT
    assert states["first"].memory_bytes == model_bytes
    assert reply.memory_used_bytes == model_bytes
    # The others were loaded once to check them, then left on disk.
    for name in ("second", "third"):
        assert states[name].state == ON_DISK
        assert states[name].loads == 1
        assert states[name].memory_bytes == 0


def test_a_configured_preview_decoder_is_served(stubs: Any) -> None:
    """Same weights, another preview decoder: the same image, other previews."""
    stub, _ = stubs
    preview = pb.PreviewOptions(every_n_steps=1, method=pb.PREVIEW_METHOD_DECODER)
    runs = {name: _generate(stub, name, preview=preview) for name in ("first", "third")}
    previews = {
        n: [e.progress.preview for e in r if e.HasField("progress")] for n, r in runs.items()
    }
    images = {n: [e.image.data for e in r if e.HasField("image")] for n, r in runs.items()}
    assert all(previews["first"]) and all(previews["third"])
    assert previews["first"] != previews["third"]
    assert _pixels(images["first"][0]) == _pixels(images["third"][0])


def test_first_use_loads_the_model_queued_and_unloads_the_idle_one(
    stubs: Any, library_server: Any, model_bytes: int
) -> None:
    stub, admin = stubs
    admin.LoadModel(admin_pb.LoadModelRequest(model="first"), timeout=120)
    scrape = scraper(metrics_port(library_server))
    loads_before = value(scrape(), "kiln_model_loads_total", model="second", backend="torch")
    events = _generate(stub, "second")
    assert kinds(events)[0] == "queued"
    assert kinds(events)[-1] == "completed"
    assert "image" in kinds(events)
    states = _states(admin)
    assert states["second"].state == RESIDENT
    assert states["second"].loads >= 2
    assert states["first"].state == ON_DISK  # least recently used and idle: unloaded

    def counted(samples: Any) -> bool:
        loads = value(samples, "kiln_model_loads_total", model="second", backend="torch")
        return loads == loads_before + 1 and value(
            samples, "kiln_model_memory_bytes", model="second"
        ) == float(model_bytes)

    wait_until(lambda: counted(scrape()), what="the load to reach the metrics")
    assert value(scrape(), "kiln_model_resident", model="first") == 0


def test_the_same_request_gives_the_same_image_after_a_reload(stubs: Any) -> None:
    stub, admin = stubs
    first = [e.image.data for e in _generate(stub, "third") if e.HasField("image")]
    admin.LoadModel(admin_pb.LoadModelRequest(model="first"), timeout=120)
    assert _states(admin)["third"].state == ON_DISK
    again = [e.image.data for e in _generate(stub, "third") if e.HasField("image")]
    assert first == again


def test_requests_for_every_model_at_once_all_complete(stubs: Any) -> None:
    stub, _ = stubs
    names = ["first", "second", "third"] * 2
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda name: _generate(stub, name), names))
    for events in results:
        assert kinds(events)[-1] == "completed"


def test_load_and_unload_through_the_admin_api(stubs: Any) -> None:
    _, admin = stubs
    admin.LoadModel(admin_pb.LoadModelRequest(model="second"), timeout=120)
    reply = admin.LoadModel(admin_pb.LoadModelRequest(model="third"), timeout=120)
    assert reply.status.state == RESIDENT
    assert list(reply.unloaded) == ["second"]
    unloaded = admin.UnloadModel(admin_pb.UnloadModelRequest(model="third"), timeout=30)
    assert unloaded.status.state == ON_DISK
    # Unloading what is not resident is already done.
    again = admin.UnloadModel(admin_pb.UnloadModelRequest(model="third"), timeout=30)
    assert again.status.state == ON_DISK


def test_admin_refusals_name_the_problem(stubs: Any) -> None:
    _, admin = stubs
    cases = [
        (admin.LoadModel, admin_pb.LoadModelRequest(), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (
            admin.LoadModel,
            admin_pb.LoadModelRequest(model="nope"),
            grpc.StatusCode.NOT_FOUND,
            "configured: first, second, third",
        ),
        (
            admin.UnloadModel,
            admin_pb.UnloadModelRequest(model="../etc"),
            grpc.StatusCode.NOT_FOUND,
            "no configured model",
        ),
    ]
    for method, request, code, words in cases:
        with pytest.raises(grpc.RpcError) as caught:
            method(request, timeout=30)
        assert caught.value.code() == code
        assert words in caught.value.details()


def test_a_busy_model_is_not_unloaded(stubs: Any) -> None:
    stub, admin = stubs
    admin.LoadModel(admin_pb.LoadModelRequest(model="first"), timeout=120)
    request = pb.GenerateRequest(
        model="first", prompt="a blue square", seed=1, num_inference_steps=150
    )
    call = stub.Generate(request, timeout=300)
    try:
        for event in call:
            if event.HasField("progress"):
                break
        with pytest.raises(grpc.RpcError) as caught:
            admin.UnloadModel(admin_pb.UnloadModelRequest(model="first"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "queued or running" in caught.value.details()
        assert _states(admin)["first"].active_requests == 1
    finally:
        call.cancel()


def test_loading_one_model_does_not_stall_another(
    tmp_path: Path, kiln_cache_dir: Path, tiny_model_path: Path, model_bytes: int
) -> None:
    """With room for two, a long generation of one model keeps stepping while the other
    loads: progress events arrive between the first LOADING and RESIDENT seen."""
    from conftest import start_server

    server = start_server(
        tmp_path,
        kiln_cache_dir,
        "--backend",
        "torch",
        "--model-memory-budget",
        str(int(model_bytes * 2.5)),
        config=_config(tiny_model_path),
    )
    try:
        channel = grpc.insecure_channel(server.address)
        stub, admin = (
            pb_grpc.GenerationServiceStub(channel),
            admin_grpc.ModelAdminServiceStub(channel),
        )
        admin.UnloadModel(admin_pb.UnloadModelRequest(model="second"), timeout=30)
        progress_times: list[float] = []
        started = threading.Event()

        def long_generation() -> None:
            request = pb.GenerateRequest(
                model="first", prompt="a red circle", seed=3, num_inference_steps=150
            )
            for event in stub.Generate(request, timeout=300):
                if event.HasField("progress"):
                    progress_times.append(time.monotonic())
                    started.set()

        worker = threading.Thread(target=long_generation)
        worker.start()
        assert started.wait(120)
        loading_seen: float | None = None
        loader = ThreadPoolExecutor(1).submit(
            admin.LoadModel, admin_pb.LoadModelRequest(model="second"), timeout=120
        )
        while not loader.done():
            if _states(admin)["second"].state == LOADING and loading_seen is None:
                loading_seen = time.monotonic()
            time.sleep(0.01)
        resident_seen = time.monotonic()
        assert loader.result().status.state == RESIDENT
        worker.join(300)
        assert loading_seen is not None
        assert any(loading_seen <= t <= resident_seen for t in progress_times)
        channel.close()
    finally:
        server.terminate()


def test_a_default_model_larger_than_the_budget_stops_start_up(
    tmp_path: Path, kiln_cache_dir: Path, tiny_model_path: Path, model_bytes: int
) -> None:
    from conftest import start_server

    server = start_server(
        tmp_path,
        kiln_cache_dir,
        "--backend",
        "torch",
        "--model-memory-budget",
        str(model_bytes // 2),
        config=_config(tiny_model_path),
        wait_serving=False,
    )
    assert server.process.wait(timeout=180) != 0
    logs = server.logs()
    assert "the default model 'first' needs" in logs
    assert "--model-memory-budget" in logs
