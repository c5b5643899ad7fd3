"""LoRA imports into the server's cache: ModelAdminService.GetImportedLora and ImportLora.

A real `kiln serve` (tokens on, a LoRA folder for model `tiny`, its own LoRA cache folder)
takes imports through the admin client and raw gRPC streams; the imported LoRA is then
listed by ListModels and applied by name in Generate. The cache's size limit (least
recently used files removed first) is tested on `LoraCache` directly.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from lora_support import make_peft_lora
from safetensors.torch import save, save_file
from test_lora_api import write_kohya, write_loha

from kiln_client.admin import KilnAdminClient
from kiln_client.errors import (
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    ResourceExhausted,
)
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_client.proto.kiln.v1 import model_admin_service_pb2 as admin_pb
from kiln_client.proto.kiln.v1 import model_admin_service_pb2_grpc as admin_grpc
from kiln_client.requests import build_request
from kiln_server.lora.imports import ImportRefused, LoraCache, lora_name

APP = "app-token"
ROOT = "root-token"
CACHE_BYTES = 4 * 1024 * 1024
MAX_RANK = 4


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> dict[str, Path]:
    """LoRA files to import: a PEFT one (also in the model's folder as `paint`), a kohya
    one, one over the maximum rank and a LoHa."""
    root = tmp_path_factory.mktemp("lora-files")
    paint = make_peft_lora(tiny_model_path, root / "paint.safetensors", rank=4, alpha=4, seed=3)
    return {
        "paint": paint.path,
        "ink": write_kohya(root / "ink.safetensors", 2),
        "wide": write_kohya(root / "wide.safetensors", 8),
        "loha": write_loha(root / "loha.safetensors"),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's folder: its config, LoRA folder and LoRA cache (`cache/`)."""
    return tmp_path_factory.mktemp("lora-imports")


@pytest.fixture(scope="module")
def server(
    root: Path, kiln_cache_dir: Path, tiny_model_path: Path, loras: dict[str, Path]
) -> Iterator[Any]:
    from conftest import start_server

    folder = root / "loras"
    folder.mkdir()
    shutil.copy(loras["paint"], folder / "paint.safetensors")
    config = f"""
[server]
default_model = "tiny"
api_tokens = ["{APP}", "{ROOT}:generate+admin"]

[[models]]
name = "tiny"
path = "{tiny_model_path}"
default_num_inference_steps = 2
lora_dirs = ["{folder}"]
"""
    server = start_server(
        root / "server",
        kiln_cache_dir,
        "--backend",
        "torch",
        "--lora-cache-dir",
        str(root / "cache"),
        "--lora-cache-size",
        str(CACHE_BYTES),
        "--max-lora-rank",
        str(MAX_RANK),
        config=config,
    )
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def admin(server: Any) -> Iterator[KilnAdminClient]:
    with KilnAdminClient(server.address, token=ROOT, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server: Any) -> Iterator[admin_grpc.ModelAdminServiceStub]:
    channel = grpc.insecure_channel(server.address)
    yield admin_grpc.ModelAdminServiceStub(channel)
    channel.close()


ROOT_METADATA = (("authorization", f"Bearer {ROOT}"),)


def _violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    fields: dict[str, str] = {}
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.update({v.field: v.description for v in bad.field_violations})
    return fields


def _refused(
    stub: admin_grpc.ModelAdminServiceStub, messages: list[admin_pb.ImportLoraRequest]
) -> tuple[grpc.StatusCode, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ImportLora(iter(messages), timeout=60, metadata=ROOT_METADATA)
    return caught.value.code(), _violations(caught.value)


def header(size: int, source: str = "") -> admin_pb.ImportLoraRequest:
    return admin_pb.ImportLoraRequest(
        header=admin_pb.ImportLoraHeader(source=source, size_bytes=size)
    )


def chunk(data: bytes) -> admin_pb.ImportLoraRequest:
    return admin_pb.ImportLoraRequest(chunk=data)


def _image(server: Any, request: pb.GenerateRequest) -> bytes:
    with grpc.insecure_channel(server.address) as channel:
        events = pb_grpc.GenerationServiceStub(channel).Generate(
            request, timeout=120, metadata=(("authorization", f"Bearer {APP}"),)
        )
        images = [e.image.data for e in events if e.WhichOneof("event") == "image"]
    assert len(images) == 1
    return images[0]


def test_import_then_find_generate_and_list(
    server: Any, root: Path, admin: KilnAdminClient, loras: dict[str, Path]
) -> None:
    url = "https://example.com/loras/paint.safetensors"
    assert admin.get_imported_lora(url) is None

    first = admin.import_lora(loras["paint"], source=url)
    data = loras["paint"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert first.lora.name == f"sha256-{sha[:16]}"
    assert (first.lora.sha256, first.lora.size_bytes) == (sha, len(data))
    assert (first.lora.rank, first.lora.format) == (4, "diffusers")
    assert not first.already_present
    assert (root / "cache" / f"{first.lora.name}.safetensors").read_bytes() == data

    again = admin.import_lora(data, source="https://mirror.example.org/p.safetensors")
    assert again.already_present and again.lora == first.lora
    assert admin.get_imported_lora(url) == first.lora
    assert admin.get_imported_lora("https://mirror.example.org/p.safetensors") == first.lora

    with grpc.insecure_channel(server.address) as channel:
        listed = pb_grpc.GenerationServiceStub(channel).ListModels(
            pb.ListModelsRequest(), timeout=60, metadata=(("authorization", f"Bearer {APP}"),)
        )
    names = {lora.name: lora for lora in listed.models[0].loras}
    assert names[first.lora.name].rank == 4 and "paint" in names

    # The imported file is the model folder's `paint`, byte for byte: the same image.
    def request(name: str) -> pb.GenerateRequest:
        return build_request("a red circle", seed=5, width=32, height=32, loras=[(name, 1.0)])

    assert _image(server, request(first.lora.name)) == _image(server, request("paint"))


def test_kohya_file_imports_from_a_path_in_chunks(
    admin: KilnAdminClient, loras: dict[str, Path]
) -> None:
    imported = admin.import_lora(str(loras["ink"]))
    assert (imported.lora.rank, imported.lora.format) == (2, "kohya")


def test_a_generate_token_is_denied(server: Any, loras: dict[str, Path]) -> None:
    with KilnAdminClient(server.address, token=APP, timeout=60) as app:
        with pytest.raises(PermissionDenied, match="`admin` scope"):
            app.get_imported_lora("https://example.com/x.safetensors")
        with pytest.raises(PermissionDenied, match="`admin` scope"):
            app.import_lora(loras["ink"])


def test_reflection_lists_the_admin_service(server: Any) -> None:
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "kiln.v1.ModelAdminService" in database.get_services()
        descriptor = database.FindFileContainingSymbol("kiln.v1.ModelAdminService")
    (service,) = [s for s in descriptor.service if s.name == "ModelAdminService"]
    methods = {method.name: method for method in service.method}
    assert {"GetImportedLora", "ImportLora"} <= set(methods)
    assert methods["ImportLora"].client_streaming


def test_the_admin_client_reaches_the_model_library(admin: KilnAdminClient) -> None:
    states = admin.list_model_states()
    assert [status.name for status in states.models] == ["tiny"]
    with pytest.raises(ModelNotFound, match="nope"):
        admin.load_model("nope")
    with pytest.raises(ModelNotFound, match="nope"):
        admin.unload_model("nope")


def test_bad_streams_are_refused_naming_the_part(
    stub: admin_grpc.ModelAdminServiceStub, loras: dict[str, Path], root: Path
) -> None:
    data = loras["ink"].read_bytes()

    code, fields = _refused(stub, [chunk(data), header(len(data))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must be the header" in fields["header"]

    code, fields = _refused(stub, [header(len(data)), header(len(data)), chunk(data)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sent twice" in fields["header"]

    code, fields = _refused(stub, [])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no header" in fields["header"]

    code, fields = _refused(stub, [header(len(data) + 5), chunk(data)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"carried {len(data)}" in fields["header.size_bytes"]

    code, fields = _refused(stub, [header(len(data) - 5), chunk(data)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "carries more" in fields["header.size_bytes"]

    code, fields = _refused(stub, [header(0)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than 0" in fields["header.size_bytes"]

    code, fields = _refused(stub, [header(2 * 1024 * 1024), chunk(b"x" * (2 * 1024 * 1024))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1 MiB" in fields["chunk"]

    code, fields = _refused(stub, [header(CACHE_BYTES + 1)])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--lora-cache-size" in fields["header.size_bytes"]

    def content_refusal(payload: bytes) -> str:
        code, fields = _refused(stub, [header(len(payload)), chunk(payload)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        return fields["content"]

    assert "not a readable .safetensors" in content_refusal(b"\x00" * 64)
    assert "not a readable .safetensors" in content_refusal(data[:-4] + b"\x00\x00")
    assert f"above the maximum LoRA rank {MAX_RANK}" in content_refusal(loras["wide"].read_bytes())
    assert "LoHa" in content_refusal(loras["loha"].read_bytes())
    # Nothing refused was kept, not even a temporary file.
    kept = sorted(path.name for path in (root / "cache").iterdir())
    assert all(name.startswith("sha256-") or name == ".kiln-imports.json" for name in kept), kept


def test_client_errors_are_typed(admin: KilnAdminClient, loras: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        admin.import_lora(loras["loha"].read_bytes())
    assert "LoHa" in dict(caught.value.field_violations)["content"]
    with pytest.raises(ResourceExhausted):
        admin.import_lora(b"\x00" * (CACHE_BYTES + 1))
    with pytest.raises(FileNotFoundError, match="not a file"):
        admin.import_lora("/nonexistent/style.safetensors")


def _big_kohya(seed: int) -> bytes:
    """A valid rank-4 kohya LoRA of about 1.5 MiB (one wide module), distinct per seed."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "lora_unet_wide.lora_down.weight": torch.randn(4, 98304, generator=generator),
        "lora_unet_wide.lora_up.weight": torch.randn(64, 4, generator=generator),
    }
    return save(tensors)


def test_the_server_keeps_its_cache_within_the_size_by_last_use(
    server: Any, admin: KilnAdminClient, root: Path
) -> None:
    first, second, third = (_big_kohya(seed) for seed in (1, 2, 3))
    assert 2 * len(first) < CACHE_BYTES < 3 * len(first)
    kept = admin.import_lora(first, source="https://example.com/first").lora
    dropped = admin.import_lora(second, source="https://example.com/second").lora
    assert admin.get_imported_lora("https://example.com/first") == kept  # used again
    newest = admin.import_lora(third, source="https://example.com/third").lora

    assert admin.get_imported_lora("https://example.com/second") is None
    assert not (root / "cache" / f"{dropped.name}.safetensors").exists()
    assert admin.get_imported_lora("https://example.com/first") == kept
    stored = sum(path.stat().st_size for path in (root / "cache").glob("sha256-*"))
    assert stored <= CACHE_BYTES
    with grpc.insecure_channel(server.address) as channel:
        listed = pb_grpc.GenerationServiceStub(channel).ListModels(
            pb.ListModelsRequest(), timeout=60, metadata=(("authorization", f"Bearer {APP}"),)
        )
    names = {lora.name for lora in listed.models[0].loras}
    assert {kept.name, newest.name} <= names and dropped.name not in names


# ------------------------------------------------------------------ the cache alone


def _lora_bytes(folder: Path, seed: int) -> bytes:
    torch.manual_seed(seed)
    path = folder / f"l{seed}.safetensors"
    save_file(
        {
            "lora_unet_x.lora_down.weight": torch.randn(2, 256),
            "lora_unet_x.lora_up.weight": torch.randn(256, 2),
        },
        str(path),
    )
    return path.read_bytes()


def _import(cache: LoraCache, data: bytes, source: str = "") -> str:
    pending = cache.begin(source, len(data))
    try:
        pending.write(data)
        return pending.finish().lora.name
    finally:
        pending.discard()


def test_cache_removes_the_least_recently_used_to_stay_in_size(tmp_path: Path) -> None:
    files = [_lora_bytes(tmp_path, seed) for seed in range(4)]
    size = len(files[0])
    cache = LoraCache(tmp_path / "cache", max_bytes=3 * size, max_rank=8)
    first, second, third = (_import(cache, data, f"u{i}") for i, data in enumerate(files[:3]))
    assert cache.lookup("u0") is not None  # `first` is now the most recently used
    in_progress = cache.begin("u-late", size)
    in_progress.write(files[0][: size // 2])
    fourth = _import(cache, files[3], "u3")
    assert cache.names() == [third, first, fourth]
    assert not (tmp_path / "cache" / f"{second}.safetensors").exists()
    assert cache.lookup("u1") is None
    assert cache.total_bytes() == 3 * size
    assert in_progress.temp.exists()  # an import being written is never removed
    in_progress.discard()
    assert fourth == lora_name(hashlib.sha256(files[3]).hexdigest())

    # A restarted server finds the same cache, sources included.
    reopened = LoraCache(tmp_path / "cache", max_bytes=3 * size, max_rank=8)
    assert reopened.names() == [third, first, fourth]
    found = reopened.lookup("u3")
    assert found is not None and found.name == fourth
    # A smaller size at the next start removes the least recently used at once.
    smaller = LoraCache(tmp_path / "cache", max_bytes=size, max_rank=8)
    assert smaller.names() == [fourth]
    assert sorted(p.name for p in (tmp_path / "cache").glob("sha256-*")) == [
        f"{fourth}.safetensors"
    ]


def test_concurrent_imports_of_the_same_bytes_store_one_file(tmp_path: Path) -> None:
    data = _lora_bytes(tmp_path, 7)
    cache = LoraCache(tmp_path / "cache", max_bytes=10 * len(data), max_rank=8)
    one, two = cache.begin("a", len(data)), cache.begin("b", len(data))
    one.write(data[:100])
    two.write(data[:100])
    one.write(data[100:])
    two.write(data[100:])
    results = [two.finish(), one.finish()]
    assert [result.already_present for result in results] == [False, True]
    assert results[0].lora == results[1].lora
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [
        ".kiln-imports.json",
        f"{results[0].lora.name}.safetensors",
    ]
    assert cache.lookup("a") == cache.lookup("b") == results[0].lora


def test_cache_refuses_what_it_cannot_hold(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, max_bytes=100, max_rank=8)
    with pytest.raises(ImportRefused) as caught:
        cache.begin("", 101)
    assert caught.value.kind == "too_large" and caught.value.field == "header.size_bytes"
    with pytest.raises(ImportRefused, match="characters"):
        cache.begin("x" * 5000, 10)
